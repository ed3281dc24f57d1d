"""What a user sees in the Prefect UI, read back through the API of a real server: runs
started by `hyperctl` tell their story (stage tasks, engine logs, progress at 100%), and
mistakes are answered in one line without creating a run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers.sources.local import create_vm
from tests.run_story import assert_tells_the_story, flow_run_id

MiB = 1024 * 1024
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


@pytest.fixture
def cli_env(prefect_server, tmp_path):
    api, env = prefect_server
    home = tmp_path / "hshome"
    vm_dir = create_vm(home / "vms", "web01", {"disk0": 12 * MiB + 4096, "disk1": 5 * MiB})
    write_realistic_disk(vm_dir / "disk0.img", 12 * MiB + 4096, seed=31)
    write_realistic_disk(vm_dir / "disk1.img", 5 * MiB, seed=32)
    return api, {**env, "HYPERSDK_HOME": str(home)}, vm_dir


def _hyperctl(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HYPERCTL, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _flow_runs(api: str) -> int:
    return len(httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json())


def test_cli_run_tells_its_story_in_the_ui(cli_env):
    api, env, vm_dir = cli_env
    first = _hyperctl(env, "migrate", "web01")
    assert first.returncode == 0, first.stdout + first.stderr
    assert_tells_the_story(api, flow_run_id(first.stdout), disks=("disk0", "disk1"))
    # (that the disks stream at the same time is shown without timing in test_flow_migrate)

    mutate_disk(vm_dir / "disk0.img", 3, seed=5)
    second = _hyperctl(env, "migrate", "web01")
    assert second.returncode == 0, second.stdout + second.stderr
    story = assert_tells_the_story(api, flow_run_id(second.stdout), disks=("disk0", "disk1"))
    text = "\n".join(entry["message"] for entry in story["logs"])
    assert "disk0: delta on point " in text  # which base, by export id
    assert "disk0: changes since" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["migrate", "ghost"], "VM 'ghost' not found"),
        (["migrate", "web01", "--source", "/nonexistent/vms"], "does not exist"),
        (["migrate", "web01", "-O", "qcow3"], "unknown format 'qcow3'"),
        (["migrate", "web01", "--target", "{readonly}"], "not writable"),
        (["migrate"], "name the VM to export (the source holds: web01)"),
        (["migrate", "web01", "--target", "s3://KEY:SECRET@bucket/x"], "password"),
    ],
)
def test_mistakes_answer_in_one_line_without_a_run(cli_env, tmp_path, args, message):
    api, env, _ = cli_env
    readonly = tmp_path / "ro"
    readonly.mkdir()
    with read_only(readonly) if "{readonly}" in args else contextlib.nullcontext():
        args = [str(readonly / "exports") if a == "{readonly}" else a for a in args]
        _one_line_and_no_run(api, env, args, message)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for this user: a read-only tmpfs mounted on it as root (root writes
    through any mode bits), mode 555 otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield
        path.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _one_line_and_no_run(api: str, env: dict, args: list[str], message: str) -> None:
    before = _flow_runs(api)
    started = time.monotonic()
    res = _hyperctl(env, *args, timeout=60)
    elapsed = time.monotonic() - started
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0], lines[0]
    assert "SECRET" not in res.stderr + res.stdout
    # no Prefect start-up on the way: well under the 10 s an ephemeral API takes (the 1 s
    # target is measured by benchmarks/first_run.py; timed tests would be flaky here)
    assert elapsed < 5, elapsed
    assert _flow_runs(api) == before
