"""A backup policy simulated day by day into a workload: what our repository would store.

One backup a day: a full first, then deltas of ``delta_bytes`` each, a full again once
``full_every`` deltas follow the last full (hypersdk.repository.history.pick_base's rule), then
``forget`` by the retention policy after each backup, with the repository's own planning
(hypersdk.repository.retention.plan and chain_plan, not a re-implementation): forgotten points'
objects are deleted that day, and a kept delta whose parent is forgotten is rebased on a
synthetic full (a new full-size object; the delta object and the old manifest are deleted).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypersdk.cost.model import Batch, Workload
from hypersdk.errors import InvalidParameterError
from hypersdk.repository.layout import MAX_DELTAS_IN_A_ROW
from hypersdk.repository.retention import Point, RetentionPolicy, chain_plan, plan

MANIFEST_BYTES = 8 * 1024  # a point's manifest object (JSON with chunk hashes), roughly
# A Monday: ISO weeks start on the first day, so weekly buckets are easy to follow by hand.
DEFAULT_START = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
MAX_DAYS = 3660  # ten years of daily points: retention is planned after each (seconds of CPU)


def simulate(
    full_bytes: float,
    delta_bytes: float,
    days: int,
    retention: RetentionPolicy | None = None,
    full_every: int = 7,
    objects_per_point: int = 1,
    manifest_bytes: float = MANIFEST_BYTES,
    start: datetime = DEFAULT_START,
    label: str = "backup policy",
) -> Workload:
    """The objects ``days`` daily backups write and forget (point ``i`` is taken on day ``i``
    at ``start`` + i days; retention runs with that moment as "now")."""
    if not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidParameterError(f"a policy is simulated for 1..{MAX_DAYS} days, not {days!r}")
    if full_bytes < 0 or delta_bytes < 0:
        raise InvalidParameterError("full and delta sizes must be >= 0")
    if not isinstance(full_every, int) or full_every < 1:
        raise InvalidParameterError(f"full_every must be >= 1, got {full_every!r}")
    if objects_per_point < 1:
        raise InvalidParameterError("objects_per_point must be >= 1")
    limit = min(full_every, MAX_DELTAS_IN_A_ROW)
    batches: list[Batch] = []
    # live objects of each point: index into ``open_`` (day written, count, bytes, what)
    open_: dict[int, tuple[int, int, float, str]] = {}
    owned: dict[str, list[int]] = {}
    kind: dict[str, str] = {}
    parent: dict[str, str | None] = {}
    times: dict[str, datetime] = {}
    order: list[str] = []  # live points, oldest first
    counter = itertools.count()

    def write(pid: str, day: int, count: int, size: float, what: str) -> None:
        idx = next(counter)
        open_[idx] = (day, count, size, what)
        owned.setdefault(pid, []).append(idx)

    def delete(idx: int, day: int) -> None:
        d, count, size, what = open_.pop(idx)
        batches.append(Batch(d, count, size, day, what))

    for day in range(days):
        pid = f"p{day:05d}"
        deltas = 0
        for q in reversed(order):
            if kind[q] != "delta":
                break
            deltas += 1
        is_full = not order or deltas >= limit
        size = full_bytes if is_full else delta_bytes
        write(pid, day, objects_per_point, size / objects_per_point, f"{pid} image")
        write(pid, day, 1, manifest_bytes, f"{pid} manifest")
        kind[pid] = "full" if is_full else "delta"
        parent[pid] = None if is_full else order[-1]
        times[pid] = start + timedelta(days=day)
        order.append(pid)
        if retention is None:
            continue
        kept = plan([Point(p, times[p]) for p in order], retention, now=times[pid])
        steps = chain_plan(kept, {p: parent[p] for p in order})
        for p in steps.rebase:  # synthetic full: new image and manifest, old ones deleted
            for idx in list(owned[p]):
                delete(idx, day)
            owned[p] = []
            write(p, day, objects_per_point, full_bytes / objects_per_point, f"{p} synthetic full")
            write(p, day, 1, manifest_bytes, f"{p} manifest")
            kind[p], parent[p] = "full", None
        for p in kept.forget_ids:
            for idx in owned.pop(p):
                delete(idx, day)
            order.remove(p)
    for d, count, size, what in open_.values():
        batches.append(Batch(d, count, size, None, what))
    batches.sort(key=lambda b: (b.day, b.what))
    workload = Workload(batches, days, label=label)
    workload.measured.update(
        {"points_kept": list(order), "kinds": {p: kind[p] for p in order}, "policy": label}
    )
    return workload
