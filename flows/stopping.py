"""A run that is stopped (cancelled from the UI or the API, SIGTERM, Ctrl-C) stops everywhere
within seconds, cleans up, and a cancelled one ends Cancelled at once (docs/cancel.md).

A process worker cancels a run by telling its process (Prefect's control channel) and sending
it SIGTERM; Prefect's handler raises TerminationSignal in the main thread. ``stoppable`` relays
that signal to the engine's threads (hypersdk.cancel: they stop within one block), lets every
``finally`` of the run clean up on the way out, then marks a run the user cancelled Cancelled.
The worker would too, but only after the process has ended and it has started a second Python
process for the flow's cancellation hooks: 10 to 30 s on a loaded host. Its own later
Cancelled is then a no-op and the hooks still run, once, by the worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from prefect import get_run_logger, runtime

from hypersdk import cancel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stoppable(what: str) -> Iterator[None]:
    """The body of a run (``what`` names it in the log) that a stop ends cleanly."""
    if threading.current_thread() is threading.main_thread():  # the process's own run
        cancel.reset()
        cancel.watch_signals()
    try:
        yield
    except BaseException as exc:
        if not cancel.is_stop(exc):
            raise
        cancel.request(f"{type(exc).__name__} received")  # any thread still at work stops
        with contextlib.suppress(Exception):
            get_run_logger().warning(
                "%s stopped (%s): %s", what, cancel.reason(), cancel.left_behind()
            )
        settle_cancelled()
        raise


def settle_cancelled() -> bool:
    """Mark this flow run Cancelled if the user cancelled it (it is Cancelling); returns
    whether it did. Never raises: the run is stopping either way."""
    run_id = runtime.flow_run.id
    if not run_id:
        return False
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is None or not state.is_cancelling():
                return False
            done = client.set_flow_run_state(
                run_id, Cancelled(message="Cancelled: the run stopped and cleaned up.")
            )
            return done.status.value == "ACCEPT"
    except Exception as exc:  # the worker marks it Cancelled a little later
        log.warning("could not mark flow run %s Cancelled: %s", run_id, exc)
        return False
