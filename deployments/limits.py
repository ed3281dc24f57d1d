"""The deploy step's fleet part: per-endpoint global concurrency limits and the automation
that marks a flow run Crashed when its process vanished (a worker's machine died).

Usage (bootstrap runs it; PREFECT_API_URL set)::

    python -m deployments.limits --source local:///srv/vms=4 --target file:///backups=8 \
        [--zombie-after 600]

or the same from the environment: ``HYPERSDK_SOURCE_LIMITS="local:///srv/vms=4 vsphere://vc1=6"``,
``HYPERSDK_TARGET_LIMITS="s3://bucket=8"``, ``HYPERSDK_ZOMBIE_AFTER=600``. Idempotent: a limit
that exists is set to the given N (and made active); the automation is replaced.

Limit names carry no secret (hypersdk.fleet.limits: a hash of the endpoint); this prints which
endpoint each name stands for, with the URL redacted.

Crashed runs: every flow run emits a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
seconds (Prefect 3.9: default 180, at least 30). The automation ``hypersdk-crashed-runs`` is a
proactive trigger: after a heartbeat of a flow run, expect another heartbeat or a final state
within ``zombie_after`` seconds; if none comes, set the run Crashed. ``zombie_after`` must exceed
the heartbeat period of every process on this server (default 600 s for the default 180 s; the
fleet workers of deployments/workers.py use 30 s heartbeats, so 90 s is safe with them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

from hypersdk.fleet.limits import source_limit_name, target_limit_name
from hypersdk.urls import redact_url

ZOMBIE_AUTOMATION = "hypersdk-crashed-runs"
ZOMBIE_AFTER = 600
FINAL_EVENTS = [
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Paused",
    "prefect.flow-run.Suspended",
]


def parse_pairs(items: Iterable[str]) -> dict[str, int]:
    """``URL=N`` items (the last ``=`` splits: URLs may hold one in their query)."""
    out: dict[str, int] = {}
    for item in items:
        url, eq, n = item.rpartition("=")
        if not eq or not url or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"not URL=N with N >= 1: {item!r}")
        out[url] = int(n)
    return out


def ensure_limit(client, name: str, limit: int) -> str:
    """Create ``name`` with ``limit`` slots, or set an existing one to it; what was done."""
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    try:
        found = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
        )
        return "created"
    if found.limit == limit and found.active:
        return "unchanged"
    client.update_global_concurrency_limit(
        name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
    )
    return "updated"


def ensure_zombie_automation(client, after: int) -> None:
    """(Re)create the automation that marks runs without heartbeats Crashed."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.states import StateType

    for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
        client.delete_automation(old.id)
    client.create_automation(
        AutomationCore(
            name=ZOMBIE_AUTOMATION,
            description=(
                f"A flow run with no heartbeat for {after} s lost its process (its worker or "
                "machine died): mark it Crashed so fleet runs re-run it."
            ),
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                after={"prefect.flow-run.heartbeat"},
                expect=set(FINAL_EVENTS),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=after,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"no heartbeat for {after} s: its process is gone",
                )
            ],
        )
    )


def setup(
    sources: dict[str, int], targets: dict[str, int], zombie_after: int | None = ZOMBIE_AFTER
) -> list[str]:
    """Create the limits and the automation on the server of PREFECT_API_URL; report lines."""
    from prefect.client.orchestration import get_client

    lines = []
    with get_client(sync_client=True) as client:
        for urls, naming, what in (
            (sources, source_limit_name, "source"),
            (targets, target_limit_name, "target"),
        ):
            for url, limit in urls.items():
                name = naming(url)
                done = ensure_limit(client, name, limit)
                lines.append(f"{name}: {limit} at once per {what} {redact_url(url)} ({done})")
        if zombie_after:
            ensure_zombie_automation(client, zombie_after)
            lines.append(f"automation {ZOMBIE_AUTOMATION}: Crashed after {zombie_after} s silent")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.limits", description=__doc__)
    env_sources = os.environ.get("HYPERSDK_SOURCE_LIMITS", "").split()
    env_targets = os.environ.get("HYPERSDK_TARGET_LIMITS", "").split()
    parser.add_argument("--source", action="append", default=env_sources, metavar="URL=N")
    parser.add_argument("--target", action="append", default=env_targets, metavar="URL=N")
    parser.add_argument(
        "--zombie-after",
        type=int,
        default=int(os.environ.get("HYPERSDK_ZOMBIE_AFTER", ZOMBIE_AFTER)),
        help="seconds without a heartbeat before a run is marked Crashed (0: no automation)",
    )
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("PREFECT_API_URL is not set: start a server first", file=sys.stderr)
        return 2
    if args.zombie_after and args.zombie_after < 45:
        print(
            "--zombie-after must be at least 45 s (heartbeats come every >= 30 s)", file=sys.stderr
        )
        return 2
    for line in setup(parse_pairs(args.source), parse_pairs(args.target), args.zombie_after):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
