"""The streams between pipeline stages (hypersdk.stages): order, bounded memory, zero-copy loans
of read buffers that are never refilled under the consumer, and failures that stop every stage
instead of hanging one."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from hypersdk.extents import ExtentMap
from hypersdk.io import IO_CHUNK, FileRangeReader, read_pieces
from hypersdk.stages import Pipe, StageAborted, StageStats


class _Collect:
    """A slow sink that keeps a hash of what it got, in order."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.hash = hashlib.sha256()
        self.n = 0
        self._delay = delay
        self._fail_at = fail_at

    def write(self, data) -> int:
        if self._fail_at is not None and self.n >= self._fail_at:
            raise OSError(28, "no space left (test)")
        time.sleep(self._delay)
        self.hash.update(data)
        self.n += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.write(bytes(length))


def _drain(pipe: Pipe, sink) -> tuple[threading.Thread, list]:
    errors: list = []

    def run():
        try:
            pipe.drain(sink, StageStats("upload"))
        except BaseException as exc:  # recorded for the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def test_borrowed_read_buffers_are_not_refilled_before_they_are_written(tmp_path):
    """read_pieces views lent to a slow consumer: the ring would be refilled long before the
    consumer got there without the loans; the bytes must arrive exactly as the file holds them."""
    path = tmp_path / "src"
    path.write_bytes(os.urandom(12 * IO_CHUNK + 12345))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    sink = _Collect(delay=0.01)
    pipe = Pipe("upload")
    thread, errors = _drain(pipe, sink)
    with FileRangeReader(path) as reader:
        pieces = ExtentMap.full(reader.size).split(IO_CHUNK)
        for _, view in read_pieces(reader, pieces, depth=2):
            pipe.write(view)  # large: lent, not copied
            pipe.write(b"")  # nothing, in between
    pipe.close_write()
    thread.join(30)
    assert not errors and sink.n == path.stat().st_size
    assert sink.hash.hexdigest() == expected


def test_small_big_and_zero_writes_keep_their_order():
    sink = _Collect()
    pipe = Pipe("upload", buffers=2, size=1 << 20)
    thread, errors = _drain(pipe, sink)
    reference = hashlib.sha256()
    for i in range(200):
        small = bytes([i % 251]) * (i * 37 % 5000 + 1)
        big = os.urandom(300_000 + i)  # bytes: borrowed as they are
        for data in (small, big):
            pipe.write(data)
            reference.update(data)
        pipe.write_zeros(i * 13)
        reference.update(bytes(i * 13))
    pipe.close_write()
    thread.join(30)
    assert not errors and sink.hash.hexdigest() == reference.hexdigest()
    assert pipe.tell() == sink.n


def test_a_failing_consumer_stops_the_producer_and_returns_every_loan(tmp_path):
    """The consumer fails after 2 pieces: the producer's next writes raise its error, and the
    read ring (waiting for loans) does not hang."""
    path = tmp_path / "src"
    path.write_bytes(os.urandom(10 * IO_CHUNK))
    pipe = Pipe("upload")
    thread, errors = _drain(pipe, _Collect(fail_at=2 * IO_CHUNK))
    with (
        pytest.raises(OSError, match="no space"),
        FileRangeReader(path) as reader,
    ):
        for _, view in read_pieces(reader, ExtentMap.full(reader.size).split(IO_CHUNK), depth=2):
            pipe.write(view)
    pipe.abort(OSError("producer stopped"))
    thread.join(30)
    assert not thread.is_alive() and isinstance(errors[0], OSError)


def test_an_aborted_producer_stops_the_consumer():
    pipe = Pipe("upload")
    thread, errors = _drain(pipe, _Collect())
    pipe.write(b"x" * 1000)
    pipe.abort(RuntimeError("convert failed"))
    thread.join(30)
    assert isinstance(errors[0], StageAborted) and "convert failed" in str(errors[0])
