"""Retention: which backup points to keep, with the semantics of restic's ``forget``, and the order
of operations that forgets the rest without ever leaving a kept point unrestorable.

Pure planning (no I/O, no Prefect): ``plan`` turns points and a ``RetentionPolicy`` into kept
points (each with restic's reasons) and points to forget; ``chain_plan`` turns that plan and the
points' parent links into steps that an executor runs in order.

Semantics, as restic's ``ApplyPolicy`` (internal/data/snapshot_policy.go):

- Points are walked newest first (ties broken by id, descending, so the input order never
  matters). Each rule counts down: ``keep_last`` keeps the N newest; a calendar rule
  (hourly, daily, weekly, monthly, yearly) keeps the newest point of each of the N newest
  hours/days/ISO weeks/months/years that have a point (-1: of every one). A point matching
  several rules is kept once, with every reason, and counts against each of them.
- While a calendar rule still has counts left at the oldest point, that point is kept as well
  ("oldest daily snapshot"): it maximises the history kept.
- ``keep_within`` keeps every point newer than the newest point minus the duration (calendar
  years, months and days, then hours; month ends normalised as Go's ``AddDate``: March 31 less
  one month is March 2 or 3). The newest point is the newest one not in the future (``now``):
  a planted future timestamp cannot make real points look old.

Time zone: restic buckets by the snapshot's recorded local time. Our points carry UTC times
(export ids are UTC stamps), so buckets are taken in UTC by default: the same repository gives
the same plan on every machine. Pass ``tz`` (a tzinfo or an IANA name) to cut days at the
user's midnight; buckets are then wall-clock ones, as restic's (in the autumn DST change both
01:xx hours fall in one hourly bucket).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hypersdk.errors import InvalidParameterError
from hypersdk.references import printable

UNLIMITED = -1
_MAX_DURATION_TEXT = 40
_DURATION_PART = re.compile(r"(\d+)([ymdh])")
_COUNT_TEXT = re.compile(r"[+-]?\d{1,18}")


def _show(value: object) -> str:
    """A short, terminal-safe rendering of a (possibly hostile) id or value for messages."""
    text = value if isinstance(value, str) else repr(value)
    return repr(printable(text[:80]))


@dataclass(frozen=True)
class Duration:
    """restic's duration: calendar years, months, days, then hours (``2y5m7d3h``)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``30d``, ``2y5m7d3h`` (units in any order, each once); ValueError saying why not."""
        shown = _show(text)
        text = text.strip()
        if not text or len(text) > _MAX_DURATION_TEXT:
            raise ValueError(f"{shown} is not a duration such as 30d or 2y5m7d3h")
        parts: dict[str, int] = {}
        pos = 0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos or match.group(2) in parts:
                break
            parts[match.group(2)] = int(match.group(1))
            pos = match.end()
        if pos != len(text):
            raise ValueError(
                f"{shown} is not a duration such as 30d or 2y5m7d3h "
                "(numbers followed by y, m, d or h, each unit once)"
            )
        duration = cls(parts.get("y", 0), parts.get("m", 0), parts.get("d", 0), parts.get("h", 0))
        if duration.is_zero():
            raise ValueError(f"{shown} is zero: it would keep nothing")
        return duration

    def is_zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        units = zip((self.years, self.months, self.days, self.hours), "ymdh", strict=True)
        return "".join(f"{n}{unit}" for n, unit in units if n)

    def before(self, moment: datetime, tz: tzinfo) -> datetime | None:
        """``moment`` less this duration (the calendar part on ``tz``'s wall clock, normalised
        as Go's ``AddDate``, then the hours as elapsed time); None when that falls before year 1,
        i.e. before any point."""
        wall = moment.astimezone(tz)
        try:
            month_index = wall.year * 12 + wall.month - 1 - self.years * 12 - self.months
            year, month0 = divmod(month_index, 12)
            first = datetime(
                year, month0 + 1, 1, wall.hour, wall.minute, wall.second, wall.microsecond
            )
            shifted = (first + timedelta(days=wall.day - 1 - self.days)).replace(tzinfo=tz)
            return shifted.astimezone(UTC) - timedelta(hours=self.hours)
        except (OverflowError, ValueError):
            return None


_COUNT_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")
_COUNT_FIELDS += ("keep_yearly",)


class RetentionPolicy(BaseModel):
    """Which points to keep. Counts are None (rule off) or >= 1; the calendar rules also take
    -1 (or "unlimited"): one point for every hour/day/... that has one. An empty policy is
    refused: forgetting every point is never what a missing option should mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None

    @field_validator(*_COUNT_FIELDS, mode="before")
    @classmethod
    def _count(cls, value: Any, info: Any) -> int | None:
        if value is None:
            return None
        unlimited_ok = info.field_name != "keep_last"
        if isinstance(value, str):
            text = value.strip().lower()
            if unlimited_ok and text == "unlimited":
                return UNLIMITED
            if not _COUNT_TEXT.fullmatch(text):
                raise ValueError(f"{_show(value)} is not a whole number")
            value = int(text)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_show(value)} is not a whole number")
        if value >= 1 or (unlimited_ok and value == UNLIMITED):
            return value
        if unlimited_ok:
            raise ValueError(f"{value} is not a count >= 1 or -1 (unlimited)")
        raise ValueError(f"{value} is not a count >= 1")

    @field_validator("keep_within", mode="before")
    @classmethod
    def _within(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, Duration):
            if value.is_zero():
                raise ValueError("a zero duration would keep nothing")
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{_show(value)} is not a duration such as 30d or 2y5m7d3h")
        return str(Duration.parse(value))

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: Callable[[Any], RetentionPolicy]) -> RetentionPolicy:
        try:
            policy = handler(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise InvalidParameterError(
                f"invalid retention policy{' ' + where if where else ''}: {msg}"
            ) from None
        if policy.is_empty():
            raise InvalidParameterError(
                "retention policy is empty: set at least one of keep_last, keep_hourly, "
                "keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within"
            )
        return policy

    def is_empty(self) -> bool:
        return self.keep_within is None and all(getattr(self, f) is None for f in _COUNT_FIELDS)

    @property
    def within(self) -> Duration | None:
        return None if self.keep_within is None else Duration.parse(self.keep_within)

    def describe(self) -> str:
        """One line for logs, in restic's words ("keep 7 daily, all monthly snapshots ...")."""
        words = ("latest", "hourly", "daily", "weekly", "monthly", "yearly")
        counts = [getattr(self, f) for f in _COUNT_FIELDS]
        rules = [
            f"all {word}" if n == UNLIMITED else f"{n} {word}"
            for n, word in zip(counts, words, strict=True)
            if n is not None
        ]
        text = f"{', '.join(rules)} snapshots" if rules else ""
        if self.keep_within is not None:
            text += (" and " if text else "") + f"all within {self.keep_within} of the newest"
        return f"keep {text}"


@dataclass(frozen=True)
class Point:
    """One backup point (an export of one VM and disk set): its id and when it was taken."""

    id: str
    time: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidParameterError(f"a retention point needs a non-empty id, not {self.id!r}")
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise InvalidParameterError(
                f"point {_show(self.id)}: time {_show(self.time)} is not a timezone-aware datetime"
            )
        object.__setattr__(self, "time", self.time.astimezone(UTC))


@dataclass(frozen=True)
class KeptPoint:
    point: Point
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """Points kept (with why) and points to forget, both newest first."""

    keep: tuple[KeptPoint, ...]
    forget: tuple[Point, ...]

    @property
    def keep_ids(self) -> list[str]:
        return [k.point.id for k in self.keep]

    @property
    def forget_ids(self) -> list[str]:
        return [p.id for p in self.forget]

    def reasons(self) -> dict[str, tuple[str, ...]]:
        return {k.point.id: k.reasons for k in self.keep}


# Bucket keys of a point's (wall-clock) time; consecutive points with equal keys share a bucket.
_BUCKETS: tuple[tuple[str, Callable[[datetime], tuple[int, ...]]], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar())[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
)


@dataclass
class _Rule:
    """One counting rule while points are walked newest first: ``remaining`` (-1: no end),
    the bucket of the last point it kept, and the bucket key (None: each point its own)."""

    remaining: int
    reason: str
    key: Callable[[datetime], tuple[int, ...]] | None
    previous: object = None


def _zone(tz: tzinfo | str) -> tzinfo:
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str):
        raise InvalidParameterError(f"time zone {_show(tz)} is neither a tzinfo nor a name")
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise InvalidParameterError(f"unknown time zone {_show(tz)}") from None


def _newest_first(points: Iterable[Point]) -> list[Point]:
    listed = list(points)
    seen: set[str] = set()
    for point in listed:
        if not isinstance(point, Point):
            raise InvalidParameterError(f"expected a retention Point, got {_show(point)}")
        if point.id in seen:
            raise InvalidParameterError(f"point id {_show(point.id)} appears twice")
        seen.add(point.id)
    return sorted(listed, key=lambda p: (p.time, p.id), reverse=True)


def plan(
    points: Iterable[Point],
    policy: RetentionPolicy,
    now: datetime | None = None,
    tz: tzinfo | str = UTC,
) -> RetentionPlan:
    """Which ``points`` ``policy`` keeps (each with restic's reasons) and which it forgets, both
    newest first. ``now`` (default: the clock) only decides which points are in the future, for
    ``keep_within``; ``tz`` is the zone whose calendar cuts hours, days, weeks, months, years."""
    if not isinstance(policy, RetentionPolicy):
        raise InvalidParameterError("plan needs a RetentionPolicy")
    zone = _zone(tz)
    if now is None:
        now = datetime.now(UTC)
    elif not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidParameterError(f"now {_show(now)} is not a timezone-aware datetime")
    ordered = _newest_first(points)
    if not ordered:
        return RetentionPlan((), ())

    within = policy.within
    cutoff: datetime | None = None
    if within is not None:
        past = [p.time for p in ordered if p.time < now]
        # no point before now: like restic (latest = zero time), every point is within
        cutoff = within.before(past[0], zone) if past else None

    rules: list[_Rule] = []
    if policy.keep_last is not None:
        rules.append(_Rule(policy.keep_last, "last snapshot", None))
    for (word, key), field in zip(_BUCKETS, _COUNT_FIELDS[1:], strict=True):
        count = getattr(policy, field)
        if count is not None:
            rules.append(_Rule(count, f"{word} snapshot", key))

    keep: list[KeptPoint] = []
    forget: list[Point] = []
    oldest = len(ordered) - 1
    for nr, point in enumerate(ordered):
        reasons: list[str] = []
        if within is not None and (cutoff is None or point.time > cutoff):
            reasons.append(f"within {within}")
        wall = point.time.astimezone(zone)
        for rule in rules:
            if rule.remaining == 0:
                continue
            bucket = nr if rule.key is None else rule.key(wall)
            if bucket != rule.previous:
                reasons.append(rule.reason)
            elif nr == oldest:  # counts left at the oldest point: keep it too
                reasons.append(f"oldest {rule.reason}")
            else:
                continue
            rule.previous = bucket
            if rule.remaining > 0:
                rule.remaining -= 1
        if reasons:
            keep.append(KeptPoint(point, tuple(reasons)))
        else:
            forget.append(point)
    return RetentionPlan(tuple(keep), tuple(forget))


class StepAction(StrEnum):
    WRITE_FULL = "write synthetic full object"
    COMMIT_FULL = "commit manifest naming the synthetic full"
    DELETE_MANIFEST = "delete manifest"
    DELETE_OBJECTS = "delete objects"
    DELETE_SUPERSEDED = "delete superseded delta object"


@dataclass(frozen=True)
class Step:
    action: StepAction
    point: str

    def __str__(self) -> str:
        return f"{self.action.value} of {self.point}"


@dataclass(frozen=True)
class ChainPlan:
    """What forgetting does to the chains of kept points, and the steps, in order.

    ``losing_ancestor``: kept deltas with a forgotten point in their chain (oldest first).
    ``rebase``: those of them whose parent is forgotten; each becomes a synthetic full of its own
    guest bytes (the oldest kept point of each broken chain); the others keep their parents.
    """

    losing_ancestor: tuple[str, ...]
    rebase: tuple[str, ...]
    steps: tuple[Step, ...]


def _check_parents(ids: set[str], parents: Mapping[str, str | None]) -> None:
    """Every point has a parent entry naming None (a full) or another point, and every chain
    ends at a full: no cycle, no link out of the plan (parent links come from manifests)."""
    for pid in ids:
        if pid not in parents:
            raise InvalidParameterError(f"no parent given for point {_show(pid)} (None: a full)")
    for pid, parent in parents.items():
        if pid not in ids:
            raise InvalidParameterError(f"parent given for {_show(pid)}, which is not a point")
        if parent is not None and parent not in ids:
            raise InvalidParameterError(
                f"point {_show(pid)} names parent {_show(parent)}, which is not a point"
            )
    reaches_full: set[str] = set()
    for start in ids:
        path: list[str] = []
        on_path: set[str] = set()
        node: str | None = start
        while node is not None and node not in reaches_full:
            if node in on_path:
                raise InvalidParameterError(f"the parent links of point {_show(node)} form a loop")
            path.append(node)
            on_path.add(node)
            node = parents[node]
        reaches_full.update(path)


def chain_plan(plan: RetentionPlan, parents: Mapping[str, str | None]) -> ChainPlan:
    """The steps that carry out ``plan`` so that a crash between any two of them leaves every
    kept point restorable (and every manifest still present with a complete chain).

    ``parents`` maps each point's id to its parent's id (None for a full). Steps:

    1. for each kept delta whose parent is forgotten, oldest first: write a synthetic full of
       its guest bytes (read through its still complete chain), then commit its manifest naming
       that full. The manifest must also record the delta object it replaces (key and BLAKE3),
       so that kept children, whose links name that object, stay valid without being rewritten.
    2. delete the forgotten points, newest first (a forgotten child always before its parent),
       each manifest before its objects: a manifest never outlives an object it needs.
    3. delete the replaced delta objects of the rebased points (nothing reads them any more).
    """
    forget_order = plan.forget_ids
    forgotten = set(forget_order)
    kept_newest_first = plan.keep_ids
    ids = forgotten | set(kept_newest_first)
    if len(ids) != len(forget_order) + len(kept_newest_first):
        raise InvalidParameterError("a point is both kept and forgotten in the retention plan")
    _check_parents(ids, parents)

    kept_oldest_first = kept_newest_first[::-1]
    rebase = [p for p in kept_oldest_first if parents[p] is not None and parents[p] in forgotten]

    # does p's chain (p excluded) contain a forgotten point? memoised walk, no recursion
    lost: dict[str, bool] = {}
    for start in ids:
        path: list[str] = []
        node = start
        while node not in lost:
            parent = parents[node]
            if parent is None:
                lost[node] = False
                break
            if parent in forgotten:
                lost[node] = True
                break
            path.append(node)
            node = parent
        answer = lost[node]
        for n in path:
            lost[n] = answer
    losing = [p for p in kept_oldest_first if lost[p]]

    steps: list[Step] = []
    for p in rebase:
        steps += [Step(StepAction.WRITE_FULL, p), Step(StepAction.COMMIT_FULL, p)]

    # newest first, but never a parent before a forgotten child of it (times are untrusted)
    rank = {p: i for i, p in enumerate(forget_order)}
    waiting = dict.fromkeys(forget_order, 0)
    for p in forget_order:
        parent = parents[p]
        if parent in waiting:
            waiting[parent] += 1
    ready = [(rank[p], p) for p in forget_order if waiting[p] == 0]
    heapq.heapify(ready)
    while ready:
        _, p = heapq.heappop(ready)
        steps += [Step(StepAction.DELETE_MANIFEST, p), Step(StepAction.DELETE_OBJECTS, p)]
        parent = parents[p]
        if parent in waiting:
            waiting[parent] -= 1
            if waiting[parent] == 0:
                heapq.heappush(ready, (rank[parent], parent))

    steps += [Step(StepAction.DELETE_SUPERSEDED, p) for p in rebase]
    return ChainPlan(tuple(losing), tuple(rebase), tuple(steps))
