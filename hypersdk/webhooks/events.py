"""Job events as webhook payloads: started, progress (throttled), completed, failed.

Payload (JSON, UTF-8)::

    {"id": "<uuid>", "type": "job.completed", "sequence": 3, "occurred_at": "...Z",
     "job": {"run_id": "...", "kind": "export", "vm": "web01",
             "source": "vsphere://admin@vc/dc", "target": "s3://bucket/prefix"},
     "data": {"bytes": 1048576, "bytes_total": 1048576, "percent": 100.0,
              "duration_seconds": 12.5, "error": null}}

``id`` is the idempotency key (also in the X-HyperSDK-Event-Id header); ``sequence`` counts the
job's events from 0, so a receiver can also see order. URLs are redacted, errors scrubbed.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hypersdk.audit import scrub
from hypersdk.urls import redact_url
from hypersdk.webhooks.config import Endpoint
from hypersdk.webhooks.outbox import Outbox


@dataclass(frozen=True)
class Job:
    run_id: str
    kind: str  # export, backup, restore, forget
    vm: str | None = None
    source: str | None = None
    target: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "vm": self.vm,
            "source": redact_url(self.source) if self.source else None,
            "target": redact_url(self.target) if self.target else None,
        }


@dataclass
class ProgressThrottle:
    """At most one progress event per ``interval`` seconds, and only when the job crossed into
    a new ``step``-percent band: a fast job sends none, a slow one at most 100/step."""

    interval: float = 30.0
    step: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _band: int = 0
    _last: float = field(default=float("-inf"))

    def __post_init__(self) -> None:
        self._last = self.clock()  # no progress right after "started"

    def due(self, percent: float) -> bool:
        band = int(min(100.0, max(0.0, percent)) // self.step)
        now = self.clock()
        if band <= self._band or band * self.step >= 100.0 or now - self._last < self.interval:
            return False
        self._band, self._last = band, now
        return True


class JobEvents:
    """The events of one job into the outbox, one row per interested endpoint."""

    def __init__(
        self,
        outbox: Outbox,
        endpoints: Iterable[Endpoint],
        job: Job,
        throttle: ProgressThrottle | None = None,
    ):
        self.outbox = outbox
        self.endpoints = list(endpoints)
        self.job = job
        self.throttle = throttle or ProgressThrottle()
        self._seq = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.bytes_done = 0
        self.bytes_total = 0

    def emit(self, event: str, **data: Any) -> str | None:
        """Queue one event; its id, or None when no endpoint wants it."""
        wanted = [e.name for e in self.endpoints if e.wants(event)]
        with self._lock:
            seq = self._seq
            self._seq += 1
        if not wanted:
            return None
        event_id = str(uuid.uuid4())
        payload = {
            "id": event_id,
            "type": event,
            "sequence": seq,
            "occurred_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "job": self.job.describe(),
            "data": {
                "bytes": self.bytes_done,
                "bytes_total": self.bytes_total or None,
                "percent": self.percent(),
                "duration_seconds": round(time.monotonic() - self._started, 3),
                "error": None,
                **data,
            },
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        self.outbox.enqueue(event_id, self.job.run_id, event, body, wanted)
        return event_id

    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return round(min(100.0, 100.0 * self.bytes_done / self.bytes_total), 1)

    def started(self) -> str | None:
        self._started = time.monotonic()
        return self.emit("job.started")

    def progress(self, done: int, total: int | None = None) -> str | None:
        """Record bytes done (of ``total``); an event only when the throttle lets one through."""
        self.bytes_done = done
        if total:
            self.bytes_total = total
        percent = self.percent()
        if percent is None or not self.throttle.due(percent):
            return None
        return self.emit("job.progress")

    def completed(self, bytes_done: int | None = None, **data: Any) -> str | None:
        if bytes_done is not None:
            self.bytes_done = bytes_done
        return self.emit("job.completed", **data)

    def failed(self, error: str, **data: Any) -> str | None:
        return self.emit("job.failed", error=scrub(error, 1000), **data)
