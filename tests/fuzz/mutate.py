"""Seeded, reproducible mutations of seed images.

A case is a pure function of the seeds, the campaign seed and the case number
(``make_case``): the same three give the same bytes on any machine, so a finding is reported
as (campaign seed, case number) and the mutated file is saved besides.

Mutations work on a ``Mutant``: the seed's bytes plus copy-on-write 4 KiB pages, a length and a
cut (bytes of the seed past a truncation read as zeros if the file grows again). A case costs
the pages it touches, not the seed's size: a worker keeps one copy of each seed on disk, writes
a case's pages into it (``apply``) and puts the seed's bytes back afterwards (``revert``).

What is mutated, most of it in the seed's structural regions (headers, tables, descriptors):
bit flips, byte sets, integer fields overwritten with boundary values (0, 1, -1, 2^31, 2^32-1,
2^63, powers of two, the file size, offsets of the header, of other tables, past the end, in
bytes, sectors or clusters), live table entries redirected (to another entry's target: shared
tables and blocks), numbers in text (descriptors, OVF, tar sizes), truncation and extension,
splices from other seeds, copies of one table region over another. Checksums (VHD, VHDX CRC-32C,
tar headers) are recomputed after most cases so mutants get past them to the parsers behind.
"""

from __future__ import annotations

import os
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.fuzz.seeds import Seed

PAGE = 4096
KiB, MiB = 1 << 10, 1 << 20


class Mutant:
    """A seed's bytes with mutations laid over them, page by page."""

    def __init__(self, base: bytes):
        self.base = base
        self.size = len(base)
        self.cut = len(base)  # seed bytes at or past this offset are gone (read as zeros)
        self.pages: dict[int, bytearray] = {}

    def _page(self, p: int) -> bytearray:
        page = self.pages.get(p)
        if page is None:
            start = p * PAGE
            src = self.base[start : min(start + PAGE, self.cut)] if start < self.cut else b""
            page = bytearray(PAGE)
            page[: len(src)] = src
            self.pages[p] = page
        return page

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (short at the end of the file)."""
        end = min(self.size, offset + max(0, length))
        out = bytearray()
        pos = max(0, offset)
        while pos < end:
            p, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            page = self.pages.get(p)
            if page is not None:
                out += page[within : within + n]
            elif pos < self.cut:
                chunk = self.base[pos : min(pos + n, self.cut)]
                out += chunk + bytes(n - len(chunk))
            else:
                out += bytes(n)
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Overwrite (or extend the file with) ``data`` at ``offset``."""
        if not data or offset < 0:
            return
        pos, end = offset, offset + len(data)
        while pos < end:
            p, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            self._page(p)[within : within + n] = data[pos - offset : pos - offset + n]
            pos += n
        self.size = max(self.size, end)

    def overwrite(self, offset: int, data: bytes) -> None:
        """``data`` at ``offset``, clipped to the file: the file does not grow."""
        self.write(offset, data[: max(0, self.size - offset)])

    def truncate(self, length: int) -> None:
        length = max(0, length)
        if length >= self.size:
            self.write(self.size, bytes(length - self.size))
            return
        p, within = divmod(length, PAGE)
        if within:
            page = self._page(p)
            page[within:] = bytes(PAGE - within)
        for q in [q for q in self.pages if q >= p + (1 if within else 0)]:
            del self.pages[q]
        self.size = length
        self.cut = min(self.cut, length)

    def replace(self, offset: int, old: int, new: bytes) -> None:
        """Replace ``old`` bytes at ``offset`` with ``new``, moving what follows (text)."""
        tail = self.read(offset + old, self.size - offset - old)
        self.truncate(offset)
        self.write(offset, new + tail)

    def to_bytes(self) -> bytes:
        return self.read(0, self.size)

    # -- on disk: a worker's copy of the seed becomes the mutant, then the seed again
    def apply(self, fd: int) -> None:
        if self.cut < len(self.base):
            os.ftruncate(fd, self.cut)
        for p, page in self.pages.items():
            start = p * PAGE
            if start < self.size:
                os.pwrite(fd, page[: min(PAGE, self.size - start)], start)
        os.ftruncate(fd, self.size)

    def revert(self, fd: int) -> None:
        n = len(self.base)
        for p in self.pages:
            start = p * PAGE
            if start < min(n, self.cut):
                os.pwrite(fd, self.base[start : min(start + PAGE, n)], start)
        if self.cut < n:
            os.pwrite(fd, self.base[self.cut :], self.cut)
        os.ftruncate(fd, n)


@dataclass
class Context:
    rng: random.Random
    seed: Seed
    m: Mutant
    others: list[tuple[Seed, bytes]]  # every seed (this one too): splice sources


# --------------------------------------------------------------------------- where to hit
def _region(c: Context) -> tuple[int, int]:
    """A (start, length) inside the current file: a structural region most of the time, else
    the first 64 KiB, the last 512 bytes or anywhere."""
    rng, size = c.rng, c.m.size
    if size == 0:
        return 0, 0
    roll = rng.random()
    if roll < 0.85 and c.seed.regions:
        start, length = rng.choice(c.seed.regions)
    elif roll < 0.92:
        start, length = 0, 64 * KiB
    elif roll < 0.96:
        start, length = size - 512, 512
    else:
        start, length = 0, size
    start = min(max(0, start), size - 1)
    return start, max(1, min(length, size - start))


def _pos(c: Context, align: int = 1) -> int:
    start, length = _region(c)
    pos = start + c.rng.randrange(max(1, length))
    return max(0, pos - pos % align)


def _values(c: Context, width: int, current: int) -> list[int]:
    """Boundary values for an integer field of ``width`` bytes."""
    size = c.m.size
    unit = c.rng.choice(c.seed.units)
    start, _ = c.rng.choice(c.seed.regions) if c.seed.regions else (0, 0)
    bits = width * 8
    k = c.rng.randrange(bits)
    return [
        0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
        2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 1 << k, (1 << k) - 1,
        size, size - 1, size + 1, size // unit, size // unit + 1, -(-size // unit) + 7,
        start, start // unit, (size + unit * c.rng.randrange(1, 64)) // unit,
        current + 1, current - 1, current * 2, current // 2, current + unit, current ^ (1 << k),
        c.rng.getrandbits(bits),
    ]  # fmt: skip


def _pack(value: int, width: int, endian: str) -> bytes:
    return (value % (1 << (width * 8))).to_bytes(width, "big" if endian == ">" else "little")


# ------------------------------------------------------------------------------ mutators
def flip(c: Context) -> str:
    hits = []
    for _ in range(c.rng.choice([1, 1, 2, 3, 8])):
        pos, bit = _pos(c), c.rng.randrange(8)
        old = c.m.read(pos, 1)
        if old:
            c.m.overwrite(pos, bytes([old[0] ^ (1 << bit)]))
            hits.append(f"{pos:#x}.{bit}")
    return "flip " + ",".join(hits)


def set_bytes(c: Context) -> str:
    pos = _pos(c)
    n = c.rng.choice([1, 1, 2, 4])
    value = c.rng.choice([0x00, 0xFF, 0x80, 0x7F, None])
    data = c.rng.randbytes(n) if value is None else bytes([value]) * n
    c.m.overwrite(pos, data)
    return f"set {pos:#x} {data.hex()}"


def int_field(c: Context) -> str:
    width = c.rng.choice([2, 4, 4, 8, 8])
    pos = _pos(c, min(width, 4))
    endian = c.seed.endian if c.rng.random() < 0.9 else ("<" if c.seed.endian == ">" else ">")
    old = c.m.read(pos, width).ljust(width, b"\0")
    current = int.from_bytes(old, "big" if endian == ">" else "little")
    value = c.rng.choice(_values(c, width, current))
    c.m.overwrite(pos, _pack(value, width, endian))
    return f"int {pos:#x} w{width}{endian} {value:#x}"


def live_entry(c: Context) -> str:
    """Redirect an entry of a table that is in use: to another entry's target (two users of
    one table or block), a neighbour, the header, the end of the file..."""
    w = c.seed.word
    start, length = _region(c)
    if length > 64 * KiB:  # a window of a large region: parsing all of it costs too much
        start += c.rng.randrange(length - 64 * KiB)
        length = 64 * KiB
    data = c.m.read(start - start % w, length + start % w)
    fmt = f"{c.seed.endian}{'Q' if w == 8 else 'I'}"
    words = [v for (v,) in struct.iter_unpack(fmt, data[: len(data) // w * w])]
    live = [i for i, v in enumerate(words) if v and v != 2 ** (8 * w) - 1]
    if not live:
        return int_field(c)
    i = c.rng.choice(live)
    pos = start - start % w + i * w
    other = words[c.rng.choice(live)]
    unit = c.rng.choice(c.seed.units)
    value = c.rng.choice(
        [other, words[i] + unit, words[i] - unit, words[i] + 1, 0, 1, words[i] | 1 << (8 * w - 1),
         c.m.size // unit, c.m.size, words[i] << 1, c.rng.getrandbits(8 * w)]
    )  # fmt: skip
    c.m.overwrite(pos, _pack(value, w, c.seed.endian))
    return f"entry {pos:#x} {words[i]:#x}->{value % (1 << (8 * w)):#x}"


_NUMBER = re.compile(rb"[0-9][0-9a-fA-F]*")
_TEXT_VALUES = [b"0", b"1", b"-1", b"4294967295", b"4294967296", b"18446744073709551615",
                b"18446744073709551616", b"9" * 40, b"2147483648", b"", b"0x10", b"1e9", b"077",
                b"\xff\xfe", b"\0"]  # fmt: skip


def text_edit(c: Context) -> str:
    """A number in a text region (descriptor, OVF, tar header) replaced, or a line dropped,
    doubled or lengthened; a standalone text file may change length."""
    regions = c.seed.text or c.seed.regions
    start, length = c.rng.choice(regions)
    length = min(length, c.m.size - start, 256 * KiB)
    if length <= 0:
        return flip(c)
    text = c.m.read(start, length)
    whole = start + length >= c.m.size  # the region ends the file: it may grow or shrink
    roll = c.rng.random()
    numbers = list(_NUMBER.finditer(text))
    if roll < 0.6 and numbers:
        hit = c.rng.choice(numbers)
        a, b = hit.span()
        new = c.rng.choice(
            _TEXT_VALUES + [str(c.rng.getrandbits(c.rng.choice([8, 33, 65]))).encode()]
        )
        if "tar" in c.seed.fixups and c.rng.random() < 0.5:  # an octal tar field, still octal
            new = "".join(c.rng.choice("01234567") for _ in range(b - a)).encode()
        if not whole:  # keep the length: pad or clip
            new = new[: b - a].rjust(b - a, b"0")
        c.m.replace(start + a, b - a, new)
        return f"text {start + a:#x} {text[a:b]!r}->{new!r}"
    lines = text.split(b"\n")
    i = c.rng.randrange(len(lines))
    op = c.rng.choice(["drop", "double", "long", "nul"])
    if op == "drop":
        lines[i] = b"" if not whole else None  # type: ignore[call-overload]
    elif op == "double" and whole:
        lines.insert(i, lines[i])
    elif op == "long" and whole:
        lines[i] = lines[i] + b"x" * c.rng.choice([300, 70_000])
    else:
        lines[i] = lines[i][:1] + b"\0" + lines[i][2:]
    new_text = b"\n".join(x for x in lines if x is not None)
    if not whole:
        new_text = new_text[:length].ljust(length, b" ")
    c.m.replace(start, length, new_text)
    return f"text {op} line {i} of {start:#x}"


def truncate(c: Context) -> str:
    size = c.m.size
    start, length = _region(c)
    new = c.rng.choice(
        [c.rng.randrange(size + 1), start, start + length // 2, start + length - 1,
         size - 512 * c.rng.randrange(1, 9), size - 1, c.rng.randrange(64 * KiB)]
    )  # fmt: skip
    c.m.truncate(max(0, new))
    return f"truncate {max(0, new):#x}"


def extend(c: Context) -> str:
    n = c.rng.choice([1, 511, 512, 4096, 64 * KiB, MiB])
    kind = c.rng.choice(["zeros", "random", "head"])
    data = bytes(n) if kind == "zeros" else c.rng.randbytes(min(n, 64 * KiB))
    if kind == "head":
        data = c.m.read(0, min(n, 64 * KiB))
    at = c.m.size
    c.m.write(at, data)
    return f"extend {at:#x} +{len(data)} {kind}"


def splice(c: Context) -> str:
    """A piece of another seed (its header, a table) over this one: same offset or ours."""
    other, blob = c.rng.choice(c.others)
    if not blob:
        return flip(c)
    if other.regions and c.rng.random() < 0.7:
        src, length = c.rng.choice(other.regions)
    else:
        src, length = c.rng.randrange(len(blob)), 64 * KiB
    src = min(src, len(blob) - 1)
    length = min(length, c.rng.choice([8, 64, 512, 4096, 64 * KiB]), len(blob) - src)
    dst = src if c.rng.random() < 0.5 and src < c.m.size else _pos(c)
    length = min(length, c.m.size - dst)  # overwrite, never grow: extend() does that
    c.m.overwrite(dst, blob[src : src + length])
    return f"splice {other.name}[{src:#x}+{length}] -> {dst:#x}"


def duplicate(c: Context) -> str:
    """One region copied over another (a table over another table), or an entry copied
    within a region."""
    w = c.seed.word
    if c.rng.random() < 0.5 and len(c.seed.regions) > 1:
        (a, alen), (b, blen) = c.rng.sample(c.seed.regions, 2)
        n = max(0, min(alen, blen, c.m.size - b))
        c.m.overwrite(b, c.m.read(a, n))
        return f"dup {a:#x}+{n} -> {b:#x}"
    start, length = _region(c)
    i = start + c.rng.randrange(max(1, length // w)) * w
    j = start + c.rng.randrange(max(1, length // w)) * w
    c.m.overwrite(j, c.m.read(i, w))
    return f"dup entry {i:#x} -> {j:#x}"


Mutator = Callable[[Context], str]
MUTATORS: list[tuple[Mutator, float]] = [
    (flip, 18), (set_bytes, 10), (int_field, 25), (live_entry, 14), (text_edit, 6),
    (truncate, 5), (extend, 4), (splice, 6), (duplicate, 8),
]  # fmt: skip


# ------------------------------------------------------------------------------- fix-ups
def _vhd_sum(buf: bytearray, at: int) -> None:
    struct.pack_into(">I", buf, at, 0)
    struct.pack_into(">I", buf, at, ~sum(buf) & 0xFFFFFFFF)


def fix_vhd(m: Mutant) -> None:
    """Footer (and its copy) and dynamic header checksums, where the cookies are."""
    if m.size < 512:
        return
    for at in (0, m.size - 512):
        foot = bytearray(m.read(at, 512))
        if foot[:8] == b"conectix":
            _vhd_sum(foot, 64)
            m.write(at, bytes(foot))
    foot = m.read(m.size - 512, 512)
    (dyn,) = struct.unpack_from(">Q", foot, 16)
    if foot[:8] == b"conectix" and dyn + 1024 <= m.size:
        hdr = bytearray(m.read(dyn, 1024))
        if hdr[:8] == b"cxsparse":
            _vhd_sum(hdr, 36)
            m.write(dyn, bytes(hdr))


def _crc32c(data: bytes) -> int:
    from hypersdk.formats._vhdx_layout import crc32c

    return crc32c(data)


def _seal(m: Mutant, at: int, length: int) -> None:
    buf = bytearray(m.read(at, length))
    if len(buf) < 8:
        return
    struct.pack_into("<I", buf, 4, 0)
    struct.pack_into("<I", buf, 4, _crc32c(bytes(buf)))
    m.write(at, bytes(buf))


def fix_vhdx(m: Mutant) -> None:
    for at, sig, length in ((64 * KiB, b"head", 4 * KiB), (128 * KiB, b"head", 4 * KiB),
                            (192 * KiB, b"regi", 64 * KiB), (256 * KiB, b"regi", 64 * KiB)):  # fmt: skip
        if m.read(at, 4) == sig:
            _seal(m, at, length)


def fix_vhdx_log(m: Mutant) -> None:
    """The CRC of the log entry at the log's start (before the headers are sealed)."""
    head = m.read(64 * KiB, 80)
    if len(head) < 80:
        return
    log_length, log_offset = struct.unpack_from("<IQ", head, 68)
    if m.read(log_offset, 4) == b"loge":
        (length,) = struct.unpack_from("<I", m.read(log_offset + 8, 4).ljust(4, b"\0"))
        _seal(m, log_offset, min(length, log_length, 16 * MiB))


def fix_tar(m: Mutant) -> None:
    """Every member header's checksum, walking sizes as they now read."""
    pos = 0
    for _ in range(64):
        hdr = bytearray(m.read(pos, 512))
        if len(hdr) < 512 or not hdr.strip(b"\0"):
            return
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % (sum(hdr) & 0o777777)
        m.write(pos, bytes(hdr))
        try:
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return
        pos += 512 + -(-size // 512) * 512


FIXUPS: dict[str, Callable[[Mutant], None]] = {
    "vhd": fix_vhd, "vhdx-log": fix_vhdx_log, "vhdx": fix_vhdx, "tar": fix_tar,
}  # fmt: skip
FIX_ORDER = ["vhdx-log", "vhdx", "vhd", "tar"]  # the log CRC before the headers that name it


# --------------------------------------------------------------------------------- cases
@dataclass
class Case:
    index: int
    seed: Seed
    mutant: Mutant
    steps: list[str] = field(default_factory=list)


STACK = 4  # mutations per case, at most (1 most often)


def make_case(
    seeds: list[Seed], blobs: dict[str, bytes], campaign: int, index: int, stack: int = STACK
) -> Case:
    """Case ``index`` of campaign ``campaign``: a seed, 1 to ``stack`` mutations (few most of
    the time), then (most of the time) its checksums redone."""
    rng = random.Random(f"hypersdk-fuzz:{campaign}:{index}")
    seed = rng.choices(seeds, weights=[s.weight for s in seeds])[0]
    m = Mutant(blobs[seed.name])
    c = Context(rng, seed, m, [(s, blobs[s.name]) for s in seeds])
    case = Case(index, seed, m)
    funcs, weights = zip(*MUTATORS, strict=True)
    if seed.text and seed.text == seed.regions:  # a text file: mostly edits that keep it text
        weights = tuple(w * 10 if f is text_edit else w for f, w in MUTATORS)
    counts = [1, 1, 1, 2, 2, 3, 4] if stack == STACK else range(1, stack + 1)
    for _ in range(rng.choice(counts)):
        case.steps.append(rng.choices(funcs, weights)[0](c))
    if seed.fixups and rng.random() < 0.8:
        for name in FIX_ORDER:
            if name in seed.fixups:
                FIXUPS[name](m)
        case.steps.append("fix " + "+".join(seed.fixups))
    return case
