"""A Prefect server on PostgreSQL and N process workers on this machine (docs/fleet.md).

    python -m deployments.postgres start --dir /srv/hypersdk-pg --port 5433
    python -m deployments.workers start --run-dir /srv/hypersdk-run --workers 3 \
        --db-url postgresql+asyncpg://prefect@127.0.0.1:5433/prefect --port 4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.bootstrap
    python -m deployments.workers stop --run-dir /srv/hypersdk-run

Each process gets its own session (a SIGTERM to the script's terminal does not reach them) and
its PID in ``<run-dir>/<name>.pid``; ``stop`` ends them by those PIDs (SIGTERM, then SIGKILL).
Workers run with the settings a fleet needs: flow run heartbeats every HEARTBEAT_SECONDS (so
the ``hypersdk-crashed-runs`` automation finds runs whose worker died), and
HYPERSDK_REQUIRE_LIMITS=1 (an export refuses to run when its source's concurrency limit is
missing instead of hitting the source unbounded). More machines: run ``prefect worker start``
with the same environment and PREFECT_API_URL on each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deployments.processes import stop_pid

CHECKOUT = Path(__file__).resolve().parent.parent
WORK_POOL = "hypersdk-local"
HEARTBEAT_SECONDS = 30  # Prefect's minimum; the default is 180


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _spawn(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def server_env(db_url: str, base: dict | None = None) -> dict[str, str]:
    """The server's environment: its database, no analytics."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


def worker_env(api_url: str, base: dict | None = None, **extra: str) -> dict[str, str]:
    """A fleet worker's environment (see the module doc)."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
            "HYPERSDK_REQUIRE_LIMITS": "1",
            "HYPERSDK_CHECKOUT": str(CHECKOUT),
            # `python` in a deployment's command (prefect.yaml's fleet-member) is this venv's
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    env.update(extra)
    return env


def start_server(
    port: int, env: dict, log: Path, cwd: Path, timeout: float = 180
) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port; returns once /api/health answers."""
    proc = _spawn(
        [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        log,
        cwd,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not answer in {timeout:g} s")
        time.sleep(0.5)


def start_worker(
    name: str, env: dict, log: Path, cwd: Path, pool: str = WORK_POOL, limit: int = 2
) -> subprocess.Popen:
    """One process worker of ``pool`` running at most ``limit`` flow runs at once."""
    return _spawn(
        [
            _prefect(),
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--name",
            name,
            "--limit",
            str(limit),
        ],
        env,
        log,
        cwd,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.workers", description=__doc__)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--run-dir", required=True, help="PID files and logs")
    parser.add_argument("--db-url", help="PostgreSQL URL (start): postgresql+asyncpg://...")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit", type=int, default=2, help="flow runs per worker at once")
    parser.add_argument("--pool", default=WORK_POOL)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).absolute()
    if args.action == "stop":
        for pid_file in sorted(run_dir.glob("*.pid"), reverse=True):  # workers, then server
            with contextlib.suppress(ValueError, OSError):
                stop_pid(int(pid_file.read_text()))
            pid_file.unlink(missing_ok=True)
        return 0
    if not args.db_url:
        parser.error("start needs --db-url")
    run_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(args.port, server_env(args.db_url), run_dir / "server.log", run_dir)
    (run_dir / "0-server.pid").write_text(str(server.pid))
    api = f"http://127.0.0.1:{args.port}/api"
    print(f"Prefect server {server.pid}: PREFECT_API_URL={api}")
    created = subprocess.run(
        [_prefect(), "work-pool", "create", args.pool, "--type", "process"],
        env=worker_env(api),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if created.returncode != 0 and "already exists" not in created.stdout + created.stderr:
        print(created.stdout + created.stderr, file=sys.stderr)
        return created.returncode
    for i in range(1, args.workers + 1):
        name = f"worker-{i}"
        proc = start_worker(
            name, worker_env(api), run_dir / f"{name}.log", run_dir, args.pool, args.limit
        )
        (run_dir / f"1-{name}.pid").write_text(str(proc.pid))
        print(f"worker {name}: {proc.pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
