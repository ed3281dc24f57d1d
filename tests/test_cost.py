"""The cost engine against hand-computed values: every class of the price book, the issue's
named cases (S3 Standard for a year, Deep Archive deleted early, GCS requests per 10,000, egress
across a tier boundary, a backup policy's retention, a user's price overriding ours) and pricing
files that must be refused with the file and line named. No Prefect here.

Conventions (docs/cost.md): 1 GB = 2**30 bytes, a month is 30 days."""

from __future__ import annotations

import math

import pytest

from hypersdk.cost.model import Batch, GiB, Workload, estimate, typed, upload_requests
from hypersdk.cost.pricing import PriceBook, PricingError

KiB = 1024


@pytest.fixture(scope="module")
def book():
    return PriceBook.load()


def test_s3_standard_500_gb_for_a_year(book):
    e = estimate(book.prices("aws", "us-east-1", "STANDARD"), typed(500, 365))
    # 12 whole months and 5 days: 500 GB x 0.023 USD/GB-month x 365/30 months
    storage = 500 * 0.023 * 12 + 500 * 0.023 * 5 / 30
    assert e.breakdown["storage"] == pytest.approx(storage)
    assert storage == pytest.approx(139.916667, abs=1e-6)
    # one 500 GiB object: parts of ceil(500 GiB / 10,000) rounded up to a MiB = 52 MiB,
    # ceil(512000 MiB / 52 MiB) = 9847 parts, + create + complete = 9849 PUTs at 0.005/1,000
    assert upload_requests(500 * GiB) == 9849
    assert e.breakdown["requests"] == pytest.approx(9849 * 0.005 / 1000)
    assert e.total == pytest.approx(storage + 9849 * 0.005 / 1000)
    assert e.breakdown["early_deletion"] == e.breakdown["transfer"] == 0
    # month by month: the upload once, in month 1; storage every month; 13 rows
    m = e.monthly
    assert len(m) == 13 and list(m["days"]) == [30] * 12 + [5]
    assert m["requests"].iloc[0] > 0 and (m["requests"].iloc[1:] == 0).all()
    assert m["storage"].iloc[1] == pytest.approx(500 * 0.023)
    assert m["cumulative"].iloc[-1] == pytest.approx(e.total)


# (provider, region, class, redundancy): storage USD/GB-month, PUT price, its published unit,
# minimum days, KB billed at the class per object, KB billed at STANDARD (0.023) per object,
# monitoring USD per 1,000 objects-month, geo-replication USD/GB written -- the rows' numbers
CLASSES = [
    ("aws", "us-east-1", "STANDARD", "-", 0.023, 0.005, 1000, 0, 0, 0, 0, 0),
    ("aws", "us-east-1", "INTELLIGENT_TIERING", "-", 0.023, 0.005, 1000, 0, 0, 0, 0.0025, 0),
    ("aws", "us-east-1", "STANDARD_IA", "-", 0.0125, 0.01, 1000, 30, 0, 0, 0, 0),
    ("aws", "us-east-1", "ONEZONE_IA", "-", 0.01, 0.01, 1000, 30, 0, 0, 0, 0),
    ("aws", "us-east-1", "GLACIER_IR", "-", 0.004, 0.02, 1000, 90, 0, 0, 0, 0),
    ("aws", "us-east-1", "GLACIER", "-", 0.0036, 0.03, 1000, 90, 32, 8, 0, 0),
    ("aws", "us-east-1", "DEEP_ARCHIVE", "-", 0.00099, 0.05, 1000, 180, 32, 8, 0, 0),
    ("azure", "eastus", "HOT", "LRS", 0.018, 0.05, 10000, 0, 0, 0, 0, 0),
    ("azure", "eastus", "COOL", "LRS", 0.01, 0.10, 10000, 30, 0, 0, 0, 0),
    ("azure", "eastus", "COLD", "LRS", 0.0036, 0.18, 10000, 90, 0, 0, 0, 0),
    ("azure", "eastus", "ARCHIVE", "LRS", 0.00099, 0.10, 10000, 180, 0, 0, 0, 0),
    ("azure", "eastus", "HOT", "GRS", 0.036, 0.10, 10000, 0, 0, 0, 0, 0.02),
    ("azure", "eastus", "COOL", "GRS", 0.02, 0.20, 10000, 30, 0, 0, 0, 0.02),
    ("azure", "eastus", "COLD", "GRS", 0.0072, 0.36, 10000, 90, 0, 0, 0, 0.02),
    ("azure", "eastus", "ARCHIVE", "GRS", 0.00198, 0.20, 10000, 180, 0, 0, 0, 0.02),
    ("gcp", "us-east1", "STANDARD", "-", 0.02, 0.05, 10000, 0, 0, 0, 0, 0),
    ("gcp", "us-east1", "NEARLINE", "-", 0.01, 0.10, 10000, 30, 0, 0, 0, 0),
    ("gcp", "us-east1", "COLDLINE", "-", 0.004, 0.20, 10000, 90, 0, 0, 0, 0),
    ("gcp", "us-east1", "ARCHIVE", "-", 0.0012, 0.50, 10000, 365, 0, 0, 0, 0),
]


@pytest.mark.parametrize("row", CLASSES, ids=lambda r: "-".join(r[:4]))
def test_every_class_100_gb_deleted_after_60_days(book, row):
    provider, region, cls, red, price, put, unit, min_days, kb, std_kb, monitor, repl = row
    e = estimate(book.prices(provider, region, cls, red), typed(100, 60, delete_after_days=60))
    gb = 100 + kb / (1024 * 1024)  # the object plus what the class bills per object
    std_gb = std_kb / (1024 * 1024)
    # two months of storage, the overheads too, and monitoring of one object for two months
    storage = gb * price * 2 + std_gb * 0.023 * 2 + 1 * 2 * monitor / 1000
    assert e.breakdown["storage"] == pytest.approx(storage, rel=1e-12)
    # 100 GiB in parts of ceil(100 GiB / 10,000) -> 11 MiB: ceil(102400 / 11) = 9310 parts + 2
    assert e.breakdown["requests"] == pytest.approx(9312 * put / unit, rel=1e-12)
    # deleted at day 60: the days left of the minimum, at the class's storage rate
    early = gb * price * max(0, min_days - 60) / 30
    assert e.breakdown["early_deletion"] == pytest.approx(early, rel=1e-12)
    assert e.breakdown["transfer"] == pytest.approx(100 * repl)
    assert e.total == pytest.approx(storage + 9312 * put / unit + early + 100 * repl)


def test_deep_archive_deleted_after_90_days_pays_its_180(book):
    p = book.prices("aws", "us-east-1", "DEEP_ARCHIVE")
    e = estimate(p, typed(500, 90, delete_after_days=90))
    gb = 500 + 32 / 1024**2  # + 32 KB at Deep Archive for the one object
    assert e.breakdown["storage"] == pytest.approx(gb * 0.00099 * 3 + 8 / 1024**2 * 0.023 * 3)
    # deleted after 90 of its 180 days: the other 90 days (3 months) charged, once
    assert e.breakdown["early_deletion"] == pytest.approx(gb * 0.00099 * 90 / 30)
    assert e.monthly["early_deletion"].iloc[-1] == e.breakdown["early_deletion"]
    assert (e.monthly["early_deletion"].iloc[:-1] == 0).all()
    # so the whole is what 180 days would have cost in storage (the 8 KB at Standard aside)
    assert e.breakdown["storage"] + e.breakdown["early_deletion"] == pytest.approx(
        gb * 0.00099 * 6 + 8 / 1024**2 * 0.023 * 3
    )
    # held 365 days instead: no early deletion at all
    assert estimate(p, typed(500, 365)).breakdown["early_deletion"] == 0


def test_gcs_requests_are_priced_per_10000(book, tmp_path):
    # 100,000 objects of 10 GB / 100,000 (about 105 KB: one PUT each) into GCS Standard:
    # 100,000 Class A operations at 0.05 USD per 10,000 = 0.50 USD (not 5.00: the seed's bug)
    w = typed(10, 30, objects=100_000)
    e = estimate(book.prices("gcp", "us-east1", "STANDARD"), w)
    assert e.breakdown["requests"] == pytest.approx(100_000 / 10_000 * 0.05)
    assert e.breakdown["requests"] == pytest.approx(0.50)
    # the same price written per 1,000 (as the page also shows it) gives the same answer
    mine = tmp_path / "per-1000.csv"
    mine.write_text(
        "provider,region,class,redundancy,item,unit,price,tier_from_gb,tier_to_gb,source,as_of\n"
        "gcp,us-east1,STANDARD,-,put,1000 requests,0.005,,,"
        "https://cloud.google.com/storage/pricing-examples,2026-12-01\n"
    )
    e2 = estimate(PriceBook.load(mine).prices("gcp", "us-east1", "STANDARD"), w)
    assert e2.breakdown["requests"] == pytest.approx(0.50)


def test_egress_crosses_a_tier_boundary(book):
    # 12,000 GB out of S3 in one month: 10,240 GB at 0.09, the next 1,760 GB at 0.085
    w = typed(12_000, 30, objects=12_000, restore_gb=12_000)
    e = estimate(book.prices("aws", "us-east-1", "STANDARD"), w)
    assert e.breakdown["transfer"] == pytest.approx(10_240 * 0.09 + 1_760 * 0.085)
    assert e.breakdown["transfer"] == pytest.approx(1071.2)
    # 2,000 GB out of GCS: the first 1,024 GB at 0.12, the next 976 GB at 0.11
    w = typed(2_000, 30, restore_gb=2_000)
    e = estimate(book.prices("gcp", "us-east1", "NEARLINE"), w)
    assert e.breakdown["transfer"] == pytest.approx(1_024 * 0.12 + 976 * 0.11)
    assert e.breakdown["retrieval"] == pytest.approx(2_000 * 0.01)
    # the restore is charged once, in its own month (the last day, month 1 here)
    assert e.monthly["transfer"].iloc[0] == e.breakdown["transfer"]


def test_restore_from_glacier_charges_retrieval_requests_and_egress_once(book):
    # 1,000 GB in 1,000 objects, held 120 days, read back on day 45 (month 2)
    w = typed(1_000, 120, objects=1_000, restore_gb=1_000, restore_day=45)
    e = estimate(book.prices("aws", "us-east-1", "GLACIER"), w)
    m = e.monthly
    assert m["retrieval"].iloc[1] == pytest.approx(1_000 * 0.01)  # standard retrieval per GB
    assert m["transfer"].iloc[1] == pytest.approx(1_000 * 0.09)
    # 1,024 MiB per object: 128 parts of 8 MiB -> 128 GETs each; one restore request each
    gets, restores = 1_000 * 128, 1_000
    puts = 1_000 * (128 + 2)
    assert e.breakdown["requests"] == pytest.approx(
        puts * 0.03 / 1000 + gets * 0.0004 / 1000 + restores * 0.05 / 1000
    )
    for col in ("retrieval", "transfer"):
        assert m[col].drop(index=1).eq(0).all()


def test_ia_minimum_object_size_and_intelligent_tiering_small_objects(book):
    # 1,000 objects of 16 KiB for 30 days: Standard-IA bills each as 128 KiB
    w = Workload([Batch(0, 1_000, 16 * KiB)], 30)
    ia = estimate(book.prices("aws", "us-east-1", "STANDARD_IA"), w)
    assert ia.breakdown["storage"] == pytest.approx(1_000 * 128 * KiB / GiB * 0.0125)
    # Intelligent-Tiering: objects under 128 KB are not monitored (no monitoring charge)
    it = estimate(book.prices("aws", "us-east-1", "INTELLIGENT_TIERING"), w)
    assert it.breakdown["storage"] == pytest.approx(1_000 * 16 * KiB / GiB * 0.023)


def test_storage_volume_tiers(book):
    # 60 TB in S3 Standard for one month: 51,200 GB at 0.023, 10,240 GB at 0.022
    e = estimate(book.prices("aws", "us-east-1", "STANDARD"), typed(61_440, 30, objects=61_440))
    assert e.breakdown["storage"] == pytest.approx(51_200 * 0.023 + 10_240 * 0.022)


def test_policy_30_days_3_percent_keep_daily_7_weekly_4(book):
    """Daily backups from Monday 2026-01-05: a 100 GB full, 3 GB deltas (3% a day), a full
    after 7 deltas, forget after each backup keeping 7 daily and 4 weekly points."""
    from hypersdk.cost.policy import MANIFEST_BYTES, simulate
    from hypersdk.repository.retention import RetentionPolicy

    policy = RetentionPolicy(keep_daily=7, keep_weekly=4)
    w = simulate(100 * GiB, 0.03 * 100 * GiB, 30, policy, full_every=7)
    manifests = lambda n: n * MANIFEST_BYTES / GiB  # noqa: E731
    gb = lambda day: w.stored_bytes(day) / GiB  # noqa: E731
    # day 7 (p7, Monday of week 2): nothing forgotten yet; full p0 + 7 deltas
    assert gb(7) == pytest.approx(100 + 7 * 3 + manifests(8))
    # day 8: 7 deltas since the full, so p8 is a full; p1 is no longer a daily point and not
    # the newest of its week (p6 is): forgotten. p0 stays (the weekly rule still has counts
    # left at the oldest point); p2, whose parent p1 goes, is rebased on a synthetic full.
    # Held: p0 100 + p2 100 + p3..p7 5 x 3 + p8 100
    assert gb(8) == pytest.approx(315 + manifests(8))
    # day 29 (Tuesday of week 5): 7 daily (p23..p29) and the newest of weeks 5, 4, 3, 2
    # (p29, p27, p20, p13); p0 went on day 28 when the fifth week used up the weekly count
    assert w.measured["points_kept"] == ["p000" + f"{n:02d}" for n in (13, 20, *range(23, 30))]
    # p13, p20 and p23 are (synthetic) fulls, p24..p29 deltas: 3 x 100 + 6 x 3
    assert gb(29) == pytest.approx(318 + manifests(9))
    e = estimate(book.prices("aws", "us-east-1", "STANDARD"), w)
    # storage: each day's bytes for 1/30 of a month at 0.023 (one month, first tier)
    daily = sum(w.stored_bytes(d) for d in range(30)) / GiB
    assert e.breakdown["storage"] == pytest.approx(daily / 30 * 0.023)
    # a month of Standard-IA: every forgotten or replaced object paid its 30 days
    ia = estimate(book.prices("aws", "us-east-1", "STANDARD_IA"), w)
    gone = [b for b in w.batches if b.delete_day is not None]
    early = sum(
        max(b.object_bytes, 128 * KiB) * b.count * (30 - (b.delete_day - b.day)) for b in gone
    )
    assert ia.breakdown["early_deletion"] == pytest.approx(early / GiB / 30 * 0.0125)
    assert ia.breakdown["early_deletion"] > 0


def test_custom_pricing_file_overrides_one_price(tmp_path):
    mine = tmp_path / "negotiated.csv"
    mine.write_text(
        "provider,region,class,redundancy,item,unit,price,tier_from_gb,tier_to_gb,source,as_of,note\n"
        "aws,us-east-1,STANDARD,-,storage,GB-month,0.01,0,,https://example.com/contract,2026-11-01,"
        "negotiated\n"
    )
    book = PriceBook.load(mine)
    e = estimate(book.prices("aws", "us-east-1", "STANDARD"), typed(500, 365))
    assert e.breakdown["storage"] == pytest.approx(500 * 0.01 * 365 / 30)
    assert e.breakdown["requests"] == pytest.approx(9849 * 0.005 / 1000)  # not overridden
    assert "https://example.com/contract" in e.prices.sources
    # the other classes keep the built-in prices
    ia = estimate(book.prices("aws", "us-east-1", "STANDARD_IA"), typed(500, 30))
    assert ia.breakdown["storage"] == pytest.approx(500 * 0.0125)


HEADER = "provider,region,class,redundancy,item,unit,price,tier_from_gb,tier_to_gb,source,as_of\n"
GOOD = "aws,us-east-1,STANDARD,-,storage,GB-month,0.01,0,,https://example.com/p,2026-11-01\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        (HEADER + GOOD + GOOD.replace("GB-month", "TB-month"), "line 3: item storage needs"),
        (HEADER + GOOD.replace("storage,GB-month", "put,request"), "line 2: item put needs"),
        (HEADER + GOOD.replace("https://example.com/p", "nowhere"), "line 2: source must be"),
        (HEADER + GOOD.replace("0.01,0", "-1,0"), "line 2: price '-1' is not a finite"),
        (HEADER + GOOD.replace("0.01,0", "abc,0"), "line 2: price 'abc' is not a number"),
        (HEADER + GOOD.replace("2026-11-01", "yesterday"), "line 2: as_of 'yesterday'"),
        (HEADER + GOOD.replace("0,,", "5,,"), "tier starts at 5 GB, expected 0 GB"),
        (HEADER + GOOD.replace(",0,,", ",0,100,"), "the last storage tier must have no"),
        (HEADER.replace(",as_of", ""), "missing column(s) as_of"),
        (HEADER + GOOD.replace("storage", "storidge"), "line 2: unknown item 'storidge'"),
        (HEADER, "no price rows"),
        (HEADER + GOOD.replace("GB-month", "GB\x00month"), "line 2: item storage needs"),
        (HEADER + GOOD + "x" * 200_000 + "\n", "line 3: not CSV"),
        (HEADER + GOOD + '"unclosed,' + "\n", "line 3: "),
        (HEADER + GOOD.rstrip() + ",extra\n", "line 2: more fields than the header"),
    ],
)
def test_malformed_pricing_files_name_the_file_and_line(tmp_path, text, needle):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(PricingError) as info:
        PriceBook.load(bad)
    message = str(info.value)
    assert message.startswith(f"pricing file {bad}") and needle in message, message
    assert "\n" not in message


def test_unknown_provider_region_class_and_bad_sizes(book):
    from hypersdk.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="unknown region 'mars-1'.*us-east-1"):
        book.prices("aws", "mars-1", "STANDARD")
    with pytest.raises(InvalidParameterError, match="unknown class 'FROZEN'.*DEEP_ARCHIVE"):
        book.prices("aws", "us-east-1", "FROZEN")
    with pytest.raises(InvalidParameterError, match="unknown provider 'ibm'"):
        book.prices("ibm", "us-south", "STANDARD")
    with pytest.raises(InvalidParameterError, match="size must be"):
        typed(-1, 30)
    with pytest.raises(InvalidParameterError, match="size must be"):
        typed(math.nan, 30)
    with pytest.raises(InvalidParameterError, match="days must be"):
        typed(1, 0)


def test_every_row_has_a_source_and_date_and_requests_a_published_unit(book):
    f = book.frame
    assert f["source"].str.startswith("https://").all()
    assert f["as_of"].str.match(r"^\d{4}-\d{2}-\d{2}$").all()
    requests = f[f["item"].isin(["put", "get", "restore"])]
    assert set(requests["unit"]) == {"1000 requests", "10000 requests"}
    assert (requests[requests["provider"] == "gcp"]["unit"] == "10000 requests").all()
    # at least one US and one EU region per provider
    for provider, us, eu in (
        ("aws", "us-east-1", "eu-west-1"),
        ("azure", "eastus", "westeurope"),
        ("gcp", "us-east1", "europe-west1"),
    ):
        regions = set(f[f["provider"] == provider]["region"])
        assert {us, eu} <= regions


def test_engine_imports_and_prices_without_prefect():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hypersdk.cost import compare, measure, model, policy, pricing\n"
        "e = model.estimate(pricing.PriceBook.load().prices('gcp', 'us-east1', 'ARCHIVE'),"
        " model.typed(10, 400))\n"
        "assert 'prefect' not in sys.modules, 'prefect imported'\n"
        "print(round(e.total, 6))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # 10 GB x 0.0012 x 400/30 months + 10240/8 = 1280 parts of 8 MiB + 2, at 0.50 per 10,000
    assert float(out.stdout) == pytest.approx(
        round(10 * 0.0012 * 400 / 30 + 1282 * 0.50 / 10_000, 6)
    )
