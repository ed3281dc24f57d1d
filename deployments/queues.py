"""The priority work queues of the ``hypersdk-local`` pool: ``urgent``, ``default``, ``bulk``.

Usage: ``python -m deployments.queues`` (the deploy step, deployments/bootstrap.py, runs it) with
PREFECT_API_URL set. Idempotent: creates the queues missing, sets every priority and description.

Prefect gives each queue of a pool a unique priority, 1 the highest; a worker of the pool asks
the server for its scheduled runs and gets them ordered by queue priority first, then by
scheduled time (server/database/sql/*/get-runs-from-worker-queues.sql.jinja), and submits them
in that order while it has slots: a queued urgent run is taken before every bulk run, however
long those waited (docs/scheduling.md).
"""

from __future__ import annotations

import sys

from deployments.bootstrap import WORK_POOL

# (name, priority, description), highest priority first; `default` is the queue every
# deployment of prefect.yaml uses when no other is asked for
QUEUES = (
    ("urgent", 1, "Taken before every other queue of the pool (priority 1)."),
    ("default", 2, "Every deployment's queue unless a run asks for another (priority 2)."),
    ("bulk", 3, "Taken when no urgent or default run waits (priority 3)."),
)


def ensure_queues(client, pool: str = WORK_POOL) -> dict[str, int]:
    """Create or update the queues of ``pool`` (a sync Prefect client); every queue's priority
    afterwards, by name. Queues of others keep their order, after these."""
    existing = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}
    for name, priority, description in QUEUES:  # highest first: each update pushes the rest down
        queue = existing.get(name)
        if queue is None:
            client.create_work_queue(
                name=name, work_pool_name=pool, priority=priority, description=description
            )
        elif queue.priority != priority or queue.description != description:
            # the pool's own endpoint: it renumbers the other queues (/work_queues/{id} does not)
            response = client.request(
                "PATCH",
                "/work_pools/{pool}/queues/{name}",
                path_params={"pool": pool, "name": name},
                json={"priority": priority, "description": description},
            )
            response.raise_for_status()
    return {q.name: q.priority for q in client.read_work_queues(work_pool_name=pool)}


def main() -> int:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            priorities = ensure_queues(client)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(
            f"work queues of {WORK_POOL} not set up: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    print(
        f"work queues of {WORK_POOL}: "
        + ", ".join(
            f"{name} (priority {p})" for name, p in sorted(priorities.items(), key=lambda kv: kv[1])
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
