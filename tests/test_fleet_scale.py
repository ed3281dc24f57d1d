"""Issue 16's done-when: PostgreSQL, a Prefect server on it, 3 process workers; a fleet backup
of 24 local VMs with a per-source limit of 4. Every export verifies against its manifest (and
qemu-img compares it with its disk), the limit is never exceeded (the export's source-holding
sections, recorded with HYPERSDK_SLOT_TRACE), and SIGKILL of one worker with its flow-run
processes in the middle loses no VM: the runs it held end Crashed (no heartbeat: the
hypersdk-crashed-runs automation) and the fleet runs them again, then completes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests import qemu
from tests.fixtures.prefect_server import api_post as _post
from tests.fleet_stack import fleet_stack, make_vms, start_fleet

VMS = [f"vm{i:02d}" for i in range(1, 25)]
SOURCE_LIMIT = 4
ZOMBIE_AFTER = 50  # s without a heartbeat (workers send one every 30 s)
BUDGET = 600  # s for the whole test: ~3-4 min on an idle 2-core machine, more when it is busy


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def most_at_once(trace: Path, killed_at: float) -> tuple[int, int]:
    """Most source-holding sections open at once, and how many sections there were (a section
    with no end, its process killed, counts as open until the kill)."""
    open_at: dict[tuple, float] = {}
    spans = []
    for line in trace.read_text().splitlines():
        e = json.loads(line)
        key = (e["pid"], e["vm"])
        if e["event"] == "start":
            open_at[key] = e["t"]
        else:
            spans.append((open_at.pop(key), e["t"]))
    spans += [(t, max(killed_at, t)) for t in open_at.values()]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:  # an end at the same instant as a start sorts first (-1 < 1)
        now += step
        most = max(most, now)
    return most, len(spans)


def test_overlap_counts_killed_sections_until_the_kill(tmp_path):
    trace = tmp_path / "t.jsonl"
    events = [("start", 1, "a", 0.0), ("start", 2, "b", 1.0), ("end", 1, "a", 2.0)]
    events += [("start", 3, "c", 2.0), ("start", 4, "d", 3.0)]  # d's process killed at 5
    events += [("end", 2, "b", 4.0), ("end", 3, "c", 6.0), ("start", 5, "e", 6.0)]
    trace.write_text(
        "".join(json.dumps({"event": e, "pid": p, "vm": v, "t": t}) + "\n" for e, p, v, t in events)
    )
    assert most_at_once(trace, killed_at=5.0) == (3, 5)  # b, c, d at 3.0; e starts as c ends
    assert most_at_once(trace, killed_at=7.0) == (3, 5)


@pytest.mark.slow
def test_fleet_on_postgres_survives_a_killed_worker(postgres_cluster, tmp_path, qemu_img):
    started = time.monotonic()
    trace = tmp_path / "slots.jsonl"
    with fleet_stack(
        postgres_cluster.url,
        tmp_path,
        workers=3,
        source_limit=SOURCE_LIMIT,
        zombie_after=ZOMBIE_AFTER,
        extra_env={"HYPERSDK_SLOT_TRACE": str(trace)},
    ) as stack:
        make_vms(stack.home / "vms", VMS)
        setup_s = time.monotonic() - started
        fleet = start_fleet(
            stack, VMS, tmp_path / "fleet.log", max_parallel=12, pending_timeout=120
        )
        try:
            # kill a worker running flow runs, with them, once a few exports have finished
            victim, killed_at = None, 0.0
            deadline = time.monotonic() + BUDGET
            while victim is None and time.monotonic() < deadline and fleet.poll() is None:
                time.sleep(0.5)
                if not trace.exists() or trace.read_text().count('"end"') < 4:
                    continue
                for w in stack.workers:
                    if kids := descendants(w.pid):
                        victim = w
                        for pid in [w.pid, *kids]:
                            os.kill(pid, signal.SIGKILL)
                        killed_at = time.time()
                        break
            assert victim is not None, "no worker was running a flow run to kill"
            victim.wait(10)
            rc = fleet.wait(timeout=max(30.0, BUDGET - (time.monotonic() - started)))
        finally:
            if fleet.poll() is None:
                os.killpg(fleet.pid, signal.SIGKILL)
        out = (tmp_path / "fleet.log").read_text(errors="replace")
        assert rc == 0, out[-4000:]

        # every VM once in the summary table, Completed; the crashed ones ran again
        api = stack.api
        [fleet_run] = _post(
            api, "/flow_runs/filter", {"flows": {"name": {"any_": ["backup-fleet"]}}}
        )
        by_run = {"artifacts": {"flow_run_id": {"any_": [fleet_run["id"]]}}}
        [table] = [a for a in _post(api, "/artifacts/filter", by_run) if a["type"] == "table"]
        rows = json.loads(table["data"])
        assert sorted(r["vm"] for r in rows) == VMS
        assert {r["state"] for r in rows} == {"Completed"}, rows
        assert all(r["kind"] in ("full", "incremental") and r["bytes"] > 0 for r in rows), rows
        tagged = {"flow_runs": {"tags": {"all_": [f"fleet:{fleet_run['id']}"]}}, "limit": 200}
        children = _post(api, "/flow_runs/filter", tagged)
        crashed = [c for c in children if c["state_type"] == "CRASHED"]
        assert crashed, "the killed worker's runs did not end Crashed"
        rerun = {c["parameters"]["vm"] for c in crashed}
        for vm in rerun:
            assert next(r for r in rows if r["vm"] == vm)["attempts"] >= 2
        completed = {c["parameters"]["vm"] for c in children if c["state_type"] == "COMPLETED"}
        assert completed == set(VMS)

        # the per-source limit held: never more than 4 sections reading the source at once
        most, sections = most_at_once(trace, killed_at)
        assert sections >= len(VMS)
        assert 2 <= most <= SOURCE_LIMIT, most

    # every export correct: its manifest verifies, and it holds the VM's disk
    from hypersdk.repository import manifest_key
    from hypersdk.repository.history import read_history
    from hypersdk.verify import verify_export
    from providers import open_target

    with open_target(stack.target) as t:
        for vm in VMS:
            # one point, or two when a killed run had published its manifest already
            points = read_history(t, vm)
            assert 1 <= len(points) <= 2, (vm, [p.export_id for p in points])
            for point in points:
                verify_export(t, manifest_key(vm, point.export_id))
            full = points[-1]
            assert full.kind == "full"
            obj = stack.home / "exports" / full.disks[0].key
            qemu.compare(stack.home / "vms" / vm / "disk0.img", obj, "raw", "qcow2")
    print(
        f"fleet test: {time.monotonic() - started:.0f} s ({setup_s:.0f} s setup), "
        f"most at once {most}, re-run {sorted(rerun)}"
    )
