"""Disk data over HTTPS: ranged GETs of a snapshot's disk through the datastore /folder endpoint.

``DatastoreReader`` is a RangeReader. A read is cut into pieces fetched in parallel by ``workers``
threads over one pooled keep-alive client, so a single-threaded consumer (hypersdk.io.read_ahead,
which asks for 4 MiB at a time) still keeps several connections busy. A piece whose connection
breaks is resumed from its last received byte, with exponential backoff and a bounded number of
attempts without progress. Every piece reports its bytes to a progress callback; ``meter`` keeps
throughput and ETA.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from hypersdk.errors import (
    CredentialsError,
    DiskReadError,
    EndpointUnreachableError,
    SourceError,
)

if TYPE_CHECKING:  # httpx loads when a vSphere source connects, not at discovery
    import httpx


MIN_PIECE = 256 * 1024
PREFETCH_PIECE = 4 * 1024 * 1024  # announced extents are fetched ahead in pieces of at most this
PREFETCH_BYTES = 32 * 1024 * 1024  # bound on prefetched bytes held in memory
MAX_DESCRIPTOR = 64 * 1024
_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")
_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?', re.M)
_CRANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def split_ds_path(file_name: str) -> tuple[str, str]:
    m = _DS_PATH.match(file_name or "")
    if not m:
        raise SourceError(f"not a datastore path: {file_name!r} (expected '[datastore] dir/file')")
    return m["ds"], m["path"]


def folder_url(base_url: str, datacenter: str, datastore: str, path: str) -> str:
    query = urlencode({"dcPath": datacenter, "dsName": datastore})
    return f"{base_url}/folder/{quote(path)}?{query}"


class Meter:
    """Bytes moved, throughput and ETA of one transfer (thread-safe)."""

    def __init__(self, total: int | None = None):
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, if the total is known and something moved."""
        if not self.total or not self.rate:
            return None
        return max(0.0, (self.total - self.done) / self.rate)


class DatastoreReader:
    """RangeReader over one file on a datastore (or an NFC device URL), by HTTP Range requests.

    ``size`` is the guest-visible size; bytes past the end of the file (a short flat file) read as
    zeros. ``bytes_fetched`` counts body bytes received over HTTP, ``resumes`` broken pieces that
    were continued.

    Parallelism comes two ways: a large read is split across the workers, and ``prefetch(extents)``
    announces the ranges the consumer will read next (in order), which the workers then fetch ahead
    (at most PREFETCH_BYTES held), so many small CBT extents don't cost one round trip each.
    """

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        size: int,
        *,
        name: str | None = None,
        cookie: Callable[[], str] | None = None,
        on_unauthorized: Callable[[], None] | None = None,
        file_size: int | None = None,
        workers: int = 4,
        attempts: int = 5,
        backoff: float = 0.25,
        progress: Callable[[int], None] | None = None,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.name = name or url.split("?", 1)[0]
        self.url = url
        self.size = size
        self.workers = workers
        self.attempts = attempts
        self.backoff = backoff
        self.progress = progress
        self.meter = Meter(None)
        self.bytes_fetched = 0
        self.requests = 0
        self.resumes = 0
        self._client = client
        self._cookie = cookie
        self._on_unauthorized = on_unauthorized
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            workers, thread_name_prefix="vsphere-get"
        )
        self._plan: list[tuple[int, int]] = []  # announced (start, end) pieces, ascending
        self._plan_ends: list[int] = []
        self._next = 0  # index of the next announced piece to schedule
        self._ahead: deque[tuple[int, int, Future]] = deque()
        self._plan_lock = threading.Lock()
        self.file_size = self._probe_size() if file_size is None else file_size

    # -- HTTP -------------------------------------------------------------------------------------
    def _headers(self, extra: dict) -> dict:
        headers = dict(extra)
        if self._cookie is not None:
            headers["Cookie"] = self._cookie()
        return headers

    def _check_status(self, r: httpx.Response, what: str) -> None:
        import httpx

        if r.status_code in (401, 403):
            if self._on_unauthorized is not None:
                self._on_unauthorized()
                raise _Reauth()
            raise CredentialsError(f"{self.name}: HTTP {r.status_code} (session not accepted)")
        if r.status_code == 404:
            raise DiskReadError(f"{self.name}: not found on the datastore (HTTP 404)")
        if r.status_code >= 500:
            raise httpx.RemoteProtocolError(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206, 416):
            raise DiskReadError(f"{self.name}: {what} answered HTTP {r.status_code}")

    def _probe_size(self) -> int:
        """The file's size from a one-byte ranged GET (works where HEAD is not served)."""

        def probe() -> int:
            r = self._client.get(self.url, headers=self._headers({"Range": "bytes=0-0"}))
            self._check_status(r, "size probe")
            m = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", r.headers.get("content-range", ""))
            if m:
                return int(m[1])
            if r.status_code == 200:
                return int(r.headers.get("content-length", len(r.content)))
            raise DiskReadError(f"{self.name}: server did not say how large the file is")

        return self._retrying(probe, "size probe")

    def _retrying(self, fn, what: str):
        import httpx

        failures = 0
        while True:
            try:
                return fn()
            except _Reauth:
                failures += 1
                if failures > 2:
                    raise CredentialsError(
                        f"{self.name}: session rejected after re-login"
                    ) from None
            except httpx.TransportError as exc:
                failures += 1
                if failures >= self.attempts:
                    raise EndpointUnreachableError(
                        f"{self.name}: {what} failed after {failures} attempts: {exc or type(exc).__name__}"
                    ) from None
                time.sleep(self.backoff * 2 ** (failures - 1))

    def _fetch(self, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of the file; a broken transfer resumes where it stopped."""
        import httpx

        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        failures = 0
        while got < length:
            before = got
            try:
                headers = self._headers({"Range": f"bytes={start + got}-{start + length - 1}"})
                with self._lock:
                    self.requests += 1
                    if got:
                        self.resumes += 1
                with self._client.stream("GET", self.url, headers=headers) as r:
                    self._check_status(r, f"GET bytes {start + got}+{length - got}")
                    if r.status_code == 206:
                        m = _CRANGE.match(r.headers.get("content-range", ""))
                        if not m or int(m[1]) != start + got:
                            raise DiskReadError(
                                f"{self.name}: server answered another range "
                                f"({r.headers.get('content-range')!r}) than asked (from {start + got})"
                            )
                    elif r.status_code == 200 and start + got != 0:
                        raise DiskReadError(f"{self.name}: server ignores HTTP Range requests")
                    elif r.status_code == 416:
                        raise DiskReadError(
                            f"{self.name}: range {start + got} is past the file end"
                        )
                    received = 0
                    try:
                        for chunk in r.iter_raw():
                            n = min(len(chunk), length - got)
                            view[got : got + n] = chunk[:n]
                            got += n
                            received += len(chunk)
                            if got >= length:
                                break
                    finally:
                        with self._lock:
                            self.bytes_fetched += received
                if got < length:
                    raise httpx.RemoteProtocolError("body ended early")
            except _Reauth:
                failures += 1
                if failures > 2:
                    raise CredentialsError(
                        f"{self.name}: session rejected after re-login"
                    ) from None
            except httpx.TransportError as exc:
                failures = 0 if got > before else failures + 1  # progress resets the budget
                if failures >= self.attempts:
                    raise EndpointUnreachableError(
                        f"{self.name}: download of bytes {start}+{length} failed after "
                        f"{failures} attempts without progress "
                        f"({exc or type(exc).__name__}); the source may be down"
                    ) from None
                time.sleep(self.backoff * 2 ** max(0, failures - 1))
        return bytes(buf)

    # -- RangeReader --------------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        piece = max(MIN_PIECE, -(-length // self.workers))
        piece = -(-piece // 65536) * 65536
        return [(o, min(piece, offset + length - o)) for o in range(offset, offset + length, piece)]

    def _piece(self, args: tuple[int, int]) -> bytes:
        offset, length = args
        data = self._fetch(offset, length)
        self.meter.add(length)
        if self.progress is not None:
            self.progress(length)
        return data

    def _read_direct(self, offset: int, length: int) -> list[bytes]:
        pieces = self._pieces(offset, length)
        if self._pool is not None and self.workers > 1 and len(pieces) > 1:
            return list(self._pool.map(self._piece, pieces))
        return [self._piece(p) for p in pieces]

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.name}: read {offset}+{length} outside {self.size} bytes")
        if self._plan:
            return self._read_planned(offset, length)
        in_file = max(0, min(offset + length, self.file_size) - offset)
        parts = self._read_direct(offset, in_file) if in_file else []
        if in_file < length:
            parts.append(bytes(length - in_file))
        return b"".join(parts) if len(parts) != 1 else parts[0]

    # -- prefetch of announced extents -------------------------------------------------------------
    def prefetch(self, extents: Iterable) -> None:
        """Announce the ranges (Extents or (offset, length)) the consumer reads next, in order."""
        plan: list[tuple[int, int]] = []
        for e in extents:
            offset, length = (e.offset, e.length) if hasattr(e, "offset") else e
            end = min(offset + length, self.file_size)
            for start in range(offset, end, PREFETCH_PIECE):
                plan.append((start, min(end, start + PREFETCH_PIECE)))
        plan.sort()
        with self._plan_lock:
            self._drop_ahead()
            self._plan = plan
            self._plan_ends = [e for _, e in plan]
            self._next = 0
            self._fill()

    def _drop_ahead(self) -> None:
        while self._ahead:
            self._ahead.popleft()[2].cancel()

    def _fill(self) -> None:
        """Keep up to 4 pieces per worker (and PREFETCH_BYTES) in flight. Caller holds the lock."""
        held = sum(e - s for s, e, _ in self._ahead)
        while (
            self._pool is not None
            and self._next < len(self._plan)
            and len(self._ahead) < 4 * self.workers
            and held < PREFETCH_BYTES
        ):
            s, e = self._plan[self._next]
            self._ahead.append((s, e, self._pool.submit(self._piece, (s, e - s))))
            held += e - s
            self._next += 1

    def _read_planned(self, offset: int, length: int) -> bytes:
        end = offset + length
        with self._plan_lock:
            while self._ahead and self._ahead[0][1] <= offset:  # the consumer skipped these
                self._ahead.popleft()[2].cancel()
            want = bisect.bisect_right(self._plan_ends, offset)  # first piece ending after offset
            first = self._next - len(self._ahead)
            if want < first or want > self._next:  # a rewind (second pass) or a jump ahead
                self._drop_ahead()
                self._next = want
            self._fill()
            take = [item for item in self._ahead if item[0] < end]
        out = bytearray(length)
        covered = []
        for s, e, fut in take:
            data = fut.result()
            a, b = max(s, offset), min(e, end)
            out[a - offset : b - offset] = data[a - s : b - s]
            covered.append((a, b))
        with self._plan_lock:
            while self._ahead and self._ahead[0][1] <= end and self._ahead[0][2].done():
                self._ahead.popleft()
            self._fill()
        pos, stop = offset, min(end, self.file_size)
        for a, b in [*sorted(covered), (stop, stop)]:  # fetch what the plan did not cover
            if a > pos and pos < stop:
                gap_end = min(a, stop)
                out[pos - offset : gap_end - offset] = b"".join(
                    self._read_direct(pos, gap_end - pos)
                )
            pos = max(pos, b)
        return bytes(out)

    def close(self) -> None:
        with self._plan_lock:
            self._drop_ahead()
            self._plan, self._plan_ends = [], []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DatastoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reauth(Exception):
    """Internal: the session was refreshed after a 401/403; try again."""


def parse_descriptor(text: str, where: str) -> str:
    """The one flat extent file a VMDK descriptor names (relative to its directory)."""
    if "createType" not in text:
        raise SourceError(f"{where}: not a VMDK text descriptor")
    parent = re.search(r'^\s*parentCID\s*=\s*"?([0-9a-fA-F]+)"?', text, re.M)
    if parent and parent[1].lower() != "ffffffff":
        raise SourceError(
            f"{where} is a delta disk (the VM had snapshots before ours): consolidate or delete "
            "the VM's existing snapshots, then export again"
        )
    extents = _EXTENT.findall(text)
    if len(extents) != 1 or extents[0][2].upper() not in ("VMFS", "FLAT"):
        kinds = ", ".join(e[2] for e in extents) or "none"
        raise SourceError(
            f"{where}: extents of type {kinds} cannot be read through the datastore browser "
            "(only one flat/VMFS extent is supported)"
        )
    return extents[0][3]


def resolve_flat(client: httpx.Client, base_url: str, datacenter: str, file_name: str, cookie: str):
    """(datastore, path) of the flat extent behind a disk's descriptor ``[ds] dir/disk.vmdk``."""
    import httpx

    ds, path = split_ds_path(file_name)
    url = folder_url(base_url, datacenter, ds, path)
    try:
        r = client.get(url, headers={"Cookie": cookie, "Range": f"bytes=0-{MAX_DESCRIPTOR - 1}"})
    except httpx.TransportError as exc:
        raise EndpointUnreachableError(f"cannot read descriptor {file_name}: {exc}") from None
    if r.status_code in (401, 403):
        raise CredentialsError(f"{file_name}: HTTP {r.status_code} reading the descriptor")
    if r.status_code == 404:
        raise DiskReadError(f"disk descriptor {file_name} not found on datastore {ds}")
    if r.status_code not in (200, 206):
        raise DiskReadError(f"{file_name}: descriptor read answered HTTP {r.status_code}")
    head = r.content[:MAX_DESCRIPTOR]
    if head[:4] == b"KDMV":
        raise SourceError(f"{file_name} is a sparse VMDK: export it with ExportVm (NFC) instead")
    flat = parse_descriptor(head.decode("utf-8", "replace"), file_name)
    directory = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    return ds, flat if "/" in flat else directory + flat
