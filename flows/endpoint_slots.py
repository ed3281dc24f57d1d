"""No source endpoint read, and no target written, by more than N exports at once, whichever
deployment or worker started them: Prefect global concurrency limits keyed per endpoint.

The deploy step creates the limits (``python -m deployments.limits``, run by bootstrap) with
the operator's N; ``run_export`` holds one slot of the source's and the target's limit (both
taken at once, so two exports never deadlock on them) around the part that reads the source:
snapshot, disks, manifest, snapshot removal. Slots are taken with ``strict=True``: a limit that
vanishes between the check below and the take fails the run instead of running unbounded.

A limit that does not exist bounds nothing: the export runs (and says so in its log), so a
plain ``migrate_vm(...)`` without a deploy step still works. Workers of a fleet set
``HYPERSDK_REQUIRE_LIMITS=1`` (deployments/workers.py does): there a missing limit fails the
run at once, naming it, instead of letting it hit the source unbounded.

Slots are leases of LEASE_SECONDS, renewed while held: a run killed with SIGKILL gives its slot
back when the server's repossessor revokes the expired lease (LEASE_SECONDS plus its loop).

``HYPERSDK_SLOT_TRACE=<file>`` appends one JSON line when a run enters and leaves the section
(wall clock, pid, VM, limit names): how the fleet test proves the limit was never exceeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

from hypersdk.errors import InvalidParameterError
from hypersdk.fleet.limits import source_limit_name, target_limit_name

LEASE_SECONDS = 60.0  # the least the server accepts: a killed holder's slot returns this late
WAIT_SECONDS = 12 * 3600.0
_TRUE = {"1", "true", "yes", "on"}


def _trace(event: str, vm: str, names: list[str]) -> None:
    path = os.environ.get("HYPERSDK_SLOT_TRACE")
    if not path:
        return
    line = (
        json.dumps(
            {"event": event, "t": time.time(), "pid": os.getpid(), "vm": vm, "limits": names}
        )
        + "\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)


def _existing(names: list[str]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            with contextlib.suppress(ObjectNotFound):
                client.read_global_concurrency_limit_by_name(name)
                found.append(name)
    return found


def _in_a_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


@contextlib.contextmanager
def endpoint_slots(source_url: str, target_url: str, vm: str) -> Iterator[list[str]]:
    """Hold one slot of the source's and the target's limit for the block (those that exist);
    yields the names held. Outside a Prefect flow run: nothing (the engine on its own)."""
    if not _in_a_run():
        yield []
        return
    from prefect import get_run_logger
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    wanted = [source_limit_name(source_url), target_limit_name(target_url)]
    names = _existing(wanted)
    missing = [n for n in wanted if n not in names]
    if missing:
        if os.environ.get("HYPERSDK_REQUIRE_LIMITS", "").strip().lower() in _TRUE:
            raise InvalidParameterError(
                f"concurrency limit(s) {', '.join(missing)} do not exist and this worker "
                "requires them (HYPERSDK_REQUIRE_LIMITS): create them with "
                "`python -m deployments.limits`"
            )
        logger.info("no concurrency limit %s: not bounded by it", ", ".join(missing))
    if not names:
        yield []
        return
    asked = time.monotonic()
    with concurrency(
        names,
        occupy=1,
        timeout_seconds=WAIT_SECONDS,
        lease_duration=LEASE_SECONDS,
        strict=True,
    ):
        waited = time.monotonic() - asked
        logger.info(
            "endpoint slots %s: taken%s",
            ", ".join(names),
            f" after {waited:.1f} s" if waited >= 1 else "",
        )
        _trace("start", vm, names)
        try:
            yield names
        finally:
            _trace("end", vm, names)
