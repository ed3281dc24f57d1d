"""What every task shares: which failures are worth a retry (each error class declares it), and
progress artifacts."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from hypersdk.errors import HyperSDKError
from hypersdk.progress import StageProgress

RETRY_DELAYS = exponential_backoff(backoff_factor=2)


def is_transient(exc: BaseException) -> bool:
    """Can a retry heal ``exc``? Our errors say so themselves; I/O errors can."""
    if isinstance(exc, HyperSDKError):
        return exc.retryable
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def transient_only(task, task_run, state) -> bool:
    """retry_condition_fn: retry I/O hiccups (network, servers), never permanent failures."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    return exc is not None and is_transient(exc)


def io_task_options(retries: int = 3) -> dict:
    return {
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAYS(retries),
        "retry_condition_fn": transient_only,
    }


class ProgressArtifact:
    """A Prefect progress artifact that follows a StageProgress: a ticker thread (carrying the
    run's context) publishes the byte count about once a second, so the hot path only adds to a
    counter, whatever thread reads or writes; ``close`` publishes the final value: 100% when the
    stage did all its work, else where it stopped."""

    def __init__(self, description: str, period: float = 1.0):
        self.description = description
        self._period = period
        self._id = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._progress: StageProgress | None = None
        with contextlib.suppress(Exception):  # no run context (plain engine use): no artifact
            self._id = create_progress_artifact(0.0, description=description)

    def follow(self, progress: StageProgress) -> StageProgress:
        self._progress = progress
        if self._id is not None:
            ctx = contextvars.copy_context()
            self._ticker = threading.Thread(
                target=ctx.run, args=(self._tick,), name="progress-artifact", daemon=True
            )
            self._ticker.start()
        return progress

    def _percent(self) -> float:
        p = self._progress
        if p is None or not p.total:
            return 0.0
        return min(100.0, 100.0 * p.done / p.total)

    def _publish(self, value: float) -> None:
        with contextlib.suppress(Exception):  # progress must never fail an export
            update_progress_artifact(self._id, value, description=self.description)

    def _tick(self) -> None:
        last = -1.0
        while not self._stop.wait(self._period):
            value = self._percent()
            if value != last:
                self._publish(value)
                last = value

    def close(self, complete: bool) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._id is not None:
            self._publish(100.0 if complete else self._percent())


@contextlib.contextmanager
def stage_progress(stage: str, total: int | None, description: str) -> Iterator[StageProgress]:
    """A bytes-done callback for one stage, feeding the CLI's bars (the progress bus) and a
    Prefect progress artifact that ends at 100% when the stage completes."""
    artifact = ProgressArtifact(description)
    progress = artifact.follow(StageProgress(stage, total))
    complete = False
    try:
        yield progress
        complete = True
    finally:
        progress.close()
        artifact.close(complete)
