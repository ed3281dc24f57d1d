"""Engine and provider logs into the run's logs in the Prefect UI.

hypersdk/ and providers/ log with the standard library (they import without Prefect). Inside a
flow or task run, their records also go to the Prefect API, so warnings such as a snapshot that
could not be removed show in the run's logs whichever way the run was started (CLI, plain
Python, a worker). Records from threads that carry no run context (the engine's own helper
threads) stay on the local handlers only.
"""

from __future__ import annotations

import logging

ENGINE_LOGGERS = ("hypersdk", "providers")


class _InRunOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def route_engine_logs(level: int = logging.INFO) -> None:
    """Attach Prefect's API log handler to the engine's loggers (once per process)."""
    from prefect.logging.handlers import APILogHandler

    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if any(isinstance(h, APILogHandler) for h in logger.handlers):
            continue
        handler = APILogHandler()
        handler.addFilter(_InRunOnly())
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
