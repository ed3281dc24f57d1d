"""backup_fleet on a real Prefect server with a real process worker: ordered groups (a group
starts when the previous one has ended), a failing VM that does not stop the others, one
summary table, and a re-run (``redo_failed_of``) that re-does only the VM that failed."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from deployments import workers as fleet_workers
from deployments.limits import setup as setup_limits
from tests.fixtures.prefect_server import api_post as _post
from tests.fixtures.prefect_server import stop
from tests.fleet_stack import make_vms

ROOT = Path(__file__).resolve().parent.parent


def _fleet(env: dict, log: Path, **params) -> tuple[str, str]:
    """backup_fleet as a client process; (its final state type, the fleet run's id)."""
    code = (
        "import json, sys; from flows.fleet import backup_fleet; "
        "s = backup_fleet(**json.loads(sys.argv[1]), return_state=True); "
        "print('FLEET', s.state_details.flow_run_id, s.type.value, s.message)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log.write_text(done.stdout + done.stderr)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FLEET ")), None)
    assert line, (done.stdout + done.stderr)[-4000:]
    return line.split()[2], line.split()[1]


def _rows(api: str, run_id: str) -> dict[str, dict]:
    by_run = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    [table] = [a for a in _post(api, "/artifacts/filter", by_run) if a["type"] == "table"]
    return {r["vm"]: r for r in json.loads(table["data"])}


def _children(api: str, run_id: str) -> dict[str, dict]:
    tagged = {"flow_runs": {"tags": {"all_": [f"fleet:{run_id}"]}}}
    return {c["parameters"]["vm"]: c for c in _post(api, "/flow_runs/filter", tagged)}


def _t(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.slow
def test_groups_failures_and_redo(prefect_server, tmp_path):
    api, env = prefect_server
    home = tmp_path / "hshome"
    make_vms(home / "vms", ["db01", "app01", "bad01"])
    (home / "vms" / "bad01" / "disk0.img").rename(tmp_path / "bad01-disk0.img")  # preflight fails
    source, target = f"local://{home / 'vms'}", f"file://{home / 'exports'}"
    env = fleet_workers.worker_env(api, {**env, "HYPERSDK_HOME": str(home)})
    prefect = str(Path(sys.executable).with_name("prefect"))
    for cmd in (
        [prefect, "work-pool", "create", "hypersdk-local", "--type", "process", "--overwrite"],
        [
            prefect,
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "prefect.yaml",
            "--name",
            "fleet-member",
        ],
    ):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        setup_limits({source: 2}, {target: 2}, zombie_after=0)
    worker = fleet_workers.start_worker("fleet-flow-worker", env, tmp_path / "worker.log", tmp_path)
    try:
        params = {
            "vms": ["app01", "bad01", "db01"],
            "groups": [["db*"], ["app*"]],
            "source": source,
            "target": target,
        }
        state, first = _fleet(env, tmp_path / "fleet1.log", **params)
        assert state == "FAILED"  # one VM did not complete
        rows = _rows(api, first)
        assert {vm: r["state"] for vm, r in rows.items()} == {
            "db01": "Completed",
            "app01": "Completed",
            "bad01": "Failed",
        }
        assert rows["db01"]["kind"] == "full" and rows["db01"]["bytes"] > 0
        assert "disk" in rows["bad01"]["message"]
        runs = _children(api, first)
        # db* first, then app*, then what no group names (bad01), each after the previous ended
        assert _t(runs["app01"]["start_time"]) >= _t(runs["db01"]["end_time"])
        assert _t(runs["bad01"]["start_time"]) >= _t(runs["app01"]["end_time"])

        # the operator fixes bad01 and re-runs the fleet run: only bad01 runs again
        (tmp_path / "bad01-disk0.img").rename(home / "vms" / "bad01" / "disk0.img")
        state, second = _fleet(env, tmp_path / "fleet2.log", redo_failed_of=first)
        assert state == "COMPLETED", (tmp_path / "fleet2.log").read_text()[-3000:]
        assert list(_children(api, second)) == ["bad01"]
        rows = _rows(api, second)
        assert {vm: r["state"] for vm, r in rows.items()} == {
            "db01": "Skipped",
            "app01": "Skipped",
            "bad01": "Completed",
        }
    finally:
        stop(worker)
    assert len(list((home / "exports" / "db01").glob("*/manifest.json"))) == 1  # not re-done
    assert len(list((home / "exports" / "bad01").glob("*/manifest.json"))) == 1


def test_selector_over_the_inventory_and_bad_requests(prefect_server, tmp_path):
    """The selector reads the source's inventory; a selector matching nothing, or a list and
    a selector at once, fail the fleet run before any child run exists."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.fleet import backup_fleet
    from hypersdk.errors import InvalidParameterError

    api, _ = prefect_server
    make_vms(tmp_path / "vms", ["db01", "app01"])
    source = f"local://{tmp_path / 'vms'}"
    with temporary_settings({PREFECT_API_URL: api}):
        with pytest.raises(InvalidParameterError, match="no VM to run"):
            backup_fleet(select={"names": ["web*"]}, source=source, target=f"file://{tmp_path}/o")
        with pytest.raises(InvalidParameterError, match="not both"):
            backup_fleet(vms=["db01"], select={"names": ["db*"]}, source=source)
        with pytest.raises(Exception, match="colour"):  # a typo in a selector: refused
            backup_fleet(select={"colour": "red"}, source=source)
    fleets = _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["backup-fleet"]}}})
    mine = [f for f in fleets if f["parameters"].get("source") == source]
    assert len(mine) == 3 and {f["state_type"] for f in mine} == {"FAILED"}
    assert not any(_children(api, f["id"]) for f in mine)
