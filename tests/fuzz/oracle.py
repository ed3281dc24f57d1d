"""The oracle of one fuzz case: what the tool does with an image, and whether it ended well.

Open by probing (``open_image``, as ``hyperctl info`` does), then ``info()``, the extents (lazy
and whole, own and through a backing chain), ``check()``, reads of the virtual disk in 1 MiB
pieces (all of it up to ``budget`` bytes, else the first data extents, both ends and pieces
spread over the middle), an unaligned read and the zero-head probe of a data scan, and
``close()``.

Acceptable ends: success, or a ``HyperSDKError`` in one line. Everything else is a finding:

* ``exception``: any other exception (IndexError, struct.error, ValueError, OverflowError,
  zlib.error, RecursionError, MemoryError, UnicodeDecodeError, KeyError, AssertionError...);
* ``masked``: a typed error wrapping such an exception raised in a deeper hypersdk function than
  the one that caught it (a blanket ``except`` turned a driver bug into a FormatError);
* ``invariant``: a short read, an extent outside the disk, a negative size, a problem list that
  is not one line per problem, an error message of several lines;
* ``hang`` and ``crash`` are decided by the parent (campaign.py): past the per-case timeout, or
  the child died (a signal, or memory exhausted below the C level).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass

from hypersdk.errors import HyperSDKError

MiB = 1 << 20
PIECE = MiB


@dataclass
class Outcome:
    status: str  # "ok", "refused" or "finding"
    kind: str = ""  # of a finding: exception, masked, invariant, hang, crash
    detail: str = ""  # one line
    where: str = ""  # innermost hypersdk frame of the fault: the finding's signature
    trace: str = ""
    seconds: float = 0.0
    format: str = ""  # what the image opened as

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def signature(self) -> str:
        """Findings with equal signatures are one bug."""
        return f"{self.kind}:{self.detail.split(':', 1)[0]}@{self.where}"


class Invariant(Exception):
    """A result that breaks the DiskImage contract (raised by the oracle itself)."""


def _hypersdk_frames(tb) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(tb) if f"{os.sep}hypersdk{os.sep}" in f.filename]


def _where(exc: BaseException) -> str:
    frames = _hypersdk_frames(exc.__traceback__)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.rsplit(os.sep + 'hypersdk' + os.sep, 1)[-1]}:{f.lineno} {f.name}"


def masked_by(exc: HyperSDKError) -> BaseException | None:
    """The non-typed exception a typed error wraps when it was raised deeper than where it
    was caught (its traceback crosses two hypersdk frames or more): a blanket ``except``."""
    inner = exc.__cause__ or exc.__context__
    while inner is not None and isinstance(inner, HyperSDKError):
        inner = inner.__cause__ or inner.__context__
    if inner is None:
        return None
    return inner if len(_hypersdk_frames(inner.__traceback__)) >= 2 else None


def read_plan(image, size: int, budget: int) -> list[tuple[int, int]]:
    """1 MiB pieces to read: the whole disk up to ``budget``; else the first data extents
    (half the budget), both ends and pieces spread over the middle."""
    pieces = -(-size // PIECE)
    if size <= budget:
        return [(i * PIECE, min(PIECE, size - i * PIECE)) for i in range(pieces)]
    want = max(4, budget // PIECE)
    chosen: list[int] = []
    for e in image.iter_extents():
        for i in range(e.offset // PIECE, -(-e.end // PIECE)):
            if i not in chosen:
                chosen.append(i)
            if len(chosen) >= want // 2:
                break
        if len(chosen) >= want // 2:
            break
    rest = want - len(chosen)
    ends = [0, 1, pieces - 2, pieces - 1]
    spread = [pieces * k // max(1, rest - 4) for k in range(max(0, rest - 4))]
    for i in ends + spread:
        if 0 <= i < pieces and i not in chosen:
            chosen.append(i)
    return [(i * PIECE, min(PIECE, size - i * PIECE)) for i in chosen]


def _extents_inside(extents, size: int, what: str) -> int:
    n, last = 0, 0
    for e in extents:
        if e.offset < last or e.length <= 0 or e.end > size:
            raise Invariant(f"{what}: extent {e.offset}+{e.length} of a {size}-byte disk")
        last = e.end
        n += 1
    return n


def exercise(path: str, budget: int = 64 * MiB, fmt: str | None = None) -> str:
    """Everything a user can ask of an image (opened as ``fmt``, else probed); raises whatever
    the code raises. Returns the format it opened as."""
    from hypersdk.formats import open_image

    image = open_image(path, fmt)
    try:
        size = image.virtual_size
        if not isinstance(size, int) or size < 0:
            raise Invariant(f"virtual size {size!r}")
        info = image.info()
        if not isinstance(info, dict):
            raise Invariant(f"info() gave {type(info).__name__}")
        _extents_inside(image.iter_extents(), size, "iter_extents")
        _extents_inside(image.extents(), size, "extents")
        _extents_inside(image.own_extents(), size, "own_extents")
        problems = image.check()
        if not isinstance(problems, list) or any(
            not isinstance(p, str) or "\n" in p for p in problems
        ):
            raise Invariant(f"check() gave {problems!r:.200}")
        for offset, length in read_plan(image, size, budget):
            data = image.read(offset, length)
            if len(data) != length:
                raise Invariant(f"read({offset}, {length}) gave {len(data)} bytes")
        if size > 2:
            at = size // 3 | 1
            n = min(4097, size - at)
            if len(image.read(at, n)) != n:
                raise Invariant(f"unaligned read({at}, {n}) was short")
        image.zero_heads(0, min(size, 2 * MiB), 64 * 1024)
        return image.format
    finally:
        image.close()


def judge(path: str, budget: int = 64 * MiB, fmt: str | None = None) -> Outcome:
    """Run ``exercise`` and say how it ended."""
    started = time.perf_counter()
    opened = ""
    try:
        opened = exercise(path, budget, fmt)
    except HyperSDKError as exc:
        out = _refused(exc)
    except Invariant as exc:
        out = Outcome("finding", "invariant", str(exc), _where(exc), traceback.format_exc())
    except BaseException as exc:  # noqa: BLE001 - anything else is the finding
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        detail = f"{type(exc).__name__}: {exc}"[:400]
        out = Outcome("finding", "exception", detail, _where(exc), traceback.format_exc())
    else:
        out = Outcome("ok", format=opened)
    out.seconds = time.perf_counter() - started
    return out


def judge_as(path: str, fmt: str, budget: int = 64 * MiB) -> Outcome:
    """Probed first, as ``hyperctl info IMAGE`` does; when that does not open it as ``fmt``
    (the seed's format: its magic was hit, it reads as raw), again with ``-f fmt``, as a
    user who knows the format would: a driver must not trust that a probe vouched for the
    bytes. The first finding wins."""
    probed = judge(path, budget)
    if probed.status == "finding" or (probed.format or _probe(path)) == fmt:
        return probed
    forced = judge(path, budget, fmt)
    if forced.status == "finding":
        forced.detail = f"(-f {fmt}) {forced.detail}"
        return forced
    probed.seconds += forced.seconds
    return probed


def _probe(path: str) -> str:
    """The driver a probe picks (for a refused case: was it refused as ``fmt`` already?)."""
    from hypersdk.formats import probe
    from hypersdk.io import FileRangeReader

    try:
        with FileRangeReader(path) as reader:
            return probe(reader).name
    except Exception:  # noqa: BLE001 - judge() already reported what the probe raises
        return ""


def _refused(exc: HyperSDKError) -> Outcome:
    text = str(exc)
    inner = masked_by(exc)
    if inner is not None:
        detail = f"{type(inner).__name__} as {type(exc).__name__}: {text}"[:400]
        trace = "".join(traceback.format_exception(exc))
        return Outcome("finding", "masked", detail, _where(inner), trace)
    if "\n" in text or not text.strip():
        return Outcome("finding", "invariant", f"error message not one line: {text!r:.300}",
                       _where(exc), traceback.format_exc())  # fmt: skip
    return Outcome("refused", detail=f"{type(exc).__name__}: {text}"[:300])
