"""The time-window guard, first thing in backup_vm and migrate_vm (docs/scheduling.md).

Inside its window (or without one) a run is never touched. Outside it:

- a deployment run (a worker started this process for it) goes back to Scheduled at the
  window's next opening and leaves without a final state: the same run, with its parameters,
  waits in the UI as Scheduled (named ``AwaitingWindow``, with its time and why), and a worker
  picks it up again when the window opens. This is Prefect's own reschedule move (what a
  worker's SIGTERM "reschedule" does: propose a Scheduled state from Running, then exit), with
  the opening as the scheduled time: the state change goes through the server's orchestration
  rules (a deployment concurrency slot the run held is released, a cancelled run stays
  cancelled), and the process leaves through ``Pause``, the signal Prefect's engine treats as
  "the state was set for this run: exit cleanly" (exit code 0, so the worker marks nothing
  Crashed);
- any other run (a plain Python call, a subflow in its parent's process) cannot be handed
  back to a worker: it waits here, in its process, logging when it will start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.states import Scheduled

from hypersdk.windows import Window, parse_window

STATE_NAME = "AwaitingWindow"
# an opening nearer than this (clock skew between worker and server, a worker that picked the
# run up early) is waited for in the process instead of rescheduling the run again
WAIT_BELOW_SECONDS = 5.0
# a waiting run re-reads the clock at least this often (sleep drifts, clocks get adjusted)
NAP_SECONDS = 60.0


def wait_for_window(
    window: str | None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return when the run may start: at once inside ``window`` (or with none); a deployment
    run outside it is rescheduled to the opening and this raises ``Pause`` (never catch it)."""
    if window is None:
        return
    win = parse_window(window)
    opens = win.next_open(now())
    if opens <= now():
        return
    logger = get_run_logger()
    run = _own_deployment_run()
    if run is not None and (opens - now()).total_seconds() >= WAIT_BELOW_SECONDS:
        state = _reschedule(run, win, opens)
        if state is not None and state.is_scheduled():
            logger.info(
                "outside its window %r: back to Scheduled, to start at %s (%s from now); "
                "a worker picks this run up again then",
                win.spec,
                _when(opens),
                _delta(opens - now()),
            )
            raise Pause(state=state)
        logger.warning(
            "outside its window %r, but the server kept the run %s: waiting in this process",
            win.spec,
            state.name if state is not None else "as it was",
        )
    _wait_in_process(win, opens, now, sleep, logger)


def _own_deployment_run():
    """This process's flow run if a worker started the process for it (only such a run can
    leave and be picked up again), else None."""
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    return run if run is not None and _handed_back_possible(run) else None


def _handed_back_possible(run) -> bool:
    # the worker (or `prefect flow-run execute`) names the run it starts the engine for
    return run.deployment_id is not None and os.environ.get("PREFECT__FLOW_RUN_ID") == str(run.id)


def will_defer(window: str | None, run) -> bool:
    """Will the guard hand ``run`` back to Scheduled (a deployment run outside its window)? The
    state hooks ask, so a deferred attempt announces no job start (it has not started)."""
    if not window or not _handed_back_possible(run):
        return False
    try:
        opens = parse_window(window).next_open(datetime.now(UTC))
    except Exception:  # noqa: BLE001 - a bad window fails the run in the guard, not here
        return False
    return (opens - datetime.now(UTC)).total_seconds() >= WAIT_BELOW_SECONDS


def _reschedule(run, win: Window, opens: datetime):
    """Propose Scheduled(opens) for ``run``; the state the server set (None if it failed)."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.engine import propose_state_sync

    state = Scheduled(
        scheduled_time=opens,
        name=STATE_NAME,
        message=f"outside its window {win.spec!r}: starts when it opens, {_when(opens)}",
    )
    try:
        with get_client(sync_client=True) as client:
            return propose_state_sync(client, state, flow_run_id=run.id)
    except Exception as exc:  # noqa: BLE001 - the run then waits here instead
        get_run_logger().warning("could not reschedule the run: %s", exc)
        return None


def _wait_in_process(win: Window, opens: datetime, now, sleep, logger) -> None:
    logger.info(
        "outside its window %r: waiting in this process until %s (%s)",
        win.spec,
        _when(opens),
        _delta(opens - now()),
    )
    while True:
        opens = win.next_open(now())
        left = (opens - now()).total_seconds()
        if left <= 0:
            break
        sleep(min(left, NAP_SECONDS))
    logger.info("window %r is open: starting", win.spec)


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _delta(d) -> str:
    s = max(0, round(d.total_seconds()))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"
