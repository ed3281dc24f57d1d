"""The fleet on a real Prefect server with a real process worker, beyond backups in groups
(tests/test_fleet_flow.py): ``migrate_fleet`` end to end (each VM migrated by its own child run
on the work queue of the fleet's ``priority``, with its ``window``, the outputs checked with
qemu-img, one summary table), and cancelling a fleet run cancelling its children (running and
waiting) and starting no further VM."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments import workers as fleet_workers
from deployments.limits import setup as setup_limits
from flows.fleet import CANCELLED_BY_FLEET
from hypersdk.fleet.limits import source_limit_name
from tests import qemu
from tests.fixtures.prefect_server import api_post as _post
from tests.fixtures.prefect_server import api_request, stop
from tests.fleet_stack import make_vms

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
WAIT = 300  # generous: child runs take 30-60 s each on a loaded 2-core machine


def _children(api: str, run_id: str) -> dict[str, dict]:
    tagged = {"flow_runs": {"tags": {"all_": [f"fleet:{run_id}"]}}}
    return {c["parameters"]["vm"]: c for c in _post(api, "/flow_runs/filter", tagged)}


def _rows(api: str, run_id: str) -> dict[str, dict]:
    by_run = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    [table] = [a for a in _post(api, "/artifacts/filter", by_run) if a["type"] == "table"]
    return {r["vm"]: r for r in json.loads(table["data"])}


def _start_fleet(env: dict, log: Path, flow: str, **params) -> subprocess.Popen:
    """A fleet flow as a client process (as `hyperctl` or a script starts it)."""
    code = (
        f"import json, sys; from flows.fleet import {flow}; "
        f"s = {flow}(**json.loads(sys.argv[1]), return_state=True); "
        "print('FLEET', s.state_details.flow_run_id, s.type.value, s.message)"
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(params)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path) -> tuple[str, str]:
    """(final state type, fleet run id) of a fleet client process."""
    try:
        proc.wait(timeout=WAIT)
    finally:
        stop(proc)
    out = log.read_text(errors="replace")
    line = next((x for x in out.splitlines() if x.startswith("FLEET ")), None)
    assert line, out[-4000:]
    return line.split()[2], line.split()[1]


@pytest.fixture(scope="module")
def fleet_pool(prefect_server, tmp_path_factory):
    """The work pool, prefect.yaml's per-VM deployments (fleet-member, on-demand) and the
    backup fleet's, and one process worker taking 2 runs at once; yields (api, env, home)."""
    api, env = prefect_server
    home = tmp_path_factory.mktemp("fleet-more")
    env = fleet_workers.worker_env(api, {**env, "HYPERSDK_HOME": str(home)})
    deploy = [PREFECT, "--no-prompt", "deploy", "--prefect-file", "prefect.yaml"]
    for cmd in (
        [PREFECT, "work-pool", "create", "hypersdk-local", "--type", "process", "--overwrite"],
        deploy + ["--name", "fleet-member", "--name", "on-demand", "--name", "fleet"],
    ):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    worker = fleet_workers.start_worker("fleet-more", env, home / "worker.log", home, limit=2)
    try:
        yield api, env, home
    finally:
        stop(worker)


@pytest.mark.slow
def test_migrate_fleet_end_to_end(fleet_pool, qemu_img):
    api, env, home = fleet_pool
    names = ["mig01", "mig02"]
    make_vms(home / "vms-m", names)
    source, target = f"local://{home / 'vms-m'}", f"file://{home / 'out-m'}"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        setup_limits({source: 2}, {target: 2}, zombie_after=0)
    log = home / "migrate-fleet.log"
    proc = _start_fleet(
        env,
        log,
        "migrate_fleet",
        vms=names,
        source=source,
        target=target,
        format="qcow2",
        priority="urgent",
        window="00:00-24:00",  # always open (docs/scheduling.md)
        max_parallel=2,
    )
    state, fleet_id = _finish(proc, log)
    assert state == "COMPLETED", log.read_text()[-4000:]

    children = _children(api, fleet_id)
    assert sorted(children) == names
    for vm, child in children.items():
        assert child["state_type"] == "COMPLETED", (vm, child["state"])
        assert child["work_queue_name"] == "urgent", child  # the fleet's priority
        assert child["parameters"]["format"] == "qcow2"
        assert child["parameters"]["window"] == "00:00-24:00"  # the fleet's, passed on
    [dep] = _post(api, "/deployments/filter", {"deployments": {"name": {"any_": ["on-demand"]}}})
    assert {c["deployment_id"] for c in children.values()} == {dep["id"]}

    rows = _rows(api, fleet_id)  # one summary table
    assert sorted(rows) == names
    for vm in names:
        assert rows[vm]["state"] == "Completed" and rows[vm]["kind"] == "full", rows[vm]
        assert rows[vm]["flow_run"] == children[vm]["id"]
        [disk] = (home / "out-m" / vm).glob("*/disk0.qcow2")
        assert rows[vm]["bytes"] == disk.stat().st_size
        qemu.check(disk, "qcow2")
        qemu.compare(home / "vms-m" / vm / "disk0.img", disk, "raw", "qcow2")


def _wait_for(what: str, probe, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _fleet_run(api: str, source: str) -> dict | None:
    runs = _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["backup-fleet"]}}})
    mine = [r for r in runs if r["parameters"].get("source") == source]
    return mine[0] if mine else None


def _cancel(env: dict, run_id: str) -> None:
    """What the UI's Cancel does: the run goes to Cancelling."""
    done = subprocess.run(
        [PREFECT, "flow-run", "cancel", run_id],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@contextlib.contextmanager
def _busy_source(api: str, home: Path, vms_dir: str, names: list[str]):
    """Local VMs whose source limit (1) the test holds: their children run and wait for it;
    yields (source, target)."""
    make_vms(home / vms_dir, names)
    source, target = f"local://{home / vms_dir}", f"file://{home / vms_dir}-out"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        setup_limits({source: 1}, {target: 4}, zombie_after=0)
    slot = {"names": [source_limit_name(source)], "slots": 1, "mode": "concurrency"}
    _post(api, "/v2/concurrency_limits/increment", slot)
    try:
        yield source, target
    finally:
        _post(api, "/v2/concurrency_limits/decrement", slot)


def _cancelled_by_fleet(api: str, run_id: str) -> bool:
    """Whether the fleet (its watch or its hook) cancelled the run, not Prefect's own cleanup
    (which says "The parent flow run was cancelled.")."""
    res = api_request("GET", f"{api}/flow_run_states/", params={"flow_run_id": run_id})
    return any(st["message"] == CANCELLED_BY_FLEET for st in res.json())


def _children_by_state(api: str, fid: str, total: int, running: int):
    def probe():
        kids = _children(api, fid)
        up = [k for k in kids.values() if k["state_type"] == "RUNNING"]
        return kids if len(kids) == total and len(up) == running else None

    return probe


@pytest.mark.slow
def test_cancelling_a_fleet_run_cancels_its_children(fleet_pool):
    """A fleet run as a client process (a script, `hyperctl`): three VMs in the first group,
    one in the second; the worker takes two runs and both wait for the source's only slot (the
    test holds it), the third waits for the worker. The operator cancels the fleet run
    (`prefect flow-run cancel`, as the UI does): nobody but the fleet itself acts on that (no
    worker runs it). Every child ends Cancelled, the second group never starts, the fleet run
    ends Cancelled with its summary table."""
    api, env, home = fleet_pool
    names = ["can01", "can02", "can03", "can04"]
    log = home / "cancel-fleet.log"
    with _busy_source(api, home, "vms-c", names) as (source, target):
        proc = _start_fleet(
            env,
            log,
            "backup_fleet",
            vms=names,
            groups=[["can01", "can02", "can03"]],
            source=source,
            target=target,
            max_parallel=3,
        )
        try:
            fid = _wait_for("the fleet run", lambda: _fleet_run(api, source))["id"]
            before = _wait_for("two children running", _children_by_state(api, fid, 3, 2))
            assert proc.poll() is None
            waiting = [vm for vm, k in before.items() if k["state_type"] != "RUNNING"]
            assert before[waiting[0]]["state_type"] in ("SCHEDULED", "PENDING")
            _cancel(env, fid)
            state, done_id = _finish(proc, log)
        finally:
            stop(proc)
    assert done_id == fid and state == "CANCELLED", log.read_text()[-4000:]

    after = _children(api, fid)
    assert sorted(after) == ["can01", "can02", "can03"]  # the second group never started
    for vm, child in after.items():
        assert child["state_type"] == "CANCELLED", (vm, child["state"])
        assert _cancelled_by_fleet(api, child["id"]), vm
        assert child["work_queue_name"] == "default" and "window" not in child["parameters"]
    for vm in set(after) - set(waiting):
        assert after[vm]["start_time"], vm  # it was running, and was stopped
    assert _fleet_run(api, source)["state_type"] == "CANCELLED"
    rows = _rows(api, fid)
    assert {vm: r["state"] for vm, r in rows.items()} == dict.fromkeys(names, "Cancelled")
    assert "not started" in rows["can04"]["message"] and rows["can04"]["flow_run"] == ""
    assert not list((home / "vms-c-out").glob("*/*/manifest.json"))  # no export was made


@pytest.mark.slow
def test_cancelling_a_fleet_deployment_run_cancels_its_children(fleet_pool):
    """The fleet as a run of backup-fleet/fleet on the worker (the fleet takes one of its two
    slots, a child the other, waiting for the source's slot; the second child waits for the
    worker). On Cancelling the worker stops the fleet's process; the fleet's on_cancellation
    hook (and its own watch) cancels both children, and the second group never starts."""
    api, env, home = fleet_pool
    names = ["dep01", "dep02", "dep03"]
    with _busy_source(api, home, "vms-d", names) as (source, target):
        params = {
            "vms": names,
            "groups": [["dep01", "dep02"]],
            "source": source,
            "target": target,
            "max_parallel": 2,
        }
        started = subprocess.run(
            [PREFECT, "deployment", "run", "backup-fleet/fleet", "--params", json.dumps(params)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        fid = _wait_for("the fleet run", lambda: _fleet_run(api, source))["id"]
        _wait_for("one child running", _children_by_state(api, fid, 2, 1))
        _cancel(env, fid)

        def all_final():
            fleet = _fleet_run(api, source)
            kids = _children(api, fid)
            final = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
            done = fleet["state_type"] in final and all(
                k["state_type"] in final for k in kids.values()
            )
            return (fleet, kids) if done else None

        fleet, after = _wait_for("the fleet and its children final", all_final)
    assert fleet["state_type"] == "CANCELLED", fleet["state"]
    assert sorted(after) == ["dep01", "dep02"]  # dep03's group never started
    for vm, child in after.items():
        assert child["state_type"] == "CANCELLED", (vm, child["state"])
        assert _cancelled_by_fleet(api, child["id"]), vm
    assert not list((home / "vms-d-out").glob("*/*/manifest.json"))
