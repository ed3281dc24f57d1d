"""First-run benchmark (the local-server issue's acceptance check): ``hyperctl demo`` as a new
user runs it, on a machine kept busy by CPU-bound processes.

    python -m benchmarks.first_run [--first-runs 5] [--warm-runs 5] [--hogs 2] [--port N]
                                   [--dir /var/tmp/hsfirst]

1. ``--first-runs`` times: a fresh HYPERSDK_HOME and a fresh PREFECT_HOME (a new database to
   migrate), one ``hyperctl demo``, then ``hyperctl server stop``. Every one must succeed.
2. One more fresh pair: a first run to warm it up, then ``--warm-runs`` runs against the warm
   server (median and max reported), then stop.

``--hogs`` busy-loop processes run beside it the whole time (stopped at the end, by PID). The
server listens on a free port unless ``--port`` says otherwise, so another server on 4200 (a
colleague's ``make server``) is not mistaken for ours. Exit status 1 if any first run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._util import hyperctl

_CLEAN = (
    "PREFECT_API_URL",
    "PREFECT_UI_URL",
    "PREFECT_PROFILE",
    "PREFECT_PROFILES_PATH",
    "HYPERSDK_PREFECT_SERVER",
    "HYPERSDK_EPHEMERAL_OWNER",
)


@dataclass
class Run:
    kind: str
    wall: float
    code: int
    api: str  # managed (a server was recorded and answers) or ephemeral
    server_s: float | None  # how long the managed server took to answer, if this run started it
    note: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(
        HYPERSDK_HOME=str(root / "hshome"),
        PREFECT_HOME=str(root / "prefecthome"),
        HYPERSDK_PREFECT_PORT=str(port),
    )
    return env


def _api_used(env: dict[str, str]) -> tuple[str, float | None]:
    """("managed", its start time) if a recorded server answers, else ("ephemeral", None)."""
    state = Path(env["HYPERSDK_HOME"]) / "prefect" / "server.json"
    try:
        record = json.loads(state.read_text())
    except (OSError, ValueError):
        return "ephemeral", None
    from hypersdk.localapi import healthy

    if not isinstance(record, dict) or not healthy(str(record.get("url"))):
        return "ephemeral", None
    return "managed", record.get("ready_after")


def _run(argv: list[str], env: dict[str, str], kind: str, timeout: float) -> Run:
    started = time.perf_counter()
    try:
        res = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        code, err = res.returncode, res.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = -1, f"timed out after {timeout:.0f} s {exc.stderr or ''}"
    wall = time.perf_counter() - started
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    note = (lines[-1] if code else next((ln for ln in lines if "Prefect" in ln), ""))[:70]
    api, server_s = _api_used(env)
    started_here = any("starting a local Prefect server" in ln for ln in lines)
    return Run(kind, wall, code, api, server_s if started_here else None, note)


def _stop(env: dict[str, str]) -> None:
    subprocess.run(
        [hyperctl(), "server", "stop"], env=env, capture_output=True, timeout=120, check=False
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first-runs", type=int, default=5)
    ap.add_argument("--warm-runs", type=int, default=5)
    ap.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the runs")
    ap.add_argument("--port", type=int, help="the server's port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=600, help="per run")
    ap.add_argument("--dir", type=Path, help="where the fresh homes go (default: a temp dir)")
    args = ap.parse_args()

    argv = [hyperctl(), "demo"]
    base = Path(tempfile.mkdtemp(prefix="hsfirst-", dir=args.dir))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    runs: list[Run] = []
    try:
        for i in range(args.first_runs):
            root = base / f"first{i}"
            env = _env(root, args.port or _free_port())
            try:
                runs.append(_run(argv, env, "first", args.timeout))
            finally:
                _stop(env)
                shutil.rmtree(root, ignore_errors=True)
            print(f"first run {i + 1}/{args.first_runs}: {runs[-1].wall:.1f} s", file=sys.stderr)
        if args.warm_runs:
            root = base / "warm"
            env = _env(root, args.port or _free_port())
            try:
                runs.append(_run(argv, env, "warm-up", args.timeout))
                for _ in range(args.warm_runs):
                    runs.append(_run(argv, env, "warm", args.timeout))
            finally:
                _stop(env)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
            hog.wait()
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nhyperctl demo, {args.hogs} CPU-bound processes beside it, {os.cpu_count()} CPUs")
    print(f"{'run':<5}{'kind':<9}{'wall s':>8}{'exit':>6}  {'API':<10}{'server s':>9}  note")
    for n, r in enumerate(runs, 1):
        server = f"{r.server_s:.1f}" if r.server_s is not None else "-"
        print(f"{n:<5}{r.kind:<9}{r.wall:>8.1f}{r.code:>6}  {r.api:<10}{server:>9}  {r.note}")
    firsts = [r for r in runs if r.kind == "first"]
    warm = [r.wall for r in runs if r.kind == "warm" and r.code == 0]
    failed = [r for r in firsts if r.code != 0]
    if firsts:
        walls = [r.wall for r in firsts]
        print(
            f"\nfirst runs: {len(firsts) - len(failed)}/{len(firsts)} succeeded, "
            f"median {statistics.median(walls):.1f} s, max {max(walls):.1f} s"
        )
    if warm:
        print(f"warm runs:  median {statistics.median(warm):.1f} s, max {max(warm):.1f} s")
    print("(server s: from `prefect server start` to a healthy /api/health, in that run)")
    return 1 if failed or any(r.code for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
