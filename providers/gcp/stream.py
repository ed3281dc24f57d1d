"""The exported image (``disk.raw`` in a tar.gz on GCS) as a RangeReader, streamed, never staged.

``gcloud compute images export`` writes the Compute Engine image format: one gzip stream holding a
tar archive whose only member is ``disk.raw``. Neither gzip nor tar can seek, so the reader is
forward-only: it decompresses from the start of the object and serves reads at or after its
position (skipping by decompressing and dropping the bytes in between). The pipeline reads the
planned extents in ascending order, so one pass over the object serves an export; a read that
goes backwards (a format writer's sizing pass) restarts the stream from the object's start.

The object is untrusted: the tar headers are parsed here, within fixed bounds (at most
``MAX_HEADERS`` header blocks, each extended header at most ``MAX_EXTENDED`` bytes), the member
must be a regular file named ``disk.raw`` whose size is a whole number of sectors and at most the
disk's capacity, and the decompressor never makes more than one buffer of output per call, so a
gzip bomb costs time bounded by the member's size, never memory.
"""

from __future__ import annotations

import logging
import tarfile
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO

from hypersdk.errors import DiskReadError, FormatError

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE  # 512
MEMBER = "disk.raw"
MAX_HEADERS = 4  # a pax or GNU long-name header, then the member: more is not an export
MAX_EXTENDED = 64 * 1024
OUT_CHUNK = 4 * 1024 * 1024  # most output one decompress call makes
IN_CHUNK = 1024 * 1024
# headers that only describe the next member (or the archive): read within MAX_EXTENDED
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class GzipStream:
    """Forward-only decompressed bytes of a gzip file (several members allowed, as gzip does)."""

    def __init__(self, raw: BinaryIO, name: str):
        self._raw = raw
        self.name = name
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed input not yet given to the decompressor
        self._eof = False
        self._fresh = True  # no input given to the current decompressor yet
        self._owed = False
        self.compressed_bytes = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        out: list[bytes] = []
        want = n
        while want > 0:
            if self._z.unconsumed_tail:
                data = self._z.unconsumed_tail
            elif self._owed:
                data = b""  # output the last call held back for want of room
            else:
                if not self._pending:
                    if self._eof:
                        break
                    self._pending = self._raw.read(IN_CHUNK)
                    self.compressed_bytes += len(self._pending)
                    if not self._pending:
                        self._eof = True
                        if not self._fresh:  # inside a member: the object was cut short
                            raise FormatError(self.name, "gzip stream is truncated")
                        break
                data, self._pending = self._pending, b""
            try:
                chunk = self._z.decompress(data, min(want, OUT_CHUNK))
            except zlib.error as exc:
                raise FormatError(self.name, f"gzip stream is corrupt: {exc}") from None
            self._fresh = False
            # all input taken and the output full: zlib may hold more output back
            self._owed = not self._z.unconsumed_tail and len(chunk) == min(want, OUT_CHUNK)
            out.append(chunk)
            want -= len(chunk)
            if self._z.eof:  # another gzip member may follow
                self._pending = self._z.unused_data + self._pending
                self._z = zlib.decompressobj(wbits=31)
                self._fresh, self._owed = True, False
        return b"".join(out)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise FormatError(self.name, f"archive ends inside {what}")
        return data


def _pax_size(data: bytes, name: str) -> int | None:
    """The ``size`` record of a pax extended header (records are ``LEN key=value\\n``)."""
    pos, found = 0, None
    while pos < len(data) and data[pos : pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise FormatError(name, "pax header is malformed")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise FormatError(name, "pax header is malformed") from None
        if length <= 0 or pos + length > len(data):
            raise FormatError(name, "pax header is malformed")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"size":
            try:
                found = int(value)
            except ValueError:
                raise FormatError(name, "pax header has a malformed size") from None
        pos += length
    return found


def open_member(stream: GzipStream, capacity: int) -> int:
    """Read the tar headers up to ``disk.raw``'s data; its size. FormatError for anything that is
    not an image export."""
    name = stream.name
    size_override: int | None = None
    long_name: bytes | None = None
    for _ in range(MAX_HEADERS):
        buf = stream.read_exact(BLOCK, "a tar header")
        if buf == bytes(BLOCK):
            raise FormatError(name, f"archive holds no {MEMBER}")
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise FormatError(name, f"not a tar archive ({exc})") from None
        if info.type in _EXTENDED:
            if info.size > MAX_EXTENDED:
                raise FormatError(name, f"extended tar header of {info.size} bytes: refused")
            data = stream.read_exact(-(-info.size // BLOCK) * BLOCK, "an extended header")
            data = data[: info.size]
            if info.type == tarfile.XHDTYPE:
                size_override = _pax_size(data, name)
                path = next(
                    (r.partition(b"=")[2] for r in data.split(b"\n") if b" path=" in r), None
                )
                long_name = path if path is not None else long_name
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0")
            continue  # a global pax header or a GNU long link name: nothing we use
        member = long_name.decode("utf-8", "replace") if long_name else info.name
        if member.removeprefix("./") != MEMBER:
            raise FormatError(name, f"archive member {member[:80]!r} is not {MEMBER}")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise FormatError(name, f"{MEMBER} is not a regular file in the archive")
        size = size_override if size_override is not None else info.size
        if size <= 0 or size % 512 or size > capacity:
            raise FormatError(
                name, f"{MEMBER} is {size} bytes: not whole sectors within the disk's {capacity}"
            )
        return size
    raise FormatError(name, f"more than {MAX_HEADERS} tar headers before {MEMBER}: refused")


class TarGzDiskReader:
    """RangeReader over ``disk.raw`` inside a tar.gz object, opened by ``opener`` (a new
    streamed read of the object from its start, each call)."""

    def __init__(self, opener: Callable[[], BinaryIO], name: str, capacity: int, progress=None):
        self.name = name
        self._opener = opener
        self._capacity = capacity
        self._lock = threading.Lock()
        self._raw: BinaryIO | None = None
        self._stream: GzipStream | None = None
        self._pos = 0
        self._progress = progress
        self.passes = 0  # streams opened: 1 for an export that reads in order
        self.size = self._start()

    def _start(self) -> int:
        self._close_stream()
        self._raw = self._opener()
        self._stream = GzipStream(self._raw, self.name)
        self.passes += 1
        size = open_member(self._stream, self._capacity)
        self._pos = 0
        return size

    def _close_stream(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001 - closing a dead HTTP stream
                log.debug("closing %s failed", self.name, exc_info=True)
            self._raw = None

    def _take(self, n: int) -> bytes:
        assert self._stream is not None
        data = self._stream.read(n)
        if len(data) != n:
            raise DiskReadError(f"{self.name}: the image ends at {self._pos + len(data)} bytes")
        self._pos += n
        if self._progress:
            self._progress(n)
        return data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self._lock:
            if offset < self._pos:
                log.info(
                    "%s: read at %d goes back from %d: restarting", self.name, offset, self._pos
                )
                self._start()
            stop = min(offset + length, self.size)
            while self._pos < min(offset, self.size):  # skip what nobody asked for
                self._take(min(OUT_CHUNK, offset - self._pos))
            data = self._take(stop - offset) if stop > offset else b""
        return data + bytes(length - len(data))  # past the end reads as zeros

    def close(self) -> None:
        with self._lock:
            self._close_stream()
            self._stream = None

    def __enter__(self) -> TarGzDiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
