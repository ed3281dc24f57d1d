"""The exported image reader (providers.gcp.stream) on crafted tar.gz bytes: reads in order are
served from one pass, a backward read restarts the stream, several gzip members read as one, and
hostile archives (wrong member, oversized extended header, a member larger than the disk, a
truncated or corrupt stream, a gzip bomb) are one FormatError line within bounded memory."""

from __future__ import annotations

import gzip
import io
import logging
import os
import tarfile

import pytest

from hypersdk.errors import DiskReadError, FormatError
from providers.gcp.stream import TarGzDiskReader

MiB = 1024 * 1024


def _targz(members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT, pax=None) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=fmt, pax_headers=pax or {}) as tar,
    ):
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _reader(blob: bytes, capacity: int = 64 * MiB) -> TarGzDiskReader:
    return TarGzDiskReader(lambda: io.BytesIO(blob), "gs://b/x.tar.gz", capacity)


def test_reads_in_order_one_pass_and_backwards_restarts(caplog):
    caplog.set_level(logging.INFO, "providers.gcp.stream")
    disk = os.urandom(MiB) + bytes(2 * MiB) + os.urandom(MiB)
    reader = _reader(_targz([("disk.raw", disk)]))
    assert reader.size == len(disk)
    assert reader.read(4096, 100) == disk[4096:4196]
    assert reader.read(3 * MiB, MiB) == disk[3 * MiB :]
    assert reader.passes == 1 and "restarting" not in caplog.text
    assert reader.read(0, 10) == disk[:10]  # backwards: a new stream from the start
    assert reader.passes == 2 and "restarting" in caplog.text  # what the flow test looks for
    assert reader.read(len(disk) - 5, 10) == disk[-5:] + bytes(5)  # past the end: zeros
    reader.close()


def test_several_gzip_members_and_pax():
    disk = os.urandom(512 * 1024)
    whole = _targz([("disk.raw", disk)], fmt=tarfile.PAX_FORMAT, pax={"comment": "x"})
    raw = gzip.decompress(whole)
    split = gzip.compress(raw[:70_000]) + gzip.compress(raw[70_000:])
    assert _reader(split).read(0, len(disk)) == disk


@pytest.mark.parametrize(
    "blob, problem",
    [
        (_targz([("etc/passwd", b"x" * 512)]), "is not disk.raw"),
        (_targz([("disk.raw", b"x" * 1000)]), "not whole sectors"),
        (_targz([("disk.raw", bytes(2 * MiB))]), "within the disk"),  # capacity 1 MiB below
        (b"not gzip at all", "corrupt"),
        (gzip.compress(b"\0" * 1024), "holds no disk.raw"),
        (_targz([("disk.raw", bytes(MiB))])[:20], "truncated"),
    ],
    ids=["other-member", "odd-size", "too-big", "not-gzip", "no-member", "cut-short"],
)
def test_hostile_archives(blob, problem):
    with pytest.raises(FormatError) as err:
        _reader(blob, capacity=MiB)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_huge_extended_header_and_truncated_member():
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 512 * MiB  # claims half a GiB of header: refused before reading it
    blob = gzip.compress(pax.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(FormatError, match="extended tar header"):
        _reader(blob)
    cut = gzip.compress(gzip.decompress(_targz([("disk.raw", os.urandom(MiB))]))[: 512 + 4096])
    reader = _reader(cut)
    with pytest.raises(DiskReadError, match="ends at"):
        reader.read(0, MiB)


def test_gzip_bomb_is_bounded_by_the_member():
    """A member that claims more than the disk holds is refused at its header; one within it
    is read only up to its size, whatever follows (memory: one output buffer)."""
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb", compresslevel=9) as gz:
        info = tarfile.TarInfo("disk.raw")
        info.size = 4 * MiB
        gz.write(info.tobuf(tarfile.GNU_FORMAT))
        for _ in range(16):  # 16 MiB of zeros after a 4 MiB member
            gz.write(bytes(MiB))
    reader = _reader(bomb.getvalue(), capacity=4 * MiB)
    assert reader.read(0, 4 * MiB) == bytes(4 * MiB)
    assert reader.read(4 * MiB, 10) == bytes(10)  # past the member: zeros, nothing decoded


def test_small_reads_drain_what_zlib_holds_back():
    """Reads of odd small sizes end where the member does, whatever zlib kept buffered."""
    disk = os.urandom(300_000) + bytes(700_000) + os.urandom(48_576)
    reader = _reader(_targz([("disk.raw", disk)]))
    got = bytearray()
    pos = 0
    for step in [1, 7, 4093, 65_536, 511, 1 << 20]:
        while pos < len(disk):
            n = min(step, len(disk) - pos)
            got += reader.read(pos, n)
            pos += n
            if len(got) % 3 == 0:
                break
    assert bytes(got) == disk and reader.passes == 1
