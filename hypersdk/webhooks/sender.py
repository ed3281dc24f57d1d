"""The sender: claims due rows of the outbox, signs and POSTs them, and acknowledges, retries
(exponential backoff with jitter) or, after ``max_age``, gives up. A 2xx answer is the
acknowledgement; anything else (refused connection, timeout, 5xx, 4xx) is retried.

Who runs it: a run starts one in a thread while it works (so ``job.started`` and progress
arrive live) and drains it for a bounded time at its end; what is left (a receiver still
down, a run killed) goes out with ``hyperctl webhooks deliver`` (cron, systemd timer, or the
``deliver-webhooks`` Prefect deployment). Several senders can share an outbox: claims are
leases.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable

import httpx

from hypersdk.audit import scrub
from hypersdk.errors import HyperSDKError
from hypersdk.webhooks.config import Endpoint, by_name
from hypersdk.webhooks.outbox import Outbox, Row
from hypersdk.webhooks.signing import signed_headers

log = logging.getLogger(__name__)


class Sender:
    def __init__(
        self,
        outbox: Outbox,
        endpoints: Iterable[Endpoint],
        *,
        base_delay: float = 2.0,
        max_delay: float = 300.0,
        max_age: float = 7 * 86400.0,
        lease: float = 120.0,
        client: httpx.Client | None = None,
        rng: random.Random | None = None,
    ):
        self.outbox = outbox
        self.endpoints = by_name(endpoints)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_age = max_age
        self.lease = lease
        self._client = client or httpx.Client(follow_redirects=False)
        self._own_client = client is None
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0  # acknowledged deliveries, over this sender's life

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: exponential, capped, with jitter (half to
        all of it) so receivers coming back are not hit by every sender at once."""
        delay = min(self.max_delay, self.base_delay * 2 ** min(attempts, 30))
        return delay * self._rng.uniform(0.5, 1.0)

    def _send(self, row: Row) -> str | None:
        """None on acknowledgement, else why not (no secret, no body in it)."""
        endpoint = self.endpoints.get(row.endpoint)
        if endpoint is None:
            return f"endpoint {row.endpoint!r} is not configured"
        try:
            headers = signed_headers(endpoint.secret(), row.body, row.event_id, row.event)
            response = self._client.post(
                endpoint.url, content=row.body, headers=headers, timeout=endpoint.timeout
            )
        except HyperSDKError as exc:  # the secret cannot be read
            return scrub(str(exc), 500)
        except httpx.HTTPError as exc:
            return scrub(f"{type(exc).__name__}: {exc}", 500)
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def deliver_due(self) -> int:
        """One pass over what is due now; the number of deliveries acknowledged."""
        done = 0
        for row in self.outbox.claim(self.lease):
            error = self._send(row)
            if error is None:
                self.outbox.ack(row.id)
                done += 1
                self.delivered += 1
            elif time.time() - row.created > self.max_age:
                self.outbox.give_up(row.id, f"given up after {row.attempts + 1} attempts: {error}")
                log.warning("webhook %s to %s given up: %s", row.event_id, row.endpoint, error)
            else:
                self.outbox.retry(row.id, error, time.time() + self.backoff(row.attempts))
                log.info("webhook %s to %s: %s (will retry)", row.event_id, row.endpoint, error)
        return done

    def drain(self, timeout: float, poll: float = 0.5) -> int:
        """Deliver until the outbox is empty or ``timeout`` seconds passed; what is left."""
        deadline = time.monotonic() + timeout
        while True:
            if self.deliver_due():
                continue
            due = self.outbox.next_due()
            if due is None:
                return 0
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return self.outbox.pending()
            time.sleep(max(0.01, min(left, poll, due - time.time())))

    # -- in a thread while a run works ------------------------------------------------------

    def start(self, period: float = 0.5) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                try:
                    self.deliver_due()
                except Exception:  # noqa: BLE001 - a webhook must never fail the run
                    log.exception("webhook sender pass failed")

        self._thread = threading.Thread(target=loop, name="webhook-sender", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the thread; ``wait=False`` leaves a delivery in flight to finish on its own (a
        daemon thread: a run being cancelled must not wait for a slow receiver)."""
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join()
            self._thread = None
            self._stop.clear()

    def close(self, wait: bool = True) -> None:
        self.stop(wait)
        if self._own_client and wait:
            self._client.close()
