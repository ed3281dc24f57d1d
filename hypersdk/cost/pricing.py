"""Price books: the versioned CSV files in ``prices/`` (one row per price, each with its source
URL and as-of date), a user's file of negotiated rates laid over them, and the validated prices
of one storage class.

A row's ``unit`` says what its ``price`` is for, exactly as the provider publishes it: request
prices per ``1000 requests`` or per ``10000 requests`` (GCS and Azure publish per 10,000; reading
one as the other is the seed product's 10x error), so the engine only ever divides by the unit
it was given. Tiered prices (storage volume, egress) carry ``tier_from_gb``/``tier_to_gb``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path

import pandas as pd

from hypersdk.errors import InvalidParameterError
from hypersdk.references import printable
from hypersdk.smallfile import UnreadableFile, read_small_file

COLUMNS = (
    "provider",
    "region",
    "class",
    "redundancy",
    "item",
    "unit",
    "price",
    "tier_from_gb",
    "tier_to_gb",
    "source",
    "as_of",
    "note",
)
# item -> the units it may be given in (what the number is divided by)
UNITS: dict[str, dict[str, float]] = {
    "storage": {"GB-month": 1},
    "put": {"1000 requests": 1000, "10000 requests": 10000},
    "get": {"1000 requests": 1000, "10000 requests": 10000},
    "restore": {"1000 requests": 1000, "10000 requests": 10000},
    "retrieval": {"GB": 1},
    "replication": {"GB": 1},
    "egress": {"GB": 1},
    "monitoring": {"1000 objects-month": 1000},
    "min_days": {"days": 1},
    "min_object_kb": {"KB": 1},
    "overhead_kb": {"KB": 1},
    "overhead_standard_kb": {"KB": 1},
}
TIERED = frozenset({"storage", "egress"})
KEY = ("provider", "region", "class", "redundancy", "item")
MAX_FILE_BYTES = 4 << 20  # a price book is a few hundred rows
MAX_ROWS = 20_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$|^[*-]$")
BUILTIN = ("aws.csv", "azure.csv", "gcp.csv")
# the class whose storage price bills ``overhead_standard_kb`` (S3: 8 KB of each archived
# object's name and metadata at S3 Standard)
STANDARD_CLASS = {"aws": "STANDARD", "azure": "HOT", "gcp": "STANDARD"}


class PricingError(InvalidParameterError):
    """A pricing file that cannot be used: one line naming the file and the row."""


@dataclass(frozen=True)
class Tier:
    start_gb: float
    end_gb: float  # math.inf for the last tier
    price: float


@dataclass(frozen=True)
class ClassPrices:
    """Everything the engine needs to price one (provider, region, class, redundancy)."""

    provider: str
    region: str
    storage_class: str
    redundancy: str
    storage: tuple[Tier, ...]
    standard_storage: tuple[Tier, ...]  # for overhead_standard_kb
    egress: tuple[Tier, ...]
    put_per_request: float = 0.0
    get_per_request: float = 0.0
    restore_per_request: float = 0.0
    retrieval_per_gb: float = 0.0
    replication_per_gb: float = 0.0
    monitoring_per_object_month: float = 0.0
    min_days: int = 0
    min_object_bytes: int = 0
    overhead_bytes: int = 0
    overhead_standard_bytes: int = 0
    sources: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        red = "" if self.redundancy in ("-", "*") else f" {self.redundancy}"
        return f"{self.provider} {self.region} {self.storage_class}{red}"


def tiered_cost(quantity: float, tiers: tuple[Tier, ...]) -> float:
    """``quantity`` GB (or GB-months) priced through ``tiers``: each slice at its own rate."""
    total = 0.0
    for t in tiers:
        if quantity <= t.start_gb:
            break
        total += (min(quantity, t.end_gb) - t.start_gb) * t.price
    return total


def _fail(where: str, problem: str) -> PricingError:
    return PricingError(f"pricing file {where}: {problem}")


def _number(text: str, where: str, column: str, empty_ok: bool = False) -> float | None:
    text = (text or "").strip()
    if not text:
        if empty_ok:
            return None
        raise _fail(where, f"{column} is empty")
    try:
        value = float(text)
    except ValueError:
        raise _fail(where, f"{column} {printable(text[:40])!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise _fail(where, f"{column} {printable(text[:40])!r} is not a finite number >= 0")
    return value


def _check_row(raw: dict[str, str | None], where: str) -> dict[str, object]:
    row = {c: (raw.get(c) or "").strip() for c in COLUMNS}
    for c in ("provider", "region", "class", "redundancy"):
        if not _NAME.match(row[c]):
            raise _fail(where, f"{c} {printable(row[c][:40])!r} is not a name")
    item, unit = row["item"], row["unit"]
    if item not in UNITS:
        raise _fail(where, f"unknown item {printable(item[:40])!r} (one of {', '.join(UNITS)})")
    if unit not in UNITS[item]:
        raise _fail(
            where,
            f"item {item} needs its published unit, one of: {', '.join(UNITS[item])} "
            f"(got {printable(unit[:40])!r})",
        )
    price = _number(row["price"], where, "price")
    lo = _number(row["tier_from_gb"], where, "tier_from_gb", empty_ok=True)
    hi = _number(row["tier_to_gb"], where, "tier_to_gb", empty_ok=True)
    if item in TIERED:
        lo = lo or 0.0
        hi = math.inf if hi is None else hi
        if hi <= lo:
            raise _fail(where, f"tier_to_gb {hi:g} is not above tier_from_gb {lo:g}")
    elif lo is not None or hi is not None:
        raise _fail(where, f"item {item} has no tiers (tier_from_gb/tier_to_gb must be empty)")
    if not row["source"].startswith(("https://", "http://")):
        raise _fail(where, "source must be the URL the price was read from")
    try:
        date.fromisoformat(row["as_of"])
    except ValueError:
        shown = printable(row["as_of"][:40])
        raise _fail(where, f"as_of {shown!r} is not a date (YYYY-MM-DD)") from None
    per = UNITS[item][unit]
    return {
        **row,
        "price": price,
        "per_unit": price / per,
        "tier_from_gb": lo if item in TIERED else None,
        "tier_to_gb": hi if item in TIERED else None,
        "where": where,
    }


def parse(text: str, name: str) -> pd.DataFrame:
    """Rows of one pricing file, validated: a PricingError naming ``name`` and the line."""
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header and c != "note"]
        if missing:
            raise _fail(name, f"missing column(s) {', '.join(missing)} in the header line")
        reader.fieldnames = header
        for raw in reader:
            where = f"{name}, line {reader.line_num}"
            if None in raw:
                raise _fail(where, "more fields than the header has")
            if len(rows) >= MAX_ROWS:
                raise _fail(name, f"more than {MAX_ROWS} rows")
            rows.append(_check_row(raw, where))
    except csv.Error as exc:  # NUL bytes, a field over the csv module's limit, bad quoting
        raise _fail(f"{name}, line {reader.line_num + 1}", f"not CSV ({exc})") from None
    if not rows:
        raise _fail(name, "no price rows")
    frame = pd.DataFrame(rows)
    _check_groups(frame)
    return frame


def _check_groups(frame: pd.DataFrame) -> None:
    """One price per non-tiered item; tiers of an item contiguous from 0 to the end."""
    for key, group in frame.groupby(list(KEY), sort=False):
        item = key[-1]
        if item not in TIERED:
            if len(group) > 1:
                raise _fail(group["where"].iloc[1], f"a second {item} price for the same class")
            continue
        group = group.sort_values("tier_from_gb")
        edge = 0.0
        for lo, hi, where in zip(
            group["tier_from_gb"], group["tier_to_gb"], group["where"], strict=True
        ):
            if lo != edge:
                raise _fail(where, f"{item} tier starts at {lo:g} GB, expected {edge:g} GB")
            edge = hi
        if edge != math.inf:
            raise _fail(group["where"].iloc[-1], f"the last {item} tier must have no tier_to_gb")


def read_file(path: str | Path) -> pd.DataFrame:
    """A user's pricing file, bounded in size, validated."""
    p = Path(path)
    try:
        text = read_small_file(p, MAX_FILE_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise _fail(str(p), "no such file") from None
    except UnreadableFile as exc:
        raise _fail(str(p), str(exc)) from None
    except UnicodeDecodeError:
        raise _fail(str(p), "not UTF-8 text") from None
    return parse(text, str(p))


class PriceBook:
    """The built-in prices, with a user's file laid over them: a row of the user's file
    replaces every built-in row of the same provider, region, class, redundancy and item (all
    tiers of it at once); new classes or regions are added."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    @classmethod
    def load(cls, override: str | Path | None = None) -> PriceBook:
        base = resources.files("hypersdk.cost") / "prices"
        frames = [parse(base.joinpath(n).read_text("utf-8"), f"prices/{n}") for n in BUILTIN]
        frame = pd.concat(frames, ignore_index=True)
        if override is not None:
            mine = read_file(override)
            keys = mine[list(KEY)].drop_duplicates()
            merged = frame.merge(keys, on=list(KEY), how="left", indicator=True)
            frame = pd.concat(
                [frame[(merged["_merge"] == "left_only").to_numpy()], mine], ignore_index=True
            )
        return cls(frame)

    def classes(self) -> pd.DataFrame:
        """Every priced (provider, region, class, redundancy), sorted."""
        storage = self.frame[self.frame["item"] == "storage"]
        cols = ["provider", "region", "class", "redundancy"]
        return storage[cols].drop_duplicates().sort_values(cols).reset_index(drop=True)

    def prices(
        self, provider: str, region: str, storage_class: str, redundancy: str | None = None
    ) -> ClassPrices:
        """The prices of one class; an InvalidParameterError naming what exists otherwise."""
        f = self.frame
        provider = provider.lower()
        mine = f[f["provider"] == provider]
        if mine.empty:
            known = ", ".join(sorted(f["provider"].unique()))
            raise InvalidParameterError(f"unknown provider {provider!r} (known: {known})")
        in_region = mine[mine["region"] == region]
        if in_region.empty:
            known = ", ".join(sorted(mine["region"].unique()))
            raise InvalidParameterError(
                f"unknown region {region!r} for {provider} (priced: {known})"
            )
        storage_class = storage_class.upper()
        of_class = in_region[in_region["class"] == storage_class]
        if of_class.empty:
            known = ", ".join(sorted(set(in_region["class"]) - {"*"}))
            raise InvalidParameterError(
                f"unknown class {storage_class!r} for {provider} {region} (priced: {known})"
            )
        reds = sorted(set(of_class["redundancy"]))
        if redundancy is None:
            redundancy = "LRS" if "LRS" in reds else reds[0]
        redundancy = redundancy.upper() if redundancy not in ("-", "*") else redundancy
        rows = of_class[of_class["redundancy"] == redundancy]
        if rows.empty:
            raise InvalidParameterError(
                f"no {redundancy} prices for {provider} {region} {storage_class} "
                f"(priced: {', '.join(reds)})"
            )
        if not (rows["item"] == "storage").any():
            raise InvalidParameterError(f"no storage price for {provider} {region} {storage_class}")
        std_class = STANDARD_CLASS.get(provider, "STANDARD")
        std = in_region[
            (in_region["class"] == std_class)
            & (in_region["item"] == "storage")
            & (in_region["redundancy"].isin([redundancy, "-"]))
        ]
        egress = in_region[(in_region["class"] == "*") & (in_region["item"] == "egress")]

        def one(item: str) -> float:
            hit = rows[rows["item"] == item]
            return float(hit["per_unit"].iloc[0]) if len(hit) else 0.0

        used = pd.concat([rows, egress])
        return ClassPrices(
            provider=provider,
            region=region,
            storage_class=storage_class,
            redundancy=redundancy,
            storage=_tiers(rows[rows["item"] == "storage"]),
            standard_storage=_tiers(std),
            egress=_tiers(egress),
            put_per_request=one("put"),
            get_per_request=one("get"),
            restore_per_request=one("restore"),
            retrieval_per_gb=one("retrieval"),
            replication_per_gb=one("replication"),
            monitoring_per_object_month=one("monitoring"),
            min_days=int(one("min_days")),
            min_object_bytes=int(one("min_object_kb") * 1024),
            overhead_bytes=int(one("overhead_kb") * 1024),
            overhead_standard_bytes=int(one("overhead_standard_kb") * 1024),
            sources=tuple(sorted(set(used["source"]))),
        )


def _tiers(rows: pd.DataFrame) -> tuple[Tier, ...]:
    rows = rows.sort_values("tier_from_gb")
    return tuple(
        Tier(float(lo), float(hi), float(p))
        for lo, hi, p in zip(
            rows["tier_from_gb"], rows["tier_to_gb"], rows["per_unit"], strict=True
        )
    )
