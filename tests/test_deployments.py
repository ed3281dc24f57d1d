"""prefect.yaml deployments on a real Prefect server, run by a real process worker: each one
registered with its schedule, the retention deployment's trigger stored as an automation and
firing when a nightly backup completes, and the verify-after-backup trigger verifying the point
that backup wrote (its parameters rendered from the triggering run's)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hypersdk.imagegen import write_realistic_disk
from providers.sources.local import create_vm
from tests import qemu
from tests.fixtures.prefect_server import api_post as _post
from tests.fixtures.prefect_server import deploy_all, stop
from tests.run_story import assert_tells_the_story, latest_flow_run

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def test_prefect_yaml_declares_the_deployments():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    nightly = by_name["nightly"]
    assert nightly["entrypoint"] == "flows/backup.py:backup_vm"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert by_name["on-demand"]["entrypoint"] == "flows/migrate.py:migrate_vm"
    forget = by_name["forget"]
    assert forget["entrypoint"] == "flows/forget.py:forget_backups"
    assert forget["parameters"] == {
        "vm": "demo-vm",
        "keep_daily": 7,
        "keep_weekly": 4,
        "keep_monthly": 6,
    }
    assert "schedules" not in forget  # it follows the nightly backup instead
    [trigger] = forget["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert by_name["verify"]["entrypoint"] == "flows/verify.py:verify_backups"
    assert by_name["verify"]["parameters"] == {"vm": "demo-vm", "at": "all"}
    after = by_name["verify-after-backup"]
    assert after["entrypoint"] == "flows/verify.py:verify_backups"
    [trigger] = after["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["match_related"] == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "backup-vm",
    }  # every deployment of backup-vm: nightly, fleet-member, ...
    assert trigger["parameters"]["vm"] == "{{ flow_run.parameters.vm }}"
    assert trigger["parameters"]["at"] == "latest"
    assert by_name["fleet-member"]["entrypoint"] == "flows/backup.py:backup_vm"
    assert by_name["fleet"]["entrypoint"] == "flows/fleet.py:backup_fleet"
    assert by_name["migrate-fleet"]["entrypoint"] == "flows/fleet.py:migrate_fleet"
    assert not (ROOT / "deployments" / "fleet.yaml").exists()  # one file deploys everything
    assert by_name["restore"]["entrypoint"] == "flows/restore.py:restore_vm"
    assert "schedules" not in by_name["restore"]
    for d in by_name.values():
        assert d["work_pool"]["name"] == "hypersdk-local"
        step = d["pull"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "{{ $HYPERSDK_CHECKOUT }}"


def test_every_entrypoint_loads_with_its_parameters():
    """Each deployment's flow loads, its parameters are ones the flow takes, and those of the
    deployments that run unattended (schedule, trigger) are complete and valid."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        schema = flow.parameters.model_dump()
        given = d.get("parameters", {})
        assert set(given) <= set(schema["properties"]), (d["name"], sorted(schema["properties"]))
        if set(schema.get("required", [])) <= set(given):  # scheduled or triggered: complete
            flow.validate_parameters(given)
    forget = next(d for d in spec["deployments"] if d["name"] == "forget")
    from flows.forget import check_forget

    policy = check_forget(forget["parameters"]).policy
    assert policy.describe() == "keep 7 daily, 4 weekly, 6 monthly snapshots"


def _prefect(env, *args, timeout=300):
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run(
        [str(exe), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def _client(api: str):
    """A Prefect client of the server at ``api`` (whatever API the test session uses)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _schedules(deployment) -> list[tuple]:
    return [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]


def _assert_registered(api: str) -> None:
    """Every deployment of prefect.yaml is on the server with its schedule, and the forget
    deployment's trigger is an automation that runs it when a nightly run completes."""
    with _client(api) as client:
        by_name = {
            name: client.read_deployment_by_name(name)
            for name in (
                "backup-vm/nightly",
                "migrate-vm/on-demand",
                "forget-backups/forget",
                "verify-backups/verify",
                "restore-vm/restore",
                "estimate-cost/cost",
                "verify-backups/verify-after-backup",
                "backup-vm/fleet-member",
                "backup-fleet/fleet",
                "migrate-fleet/migrate-fleet",
            )
        }
        forget = by_name["forget-backups/forget"]
        automations = client.read_resource_related_automations(f"prefect.deployment.{forget.id}")
        after = by_name["verify-backups/verify-after-backup"]
        [verify_automation] = client.read_resource_related_automations(
            f"prefect.deployment.{after.id}"
        )
    assert _schedules(by_name["backup-vm/nightly"]) == [("0 2 * * *", "UTC", True)]
    assert _schedules(by_name["verify-backups/verify"]) == [("0 4 * * 0", "UTC", True)]
    for name in (
        "forget-backups/forget",
        "restore-vm/restore",
        "migrate-vm/on-demand",
        "estimate-cost/cost",
        "verify-backups/verify-after-backup",
        "backup-vm/fleet-member",
        "backup-fleet/fleet",
    ):
        assert _schedules(by_name[name]) == [], name
    assert forget.parameters == {
        "vm": "demo-vm",
        "keep_daily": 7,
        "keep_weekly": 4,
        "keep_monthly": 6,
    }
    assert by_name["verify-backups/verify"].parameters == {"vm": "demo-vm", "at": "all"}
    [automation] = automations
    assert automation.name == "forget-after-nightly" and automation.enabled
    trigger = automation.trigger
    assert trigger.type == "event" and trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.expect == {"prefect.flow-run.Completed"}
    related = [dict(spec.root) for spec in trigger.match_related]
    assert {"prefect.resource.role": "deployment", "prefect.resource.name": "nightly"} in related
    assert {"prefect.resource.role": "flow", "prefect.resource.name": "backup-vm"} in related
    [action] = automation.actions
    assert action.type == "run-deployment" and action.deployment_id == forget.id
    assert verify_automation.name == "verify-after-backup" and verify_automation.enabled
    assert verify_automation.trigger.expect == {"prefect.flow-run.Completed"}
    [action] = verify_automation.actions
    assert action.type == "run-deployment" and action.deployment_id == after.id


def _flow_runs(api: str, flow_name: str) -> list[dict]:
    return _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}})


def _wait_for_completed_run(api: str, flow_name: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        runs = _flow_runs(api, flow_name)
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        if done:
            return done[0]
        assert time.monotonic() < deadline, runs
        assert not any(r["state_type"] in ("FAILED", "CRASHED") for r in runs), runs
        time.sleep(1)


def _automation_runs(api: str, deployment: str) -> list[dict]:
    [dep] = _post(api, "/deployments/filter", {"deployments": {"name": {"any_": [deployment]}}})
    return _post(api, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})


def _wait_for_automation_run(api: str, deployment: str, timeout: float = 240) -> dict:
    """The one run of ``deployment`` once final (an automation creates it; the triggering event
    reaches the trigger a few seconds after the run completes)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _automation_runs(api, deployment)
        final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if final:
            return final[0]
        assert time.monotonic() < deadline, runs
        time.sleep(1)


def test_deploy_run_with_worker(prefect_server, tmp_path, qemu_img):
    api, env = prefect_server
    home = tmp_path / "hshome"
    env = {**env, "HYPERSDK_HOME": str(home)}
    vm_dir = create_vm(home / "vms", "db01", {"disk0": 16 * MiB + 4096})
    write_realistic_disk(vm_dir / "disk0.img", 16 * MiB + 4096, seed=21)

    deploy_all(env)
    listed = _prefect(env, "deployment", "ls")
    assert "migrate-vm/on-demand" in listed.stdout and "backup-vm/nightly" in listed.stdout
    _assert_registered(api)
    # the nightly backup's VM (prefect.yaml: demo-vm), which the triggered forget then prunes
    demo = create_vm(home / "vms", "demo-vm", {"disk0": 4 * MiB})
    write_realistic_disk(demo / "disk0.img", 4 * MiB, seed=22)

    worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "worker",
            "start",
            "--pool",
            "hypersdk-local",
            "--type",
            "process",
            "--limit",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = _prefect(
            env,
            "deployment",
            "run",
            "migrate-vm/on-demand",
            "--param",
            "vm=db01",
            "--param",
            "format=qcow2",
            "--watch",
            "--watch-timeout",
            "240",
            timeout=300,
        )
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert run.returncode == 0, run.stdout + run.stderr + log[-3000:]
        assert "COMPLETED" in (run.stdout + run.stderr).upper()
        # a worker's run tells the same story in the UI as a CLI run
        assert_tells_the_story(api, latest_flow_run(api, "migrate-vm"))

        # a completed nightly backup triggers the forget deployment (and only it does: the
        # on-demand migration above triggered nothing)
        nightly = _prefect(
            env,
            "deployment",
            "run",
            "backup-vm/nightly",
            "--watch",
            "--watch-timeout",
            "240",
            timeout=300,
        )
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert nightly.returncode == 0, nightly.stdout + nightly.stderr + log[-3000:]
        forget_run = _wait_for_completed_run(api, "forget-backups")
        assert len(_flow_runs(api, "forget-backups")) == 1
        assert forget_run["parameters"]["keep_daily"] == 7
        assert forget_run["created_by"]["type"] == "AUTOMATION", forget_run["created_by"]
        [table] = [
            a
            for a in _post(
                api,
                "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [forget_run["id"]]}}},
            )
            if a["type"] == "table"
        ]
        [row] = json.loads(table["data"])  # the nightly's point, kept
        assert row["decision"] == "kept" and "daily snapshot" in row["reasons"], row

        # ... and the verify-after-backup automation verifies the point it wrote, with the
        # triggering run's parameters (the VM, the target: none, so the default)
        [point] = [m.parent.name for m in (home / "exports" / "demo-vm").glob("*/manifest.json")]
        verify_run = _wait_for_automation_run(api, "verify-after-backup")
        assert verify_run["parameters"]["vm"] == "demo-vm", verify_run["parameters"]
        assert verify_run["parameters"]["at"] == "latest"
        assert verify_run["parameters"].get("target") is None
        assert verify_run["created_by"]["type"] == "AUTOMATION", verify_run["created_by"]
        assert verify_run["state_type"] == "COMPLETED", verify_run["state"]
        [table] = [
            a
            for a in _post(
                api,
                "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [verify_run["id"]]}}},
            )
            if a["type"] == "table"
        ]
        [row] = json.loads(table["data"])
        assert row["export id"] == point and row["verdict"].startswith("OK ("), row
        # the migration and the triggered runs (forget, verify) are no backup-vm runs: one
        # verify run only
        assert len(_automation_runs(api, "verify-after-backup")) == 1
    finally:
        stop(worker)
        worker_log.close()
    exports = sorted((home / "exports" / "db01").glob("*/disk0.qcow2"))
    assert len(exports) == 1
    qemu.check(exports[0], "qcow2")
    qemu.compare(vm_dir / "disk0.img", exports[0], "raw", "qcow2")
    assert (exports[0].parent / "manifest.json").is_file()
