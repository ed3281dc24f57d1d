"""HSDELTA, the repository's delta format: round trips over random extent maps checked against a
reference composition written here (parent bytes, then the delta's entries), the streaming
writer (in order, never seeking, large source reads), the documented byte layout (an encoder
written from docs/repository.md, and the document's worked example regenerated), the CLI on a
lone delta, and hostile objects: each a FormatError naming the object, in a child process under
a memory limit (tests/limited.py)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hypersdk.cli.main import main
from hypersdk.errors import FormatError, InvalidParameterError, UnsupportedFormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import drivers, get_driver, open_image
from hypersdk.formats.hsdelta import DeltaLayer
from hypersdk.io import IO_CHUNK
from tests.limited import hyperctl, python, refused

KiB, MiB = 1 << 10, 1 << 20
EXPORT_ID = "20250101T000000Z-0a1b2c3d"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "repository.md"


def options(parent_size: int, **changes: str) -> dict[str, str]:
    return {
        "parent_export_id": EXPORT_ID,
        "parent_disk": "disk0",
        "parent_object_blake3": blake3.blake3(b"parent").hexdigest(),
        "parent_virtual_size": str(parent_size),
        **changes,
    }


class BytesReader:
    """A RangeReader over bytes (an object on a target, as the chain reader sees it)."""

    def __init__(self, data: bytes, name: str = "mem.hsdelta"):
        self.data, self.size, self.name = data, len(data), name

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.size, (offset, length, self.size)
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


class RecordingSink:
    """A Sink with no way to seek, recording every call."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.buf = bytearray()

    def write(self, data) -> int:
        self.calls.append(("write", len(data)))
        self.buf += data
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.calls.append(("zeros", length))
        self.buf += bytes(length)

    def tell(self) -> int:
        return len(self.buf)


class RecordingSource:
    """The new point's disk, recording the reads the writer makes (through ``readinto``)."""

    def __init__(self, data: bytes):
        self.data, self.size, self.name = data, len(data), "source"
        self.reads: list[tuple[int, int]] = []

    def readinto(self, offset: int, view: memoryview) -> None:
        self.reads.append((offset, len(view)))
        view[:] = self.data[offset : offset + len(view)]


def write_delta(new: bytes, em: ExtentMap, parent_size: int, **changes: str) -> bytes:
    driver = get_driver("hsdelta")
    layout = driver.plan(len(new), em, options(parent_size, **changes))
    sink = RecordingSink()
    driver.write(RecordingSource(new), layout, sink)
    assert sink.tell() == layout.total_size
    return bytes(sink.buf)


def compose(parent: bytes, em: ExtentMap, new: bytes) -> bytes:
    """The reference: the parent's bytes (zeros past its end), then each entry of the delta."""
    size = em.size
    out = bytearray(parent[:size].ljust(size, b"\0"))
    for e in em:
        out[e.offset : e.end] = bytes(e.length) if e.zero else new[e.offset : e.end]
    return bytes(out)


# ------------------------------------------------------------- the documented layout, again
def encode(
    entries: list[tuple],
    data: bytes,
    *,
    vsize: int,
    parent_size: int,
    count: int | None = None,
    data_offset: int | None = None,
    data_size: int | None = None,
    version: int = 1,
    flags: int = 0,
    index_offset: int = 4096,
    export_id: bytes = EXPORT_ID.encode(),
    disk: bytes = b"disk0",
    parent_hash: bytes = blake3.blake3(b"parent").digest(),
    header_tail: bytes = b"",
    gap: bytes = b"",
    extra: bytes = b"",
    index_hash: bytes | None = None,
    header_hash: bytes | None = None,
) -> bytes:
    """An HSDELTA object encoded from docs/repository.md alone (not from the module), with
    every field overridable: hostile objects with valid hashes unless told otherwise."""
    index = b"".join(struct.pack("<QQB7s", *(tuple(e) + (b"",))[:4]) for e in entries)
    count = len(entries) if count is None else count
    if data_offset is None:
        data_offset = -(-(4096 + len(index)) // 4096) * 4096
    data_size = len(data) if data_size is None else data_size
    header = bytearray(4096)
    struct.pack_into(
        "<8sIIQQQQQQ32s32s", header, 0, b"HSDELTA1", version, flags, vsize, parent_size,
        count, index_offset, data_offset, data_size, parent_hash,
        blake3.blake3(index).digest() if index_hash is None else index_hash,
    )  # fmt: skip
    strings = struct.pack("<H", len(export_id)) + export_id + struct.pack("<H", len(disk)) + disk
    header[160 : 160 + len(strings)] = strings
    header[160 + len(strings) : 160 + len(strings) + len(header_tail)] = header_tail
    header[128:160] = blake3.blake3(bytes(header)).digest() if header_hash is None else header_hash
    pad = bytearray(max(0, data_offset - 4096 - len(index)))
    pad[: len(gap)] = gap
    return bytes(header) + index + bytes(pad) + data + extra


def test_writer_matches_the_documented_layout():
    """The writer's bytes are exactly what the specification's encoder makes."""
    size = 3 * MiB + 17
    new = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    em = ExtentMap(size, [Extent(5, 70_000), Extent(MiB, MiB, True), Extent(3 * MiB, 17)])
    got = write_delta(new, em, parent_size=2 * MiB)
    data = new[5:70_005] + new[3 * MiB :]
    want = encode([(5, 70_000, 1), (MiB, MiB, 2), (3 * MiB, 17, 1)], data, vsize=size,
                  parent_size=2 * MiB)  # fmt: skip
    assert got == want


# ------------------------------------------------------------------------------- round trips
@st.composite
def points(draw):
    """A parent disk, the new point's size (odd, grown, shrunk, empty), and its changes."""
    parent_size = draw(st.integers(0, 200_000))
    size = draw(st.one_of(st.integers(0, 200_000), st.just(parent_size)))
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))) | {0, size})
    kinds = st.sampled_from(["same", "data", "zero"])
    segments = [(a, b, draw(kinds)) for a, b in zip(cuts, cuts[1:], strict=False)]
    return parent_size, size, segments, draw(st.integers(0, 2**32 - 1))


def _parent_reader(parent: bytes):
    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(parent), "read past the parent's end"
        return parent[offset : offset + length]

    return read


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points())
@example((10_000, 0, [], 1))  # an empty disk
@example((10_000, 10_000, [(0, 10_000, "same")], 2))  # an empty delta
@example((8192, 20_003, [(0, 5, "data"), (8000, 20_003, "zero")], 3))  # grown, odd tail
@example((65_536, 65_535, [(61_440, 65_535, "data")], 4))  # shrunk, last partial block
def test_round_trip(point):
    parent_size, size, segments, seed = point
    rng = np.random.default_rng(seed)
    parent = rng.integers(0, 256, parent_size, dtype=np.uint8).tobytes()
    new = bytearray(parent[:size].ljust(size, b"\0"))
    extents = []
    for a, b, kind in segments:
        if kind == "data":
            chunk = rng.integers(0, 256, b - a, dtype=np.uint8)
            chunk[: (b - a) // 3] = 0  # zero bytes inside data stay data
            new[a:b] = chunk.tobytes()
            extents.append(Extent(a, b - a))
        elif kind == "zero":
            new[a:b] = bytes(b - a)
            extents.append(Extent(a, b - a, True))
    new = bytes(new)
    em = ExtentMap(size, extents)
    obj = write_delta(new, em, parent_size)
    assert len(obj) == -(-(4096 + 24 * len(em)) // 4096) * 4096 + em.data_bytes
    want = compose(parent, em, new)
    assert want == new  # the reference agrees with how the new disk was made

    layer = DeltaLayer(BytesReader(obj), parent_read=_parent_reader(parent))
    assert layer.virtual_size == size and layer.check() == []
    assert layer.read(0, size) == want
    assert layer.own_extents() == em
    view = memoryview(bytearray(size))
    layer.readinto(0, view)
    assert view == want
    probes = [(int(a), int(n)) for a, n in rng.integers(0, size + 1, (6, 2))]
    for a, n in probes:
        n = max(1, min(n, size - a)) if a < size else 0
        assert layer.read(a, n) == want[a : a + n]
        assert not n or layer.covered(a, n) == [
            Extent(max(a, e.offset), min(a + n, e.end) - max(a, e.offset), e.zero)
            for e in em
            if e.end > a and e.offset < a + n
        ]
    # outside extents() the point reads as zeros
    shown = layer.extents()
    pos = 0
    for e in [*shown, Extent(size, 0)]:
        assert not any(want[pos : e.offset])
        pos = e.end

    # alone, the layer answers what it holds and what lies past the parent, never the rest
    alone = DeltaLayer(BytesReader(obj, "alone.hsdelta"))
    own = np.zeros(size, dtype=bool)
    for e in em:
        own[e.offset : e.end] = True
    own[parent_size:] = True
    for a, n in [(0, size), *probes]:
        n = max(1, min(n, size - a)) if a < size else 0
        if own[a : a + n].all():
            assert alone.read(a, n) == want[a : a + n]
        else:
            with pytest.raises(FormatError, match="alone.hsdelta: .* not in this delta"):
                alone.read(a, n)
    if own.all():
        assert alone.extents() == shown
    else:
        with pytest.raises(FormatError, match="backup chain"):
            alone.extents()


def test_parent_extents_show_through():
    """With the parent's extents known, a layer's extents() are its data plus the parent's data
    in the gaps (not the whole gaps), and zero entries hide the parent's data."""
    size = 64 * KiB
    em = ExtentMap(size, [Extent(0, 4 * KiB), Extent(16 * KiB, 16 * KiB, True)])
    obj = write_delta(bytes(size), em, parent_size=48 * KiB)
    parent = ExtentMap(48 * KiB, [Extent(2 * KiB, 6 * KiB), Extent(20 * KiB, 24 * KiB)])
    layer = DeltaLayer(
        BytesReader(obj), parent_read=_parent_reader(bytes(48 * KiB)), parent_extents=lambda: parent
    )
    assert list(layer.extents()) == [Extent(0, 8 * KiB), Extent(32 * KiB, 12 * KiB)]


def test_writer_streams_in_order_with_large_reads():
    """Header, index, padding and data leave in one ordered pass into a sink that cannot seek,
    and the data is read through read_pieces in pieces of up to 4 MiB, not per extent."""
    size = 12 * MiB + 3
    new = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    em = ExtentMap(size, [Extent(1, 9 * MiB), Extent(10 * MiB, MiB, True), Extent(12 * MiB, 3)])
    driver = get_driver("hsdelta")
    layout = driver.plan(size, em, options(size))
    source, sink, seen = RecordingSource(new), RecordingSink(), []
    driver.write(source, layout, sink, progress=seen.append)
    assert sink.calls[:3] == [("write", 4096), ("write", 72), ("zeros", 4096 - 72)]
    assert sum(n for _, n in sink.calls) == sink.tell() == layout.total_size
    assert source.reads == [(1, IO_CHUNK - 1), (IO_CHUNK, IO_CHUNK), (2 * IO_CHUNK, MiB + 1),
                            (12 * MiB, 3)]  # fmt: skip
    assert sum(seen) == em.data_bytes
    assert bytes(sink.buf[8192:]) == new[1 : 9 * MiB + 1] + new[12 * MiB :]


@pytest.mark.parametrize(
    "change,words",
    [
        ({"parent_export_id": ""}, "needs option parent_export_id"),
        ({"parent_export_id": "../other"}, "parent_export_id '../other' is malformed"),
        ({"parent_export_id": "a" * 129}, "malformed"),
        ({"parent_disk": "d" * 256}, "256 bytes of UTF-8, at most 255"),
        ({"parent_disk": "\udcff"}, "not valid UTF-8"),
        ({"parent_object_blake3": "ab" * 31}, "64 hex digits"),
        ({"parent_object_blake3": "zz" * 32}, "64 hex digits"),
        ({"parent_virtual_size": "-1"}, "must be a byte count"),
        ({"parent_virtual_size": "1e6"}, "must be a byte count"),
        ({"parent_virtual_size": str(1 << 63)}, "must be a byte count"),
        ({"cluster_size": "4096"}, "has no option cluster_size"),
    ],
)
def test_plan_validates_the_parent(change, words):
    with pytest.raises(InvalidParameterError, match=re.escape(words)):
        get_driver("hsdelta").plan(4096, ExtentMap.full(4096), options(4096, **change))


def test_plan_refuses_a_map_of_another_size():
    with pytest.raises(InvalidParameterError, match="extent map covers 4096 bytes, disk 8192"):
        get_driver("hsdelta").plan(8192, ExtentMap.full(4096), options(4096))


# ----------------------------------------------------------------------- registry and CLI
def test_registered_as_a_delta(tmp_path):
    driver = drivers()["hsdelta"]
    assert driver.kind == "delta" and driver.supports_backing
    assert driver.extensions == (".hsdelta",)
    path = tmp_path / "d.hsdelta"
    path.write_bytes(write_delta(b"x" * 5000, ExtentMap.full(5000), 4096))
    with open_image(path) as img:  # probed on the magic
        assert isinstance(img, DeltaLayer) and img.read(0, 5000) == b"x" * 5000


def _cli(capsys, *args: object) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_cli_on_a_lone_delta(tmp_path, capsys):
    """``info`` shows the header and says the delta needs its chain; ``check`` passes;
    ``convert`` refuses in one line instead of writing zeros where the parent's bytes go,
    and leaves no output; a delta that covers its whole disk converts on its own."""
    size = 40 * KiB + 5
    new = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "p.hsdelta"
    path.write_bytes(write_delta(new, ExtentMap(size, [Extent(KiB, 3 * KiB)]), size))
    code, out, _ = _cli(capsys, "info", path, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "hsdelta" and info["virtual_size"] == size
    assert info["parent_export_id"] == EXPORT_ID and info["parent_disk"] == "disk0"
    assert info["parent_object_blake3"] == blake3.blake3(b"parent").hexdigest()
    assert info["extent_count"] == 1 and info["data_bytes"] == 3 * KiB
    assert "backup chain" in info["delta"]
    code, out, _ = _cli(capsys, "check", path)
    assert code == 0 and "no errors found (hsdelta)" in out
    code, _, err = _cli(capsys, "convert", "-q", "-O", "raw", path, tmp_path / "out.raw")
    assert code == 1 and len(err) == 1 and "not in this delta" in err[0] and str(path) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.hsdelta"]

    whole = tmp_path / "whole.hsdelta"
    whole.write_bytes(write_delta(new, ExtentMap.full(size), 4096))
    code, _, err = _cli(capsys, "convert", "-q", "-O", "raw", whole, tmp_path / "w.raw")
    assert code == 0, err
    assert (tmp_path / "w.raw").read_bytes() == new


# ------------------------------------------------------------------------------------ hostile
DATA = b"0123456789" * 10
GOOD = [(0, 60, 1), (4096, 4096, 2), (9000, 40, 1)]


def _good(**kw) -> bytes:
    return encode(GOOD, DATA, vsize=20_000, parent_size=16_384, **kw)


def _entries(entries, data=DATA, **kw) -> bytes:
    return encode(entries, data, vsize=20_000, parent_size=16_384, **kw)


def _bad_header_hash() -> bytes:
    obj = bytearray(_good())
    obj[16] ^= 1  # virtual_size changed, the hash kept
    return bytes(obj)


def _bad_index_hash() -> bytes:
    obj = bytearray(_good())
    obj[4096 + 8] ^= 1  # an entry's length changed, the index hash kept
    return bytes(obj)


def _max_entries() -> bytes:
    """The most entries a v1 object may hold (2**20, 24 MiB of index), all of kind 0."""
    n = 1 << 20
    return encode([], b"", vsize=1 << 40, parent_size=0, count=n,
                  data_offset=4096 + 24 * n, index_hash=blake3.blake3(bytes(24 * n)).digest(),
                  )  # fmt: skip


HOSTILE: dict[str, tuple] = {
    # name: (object bytes or a callable making them, words the one-line error must contain)
    "truncated-header": (lambda: _good()[:1000], "truncated HSDELTA object: 1000 bytes"),
    "header-hash": (_bad_header_hash, "header hash mismatch"),
    "index-hash": (_bad_index_hash, "index hash mismatch"),
    "version": (lambda: _good(version=2), "HSDELTA version 2 is not supported"),
    "flags": (lambda: _good(flags=1), "HSDELTA flags 0x1 are not supported"),
    "export-id": (lambda: _good(export_id=b"../../x"), "parent export id '../../x' is malformed"),
    "disk-utf8": (lambda: _good(disk=b"\xff\xfe"), "parent disk name is not UTF-8"),
    "disk-length": (lambda: _good(disk=b""), "parent disk name length 0 is not 1..255"),
    "header-padding": (lambda: _good(header_tail=b"\1"), "header padding"),
    "index-offset": (lambda: _good(index_offset=0), "index offset 0 is not 4096"),
    "count-larger-than-object": (lambda: _good(count=1 << 40), "index of 1099511627776 entries"),
    "index-past-end": (lambda: _good(count=200), "index of 200 entries needs 4800 bytes"),
    "too-many-entries": (
        lambda: encode(
            [],
            b"",
            vsize=1,
            parent_size=0,
            count=(1 << 20) + 1,
            data_offset=4096 + 24 * ((1 << 20) + 1),
        ),
        "index of 1048577 entries exceeds 1048576",
    ),  # fmt: skip
    "max-entries": (_max_entries, "index entry 0 has kind 0"),
    "data-offset": (lambda: _good(data_offset=4096 + 72), "data offset 4168 is not 8192"),
    "data-short": (lambda: _good()[:-1], "data area short"),
    "data-extra": (lambda: _good(extra=b"x"), "data area followed by extra bytes"),
    "data-size": (
        lambda: _good(data_size=99)[:-1],
        "index holds 100 data bytes, the header's data area 99",
    ),
    "data-larger-than-disk": (lambda: _good(data_size=1 << 62), "exceeds the disk's 20000"),
    "overlap": (
        lambda: _entries([(0, 60, 1), (50, 4096, 2), (9000, 40, 1)]),
        "index entry 1 at 50 overlaps entry 0 (0+60)",
    ),
    "unsorted": (
        lambda: _entries([(9000, 40, 1), (4096, 4096, 2), (0, 60, 1)]),
        "entries must be sorted",
    ),
    "past-disk": (lambda: _entries([(0, 60, 1), (19_990, 40, 1)]), "ends past the disk's 20000"),
    "wraps": (lambda: _entries([(0, 60, 1), (2**64 - 8, 48, 1)]), "ends past the disk's"),
    "kind": (lambda: _entries([(0, 100, 3)]), "index entry 0 has kind 3"),
    "reserved": (lambda: _entries([(0, 100, 1, b"\0\0\1")]), "non-zero reserved bytes"),
    "empty-entry": (lambda: _entries([(0, 100, 1), (200, 0, 2)]), "index entry 1 is empty"),
    "index-padding": (lambda: _good(gap=b"\0\7"), "padding between index and data"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every hostile object opened (probed) in one child under 1 GiB of address space: the
    error each gave, or what went wrong instead."""
    where = tmp_path_factory.mktemp("hostile")
    for name, (make, _) in HOSTILE.items():
        (where / f"{name}.hsdelta").write_bytes(make())
    code = """
import json, sys
from pathlib import Path
from hypersdk.errors import HyperSDKError
from hypersdk.formats import open_image
out = {}
for path in sorted(Path(sys.argv[1]).glob("*.hsdelta")):
    try:
        with open_image(path) as img:
            out[path.stem] = "opened as " + img.format
    except HyperSDKError as exc:
        out[path.stem] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""
    res = python(code, where, timeout=60)
    assert res.returncode == 0, res.stderr
    return where, json.loads(res.stdout)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_object(hostile, name):
    where, errors = hostile
    kind = "UnsupportedFormatError" if name in ("version", "flags") else "FormatError"
    error = errors[name]
    assert error.startswith(f"{kind}: {where / name}.hsdelta: "), error
    assert HOSTILE[name][1] in error and "\n" not in error, error


def test_hostile_objects_on_the_command_line(hostile):
    """The same refusal as one line from hyperctl, under the memory limit."""
    where, _ = hostile
    for name, cmd in (("overlap", "check"), ("data-short", "info"), ("max-entries", "convert")):
        path = where / f"{name}.hsdelta"
        args = (cmd, path, where / "out.raw") if cmd == "convert" else (cmd, path)
        refused(hyperctl(*args, timeout=60), str(path), HOSTILE[name][1])


def test_unsupported_is_typed():
    with pytest.raises(UnsupportedFormatError):
        DeltaLayer(BytesReader(_good(version=2)))


def test_check_reports_a_short_data_area():
    """A reader whose object turns out shorter than its size (a ranged read that comes back
    short) is a problem for check(), and an error for a read, not zeros."""

    class Short(BytesReader):
        def read(self, offset: int, length: int) -> bytes:
            return self.data[offset : offset + length][: max(0, self.size - 10 - offset)]

    layer = DeltaLayer(Short(_good()), parent_read=_parent_reader(bytes(16_384)))
    assert layer.check() == ["data area read at 8192 gave 90 of 100 bytes"]
    with pytest.raises(FormatError, match="data read at 8252 gave 30 of 40 bytes"):
        layer.read(9000, 40)


# ---------------------------------------------------------------- the document's example
def hexdump_c(data: bytes) -> str:
    """``hexdump -C``'s output (repeated lines as ``*``)."""
    lines, previous, starred = [], None, False
    for at in range(0, len(data), 16):
        row = data[at : at + 16]
        if row == previous:
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = row, False
        hexes = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{at:08x}  {hexes:<48}  |{text}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines)


def example_object() -> bytes:
    """The worked example of docs/repository.md: a parent disk of 8 KiB of 'A', grown to
    12 KiB; "hello, world" written at 100, the second 4 KiB zeroed, "tail" in the last bytes."""
    size = 12 * KiB
    new = bytearray(b"A" * 8 * KiB + bytes(4 * KiB))
    new[100:112] = b"hello, world"
    new[4096:8192] = bytes(4096)
    new[size - 4 :] = b"tail"
    em = ExtentMap(size, [Extent(100, 12), Extent(4096, 4096, True), Extent(size - 4, 4)])
    driver = get_driver("hsdelta")
    layout = driver.plan(size, em, {
        "parent_export_id": "20250101T000000Z-0a1b2c3d",
        "parent_disk": "disk0",
        "parent_object_blake3": blake3.blake3(b"A" * 8 * KiB).hexdigest(),
        "parent_virtual_size": str(8 * KiB),
    })  # fmt: skip
    sink = RecordingSink()
    driver.write(RecordingSource(bytes(new)), layout, sink)
    return bytes(sink.buf)


def test_document_example_is_real():
    """docs/repository.md's hexdump is what the writer makes, and it reads back as described."""
    text = DOCS.read_text()
    block = re.search(r"<!-- hsdelta-example -->\n```text\n(.*?)\n```", text, re.S)
    assert block, "the worked example's hexdump is missing from docs/repository.md"
    obj = example_object()
    assert block.group(1) == hexdump_c(obj)
    parent = b"A" * 8 * KiB
    layer = DeltaLayer(BytesReader(obj), parent_read=_parent_reader(parent))
    want = bytearray(b"A" * 8 * KiB + bytes(4 * KiB))
    want[100:112], want[4096:8192], want[-4:] = b"hello, world", bytes(4096), b"tail"
    assert layer.read(0, 12 * KiB) == bytes(want)


def test_the_delta_format_is_never_an_output_format(tmp_path):
    """Backups write hsdelta by themselves; a user asking for it as an output is told why not."""
    from flows.params import WRITABLE_FORMATS
    from hypersdk.errors import InvalidParameterError
    from hypersdk.requests import validate_request
    from tests.cli_run import hyperctl, one_line_error

    assert "hsdelta" not in WRITABLE_FORMATS and "qcow2" in WRITABLE_FORMATS
    with pytest.raises(InvalidParameterError, match="delta format"):
        validate_request(vm="x", format="hsdelta")
    src = tmp_path / "src.raw"
    src.write_bytes(b"\1" * 65536)
    res = hyperctl("convert", src, tmp_path / "out.hsdelta", "-O", "hsdelta")
    one_line_error(res, "delta format")
    assert not (tmp_path / "out.hsdelta").exists()
