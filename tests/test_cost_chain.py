"""Estimates fed by reality: a real backup chain (a full and deltas written by the backup flow)
priced from its stored objects, its change rate measured from its points; a VM's stored size
sampled in the chosen format against the size of a real export; the estimate_cost flow and its
table, markdown and chart artifacts."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from hypersdk.cost.model import GiB, estimate
from hypersdk.cost.pricing import PriceBook
from tests.points import make_vm, run_chain


@pytest.fixture(scope="module")
def chain(prefect_api, tmp_path_factory):
    """Two points of db01 (a full and a delta) in a local repository."""
    base = tmp_path_factory.mktemp("costchain")
    root, disk = make_vm(base)
    copies = base / "copies"
    copies.mkdir()
    repo = base / "repo"
    results = run_chain(str(root), f"file://{repo}", disk, copies, points=2)
    return root, repo, results


def _files(repo: Path) -> list[Path]:
    return [p for p in (repo / "db01").rglob("*") if p.is_file()]


def test_estimate_from_a_chain_matches_its_stored_bytes(chain):
    from hypersdk.cost.measure import chain_workload
    from providers import open_target

    _, repo, results = chain
    files = _files(repo)
    actual = sum(p.stat().st_size for p in files)
    with open_target(f"file://{repo}") as target:
        workload, facts = chain_workload(target, "db01", 30)
    assert facts.stored_bytes == actual and workload.stored_bytes(0) == actual
    assert facts.objects == len(files) == workload.stored_objects(0)
    assert facts.points == 2
    # the change rate: the deltas' mean stored size over the full's (points within one day:
    # one point a day assumed)
    sizes = {r.export_id: _object_size(repo, r.export_id) for r in results}
    full, delta = (sizes[r.export_id] for r in results)
    assert 0 < delta < full
    assert facts.change_rate == pytest.approx(delta / full)
    # priced in S3 Standard for a month: every stored byte at 0.023/GB-month, a PUT per object
    # (all of them small enough for one)
    e = estimate(PriceBook.load().prices("aws", "us-east-1", "STANDARD"), workload)
    assert e.breakdown["storage"] == pytest.approx(actual / GiB * 0.023)
    assert e.breakdown["requests"] == pytest.approx(len(files) * 0.005 / 1000)
    assert e.to_dict()["stored_bytes"] == actual


def _object_size(repo: Path, export_id: str) -> int:
    """The stored disk image of a point (everything of the point but its manifest)."""
    point = repo / "db01" / export_id
    return sum(p.stat().st_size for p in point.iterdir() if p.name != "manifest.json")


def test_project_from_a_chain_uses_its_measured_sizes(chain):
    from hypersdk.cost.measure import chain_facts
    from hypersdk.cost.policy import MANIFEST_BYTES, simulate
    from providers import open_target

    _, repo, results = chain
    with open_target(f"file://{repo}") as target:
        facts = chain_facts(target, "db01")
    full = _object_size(repo, results[0].export_id)
    assert facts.full_stored_bytes == full
    delta = _object_size(repo, results[1].export_id)
    assert facts.delta_stored_bytes == delta
    w = simulate(facts.full_stored_bytes, facts.full_stored_bytes * facts.change_rate, 3)
    # three simulated days without retention: a full and two deltas of the measured size
    # (and three manifests of the simulation's assumed size)
    assert w.stored_bytes(2) - 3 * MANIFEST_BYTES == pytest.approx(full + 2 * delta)


def test_vm_sampled_in_its_format_against_a_real_export(chain, tmp_path):
    from hypersdk.cost.measure import vm_facts
    from providers import open_source

    root, repo, results = chain
    fresh_root, _ = make_vm(tmp_path)  # the VM as the full was taken
    with open_source(f"local://{fresh_root}") as src:
        facts = vm_facts(src, "db01", "qcow2", max_extents=4, piece_bytes=1 << 20)
    assert facts.sampled_bytes <= 4 * (1 << 20)  # bounded sampling, never the whole disk
    assert 0 < facts.sampled_bytes < facts.allocated_bytes
    real = _object_size(repo, results[0].export_id)  # the full qcow2 export of the same disk
    assert facts.estimated_stored_bytes == pytest.approx(real, rel=0.15)


def test_estimate_cost_flow_publishes_table_markdown_and_chart(prefect_api, hs_home):
    from flows.cost import estimate_cost
    from tests.test_flow_backups import _artifacts

    state = estimate_cost(
        size_gb=500, days=365, regions=["us-east-1", "eastus", "us-east1"], return_state=True
    )
    rows = state.result()
    totals = [r["total"] for r in rows]
    assert totals == sorted(totals) and rows[0]["cheapest"] and not rows[1]["cheapest"]
    s3 = next(r for r in rows if r["provider"] == "aws" and r["class"] == "STANDARD")
    assert s3["total"] == pytest.approx(500 * 0.023 * 365 / 30 + 9849 * 0.005 / 1000, abs=1e-4)
    arts = _artifacts(str(state.state_details.flow_run_id))
    assert len(arts["table"]) == 1 and len(arts["markdown"]) == 1
    md = arts["markdown"][0].data
    pngs = list((hs_home / "cost").glob("cost-*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(pngs[0]) in md and "(cheapest)" in md
    # the chart itself is in the artifact (the UI draws it), byte for byte
    inline = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(inline) == pngs[0].read_bytes()
