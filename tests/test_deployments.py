"""prefect.yaml deployments on a real Prefect server, run by a real process worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from hypersdk.imagegen import write_realistic_disk
from providers.sources.local import create_vm
from tests import qemu
from tests.fixtures.prefect_server import stop
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
    for d in by_name.values():
        assert d["work_pool"]["name"] == "hypersdk-local"
        step = d["pull"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "{{ $HYPERSDK_CHECKOUT }}"


def _prefect(env, *args, timeout=300):
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run(
        [str(exe), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_deploy_run_with_worker(prefect_server, tmp_path, qemu_img):
    api, env = prefect_server
    home = tmp_path / "hshome"
    env = {**env, "HYPERSDK_HOME": str(home)}
    vm_dir = create_vm(home / "vms", "db01", {"disk0": 16 * MiB + 4096})
    write_realistic_disk(vm_dir / "disk0.img", 16 * MiB + 4096, seed=21)

    boot = subprocess.run(
        [sys.executable, "-m", "deployments.bootstrap"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert boot.returncode == 0, boot.stdout + boot.stderr
    listed = _prefect(env, "deployment", "ls")
    assert "migrate-vm/on-demand" in listed.stdout and "backup-vm/nightly" in listed.stdout

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
    finally:
        stop(worker)
        worker_log.close()
    exports = sorted((home / "exports" / "db01").glob("*/disk0.qcow2"))
    assert len(exports) == 1
    qemu.check(exports[0], "qcow2")
    qemu.compare(vm_dir / "disk0.img", exports[0], "raw", "qcow2")
    assert (exports[0].parent / "manifest.json").is_file()
