"""What every task shares: which failures are worth a retry, and progress artifacts."""

from __future__ import annotations

import contextlib
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from hypersdk.errors import (
    CredentialsError,
    DecryptionError,
    FormatError,
    HyperSDKError,
    InvalidParameterError,
    SnapshotError,
    TargetFullError,
    VMNotFoundError,
)
from hypersdk.progress import StageProgress

# Failures a retry cannot fix: bad input, missing things, full disks, wrong keys.
PERMANENT = (
    InvalidParameterError,
    VMNotFoundError,
    FormatError,
    TargetFullError,
    CredentialsError,
    DecryptionError,
    SnapshotError,
)

RETRY_DELAYS = exponential_backoff(backoff_factor=2)


def transient_only(task, task_run, state) -> bool:
    """retry_condition_fn: retry I/O hiccups (network, servers), never permanent failures."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    if isinstance(exc, PERMANENT):
        return False
    return isinstance(exc, HyperSDKError | OSError | TimeoutError | ConnectionError)


def io_task_options(retries: int = 3) -> dict:
    return {
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAYS(retries),
        "retry_condition_fn": transient_only,
    }


def stage_progress(stage: str, total: int | None, description: str) -> StageProgress:
    """Progress callback that also keeps a Prefect progress artifact (updated about once a second)."""
    try:
        artifact = create_progress_artifact(0.0, description=description)
    except Exception:  # no run context (plain engine use): the bus alone is enough
        artifact = None
    last = [0.0]

    def update(done: int, total_: int) -> None:
        now = time.monotonic()
        finished = bool(total_) and done >= total_
        if artifact is None or not total_ or (now - last[0] < 1.0 and not finished):
            return
        last[0] = now
        with contextlib.suppress(Exception):  # progress must never fail an export
            update_progress_artifact(artifact, min(100.0, 100.0 * done / total_))

    return StageProgress(stage, total, update)
