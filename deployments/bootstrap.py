"""Create the work pool and its priority queues (deployments/queues.py), and deploy every
deployment in prefect.yaml, pointing them at this checkout.

Usage: ``python -m deployments.bootstrap`` (what ``make deploy`` runs) with PREFECT_API_URL set to a
running server. Idempotent: re-running updates the deployments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
WORK_POOL = "hypersdk-local"


def prefect(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run(
        [str(exe), *args], cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300
    )


def main() -> int:
    env = {**os.environ, "HYPERSDK_CHECKOUT": str(CHECKOUT)}
    if not env.get("PREFECT_API_URL"):
        print(
            "PREFECT_API_URL is not set: start a server (make server) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    pool = prefect("work-pool", "inspect", WORK_POOL, env=env)
    if pool.returncode != 0:
        created = prefect("work-pool", "create", WORK_POOL, "--type", "process", env=env)
        if created.returncode != 0:
            print(created.stdout + created.stderr, file=sys.stderr)
            return created.returncode
    from deployments.queues import main as work_queues  # urgent, default, bulk

    if (queued := work_queues()) != 0:
        return queued
    deployed = prefect(
        "--no-prompt", "deploy", "--all", "--prefect-file", str(CHECKOUT / "prefect.yaml"), env=env
    )
    print(deployed.stdout)
    if deployed.returncode != 0:
        print(deployed.stderr, file=sys.stderr)
        return deployed.returncode
    from deployments.limits import main as fleet_limits  # per-endpoint limits (docs/fleet.md)

    return fleet_limits([])


if __name__ == "__main__":
    sys.exit(main())
