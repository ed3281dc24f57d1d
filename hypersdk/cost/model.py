"""The estimate: a workload (batches of objects written on a day, deleted on a day or kept,
restores) priced month by month for one storage class.

Conventions, the same for every provider so classes compare fairly:

- A GB is 2**30 bytes (what S3, Azure and GCS bill as "GB").
- A month is 30 days (the pro-rating Azure and AWS use for early deletion): month 1 is days
  0-29, and a last partial month is billed for its days only.
- One-time charges fall in the month they happen: upload requests when a batch is written,
  retrieval, GET requests and egress when a restore is asked for, the early-deletion charge when
  a batch is deleted before its class's minimum duration (the remaining days at the class's
  storage rate). Storage is charged for every day a batch is held.
- Tiered prices (storage volume, egress) apply to each month's own total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypersdk.errors import InvalidParameterError

if TYPE_CHECKING:  # pandas loads when something is priced, not when input is checked
    import pandas as pd

    from hypersdk.cost.pricing import ClassPrices

GiB = 1 << 30
MiB = 1 << 20
DAYS_PER_MONTH = 30
DEFAULT_PART = 8 * MiB  # our object writers' part (block, chunk) size
MAX_PARTS = 10_000
MONITOR_MIN_BYTES = 128 * 1024  # S3 Intelligent-Tiering monitors objects of 128 KB or more
MAX_DAYS = 100 * 365
CATEGORIES = ("storage", "requests", "transfer", "retrieval", "early_deletion")


@dataclass(frozen=True)
class Batch:
    """``count`` objects of ``object_bytes`` each, written on ``day``, deleted on
    ``delete_day`` (None: still held at the end)."""

    day: int
    count: int
    object_bytes: float
    delete_day: int | None = None
    what: str = ""

    @property
    def bytes(self) -> float:
        return self.count * self.object_bytes


@dataclass(frozen=True)
class Restore:
    """Reading ``bytes`` in ``objects`` objects back on ``day`` (egress: out of the cloud)."""

    day: int
    bytes: float
    objects: int = 1
    egress: bool = True


@dataclass
class Workload:
    batches: list[Batch]
    days: int
    restores: list[Restore] = field(default_factory=list)
    part_size: int = DEFAULT_PART
    label: str = "workload"
    measured: dict[str, Any] = field(default_factory=dict)  # where the numbers came from

    def __post_init__(self) -> None:
        if not isinstance(self.days, int) or not 1 <= self.days <= MAX_DAYS:
            raise InvalidParameterError(f"days must be 1..{MAX_DAYS}, got {self.days!r}")
        for b in self.batches:
            if b.count < 0 or not math.isfinite(b.object_bytes) or b.object_bytes < 0:
                raise InvalidParameterError(f"{b.what or 'a batch'}: negative or invalid size")
            if b.delete_day is not None and b.delete_day < b.day:
                raise InvalidParameterError(f"{b.what or 'a batch'}: deleted before written")
        for r in self.restores:
            if r.bytes < 0 or r.objects < 0 or not 0 <= r.day <= self.days:
                raise InvalidParameterError(f"a restore must be on day 0..{self.days}, size >= 0")

    def stored_bytes(self, day: int) -> float:
        """Bytes held on ``day`` (as written, before any class minimum or overhead)."""
        return sum(
            b.bytes
            for b in self.batches
            if b.day <= day and (b.delete_day is None or day < b.delete_day)
        )

    def stored_objects(self, day: int) -> int:
        return sum(
            b.count
            for b in self.batches
            if b.day <= day and (b.delete_day is None or day < b.delete_day)
        )


def typed(
    size_gb: float,
    days: int,
    delete_after_days: int | None = None,
    objects: int = 1,
    restore_gb: float = 0.0,
    restore_day: int | None = None,
) -> Workload:
    """What a user types: ``size_gb`` written on day 0 as ``objects`` equal objects, held for
    ``days`` (or deleted after ``delete_after_days``), optionally read back once."""
    if not isinstance(size_gb, (int, float)) or not math.isfinite(size_gb) or size_gb < 0:
        raise InvalidParameterError(f"size must be a number of GB >= 0, got {size_gb!r}")
    if not isinstance(objects, int) or objects < 1:
        raise InvalidParameterError(f"objects must be >= 1, got {objects!r}")
    if delete_after_days is not None and delete_after_days < 0:
        raise InvalidParameterError("delete-after-days must be >= 0")
    if restore_gb < 0 or not math.isfinite(restore_gb):
        raise InvalidParameterError(f"restore size must be >= 0 GB, got {restore_gb!r}")
    horizon = days if delete_after_days is None else max(days, delete_after_days)
    batch = Batch(0, objects, size_gb * GiB / objects, delete_after_days, "data")
    restores = []
    label = f"{size_gb:g} GB for {horizon} days"
    if restore_gb:
        day = horizon if restore_day is None else restore_day
        restores.append(Restore(day, restore_gb * GiB, objects))
        label += f", {restore_gb:g} GB restored on day {day}"
    return Workload([batch], horizon, restores, label=label)


def parts(object_bytes: float, part_size: int = DEFAULT_PART) -> int:
    """Parts (blocks, chunks) one object is moved in: our writers' part size, grown to fit the
    10,000-part limit and rounded up to a whole MiB (providers/targets/s3.py)."""
    if object_bytes <= part_size:
        return 1
    size = max(part_size, math.ceil(object_bytes / MAX_PARTS))
    size = math.ceil(size / MiB) * MiB
    return math.ceil(object_bytes / size)


def upload_requests(object_bytes: float, part_size: int = DEFAULT_PART) -> int:
    """Write requests for one object: one PUT, or a multipart upload (create, the parts,
    complete; Azure's Put Block + Put Block List has the same shape)."""
    n = parts(object_bytes, part_size)
    return 1 if n == 1 else n + 2


@dataclass
class Estimate:
    prices: ClassPrices
    workload: Workload
    monthly: pd.DataFrame  # one row per month, the categories, total and cumulative

    @property
    def breakdown(self) -> dict[str, float]:
        return {c: float(self.monthly[c].sum()) for c in CATEGORIES}

    @property
    def total(self) -> float:
        return float(self.monthly["total"].sum())

    def to_dict(self) -> dict[str, Any]:
        p = self.prices
        return {
            "provider": p.provider,
            "region": p.region,
            "class": p.storage_class,
            "redundancy": p.redundancy,
            "currency": "USD",
            "days": self.workload.days,
            "workload": self.workload.label,
            "stored_bytes": self.workload.stored_bytes(0),
            "measured": self.workload.measured,
            "breakdown": {k: round(v, 6) for k, v in self.breakdown.items()},
            "total": round(self.total, 6),
            "monthly": [
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                for row in self.monthly.to_dict("records")
            ],
            "sources": list(p.sources),
        }


def estimate(prices: ClassPrices, workload: Workload) -> Estimate:
    """Price ``workload`` in ``prices``'s class, month by month."""
    import numpy as np
    import pandas as pd

    from hypersdk.cost.pricing import tiered_cost

    days = workload.days
    months = max(1, math.ceil(days / DAYS_PER_MONTH))
    starts = np.arange(months) * DAYS_PER_MONTH
    ends = np.minimum(starts + DAYS_PER_MONTH, days)
    z = lambda: np.zeros(months)  # noqa: E731
    class_gbm, std_gbm, obj_months, stored_end = z(), z(), z(), z()
    put_req, get_req, restore_req = z(), z(), z()
    retrieval_gb, egress_gb, written_gb, early = z(), z(), z(), z()
    flat = prices.storage[0].price  # early deletion: the remaining days at the class's rate

    def month(day: int) -> int:
        return min(day // DAYS_PER_MONTH, months - 1)

    for b in workload.batches:
        if b.day >= days or b.count == 0:
            continue
        end = days if b.delete_day is None else min(b.delete_day, days)
        overlap = np.clip(np.minimum(ends, end) - np.maximum(starts, b.day), 0, None)
        billable = max(b.object_bytes, prices.min_object_bytes) + prices.overhead_bytes
        class_gbm += b.count * billable / GiB * overlap / DAYS_PER_MONTH
        std_gbm += b.count * prices.overhead_standard_bytes / GiB * overlap / DAYS_PER_MONTH
        if b.object_bytes >= MONITOR_MIN_BYTES:
            obj_months += b.count * overlap / DAYS_PER_MONTH
        held_at_end = (b.day < ends) & (end >= ends)
        stored_end += np.where(held_at_end, b.bytes / GiB, 0.0)
        m = month(b.day)
        put_req[m] += b.count * upload_requests(b.object_bytes, workload.part_size)
        written_gb[m] += b.bytes / GiB
        if b.delete_day is not None and b.delete_day <= days:
            age = b.delete_day - b.day
            if age < prices.min_days:
                left = prices.min_days - age
                early[month(b.delete_day)] += (
                    b.count * billable / GiB * left / DAYS_PER_MONTH * flat
                )
    for r in workload.restores:
        m = month(r.day)
        per_object = r.bytes / r.objects if r.objects else 0.0
        get_req[m] += r.objects * parts(per_object, workload.part_size)
        restore_req[m] += r.objects
        retrieval_gb[m] += r.bytes / GiB
        if r.egress:
            egress_gb[m] += r.bytes / GiB

    storage = np.array(
        [
            tiered_cost(class_gbm[i], prices.storage)
            + tiered_cost(std_gbm[i], prices.standard_storage)
            + obj_months[i] * prices.monitoring_per_object_month
            for i in range(months)
        ]
    )
    requests = (
        put_req * prices.put_per_request
        + get_req * prices.get_per_request
        + restore_req * prices.restore_per_request
    )
    transfer = np.array([tiered_cost(egress_gb[i], prices.egress) for i in range(months)])
    transfer = transfer + written_gb * prices.replication_per_gb
    retrieval = retrieval_gb * prices.retrieval_per_gb
    frame = pd.DataFrame(
        {
            "month": np.arange(1, months + 1),
            "days": (ends - starts).astype(int),
            "stored_gb": stored_end,
            "billed_gb_months": class_gbm + std_gbm,
            "storage": storage,
            "requests": requests,
            "transfer": transfer,
            "retrieval": retrieval,
            "early_deletion": early,
        }
    )
    frame["total"] = frame[list(CATEGORIES)].sum(axis=1)
    frame["cumulative"] = frame["total"].cumsum()
    return Estimate(prices, workload, frame)
