"""Workloads from reality: a backup chain's stored objects and measured change rate, and a VM's
allocated bytes with the stored size per allocated byte sampled in the chosen format.

Nothing here reads whole disks: a VM is sampled on at most ``max_extents`` pieces of at most
``piece_bytes`` each, spread over its allocated extents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypersdk.cost.model import Batch, GiB, Workload
from hypersdk.errors import InvalidParameterError, VerificationError

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class ChainFacts:
    """What a VM's repository holds now, and how fast it grows."""

    vm: str
    stored_bytes: int  # every object under the VM's prefix, as listed
    objects: int
    points: int
    full_stored_bytes: float  # mean stored size of a full point
    delta_stored_bytes: float  # mean stored size of a delta point
    change_rate: float  # delta stored bytes per day / full stored bytes
    days_measured: float  # span of the points' times (0: all the same day)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def chain_facts(target: Any, vm: str) -> ChainFacts:
    """Actual stored bytes and object counts of ``vm``'s points on ``target`` (a listing), and
    the daily change rate measured from the points' manifests (sizes and times)."""
    from hypersdk.repository.history import read_history
    from hypersdk.repository.layout import vm_prefix

    listed = list(target.list(vm_prefix(vm)))
    history = read_history(target, vm)  # newest first
    if not history:
        raise VerificationError(f"no backups of VM {vm!r} on {target.url}")
    sizes = {m.export_id: sum(d.object_size for d in m.disks) for m in history}
    fulls = [sizes[m.export_id] for m in history if m.kind == "full"]
    deltas = [sizes[m.export_id] for m in history if m.kind != "full"]
    full_mean = sum(fulls) / len(fulls) if fulls else float(max(sizes.values()))
    delta_mean = sum(deltas) / len(deltas) if deltas else 0.0
    times = sorted(m.created for m in history)
    span = (times[-1] - times[0]).total_seconds() / SECONDS_PER_DAY
    # measured over the points' own calendar; points taken within a day: one a day assumed
    per_day = sum(deltas) / span if span >= 1 and deltas else delta_mean
    rate = per_day / full_mean if full_mean else 0.0
    return ChainFacts(
        vm=vm,
        stored_bytes=sum(o.size for o in listed),
        objects=len(listed),
        points=len(history),
        full_stored_bytes=full_mean,
        delta_stored_bytes=delta_mean,
        change_rate=rate,
        days_measured=span,
    )


def chain_workload(target: Any, vm: str, days: int) -> tuple[Workload, ChainFacts]:
    """The repository as it stands, held for ``days`` (every object a batch of its own size:
    the class minimums and per-object overheads apply to the real objects)."""
    from hypersdk.repository.layout import vm_prefix

    facts = chain_facts(target, vm)
    by_size: dict[int, int] = {}
    for o in target.list(vm_prefix(vm)):
        by_size[o.size] = by_size.get(o.size, 0) + 1
    batches = [Batch(0, n, float(size), None, "stored object") for size, n in by_size.items()]
    workload = Workload(batches, days, label=f"repository of {vm} for {days} days")
    workload.measured.update(facts.to_dict())
    return workload, facts


class _CountingSink:
    """A Sink that only counts the bytes an export would store."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes | memoryview) -> int:
        self.n += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.n += length

    def tell(self) -> int:
        return self.n


@dataclass(frozen=True)
class VmFacts:
    vm: str
    format: str
    allocated_bytes: int
    sampled_bytes: int
    stored_ratio: float  # stored bytes per allocated byte in ``format``, from the samples
    header_bytes: int  # the format's bytes for an empty image of the VM's disks
    estimated_stored_bytes: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _pieces(extents: list[Any], max_extents: int, piece: int) -> list[tuple[int, int]]:
    """Up to ``max_extents`` (offset, length) pieces spread evenly over the data extents."""
    total = sum(e.length for e in extents)
    if not total:
        return []
    n = min(max_extents, max(1, math.ceil(total / piece)))
    out = []
    for i in range(n):
        at = total * i // n  # position in the concatenated data
        for e in extents:
            if at < e.length:
                length = min(piece, e.length - at)
                out.append((e.offset + at, length))
                break
            at -= e.length
    return out


def vm_facts(
    source: Any,
    vm: str,
    fmt: str = "qcow2",
    options: dict[str, str] | None = None,
    max_extents: int = 16,
    piece_bytes: int = 4 << 20,
) -> VmFacts:
    """Allocated bytes of ``vm``'s disks and the stored size per allocated byte of ``fmt``,
    measured by exporting at most ``max_extents`` pieces of ``piece_bytes`` into a counter."""
    from hypersdk.extents import Extent, ExtentMap
    from hypersdk.formats import get_driver
    from hypersdk.pipeline import export_stream

    if get_driver(fmt).kind == "package":
        raise InvalidParameterError(f"format {fmt} packages a whole VM: estimate its disk format")
    info = source.get_vm(vm)
    allocated = sampled = header = virtual = 0
    stored_sample = 0
    with source.snapshot(info.name) as snap:
        for sd in snap.disks:
            changes = source.changed_extents(snap, sd.disk, None)
            data = list(changes.extents.data())
            allocated += sum(e.length for e in data)
            size = changes.extents.size
            virtual += size
            empty = _CountingSink()
            export_stream(_NoReads(size), ExtentMap(size, []), True, fmt, empty, options)
            header += empty.n
            pieces = _pieces(data, max_extents, piece_bytes)
            if not pieces:
                continue
            planned = ExtentMap(size, [Extent(o, n) for o, n in pieces])
            reader = source.open_disk(snap, sd.disk, planned)
            try:
                out = _CountingSink()
                export_stream(reader, planned, True, fmt, out, options)
            finally:
                reader.close()
            sampled += planned.data_bytes
            stored_sample += out.n - empty.n
    ratio = stored_sample / sampled if sampled else 1.0
    return VmFacts(
        vm=info.name,
        format=fmt,
        allocated_bytes=allocated,
        sampled_bytes=sampled,
        stored_ratio=ratio,
        header_bytes=header,
        # block-granular formats (VHDX's 32 MiB blocks) inflate sparse samples: never more than
        # the format's metadata plus every guest byte
        estimated_stored_bytes=header + min(ratio * allocated, virtual),
    )


class _NoReads:
    """The source of an empty export: nothing is ever read."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:  # pragma: no cover - never called
        raise AssertionError("an empty export reads nothing")

    def close(self) -> None:
        pass


def vm_workload(facts: VmFacts, days: int) -> Workload:
    """One full export of the VM (one object, as our exports store a disk), held ``days``."""
    batch = Batch(0, 1, facts.estimated_stored_bytes, None, f"{facts.vm} full export")
    w = Workload([batch], days, label=f"{facts.vm} ({facts.format}) for {days} days")
    w.measured.update(facts.to_dict())
    w.measured["stored_gb"] = facts.estimated_stored_bytes / GiB
    return w
