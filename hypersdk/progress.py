"""One progress bus per process: stages report bytes done; CLIs and Prefect artifacts listen.

Tasks publish (stage, bytes) events; the CLI subscribes to draw rich bars while a flow runs in the
same process. Nothing here knows about Prefect or rich.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str, str, int, int | None], None]  # (event, stage, n_bytes, total)

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def publish(event: str, stage: str, n: int = 0, total: int | None = None) -> None:
    """event: 'start' (total known), 'advance' (n more bytes) or 'end'."""
    for listener in list(_listeners):
        listener(event, stage, n, total)


class StageProgress:
    """A bytes-done callback for one stage, fanning out to the bus and an optional extra sink."""

    def __init__(
        self, stage: str, total: int | None, extra: Callable[[int, int], None] | None = None
    ):
        self.stage = stage
        self.total = total
        self.done = 0
        self._extra = extra
        publish("start", stage, 0, total)

    def __call__(self, n: int) -> None:
        with _lock:  # reads finish on several threads
            self.done += n
        publish("advance", self.stage, n, self.total)
        if self._extra:
            self._extra(self.done, self.total or 0)

    def close(self) -> None:
        publish("end", self.stage, self.done, self.total)
