"""Webhooks: job events (started, progress, completed, failed) into a persisted outbox, then
signed (HMAC-SHA256 over timestamp and body) and delivered with retries, in order per job.
Receivers check deliveries with ``verify_signature``. Nothing here imports Prefect."""

from hypersdk.webhooks.config import Endpoint, load_endpoints
from hypersdk.webhooks.events import Job, JobEvents, ProgressThrottle
from hypersdk.webhooks.outbox import Outbox
from hypersdk.webhooks.sender import Sender
from hypersdk.webhooks.signing import SignatureError, sign, verify_signature

__all__ = [
    "Endpoint",
    "Job",
    "JobEvents",
    "Outbox",
    "ProgressThrottle",
    "Sender",
    "SignatureError",
    "load_endpoints",
    "sign",
    "verify_signature",
]
