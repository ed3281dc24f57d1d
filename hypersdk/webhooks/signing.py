"""Webhook signatures: HMAC-SHA256 over ``"<timestamp>.<body>"`` with the endpoint's secret.

Headers of every delivery::

    X-HyperSDK-Timestamp: 1764626400          (Unix seconds when this attempt was sent)
    X-HyperSDK-Signature: v1=<hex digest>     (several, comma-separated, while a secret rotates)
    X-HyperSDK-Event-Id:  <uuid>              (the idempotency key: dedupe on it)
    X-HyperSDK-Event:     job.started | job.progress | job.completed | job.failed

The timestamp is signed with the body, so a captured delivery cannot be replayed later with a
new timestamp; a receiver refuses timestamps outside its replay window (``tolerance``). Each
attempt is signed afresh at send time, so a delivery retried for an hour is not stale.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from hypersdk.errors import HyperSDKError

TIMESTAMP_HEADER = "X-HyperSDK-Timestamp"
SIGNATURE_HEADER = "X-HyperSDK-Signature"
EVENT_ID_HEADER = "X-HyperSDK-Event-Id"
EVENT_HEADER = "X-HyperSDK-Event"
SCHEME = "v1"
DEFAULT_TOLERANCE = 300.0


class SignatureError(HyperSDKError):
    """A webhook delivery whose signature or timestamp does not check out."""

    exit_code = 1


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(_key(secret), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def signed_headers(secret: str | bytes, body: bytes, event_id: str, event: str) -> dict[str, str]:
    ts = int(time.time())
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
        EVENT_ID_HEADER: event_id,
        EVENT_HEADER: event,
        "Idempotency-Key": event_id,
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    get = getattr(headers, "get", None)
    value = get(name) if get else None  # email.message.Message / httpx.Headers: any case
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> int:
    """For receivers: the delivery's timestamp if its signature matches ``secret`` and its
    timestamp is within ``tolerance`` seconds of ``now``; SignatureError (saying why, never the
    secret or the expected digest) otherwise. ``body`` is the raw request body, as received."""
    raw_ts = _header(headers, TIMESTAMP_HEADER)
    raw_sig = _header(headers, SIGNATURE_HEADER)
    if not raw_ts or not raw_sig:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        ts = int(raw_ts)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not a Unix time") from None
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance:
        raise SignatureError(
            f"timestamp {ts} is {abs(now - ts):.0f} s from now, outside the {tolerance:.0f} s "
            "replay window"
        )
    expected = sign(secret, ts, body)
    given = [s.strip() for s in raw_sig.split(",") if s.strip().startswith(f"{SCHEME}=")]
    if not any(hmac.compare_digest(expected, s) for s in given):
        raise SignatureError("signature does not match (wrong secret or altered body)")
    return ts
