"""A fleet stack for tests and benchmarks/fleet.py: a Prefect server on a PostgreSQL cluster,
the work pool, prefect.yaml's fleet deployments, the per-endpoint limits and the crashed-runs automation,
N process workers; plus local VMs and the fleet run as a client process. Everything through
deployments/ (the scripts an operator runs), stopped by PID."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deployments import workers as fleet_workers
from deployments.limits import setup as setup_limits
from providers.sources.local import create_vm
from tests.fixtures.prefect_server import free_port, prefect_env, stop

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# prefect.yaml's fleet deployments: only these (no schedule, no trigger runs beside the fleet)
FLEET_DEPLOYMENTS = ("fleet-member", "fleet", "migrate-fleet")


@dataclass
class Stack:
    api: str
    env: dict[str, str]
    source: str
    target: str
    home: Path
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)


def make_vms(vms_dir: Path, names: list[str]) -> None:
    """Small VMs: 2 MiB disks holding data, a hole, data."""
    for i, vm in enumerate(names):
        vm_dir = create_vm(vms_dir, vm, {"disk0": 2 * MiB})
        with open(vm_dir / "disk0.img", "r+b") as f:
            f.write(random.Random(i).randbytes(192 * 1024))
            f.seek(MiB + 4096)
            f.write(f"{vm} ".encode() * 20000)


def _run(cmd: list[str], env: dict, timeout: float = 300) -> None:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {done.stdout[-3000:]}{done.stderr[-3000:]}")


@contextlib.contextmanager
def fleet_stack(
    db_url: str,
    workdir: Path,
    workers: int,
    source_limit: int,
    zombie_after: int = 50,
    worker_limit: int = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    home = workdir / "hshome"
    (home / "vms").mkdir(parents=True, exist_ok=True)
    source, target = f"local://{home / 'vms'}", f"file://{home / 'exports'}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {
        **prefect_env(workdir / "prefect-home"),
        "HYPERSDK_HOME": str(home),
        "HYPERSDK_PREFECT_SERVER": "off",
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT2S",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
        **(extra_env or {}),
    }
    server = fleet_workers.start_server(
        port, fleet_workers.server_env(db_url, base), workdir / "server.log", ROOT
    )
    stack = Stack(api, fleet_workers.worker_env(api, base), source, target, home, workdir)
    try:
        prefect = str(Path(sys.executable).with_name("prefect"))
        _run([prefect, "work-pool", "create", "hypersdk-local", "--type", "process"], stack.env)
        _run(
            [prefect, "--no-prompt", "deploy", "--prefect-file", "prefect.yaml"]
            + [arg for name in FLEET_DEPLOYMENTS for arg in ("--name", name)],
            stack.env,
        )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            setup_limits({source: source_limit}, {target: 1000}, zombie_after=zombie_after)
        for i in range(1, workers + 1):
            stack.workers.append(
                fleet_workers.start_worker(
                    f"worker-{i}",
                    stack.env,
                    workdir / f"worker-{i}.log",
                    workdir,
                    limit=worker_limit,
                )
            )
        yield stack
    finally:
        for w in stack.workers:
            stop(w)
        stop(server)


def start_fleet(stack: Stack, vms: list[str], log: Path, **params) -> subprocess.Popen:
    """backup_fleet over ``vms`` as a client process (like `hyperctl`); exit 0 iff Completed."""
    args = {"source": stack.source, "target": stack.target, **params}
    code = (
        "import json, sys; from flows.fleet import backup_fleet; "
        "s = backup_fleet(vms=sys.argv[1].split(','), **json.loads(sys.argv[2]), "
        "return_state=True); print('FLEET', s.type.value, s.message); "
        "sys.exit(0 if s.is_completed() else 1)"
    )
    import json

    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, ",".join(vms), json.dumps(args)],
            env=stack.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
