"""``hyperctl cost`` as a user runs it: real subprocesses, JSON and CSV on stdout, and bad input
(negative size, unknown class or region, a malformed pricing file) as one line and a non-zero
exit. ``hyperctl migrate --estimate`` prints the estimate and stops at a "no"."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from tests.cli_run import hyperctl, one_line_error

S3 = ["--provider", "aws", "--class", "STANDARD", "--region", "us-east-1"]


def test_estimate_json_has_breakdown_and_total():
    res = hyperctl("cost", "estimate", *S3, "--size-gb", 500, "--days", 365, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["currency"] == "USD"
    # 500 GB x 0.023 x 365/30 months + 9849 PUTs (one 500 GiB multipart upload) at 0.005/1,000
    assert data["breakdown"]["storage"] == pytest.approx(500 * 0.023 * 365 / 30, abs=1e-6)
    assert data["breakdown"]["requests"] == pytest.approx(9849 * 0.005 / 1000, abs=1e-6)
    assert data["total"] == pytest.approx(139.916667 + 0.049245, abs=1e-5)
    assert set(data["breakdown"]) == {
        "storage",
        "requests",
        "transfer",
        "retrieval",
        "early_deletion",
    }
    assert len(data["monthly"]) == 13 and data["sources"]


def test_estimate_csv_is_the_month_by_month_series():
    res = hyperctl(
        "cost", "estimate", "--provider", "aws", "--class", "DEEP_ARCHIVE", "--region",
        "us-east-1", "--size-gb", 500, "--days", 90, "--delete-after-days", 90, "--csv",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["month"] for r in rows] == ["1", "2", "3"]
    early = [float(r["early_deletion"]) for r in rows]
    # the 90 days left of Deep Archive's 180, at deletion only
    assert early[:2] == [0, 0] and early[2] == pytest.approx(
        (500 + 32 / 1024**2) * 0.00099 * 3, rel=1e-9
    )


def test_compare_csv_sorted_with_the_cheapest_marked(tmp_path):
    png = tmp_path / "chart.png"
    res = hyperctl(
        "cost", "compare", "--size-gb", 100, "--days", 60, "--delete-after-days", 60,
        "--region", "us-east-1", "--csv", "--chart", png,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 7  # the seven S3 classes of us-east-1
    totals = [float(r["total"]) for r in rows]
    assert totals == sorted(totals)
    assert [r["cheapest"] for r in rows] == ["True"] + ["False"] * 6
    # 100 GB deleted after 60 days: Deep Archive pays storage and its minimum, 180 days in all:
    # 100 GB x 0.00099 x 6 months (+ its per-object 40 KB, under a cent) + 9312 PUTs at 0.05/1,000
    # = 0.594 + 0.4656; Glacier Flexible: 100 x 0.0036 x 3 + 9312 x 0.03 / 1,000 = 1.3594
    assert rows[0]["class"] == "DEEP_ARCHIVE"
    assert totals[0] == pytest.approx(0.594 + 0.4656, abs=1e-4)
    assert rows[1]["class"] == "GLACIER" and totals[1] == pytest.approx(1.3594, abs=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_project_json_simulates_the_policy():
    res = hyperctl(
        "cost", "project", *S3, "--full-gb", 100, "--change-rate", "3%", "--full-every", 7,
        "--keep-daily", 7, "--keep-weekly", 4, "--days", 30, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    # test_cost.py derives the kept points by hand: p13, p20, p23..p29 on the last day
    assert data["measured"]["points_kept"][:3] == ["p00013", "p00020", "p00023"]
    # on the last day: 3 fulls and 6 deltas of 3 GB (manifests aside)
    assert data["monthly"][0]["stored_gb"] == pytest.approx(318, abs=0.01)


@pytest.mark.parametrize(
    "args, needles",
    [
        ([*S3, "--size-gb", -5, "--days", 30], ["size must be", "-5"]),
        ([*S3, "--size-gb", 5, "--days", 0], ["--days must be >= 1"]),
        (
            ["--provider", "aws", "--class", "FROZEN", "--region", "us-east-1", "--size-gb", 5],
            ["unknown class 'FROZEN'", "STANDARD_IA"],
        ),
        (
            ["--provider", "aws", "--class", "STANDARD", "--region", "mars-1", "--size-gb", 5],
            ["unknown region 'mars-1'", "us-east-1"],
        ),
        (
            ["--provider", "ibm", "--class", "STANDARD", "--region", "x", "--size-gb", 5],
            ["unknown provider 'ibm'"],
        ),
        ([*S3, "--days", 30], ["give one of --size-gb"]),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, needles):
    one_line_error(hyperctl("cost", "estimate", *args), *needles)


def test_malformed_pricing_file_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "rates.csv"
    bad.write_text(
        "provider,region,class,redundancy,item,unit,price,tier_from_gb,tier_to_gb,source,as_of\n"
        "gcp,us-east1,STANDARD,-,put,1000 requests,0.005,,,https://example.com/a,2026-11-01\n"
        "gcp,us-east1,STANDARD,-,get,requests,0.0004,,,https://example.com/a,2026-11-01\n"
    )
    res = hyperctl("cost", "estimate", *S3, "--size-gb", 5, "--pricing", bad)
    one_line_error(res, f"pricing file {bad}, line 3", "item get needs its published unit")
    assert res.returncode == 2
    missing = hyperctl("cost", "compare", "--size-gb", 5, "--pricing", tmp_path / "nope.csv")
    one_line_error(missing, "nope.csv")


def test_migrate_estimate_asks_before_spending(tmp_path):
    """A VM to an S3 target: the estimate is printed and a "no" ends the command before any
    export (nothing is written, no flow runs); a local target needs no question."""
    from tests.points import make_vm

    root, _ = make_vm(tmp_path)
    env = {**os.environ, "HYPERSDK_HOME": str(tmp_path / "home")}
    target = "s3://bucket/backups?region=us-east-1&storage_class=STANDARD_IA"
    res = hyperctl(
        "migrate", "db01", "--source", f"local://{root}", "--target", target, "--estimate",
        stdin="n\n", env=env,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "estimate: db01 in qcow2" in res.stderr
    assert "aws us-east-1 STANDARD_IA, first 30 days:" in res.stderr
    assert "Go ahead and export?" in res.stderr
    assert "aborted" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.qcow2"))


def test_migrate_estimate_yes_goes_ahead(tmp_path, moto_s3, prefect_server):
    """``--estimate --yes``: the estimate is printed, no question asked, and the export runs
    to the S3 target (its manifest is there)."""
    from tests.fixtures.moto_server import ACCESS_KEY, SECRET_KEY
    from tests.points import make_vm

    api, server_env = prefect_server
    root, _ = make_vm(tmp_path)
    bucket = moto_s3.new_bucket()
    opts = f"endpoint_url={moto_s3.endpoint_url}&addressing_style=path&region=us-east-1"
    target = f"s3://{bucket}/backups?{opts}"
    env = {
        **server_env,
        "HYPERSDK_HOME": str(tmp_path / "home"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    res = hyperctl(
        "migrate", "db01", "--source", f"local://{root}", "--target", target,
        "--estimate", "--yes", "--json", env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "aws us-east-1 STANDARD, first 30 days:" in res.stderr
    assert "Go ahead" not in res.stderr
    done = json.loads(res.stdout)
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"backups/{done['manifest_key']}" in keys
