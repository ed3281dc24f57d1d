"""A GCS object as a forward-only byte stream of ranged GETs, a few fetched ahead.

Decompressing the exported image is CPU work; fetching its next pieces meanwhile (``depth``
ranged GETs in flight on worker threads) keeps the network busy, so a pass costs about the larger
of the two, not their sum. The object's generation is pinned: a concurrent rewrite of the key
cannot mix two exports into one stream. Memory: ``depth`` chunks.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hypersdk.errors import DiskReadError, EndpointUnreachableError, HyperSDKError


class RangedStream:
    """``read(n)`` over bytes ``[0, size)`` of ``blob`` (a google.cloud.storage Blob)."""

    def __init__(self, blob: Any, size: int, chunk: int, depth: int = 3, timeout=(10, 120)):
        self._blob = blob
        self.size = size
        self._chunk = chunk
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="gcs-fetch")
        self._ahead: deque[Future] = deque()
        self._next = 0  # first byte not yet asked for
        self._depth = depth
        self._buf = memoryview(b"")
        self.requests = 0

    def _fill(self) -> None:
        while len(self._ahead) < self._depth and self._next < self.size:
            end = min(self.size, self._next + self._chunk)
            self._ahead.append(self._pool.submit(self._get, self._next, end))
            self._next = end

    def _get(self, start: int, end: int) -> bytes:
        from google.api_core import exceptions as gexc
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.requests += 1
        name = f"gs://{self._blob.bucket.name}/{self._blob.name}"
        try:
            data = self._blob.download_as_bytes(
                start=start,
                end=end - 1,
                checksum=None,
                raw_download=True,  # the stored bytes, never a transcoded copy
                timeout=self._timeout,
                retry=DEFAULT_RETRY,
            )
        except gexc.NotFound:
            raise DiskReadError(f"{name}: the exported image is gone") from None
        except gexc.GoogleAPICallError as exc:
            raise DiskReadError(f"{name}: read at {start} failed: {exc.message}") from None
        except HyperSDKError:
            raise
        except Exception as exc:  # requests' connection errors and timeouts
            raise EndpointUnreachableError(
                f"{name}: read at {start} failed: {type(exc).__name__}"
            ) from None
        if len(data) != end - start:
            raise DiskReadError(f"{name}: read at {start} returned {len(data)} bytes")
        return data

    def read(self, n: int) -> bytes:
        if not self._buf:
            self._fill()
            if not self._ahead:
                return b""
            self._buf = memoryview(self._ahead.popleft().result())
            self._fill()
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def close(self) -> None:
        for fut in self._ahead:
            fut.cancel()
        self._ahead.clear()
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=True, cancel_futures=True)
