"""Fleet benchmark (issue 16): a backup_fleet of 24 small VMs on 1, 2 and 3 process workers
(a Prefect server on a private PostgreSQL cluster; tests/fleet_stack.py sets it all up the way
deployments/ does), per worker count: wall time of the fleet run, child runs per minute, and
the Prefect overhead per VM: a child run's Running time (from the API) minus the export's own
time (its manifest's ``stats.seconds``: snapshot to manifest), and the whole overhead: a worker
slot's time per VM (wall x workers x runs per worker / VMs) minus the export's time, which adds
the process start-up (Python, Prefect, loading the flow) before the run is Running.

    python -m benchmarks.fleet [--vms 24] [--workers 1,2,3] [--worker-limit 2]
                               [--source-limit 4] [--dir /var/tmp]

Each worker count gets a fresh server database and VMs (no delta on a previous point).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deployments.postgres import Cluster, available, free_port


def _one(db_url: str, work: Path, workers: int, vms: int, worker_limit: int, limit: int) -> dict:
    from hypersdk.repository.history import read_history
    from providers import open_target
    from tests.fleet_stack import fleet_stack, make_vms, start_fleet

    names = [f"vm{i:03d}" for i in range(1, vms + 1)]
    with fleet_stack(
        db_url, work, workers=workers, source_limit=limit, worker_limit=worker_limit
    ) as stack:
        make_vms(stack.home / "vms", names)
        started = time.monotonic()
        fleet = start_fleet(stack, names, work / "fleet.log", max_parallel=vms)
        rc = fleet.wait(timeout=3600)
        wall = time.monotonic() - started
        if rc != 0:
            raise RuntimeError((work / "fleet.log").read_text()[-3000:])
        runs = httpx.post(
            f"{stack.api}/flow_runs/filter",
            json={"flows": {"name": {"any_": ["backup-vm"]}}, "limit": 200},
            timeout=30,
        ).json()
        run_seconds = {r["parameters"]["vm"]: r["total_run_time"] for r in runs}
        with open_target(stack.target) as t:
            export_seconds = {n: read_history(t, n)[0].stats.get("seconds", 0.0) for n in names}
    overhead = [run_seconds[n] - export_seconds[n] for n in names]
    slot_s = wall * workers * worker_limit / vms  # a worker slot's time per VM
    return {
        "workers": workers,
        "vms": vms,
        "wall_s": round(wall, 1),
        "runs_per_min": round(60 * vms / wall, 1),
        "run_s_median": round(statistics.median(run_seconds.values()), 2),
        "export_s_median": round(statistics.median(export_seconds.values()), 2),
        "overhead_s_median": round(statistics.median(overhead), 2),
        "slot_s_per_vm": round(slot_s, 1),
        "overhead_total_s": round(slot_s - statistics.median(export_seconds.values()), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__)
    parser.add_argument("--vms", type=int, default=24)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--worker-limit", type=int, default=2)
    parser.add_argument("--source-limit", type=int, default=4)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    if why := available():
        print(why, file=sys.stderr)
        return 2
    results = []
    for n in [int(x) for x in args.workers.split(",")]:
        pg_dir = Path(tempfile.mkdtemp(prefix="hypersdk-pg-"))  # the postgres user must enter it
        work = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{n}-", dir=args.dir))
        cluster = Cluster(pg_dir, free_port(), durable=False)
        try:
            cluster.init()
            cluster.start()
            results.append(
                _one(cluster.url, work, n, args.vms, args.worker_limit, args.source_limit)
            )
            print(json.dumps(results[-1]), flush=True)
        finally:
            cluster.stop()
            shutil.rmtree(pg_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| workers | VMs | wall s | runs/min | run s (median) | export s | overhead in run "
        "s/VM | slot s/VM | overhead total s/VM |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['workers']} | {r['vms']} | {r['wall_s']} | {r['runs_per_min']} | "
            f"{r['run_s_median']} | {r['export_s_median']} | {r['overhead_s_median']} | "
            f"{r['slot_s_per_vm']} | {r['overhead_total_s']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
