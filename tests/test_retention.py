"""Retention planning (hypersdk.repository.retention): restic's ``forget`` semantics, checked against
restic's own golden results and documented examples, Hypothesis properties (including an
independent, declarative oracle of the calendar rules), and the crash safety of the steps that
carry a plan out on chains of deltas."""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.errors import InvalidParameterError
from hypersdk.repository.retention import (
    Duration,
    KeptPoint,
    Point,
    RetentionPlan,
    RetentionPolicy,
    Step,
    StepAction,
    chain_plan,
    plan,
)
from tests import limited

GOLDEN = json.loads(
    (pathlib.Path(__file__).parent / "data" / "restic_forget_golden.json").read_text()
)
# restic's golden results were made with time.Now() long after its 2016 snapshots
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def points_at(*times: str) -> list[Point]:
    return [Point(f"p{i:03d}", utc(t)) for i, t in enumerate(times)]


def kept_times(result: RetentionPlan) -> list[str]:
    return [k.point.time.strftime("%Y-%m-%d %H:%M:%S") for k in result.keep]


# --- restic's own results --------------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"restic-{c['case']}")
def test_restic_golden_results(case):
    """restic's TestApplyPolicy list under each policy we support: same kept points, newest
    first, with the same reasons (restic's own golden files)."""
    pts = [Point(f"s{i:03d}", utc(t)) for i, t in enumerate(GOLDEN["snapshots"])]
    result = plan(pts, RetentionPolicy(**case["policy"]), now=NOW)
    got = [(k.point.time, list(k.reasons)) for k in result.keep]
    want = [(datetime.fromisoformat(t), reasons) for t, reasons in case["keep"]]
    assert got == want
    assert len(result.keep) + len(result.forget) == len(pts)


# restic's doc/060_forget.rst: backups every weekday of two weeks, a second one on Fridays,
# none on the second Wednesday; "forget --keep-daily 5".
DOC_2025 = [
    "2025-04-21 11:00:00",
    "2025-04-22 11:00:00",
    "2025-04-23 11:00:00",
    "2025-04-24 11:00:00",
    "2025-04-25 11:00:00",
    "2025-04-25 23:00:00",
    "2025-04-28 11:00:00",
    "2025-04-29 11:00:00",
    "2025-05-01 11:00:00",
    "2025-05-02 11:00:00",
    "2025-05-02 23:00:00",
]


def test_restic_docs_keep_daily_5():
    result = plan(points_at(*DOC_2025), RetentionPolicy(keep_daily=5), now=NOW)
    # the docs list the kept Friday as "8a603ddf 2025-04-25 23:00:00" (the 23:00 snapshot's id
    # is ae33bf10; 8a603ddf, at 11:00, is in the removed list)
    assert kept_times(result)[::-1] == [
        "2025-04-25 23:00:00",
        "2025-04-28 11:00:00",
        "2025-04-29 11:00:00",
        "2025-05-01 11:00:00",
        "2025-05-02 23:00:00",
    ]
    assert all(k.reasons == ("daily snapshot",) for k in result.keep)
    assert sorted(p.time.strftime("%Y-%m-%d %H:%M:%S") for p in result.forget) == [
        "2025-04-21 11:00:00",
        "2025-04-22 11:00:00",
        "2025-04-23 11:00:00",
        "2025-04-24 11:00:00",
        "2025-04-25 11:00:00",
        "2025-05-02 11:00:00",
    ]


def test_restic_docs_keep_daily_4_of_weekly_backups():
    """The earlier docs' example: one backup every Sunday for 12 weeks, --keep-daily 4 keeps
    the last four Sundays."""
    sundays = [datetime(2019, 9, 1, 11, tzinfo=UTC) + timedelta(weeks=w) for w in range(12)]
    pts = [Point(f"w{i:02d}", t) for i, t in enumerate(sundays)]
    result = plan(pts, RetentionPolicy(keep_daily=4), now=NOW)
    assert kept_times(result) == [
        "2019-11-17 11:00:00",
        "2019-11-10 11:00:00",
        "2019-11-03 11:00:00",
        "2019-10-27 11:00:00",
    ]
    assert [p.id for p in result.forget] == [f"w{i:02d}" for i in range(7, -1, -1)]


def test_restic_docs_hundred_years_of_dailies():
    """The docs: a backup every day for 100 years, --keep-daily 7 --keep-weekly 5
    --keep-monthly 12 --keep-yearly 75 keeps 7 dailies, 4 more weeklies (the dailies hold
    one), 12 or 11 more monthlies and 75 or 74 more yearlies."""
    # the last backup on a Sunday, December 31st: the 7 dailies hold exactly one week end, one
    # month end and one year end, so the docs' counts hold exactly (later in a year, the
    # previous December 31st is also one of the 12 monthlies and one fewer yearly is extra)
    last = date(2023, 12, 31)
    assert last.isoweekday() == 7
    first = last.replace(year=last.year - 100)
    days = (last - first).days + 1
    start = datetime(first.year, first.month, first.day, 12, tzinfo=UTC)
    pts = [Point(f"d{i:05d}", start + timedelta(days=i)) for i in range(days)]
    policy = RetentionPolicy(keep_daily=7, keep_weekly=5, keep_monthly=12, keep_yearly=75)
    result = plan(pts, policy, now=NOW)

    by_reason: dict[str, int] = defaultdict(int)
    first_reason: dict[str, int] = defaultdict(int)
    for k in result.keep:
        for r in k.reasons:
            by_reason[r] += 1
        first_reason[k.reasons[0]] += 1
    assert by_reason == {
        "daily snapshot": 7,
        "weekly snapshot": 5,
        "monthly snapshot": 12,
        "yearly snapshot": 75,
    }
    assert first_reason["daily snapshot"] == 7
    assert first_reason["weekly snapshot"] == 4
    assert first_reason["monthly snapshot"] == 11
    assert first_reason["yearly snapshot"] == 74
    assert len(result.keep) == sum(first_reason.values())
    assert result.keep[0].point.id == pts[-1].id


# --- the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, words",
    [
        ({}, ["empty"]),
        ({"keep_last": None, "keep_within": None}, ["empty"]),
        ({"keep_daily": 0}, ["keep_daily", ">= 1"]),
        ({"keep_daily": -2}, ["keep_daily", "-1"]),
        ({"keep_last": -1}, ["keep_last", ">= 1"]),
        ({"keep_last": "unlimited"}, ["keep_last", "whole number"]),
        ({"keep_daily": True}, ["keep_daily", "whole number"]),
        ({"keep_daily": 2.5}, ["keep_daily", "whole number"]),
        ({"keep_daily": "five"}, ["keep_daily", "whole number"]),
        ({"keep_dayly": 5}, ["keep_dayly", "Extra"]),
        ({"keep_within": "1w"}, ["keep_within", "'1w'", "2y5m7d3h"]),
        ({"keep_within": "30"}, ["keep_within", "duration"]),
        ({"keep_within": "d"}, ["keep_within", "duration"]),
        ({"keep_within": "-1d"}, ["keep_within", "duration"]),
        ({"keep_within": "1d1d"}, ["keep_within", "each unit once"]),
        ({"keep_within": "0d0h"}, ["keep_within", "zero"]),
        ({"keep_within": ""}, ["keep_within", "duration"]),
        ({"keep_within": "1" * 5000 + "d"}, ["keep_within", "duration"]),
        ({"keep_within": "7d\n\x1b[31m"}, ["keep_within", "duration"]),
        ({"keep_within": 30}, ["keep_within", "duration"]),
    ],
)
def test_policy_refused_with_one_line(params, words):
    with pytest.raises(InvalidParameterError) as exc:
        RetentionPolicy(**params)
    line = str(exc.value)
    assert "\n" not in line and "\x1b" not in line and len(line) < 300, line
    for word in words:
        assert word in line, (word, line)


def test_policy_model_validate_refuses_with_our_error():
    with pytest.raises(InvalidParameterError, match="empty"):
        RetentionPolicy.model_validate({})
    with pytest.raises(InvalidParameterError, match="retention policy"):
        RetentionPolicy.model_validate("keep everything")


def test_policy_accepts_restic_spellings():
    policy = RetentionPolicy(
        keep_last="3", keep_daily="unlimited", keep_weekly=-1, keep_within=" 1y1d1m "
    )
    assert (policy.keep_last, policy.keep_daily, policy.keep_weekly) == (3, -1, -1)
    assert policy.keep_within == "1y1m1d"  # normalised as restic prints it
    assert policy.within == Duration(years=1, months=1, days=1)
    assert policy.describe() == (
        "keep 3 latest, all daily, all weekly snapshots and all within 1y1m1d of the newest"
    )
    assert RetentionPolicy(keep_within=Duration(hours=36)).keep_within == "36h"


# --- keep_within ----------------------------------------------------------------------------


def test_within_is_relative_to_the_newest_point_not_now():
    pts = points_at("2020-01-10 00:00:00", "2020-01-08 00:00:01", "2020-01-07 23:59:59")
    result = plan(pts, RetentionPolicy(keep_within="2d"), now=NOW)  # ten years later
    assert [k.point.id for k in result.keep] == ["p000", "p001"]
    assert result.keep[0].reasons == ("within 2d",)
    assert [p.id for p in result.forget] == ["p002"]


def test_within_boundary_is_exclusive():
    pts = points_at("2020-01-10 00:00:00", "2020-01-09 00:00:00")
    assert plan(pts, RetentionPolicy(keep_within="1d"), now=NOW).forget_ids == ["p001"]
    assert plan(pts, RetentionPolicy(keep_within="25h"), now=NOW).forget_ids == []


def test_within_month_ends_normalise_as_go():
    """2024-03-31 less one month is "February 31", i.e. March 2 in Go (restic), not February 29
    as dateutil would say: a point on March 1 is outside."""
    pts = points_at(
        "2024-03-31 12:00:00", "2024-03-02 12:00:01", "2024-03-02 12:00:00", "2024-03-01 12:00:00"
    )
    result = plan(pts, RetentionPolicy(keep_within="1m"), now=NOW)
    assert result.keep_ids == ["p000", "p001"]
    assert result.forget_ids == ["p002", "p003"]


def test_within_hours_are_elapsed_time_and_calendar_follows_tz():
    """1d in a zone with DST is a calendar day (23 hours across the spring change), while 24h
    is 24 elapsed hours."""
    paris = ZoneInfo("Europe/Paris")
    newest = datetime(2024, 3, 31, 12, tzinfo=paris)  # DST began at 02:00 that night
    pts = [
        Point("new", newest),
        # 23.5 elapsed hours earlier: 2024-03-30 11:30 CET, before "12:00 the day before"
        Point("mid", newest.astimezone(UTC) - timedelta(hours=23, minutes=30)),
    ]
    assert plan(pts, RetentionPolicy(keep_within="1d"), now=NOW, tz=paris).forget_ids == ["mid"]
    assert plan(pts, RetentionPolicy(keep_within="24h"), now=NOW, tz=paris).forget_ids == []
    assert plan(pts, RetentionPolicy(keep_within="1d"), now=NOW, tz=UTC).forget_ids == []


def test_within_ignores_future_points_for_the_newest():
    """A planted point dated in the future neither counts as the newest (real points would
    look old) nor is forgotten."""
    now = utc("2020-06-01 00:00:00")
    pts = points_at("2099-01-01 00:00:00", "2020-05-31 00:00:00", "2020-05-29 00:00:00")
    result = plan(pts, RetentionPolicy(keep_within="2d"), now=now)
    assert result.keep_ids == ["p000", "p001"]
    assert result.forget_ids == ["p002"]


def test_within_all_points_in_the_future_keeps_all():
    pts = points_at("2099-01-01 00:00:00", "2050-01-01 00:00:00")
    result = plan(pts, RetentionPolicy(keep_within="1h"), now=utc("2020-01-01 00:00:00"))
    assert result.forget == ()


def test_within_huge_duration_keeps_everything():
    pts = points_at("0001-01-02 00:00:00", "2020-01-01 00:00:00", "9999-12-31 23:00:00")
    for within in ("9999y", "99999999999999999999h", "1y" + "9" * 30 + "m"):
        result = plan(pts, RetentionPolicy(keep_within=within), now=utc("9999-12-31 23:59:59"))
        assert result.forget == (), within


# --- edge cases -----------------------------------------------------------------------------


def test_no_points_and_one_point():
    policy = RetentionPolicy(keep_daily=3)
    assert plan([], policy) == RetentionPlan((), ())
    (kept,) = plan(points_at("2020-01-01 00:00:00"), policy, now=NOW).keep
    assert kept.reasons == ("daily snapshot",)


def test_equal_timestamps_are_ordered_by_id_whatever_the_input_order():
    t = utc("2020-01-01 10:00:00")
    pts = [Point(i, t) for i in ("b", "c", "a")]
    for order in (pts, pts[::-1], sorted(pts, key=lambda p: p.id)):
        result = plan(order, RetentionPolicy(keep_last=2), now=NOW)
        assert result.keep_ids == ["c", "b"]
        assert result.forget_ids == ["a"]
        daily = plan(order, RetentionPolicy(keep_daily=1), now=NOW)
        assert daily.keep_ids == ["c"] and daily.forget_ids == ["b", "a"]


def test_oldest_point_kept_while_counts_remain():
    pts = points_at("2020-01-02 10:00:00", "2020-01-01 10:00:00", "2020-01-01 09:00:00")
    result = plan(pts, RetentionPolicy(keep_daily=5), now=NOW)
    assert result.reasons() == {
        "p000": ("daily snapshot",),
        "p001": ("daily snapshot",),
        "p002": ("oldest daily snapshot",),
    }
    # counts used up before the oldest point: no extra
    assert plan(pts, RetentionPolicy(keep_daily=2), now=NOW).forget_ids == ["p002"]


def test_weeks_are_iso_weeks_across_the_year_end():
    # 2020-12-31 (Thu) and 2021-01-03 (Sun) are both in ISO week 2020-53; 2021-01-04 is week 1
    pts = points_at("2021-01-04 00:00:00", "2021-01-03 00:00:00", "2020-12-31 00:00:00")
    result = plan(pts, RetentionPolicy(keep_weekly=2), now=NOW)
    assert result.keep_ids == ["p000", "p001"]
    assert result.forget_ids == ["p002"]


def test_buckets_follow_the_given_time_zone():
    """23:30 and 00:30 UTC are two UTC days but one day in Paris (UTC+1 in winter)."""
    pts = points_at("2024-01-10 00:30:00", "2024-01-09 23:30:00", "2024-01-09 22:30:00")
    policy = RetentionPolicy(keep_daily=1)
    assert plan(pts, policy, now=NOW).keep_ids == ["p000"]
    in_utc = plan(pts, RetentionPolicy(keep_daily=2), now=NOW)
    assert in_utc.keep_ids == ["p000", "p001"]
    in_paris = plan(pts, RetentionPolicy(keep_daily=2), now=NOW, tz="Europe/Paris")
    assert in_paris.keep_ids == ["p000", "p002"]  # 01:30 and 00:30 on the 10th; 23:30 on the 9th
    assert in_paris.keep[1].reasons == ("daily snapshot",)


def test_dst_fall_back_hours_share_a_wall_clock_bucket():
    """New York, 2024-11-03: 05:30Z is 01:30 EDT and 06:30Z is 01:30 EST. restic buckets by wall
    clock, so keep-hourly sees one hour there; in UTC they are two."""
    pts = points_at("2024-11-03 06:30:00", "2024-11-03 05:30:00", "2024-11-03 04:30:00")
    policy = RetentionPolicy(keep_hourly=2)
    assert plan(pts, policy, now=NOW).keep_ids == ["p000", "p001"]
    new_york = plan(pts, policy, now=NOW, tz=ZoneInfo("America/New_York"))
    assert new_york.keep_ids == ["p000", "p002"]  # 01:xx (both) then 00:30 EDT


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: Point("a", datetime(2020, 1, 1)), ["'a'", "timezone"]),
        (lambda: Point("", datetime(2020, 1, 1, tzinfo=UTC)), ["non-empty id"]),
        (lambda: Point("a", "2020-01-01"), ["timezone"]),
        (
            lambda: plan(points_at("2020-01-01 00:00:00") * 2, RetentionPolicy(keep_last=1)),
            ["p000", "twice"],
        ),
        (lambda: plan(["x"], RetentionPolicy(keep_last=1)), ["Point"]),
        (lambda: plan([], {"keep_last": 1}), ["RetentionPolicy"]),
        (
            lambda: plan([], RetentionPolicy(keep_last=1), now=datetime(2020, 1, 1)),
            ["now", "timezone"],
        ),
        (lambda: plan([], RetentionPolicy(keep_last=1), tz="Mars/Olympus"), ["Mars/Olympus"]),
        (lambda: plan([], RetentionPolicy(keep_last=1), tz="../../etc/passwd"), ["time zone"]),
        (lambda: plan([], RetentionPolicy(keep_last=1), tz=5), ["time zone"]),
    ],
)
def test_bad_input_refused_with_one_line(call, words):
    with pytest.raises(InvalidParameterError) as exc:
        call()
    line = str(exc.value)
    assert "\n" not in line, line
    for word in words:
        assert word in line, (word, line)


def test_point_times_are_normalised_to_utc():
    p = Point("a", datetime(2020, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    assert p.time == datetime(2020, 1, 1, tzinfo=UTC) and p.time.tzinfo is UTC


# --- properties -----------------------------------------------------------------------------

SCALES = [60 * 6, 60 * 24 * 20, 60 * 24 * 120, 60 * 24 * 366 * 4]  # minutes spanned
ZONES = [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]
BASE = datetime(2019, 12, 1, tzinfo=UTC)


@st.composite
def point_lists(draw, min_size=0):
    span = draw(st.sampled_from(SCALES))
    minutes = draw(st.lists(st.integers(0, span), min_size=min_size, max_size=40))
    return [Point(f"id{i:02d}", BASE + timedelta(minutes=m)) for i, m in enumerate(minutes)]


counts = st.one_of(st.none(), st.integers(1, 6), st.just(-1))


@st.composite
def policies(draw, within=True):
    params = {
        "keep_last": draw(st.one_of(st.none(), st.integers(1, 6))),
        **{
            f: draw(counts)
            for f in ("keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
        },
    }
    if within:
        params["keep_within"] = draw(st.one_of(st.none(), st.sampled_from(["6h", "3d", "1m2d"])))
    if all(v is None for v in params.values()):
        params["keep_daily"] = draw(st.integers(1, 6))
    return RetentionPolicy(**params)


def _oracle(points, policy, tz):
    """The calendar rules declared, not simulated: the newest point of each of the N newest
    buckets (all of them for -1); the oldest point too while fewer than N buckets exist."""
    ordered = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    reasons = {p.id: [] for p in ordered}
    if not ordered:
        return {}
    if policy.keep_last:
        for p in ordered[: policy.keep_last]:
            reasons[p.id].append("last snapshot")
    keys = {
        "hourly": lambda t: t.strftime("%Y%m%d%H"),
        "daily": lambda t: t.strftime("%Y%m%d"),
        "weekly": lambda t: t.strftime("%G%V"),
        "monthly": lambda t: t.strftime("%Y%m"),
        "yearly": lambda t: t.strftime("%Y"),
    }
    for word, key in keys.items():
        count = getattr(policy, f"keep_{word}")
        if count is None:
            continue
        newest_of: dict[str, Point] = {}
        for p in ordered:
            newest_of.setdefault(key(p.time.astimezone(tz)), p)
        reps = list(newest_of.values())
        for p in reps if count == -1 else reps[:count]:
            reasons[p.id].append(f"{word} snapshot")
        oldest = ordered[-1]
        if oldest not in reps and (count == -1 or len(reps) < count):
            reasons[oldest.id].append(f"oldest {word} snapshot")
    return {i: tuple(r) for i, r in reasons.items() if r}


@settings(max_examples=150, deadline=None)
@given(point_lists(), policies(within=False), st.sampled_from(ZONES))
def test_calendar_rules_match_the_declarative_oracle(points, policy, tz):
    assert plan(points, policy, now=NOW, tz=tz).reasons() == _oracle(points, policy, tz)


@settings(max_examples=150, deadline=None)
@given(point_lists(), policies(), st.sampled_from(ZONES), st.randoms(use_true_random=False))
def test_plan_properties(points, policy, tz, rnd):
    result = plan(points, policy, now=NOW, tz=tz)
    keep, forget = result.keep_ids, result.forget_ids
    # a partition of the input, each side newest first
    assert sorted(keep + forget) == sorted(p.id for p in points)
    assert not set(keep) & set(forget)
    for side in ([k.point for k in result.keep], list(result.forget)):
        assert side == sorted(side, key=lambda p: (p.time, p.id), reverse=True)
    # every kept point says why
    assert all(k.reasons for k in result.keep)
    # never forgets everything, and never the newest point
    if points:
        newest = max(points, key=lambda p: (p.time, p.id))
        assert keep and keep[0] == newest.id
    # the input order does not matter
    shuffled = list(points)
    rnd.shuffle(shuffled)
    assert plan(shuffled, policy, now=NOW, tz=tz) == result
    # idempotence: planning again on the kept points keeps them all, for the same reasons
    again = plan([k.point for k in result.keep], policy, now=NOW, tz=tz)
    assert again.forget == () and again.keep == result.keep


@settings(max_examples=100, deadline=None)
@given(point_lists(), st.integers(1, 50))
def test_keep_last_keeps_exactly_the_newest(points, n):
    result = plan(points, RetentionPolicy(keep_last=n), now=NOW)
    newest = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    assert result.keep_ids == [p.id for p in newest[:n]]
    assert all(k.reasons == ("last snapshot",) for k in result.keep)


# --- chains: which kept deltas are rebased, and the crash safety of the steps -----------------


@dataclass
class Manifest:
    kind: str  # "full" | "delta"
    obj: str
    parent: str | None = None
    parent_obj: str | None = None  # the object the delta was written against
    replaces: str | None = None  # a synthetic full's record of the delta object it replaced


class Repo:
    """Manifests and objects of one VM, as committed on a target; applies steps one by one."""

    def __init__(self, parents: dict[str, str | None]):
        self.manifests: dict[str, Manifest] = {}
        self.objects: set[str] = set()
        for p, parent in parents.items():
            self.objects.add(f"{p}/{'full' if parent is None else 'delta'}")
        for p, parent in parents.items():
            if parent is None:
                self.manifests[p] = Manifest("full", f"{p}/full")
            else:
                kind = "full" if parents[parent] is None else "delta"
                self.manifests[p] = Manifest("delta", f"{p}/delta", parent, f"{parent}/{kind}")

    def restorable(self, point: str) -> bool:
        """Every object on ``point``'s chain is there and every link holds."""
        node: str | None = point
        for _ in range(len(self.manifests) + 1):
            m = self.manifests.get(node)
            if m is None or m.obj not in self.objects:
                return False
            if m.kind == "full":
                return True
            up = self.manifests.get(m.parent)
            if up is None or m.parent_obj not in (up.obj, up.replaces):
                return False
            node = m.parent
        return False  # a loop

    def apply(self, step: Step) -> str | None:
        p = step.point
        if step.action is StepAction.WRITE_FULL:
            if not self.restorable(p):
                return f"synthetic full of {p} built from a broken chain"
            self.objects.add(f"{p}/synthetic")
        elif step.action is StepAction.COMMIT_FULL:
            if f"{p}/synthetic" not in self.objects:
                return f"manifest of {p} committed before its synthetic full"
            old = self.manifests[p]
            self.manifests[p] = Manifest("full", f"{p}/synthetic", replaces=old.obj)
        elif step.action is StepAction.DELETE_MANIFEST:
            del self.manifests[p]
        elif step.action is StepAction.DELETE_OBJECTS:
            if p in self.manifests:
                return f"objects of {p} deleted before its manifest"
            self.objects -= {f"{p}/full", f"{p}/delta"}
        elif step.action is StepAction.DELETE_SUPERSEDED:
            self.objects.discard(f"{p}/delta")
        return None


def first_violation(parents, kept, steps) -> str | None:
    """Run ``steps``; after each prefix (a crash there), every kept point must be restorable and
    every manifest still present must have a complete chain. None when all holds, and at the
    end exactly the kept points remain, with no object left behind."""
    repo = Repo(parents)
    for n, step in enumerate([None, *steps]):
        if step is not None:
            problem = repo.apply(step)
            if problem:
                return f"step {n} ({step}): {problem}"
        for p in kept:
            if not repo.restorable(p):
                return f"after step {n} ({step}): kept {p} is not restorable"
        for p in repo.manifests:
            if not repo.restorable(p):
                return f"after step {n} ({step}): manifest of {p} has a broken chain"
    if set(repo.manifests) != set(kept):
        return f"manifests left: {sorted(repo.manifests)}"
    needed = {m.obj for m in repo.manifests.values()}
    if repo.objects != needed:
        return f"objects left behind: {sorted(repo.objects - needed)}"
    return None


def make_plan(times: dict[str, datetime], kept: set[str]) -> RetentionPlan:
    order = sorted(times, key=lambda p: (times[p], p), reverse=True)
    return RetentionPlan(
        tuple(KeptPoint(Point(p, times[p]), ("test",)) for p in order if p in kept),
        tuple(Point(p, times[p]) for p in order if p not in kept),
    )


def linear(n: int) -> tuple[dict[str, datetime], dict[str, str | None]]:
    """A full P0 and deltas P1..Pn-1, each on the previous one, a day apart."""
    times = {f"P{i}": BASE + timedelta(days=i) for i in range(n)}
    parents = {f"P{i}": (None if i == 0 else f"P{i - 1}") for i in range(n)}
    return times, parents


def test_chain_oldest_kept_of_a_broken_chain_becomes_full():
    times, parents = linear(4)  # P0 <- P1 <- P2 <- P3
    result = chain_plan(make_plan(times, {"P2", "P3"}), parents)
    assert result.losing_ancestor == ("P2", "P3")
    assert result.rebase == ("P2",)  # P3 keeps its parent
    assert [(s.action, s.point) for s in result.steps] == [
        (StepAction.WRITE_FULL, "P2"),
        (StepAction.COMMIT_FULL, "P2"),
        (StepAction.DELETE_MANIFEST, "P1"),
        (StepAction.DELETE_OBJECTS, "P1"),
        (StepAction.DELETE_MANIFEST, "P0"),
        (StepAction.DELETE_OBJECTS, "P0"),
        (StepAction.DELETE_SUPERSEDED, "P2"),
    ]
    assert first_violation(parents, {"P2", "P3"}, result.steps) is None


def test_chain_gaps_rebase_each_broken_piece():
    times, parents = linear(6)
    kept = {"P0", "P2", "P4", "P5"}
    result = chain_plan(make_plan(times, kept), parents)
    assert result.losing_ancestor == ("P2", "P4", "P5")
    assert result.rebase == ("P2", "P4")
    assert first_violation(parents, kept, result.steps) is None


def test_chain_nothing_forgotten_or_nothing_broken():
    times, parents = linear(3)
    assert chain_plan(make_plan(times, set(times)), parents).steps == ()
    only_tail = chain_plan(make_plan(times, {"P0", "P1"}), parents)
    assert only_tail.rebase == () and only_tail.losing_ancestor == ()
    assert [s.action for s in only_tail.steps] == [
        StepAction.DELETE_MANIFEST,
        StepAction.DELETE_OBJECTS,
    ]


def test_chain_deletes_newest_first_across_chains():
    """Two chains, each forgotten entirely: deletions interleave by time, newest first."""
    times = {p: BASE + timedelta(days=d) for p, d in (("A0", 0), ("B0", 1), ("A1", 2), ("B1", 3))}
    times["K"] = BASE + timedelta(days=9)
    parents = {"A0": None, "A1": "A0", "B0": None, "B1": "B0", "K": None}
    result = chain_plan(make_plan(times, {"K"}), parents)
    assert [(s.action, s.point) for s in result.steps] == [
        (action, p)
        for p in ("B1", "A1", "B0", "A0")
        for action in (StepAction.DELETE_MANIFEST, StepAction.DELETE_OBJECTS)
    ]


def test_chain_deletes_children_first_even_with_lying_times():
    """Manifest times are untrusted: a parent dated after its child is still deleted after it,
    so no manifest ever names a deleted parent."""
    times = {"F": BASE, "A": BASE + timedelta(days=5), "B": BASE + timedelta(days=1)}
    parents = {"F": None, "A": "F", "B": "A"}  # B is a delta on A, yet dated before A
    result = chain_plan(make_plan(times, {"F"}), parents)
    deleted = [s.point for s in result.steps if s.action is StepAction.DELETE_MANIFEST]
    assert deleted == ["B", "A"]
    assert first_violation(parents, {"F"}, result.steps) is None


def test_simulator_catches_unsafe_orders():
    """The crash simulation is not vacuous: deleting before rebasing, objects before manifests,
    or parents before children is caught."""
    times, parents = linear(4)
    kept = {"P2", "P3"}
    steps = list(chain_plan(make_plan(times, kept), parents).steps)
    deletes_first = steps[2:6] + steps[:2] + steps[6:]
    assert "not restorable" in first_violation(parents, kept, deletes_first)
    objects_first = steps[:2] + [steps[3], steps[2]] + steps[4:]
    assert "before its manifest" in first_violation(parents, kept, objects_first)
    oldest_first = steps[:2] + steps[4:6] + steps[2:4] + steps[6:]
    assert "broken chain" in first_violation(parents, kept, oldest_first)
    commit_first = [steps[1], steps[0], *steps[2:]]
    assert "before its synthetic full" in first_violation(parents, kept, commit_first)
    assert "left behind" in first_violation(parents, kept, steps[:-1])


@st.composite
def forests(draw):
    """Points with random times; each a full or a delta on any other earlier-listed point
    (branches, several chains, parents possibly dated after their children)."""
    n = draw(st.integers(1, 25))
    times = {f"X{i:02d}": BASE + timedelta(hours=draw(st.integers(0, 24 * 60))) for i in range(n)}
    parents: dict[str, str | None] = {"X00": None}
    for i in range(1, n):
        full = draw(st.integers(0, 4)) == 0
        parents[f"X{i:02d}"] = None if full else f"X{draw(st.integers(0, i - 1)):02d}"
    kept = {p for p in times if draw(st.booleans())}
    return times, parents, kept


@settings(max_examples=200, deadline=None)
@given(forests())
def test_chain_plan_is_crash_safe_after_every_step(forest):
    times, parents, kept = forest
    result = chain_plan(make_plan(times, kept), parents)
    assert first_violation(parents, kept, result.steps) is None
    forgotten = set(times) - kept
    for p in result.rebase:
        assert p in kept and parents[p] in forgotten
    for p in kept:
        if parents[p] is not None and parents[p] in forgotten:
            assert p in result.rebase


@settings(max_examples=60, deadline=None)
@given(point_lists(min_size=1), policies(), st.data())
def test_chain_plan_of_a_real_plan(points, policy, data):
    ordered = sorted(points, key=lambda p: (p.time, p.id))
    parents = {
        p.id: (None if i == 0 or data.draw(st.integers(0, 5)) == 0 else ordered[i - 1].id)
        for i, p in enumerate(ordered)
    }
    result = plan(points, policy, now=NOW)
    steps = chain_plan(result, parents).steps
    assert first_violation(parents, set(result.keep_ids), steps) is None
    # parents older than their children: deletions exactly newest first
    deleted = [s.point for s in steps if s.action is StepAction.DELETE_MANIFEST]
    assert deleted == result.forget_ids


@pytest.mark.parametrize(
    "parents, words",
    [
        ({"P0": None, "P1": "P0"}, ["no parent", "'P2'"]),
        ({"P0": None, "P1": "P0", "P2": "Q"}, ["'P2'", "'Q'", "not a point"]),
        ({"P0": None, "P1": "P0", "P2": "P1", "Z": None}, ["'Z'", "not a point"]),
        ({"P0": "P2", "P1": "P0", "P2": "P1"}, ["loop"]),
        ({"P0": None, "P1": "P1", "P2": "P1"}, ["loop", "'P1'"]),
    ],
)
def test_chain_plan_refuses_bad_links(parents, words):
    times, _ = linear(3)
    with pytest.raises(InvalidParameterError) as exc:
        chain_plan(make_plan(times, {"P2"}), parents)
    line = str(exc.value)
    assert "\n" not in line
    for word in words:
        assert word in line, (word, line)


def test_chain_plan_refuses_a_point_both_kept_and_forgotten():
    p = Point("A", BASE)
    both = RetentionPlan((KeptPoint(p, ("test",)),), (p,))
    with pytest.raises(InvalidParameterError, match="both kept and forgotten"):
        chain_plan(both, {"A": None})


def test_long_chains_and_loops_are_bounded():
    """50,000 points in one chain (or one loop), as hostile manifests could make them: linear
    time, no recursion (50 times the default limit), in a child under 1 GiB of address space."""
    code = """
import sys
from datetime import UTC, datetime, timedelta
from hypersdk.errors import InvalidParameterError
from hypersdk.repository.retention import Point, RetentionPolicy, chain_plan, plan

n = 50_000
base = datetime(2000, 1, 1, tzinfo=UTC)
pts = [Point(f"p{i}", base + timedelta(minutes=i)) for i in range(n)]
parents = {f"p{i}": (None if i == 0 else f"p{i - 1}") for i in range(n)}
result = plan(pts, RetentionPolicy(keep_last=1, keep_daily=3), now=base + timedelta(days=999))
cp = chain_plan(result, parents)
print(len(result.keep), len(cp.rebase), len(cp.steps))
parents["p0"] = f"p{n - 1}"
try:
    chain_plan(result, parents)
except InvalidParameterError as exc:
    print("refused:", exc)
"""
    res = limited.python(code, timeout=120)
    out = limited.succeeded(res)
    lines = out.strip().splitlines()
    kept, rebased, steps = map(int, lines[0].split())
    assert kept == 3 and rebased == 3
    assert steps == 2 * rebased + 2 * (50_000 - kept) + rebased
    assert lines[1].startswith("refused:") and "loop" in lines[1]
