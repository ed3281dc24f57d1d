"""Backup chains on every target, plain and encrypted: a full, then deltas (HSDELTA, parent by
export id and object hash) after overwrites, writes into zero areas, zeroed blocks and the odd
last block; every point restored (from the local directory and from S3 through ranged reads)
equals a copy of the disk taken at that point; broken chains are named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypersdk.errors import ObjectNotFoundError, VerificationError
from tests import qemu
from tests.points import make_vm, run_chain

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


@pytest.fixture
def vm(tmp_path):
    return make_vm(tmp_path)


def _restore_all(target_url: str, results: list, copies: Path, tmp_path: Path, key=None) -> None:
    from hypersdk.repository.restore import restore_disk
    from providers import open_target

    with open_target(target_url) as target:
        for r in results:
            out = tmp_path / f"back-{r.export_id}.qcow2"
            restored = restore_disk(target, "db01", r.export_id, "disk0", out, "qcow2", key)
            assert len(restored.chain) == results.index(r) + 1
            qemu.check(out, "qcow2")
            qemu.compare(copies / f"{r.export_id}.raw", out, "raw", "qcow2")


def test_broken_chains_are_named(prefect_api, vm, tmp_path, qemu_img):
    from hypersdk.repository.restore import restore_disk
    from providers import open_target

    root, disk = vm
    copies = tmp_path / "copies"
    copies.mkdir()
    repo = tmp_path / "repo"
    results = run_chain(str(root), f"file://{repo}", disk, copies)
    full, d1, d2, d3 = (r.export_id for r in results)
    target = open_target(f"file://{repo}")
    out = tmp_path / "out.raw"
    with pytest.raises(ObjectNotFoundError, match="no-such-point"):
        restore_disk(target, "db01", "no-such-point", "disk0", out, "raw")
    # a flipped byte in a stored delta: its verification names it
    delta = repo / results[2].disks[0].key
    data = bytearray(delta.read_bytes())
    data[-100] ^= 0xFF
    delta.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=results[2].disks[0].key):
        restore_disk(target, "db01", d3, "disk0", out, "raw")
    # a parent point that is gone: the child says which
    shutil.rmtree(repo / "db01" / d1)
    with pytest.raises(VerificationError, match=f"parent point {d1} is gone"):
        restore_disk(target, "db01", d2, "disk0", out, "raw")
    assert not out.exists()
    # the full still restores
    restore_disk(target, "db01", full, "disk0", out, "raw")
    qemu.compare(copies / f"{full}.raw", out, "raw", "raw")


def test_cli_lists_and_restores_points(prefect_api, vm, tmp_path, qemu_img):
    root, disk = vm
    copies = tmp_path / "copies"
    copies.mkdir()
    repo = f"file://{tmp_path / 'repo'}"
    results = run_chain(str(root), repo, disk, copies)
    env = {**os.environ, "HYPERSDK_HOME": str(tmp_path / "home")}

    def hyperctl(*args):
        return subprocess.run([HYPERCTL, *args], env=env, capture_output=True, text=True)

    listed = hyperctl("backups", "list", "db01", "-t", repo, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["export_id"] for r in rows] == [r.export_id for r in results]
    assert rows[2]["disks"][0]["parent"] == results[1].export_id
    # the newest point, as a local VM directory the local source reads back
    done = hyperctl("restore", "db01", str(tmp_path / "vmdir"), "-t", repo, "--json", "-q")
    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)["disks"][0]
    assert len(restored["chain"]) == 4
    qemu.compare(copies / f"{results[-1].export_id}.raw", restored["path"], "raw", "qcow2")
    from providers import open_source

    with open_source(str(tmp_path / "vmdir")) as src:
        assert [v.name for v in src.list_vms()] == ["db01"]
    # an older point, as one raw image
    out = tmp_path / "p1.raw"
    done = hyperctl(
        "restore", "db01", str(out), "--at", results[1].export_id, "-t", repo, "-O", "raw", "-q"
    )
    assert done.returncode == 0, done.stderr
    qemu.compare(copies / f"{results[1].export_id}.raw", out, "raw", "raw")
    # mistakes: one line each
    for args, needle in (
        (("restore", "db01", str(tmp_path / "x.raw"), "--at", "nope", "-t", repo), "no backup"),
        (("backups", "list", "ghost", "-t", repo), "no backups"),
    ):
        res = hyperctl(*args)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr


def test_a_second_export_of_the_same_vm_waits_then_names_the_holder(
    prefect_api, vm, tmp_path, monkeypatch
):
    import flows.export as export
    from flows.migrate import migrate_vm
    from hypersdk.errors import RepositoryLockedError
    from hypersdk.repository import vm_prefix
    from hypersdk.repository.locks import RepositoryLock
    from providers import open_target

    root, _ = vm
    repo = f"file://{tmp_path / 'repo'}"
    monkeypatch.setattr(export, "LOCK_WAIT", 1.0)
    holder = {"host": "backup-host-7", "pid": 4242, "purpose": "nightly backup"}
    with open_target(repo) as target, RepositoryLock(target, vm_prefix("db01"), holder):
        with pytest.raises(RepositoryLockedError, match="backup-host-7.*nightly backup"):
            migrate_vm(vm="db01", source=str(root), target=repo)
        assert not list((tmp_path / "repo" / "db01").glob("*/manifest.json"))
    r = migrate_vm(vm="db01", source=str(root), target=repo)  # released: it runs
    assert r.kind == "full" and not (tmp_path / "repo" / "db01" / "lock.json").exists()
