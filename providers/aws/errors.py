"""Errors of the AWS source that hypersdk.errors has no class for (each says if a retry heals)."""

from __future__ import annotations

from hypersdk.errors import SourceError


class BlockChecksumError(SourceError):
    """A block from ``GetSnapshotBlock`` does not match the SHA-256 checksum EBS sent with it:
    the data is not what the snapshot holds. Never retried: a run that stored it would publish
    a wrong disk, and a run that fails names the block so it can be looked into."""

    retryable = False


class ThrottledError(SourceError):
    """AWS kept refusing calls for their rate (ThrottlingException, RequestLimitExceeded, 503)
    past every retry with backoff: a later run, or fewer blocks in flight, heals it."""

    retryable = True
