"""Forget points by a retention policy: kept deltas whose parent goes are rebased on synthetic
fulls built from the stored objects, forgotten objects disappear, every kept point restores
equal to a copy of the disk at that point, a dry run changes nothing, and a crash after any
step leaves every committed point restorable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypersdk.repository.retention import RetentionPolicy
from tests import qemu
from tests.points import make_vm, run_chain

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


@pytest.fixture(scope="module")
def built_chain(prefect_api, tmp_path_factory):
    """One chain of four points for the module (the backups are the slow part)."""
    base = tmp_path_factory.mktemp("forget")
    root, disk = make_vm(base)
    copies = base / "copies"
    copies.mkdir()
    repo = base / "repo"
    results = run_chain(str(root), f"file://{repo}", disk, copies)
    return repo, copies, [r.export_id for r in results]


@pytest.fixture
def chain(built_chain, tmp_path):
    """A private copy of the module's repository: each test forgets in its own."""
    repo, copies, ids = built_chain
    mine = tmp_path / "repo"
    shutil.copytree(repo, mine)
    return mine, copies, ids


def _restore_equal(repo: Path, export_id: str, copies: Path, tmp_path: Path) -> None:
    from hypersdk.repository.restore import restore_disk
    from providers import open_target

    out = tmp_path / f"r-{export_id}.raw"
    with open_target(f"file://{repo}") as target:
        restore_disk(target, "db01", export_id, "disk0", out, "raw", cache="unsafe")
    qemu.compare(copies / f"{export_id}.raw", out, "raw", "raw")
    out.unlink()


def _stored(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}


def test_keep_last_rebases_the_oldest_kept_delta(chain, tmp_path, qemu_img):
    from hypersdk.repository.forget import forget
    from providers import open_target

    repo, copies, ids = chain
    before = _stored(repo)
    with open_target(f"file://{repo}") as target:
        dry = forget(target, "db01", RetentionPolicy(keep_last=2), dry_run=True)
        assert dry.plan.forget_ids == [ids[1], ids[0]] and dry.chain.rebase == (ids[2],)
        assert _stored(repo) == before  # a dry run changes nothing
        done = forget(target, "db01", RetentionPolicy(keep_last=2))
    assert done.done[0].startswith("write synthetic full")
    assert not (repo / "db01" / ids[0]).exists() and not (repo / "db01" / ids[1]).exists()
    rebased = json.loads((repo / "db01" / ids[2] / "manifest.json").read_text())
    disk = rebased["disks"][0]
    assert disk["kind"] == "full" and disk["replaces"]["key"].endswith("disk0.hsdelta")
    assert not (repo / "db01" / ids[2] / "disk0.hsdelta").exists()  # the replaced delta is gone
    for export_id in ids[2:]:  # the newest still chains onto the rebased point
        _restore_equal(repo, export_id, copies, tmp_path)


def test_keep_daily_over_faked_dates(chain, tmp_path, qemu_img):
    """Four points on four days (dates rewritten in their manifests), keep-daily 2 and
    keep-last 1: the two newest days stay."""
    from hypersdk.repository.forget import forget
    from providers import open_target

    repo, copies, ids = chain
    day0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
    for n, export_id in enumerate(ids):
        path = repo / "db01" / export_id / "manifest.json"
        doc = json.loads(path.read_text())
        doc["created"] = (day0 + timedelta(days=n)).isoformat()
        path.write_text(json.dumps(doc))
    with open_target(f"file://{repo}") as target:
        done = forget(target, "db01", RetentionPolicy(keep_daily=2))
    assert done.plan.keep_ids == [ids[3], ids[2]]
    for export_id in ids[2:]:
        _restore_equal(repo, export_id, copies, tmp_path)


def test_a_crash_after_any_step_leaves_every_committed_point_restorable(chain, tmp_path):
    """kill -9 in the middle of forget, simulated by stopping after each step in turn on copies
    of the repository: every point with a manifest still restores; the next forget finishes."""
    import shutil

    from hypersdk.repository import forget as forget_module
    from hypersdk.repository.restore import points
    from providers import open_target

    repo, copies, ids = chain
    steps = len(
        forget_module.forget(
            open_target(f"file://{repo}"), "db01", RetentionPolicy(keep_last=2), dry_run=True
        ).chain.steps
    )

    for stop_after in range(steps):
        trial = tmp_path / f"trial{stop_after}"
        shutil.copytree(repo, trial)
        seen = []

        def say(line: str, seen=seen, stop_after=stop_after) -> None:
            seen.append(line)

        real = forget_module._carry_out

        def crashing(*args, stop_after=stop_after, real=real):
            args[-1].done = _CrashAfter(stop_after)  # the process dies after that step
            real(*args)

        forget_module._carry_out = crashing
        try:
            with pytest.raises(_Crash), open_target(f"file://{trial}") as target:
                forget_module.forget(
                    target, "db01", RetentionPolicy(keep_last=2), say=say, lock_wait=0
                )
        finally:
            forget_module._carry_out = real
        (trial / "db01" / "lock.json").unlink(missing_ok=True)  # the killed run's lock
        with open_target(f"file://{trial}") as target:
            for export_id in points(target, "db01"):
                _restore_equal(trial, export_id, copies, tmp_path)
            forget_module.forget(target, "db01", RetentionPolicy(keep_last=2))
            assert points(target, "db01") == ids[2:]
        shutil.rmtree(trial)


class _Crash(Exception):
    pass


class _CrashAfter(list):
    """A step log that raises once ``n`` steps are done."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def append(self, step: str) -> None:
        super().append(step)
        if len(self) > self.n:
            raise _Crash(step)


def test_cli_forget(chain, tmp_path):
    repo, copies, ids = chain
    env = {**os.environ, "HYPERSDK_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [
            HYPERCTL,
            "forget",
            "db01",
            "-t",
            f"file://{repo}",
            "--keep-last",
            "3",
            "--dry-run",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["forget"] == [ids[0]] and out["rebase"] == [ids[1]] and out["dry_run"]
    assert (repo / "db01" / ids[0]).exists()
    bad = subprocess.run(
        [HYPERCTL, "forget", "db01", "-t", f"file://{repo}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "policy" in bad.stderr and len(bad.stderr.splitlines()) == 1
