"""Time windows of runs: when a backup or migration may start, e.g. ``"Mon-Fri 22:00-06:00
Europe/Paris"``. Pure engine code (no Prefect): parsing, ``is_open`` and ``next_open``; the
flows' guard (flows/window.py) decides what a run outside its window does.

Grammar (case-insensitive day names, one space between parts)::

    [DAYS ]HH:MM[:SS]-HH:MM[:SS][ ZONE]

- DAYS: ``Mon``, ``Mon-Fri``, ``Sat,Sun``, ``Mon,Wed-Fri``, ``Fri-Mon`` (ranges wrap around
  the week); none: every day. A window crossing midnight belongs to the day it opens on
  (``Fri 22:00-06:00`` is open from Friday 22:00 to Saturday 06:00).
- The end may be ``24:00``; an end before the start crosses midnight; start == end is refused.
- ZONE: an IANA time zone (``Europe/Paris``), default UTC. Times are wall-clock times there,
  across DST changes too: a window opens (closes) the first time the zone's clock shows its
  time that day; a time the spring change skips counts as reached when the clock jumps past it,
  one the autumn change repeats at its first occurrence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hypersdk.errors import InvalidParameterError

MAX_SPEC = 200  # longer is not a window (and never reaches the regex)
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_DAYS = rf"{_DAY}(?:-{_DAY})?(?:,{_DAY}(?:-{_DAY})?)*"
_TIME = r"\d{1,2}:\d{2}(?::\d{2})?"
_ZONE = r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*"
_SPEC = re.compile(
    rf"(?:(?P<days>{_DAYS}) )?(?P<start>{_TIME})-(?P<end>{_TIME})(?: (?P<zone>{_ZONE}))?",
    re.IGNORECASE,
)
FORMAT_HINT = 'e.g. "22:00-06:00", "Mon-Fri 22:00:30-06:00 Europe/Paris"'


@dataclass(frozen=True)
class Window:
    """A parsed window: opening and closing wall-clock times (seconds from midnight; the end
    may be 86400) on the given weekdays (0 = Monday) in ``zone``."""

    spec: str
    days: frozenset[int]
    start: int
    end: int
    zone: ZoneInfo

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def _instances(self, around: datetime):
        """(open, close) in UTC of every opening from the day before ``around`` (local) to
        eight days after: always includes the current one and the next one."""
        today = around.astimezone(self.zone).date()
        for offset in range(-1, 9):
            day = today + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens = _at(day, self.start, self.zone)
            closes = _at(
                day + timedelta(days=1) if self.crosses_midnight else day, self.end, self.zone
            )
            if closes > opens:  # a DST change cannot make it negative, but never trust that
                yield opens, closes

    def is_open(self, now: datetime) -> bool:
        """Whether ``now`` (aware; naive means UTC) is inside the window."""
        now = _aware(now)
        return any(opens <= now < closes for opens, closes in self._instances(now))

    def next_open(self, now: datetime) -> datetime:
        """``now`` (in UTC) if the window is open, else when it opens next (UTC)."""
        now = _aware(now).astimezone(UTC)
        upcoming = []
        for opens, closes in self._instances(now):
            if opens <= now < closes:
                return now
            if opens > now:
                upcoming.append(opens)
        return min(upcoming)  # a week of days always holds one (days is never empty)

    def describe(self) -> str:
        return self.spec


def parse_window(spec: str) -> Window:
    """The window ``spec`` names, or InvalidParameterError saying what is wrong with it."""
    if not isinstance(spec, str):
        raise InvalidParameterError(f"invalid window: a string is needed ({FORMAT_HINT})")
    text = " ".join(spec.split()) if len(spec) <= MAX_SPEC else None
    if not text:
        problem = "it is empty" if text == "" else f"longer than {MAX_SPEC} characters"
        raise InvalidParameterError(f"invalid window: {problem} ({FORMAT_HINT})")
    m = _SPEC.fullmatch(text)
    if m is None:
        raise InvalidParameterError(
            f"invalid window {text!r}: not [DAYS ]HH:MM-HH:MM[ ZONE] ({FORMAT_HINT})"
        )
    start = _seconds(m["start"], text, end=False)
    end = _seconds(m["end"], text, end=True)
    if start == end:
        raise InvalidParameterError(f"invalid window {text!r}: it opens and closes at once")
    return Window(
        spec=text,
        days=_days(m["days"]) if m["days"] else frozenset(range(7)),
        start=start,
        end=end,
        zone=_zone(m["zone"] or "UTC", text),
    )


def check_window(spec: str | None) -> Window | None:
    """None for no window (any time), else the parsed window (InvalidParameterError if bad)."""
    return None if spec is None else parse_window(spec)


def next_open(window: str | Window, now: datetime) -> datetime:
    """When a run at ``now`` may start: ``now`` inside the window, else its next opening (UTC)."""
    return (parse_window(window) if isinstance(window, str) else window).next_open(now)


def _seconds(value: str, spec: str, end: bool) -> int:
    parts = [int(p) for p in value.split(":")]
    h, m, s = (parts + [0])[:3]
    if end and (h, m, s) == (24, 0, 0):
        return 86400
    if h > 23 or m > 59 or s > 59:
        raise InvalidParameterError(f"invalid window {spec!r}: {value} is not a time of day")
    return h * 3600 + m * 60 + s


def _days(value: str) -> frozenset[int]:
    days: set[int] = set()
    for part in value.lower().split(","):
        first, _, last = part.partition("-")
        a = DAY_NAMES.index(first)
        b = DAY_NAMES.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _zone(name: str, spec: str) -> ZoneInfo:
    # the pattern already keeps it a relative name of letters, digits, _+- and slashes
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidParameterError(
            f"invalid window {spec!r}: unknown time zone {name!r} (an IANA name such as "
            "Europe/Paris)"
        ) from None


def _at(day: date, seconds: int, zone: ZoneInfo) -> datetime:
    """The first UTC instant at which the wall clock of ``zone`` shows (or, in the hour a DST
    change skips, passes) ``seconds`` after midnight of ``day``."""
    if seconds == 86400:
        day, seconds = day + timedelta(days=1), 0
    wall = datetime.combine(day, time(seconds // 3600, seconds // 60 % 60, seconds % 60))
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # it exists (fold=0: the first of two in an autumn change)
    # skipped: fold=1 reads it with the offset after the change, landing before the gap; the
    # gap ends between the two readings (whole seconds: a binary search of ~12 steps)
    lo = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = first
    while (hi - lo).total_seconds() > 1:
        mid = lo + timedelta(seconds=(hi - lo).total_seconds() // 2)
        if mid.astimezone(zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return hi


def _aware(now: datetime) -> datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)
