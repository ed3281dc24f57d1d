"""Bad input on the repository commands (``hyperctl backups list``, ``restore``, ``forget``): each
mistake is one line on stderr naming what is wrong (the VM, the export id, the missing object,
the directory), a non-zero exit (2 for a malformed argument, 1 otherwise), no traceback, nothing
left under OUT (no image, no temporary file, no directory) and nothing changed in the
repository. Every case runs the real CLI against real chains: a plain one (a full and two
deltas) and one encrypted with a passphrase (a full and a delta), built once for the module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.points import SIZE, change_disk, make_vm

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
PASSPHRASE = "correct horse battery staple\n"


@dataclass(frozen=True)
class Chains:
    plain: Path  # repository directory
    plain_ids: list[str]  # oldest first: full, then deltas
    plain_full_key: str
    secret: Path
    secret_ids: list[str]
    passphrase: Path
    wrong: Path
    home: Path


def _backups(root: Path, disk: Path, repo: Path, points: int, key: dict | None) -> list:
    """``points`` backups of db01 into ``repo``, the disk changed before each but the first."""
    from flows.backup import backup_vm

    results = []
    for step in range(points):
        if step:
            change_disk(disk, step)
        results.append(
            backup_vm(vm="db01", source=str(root), target=f"file://{repo}", encryption=key)
        )
    assert [r.kind for r in results] == ["full"] + ["incremental"] * (points - 1)
    return results


@pytest.fixture(scope="module")
def chains(prefect_api, tmp_path_factory) -> Chains:
    base = tmp_path_factory.mktemp("repo-errors")
    plain = _backups(*make_vm(base / "plain"), base / "repo", 3, None)
    (base / "pass").write_text(PASSPHRASE)
    (base / "wrong").write_text("not the passphrase\n")
    key = {"method": "passphrase", "ref": str(base / "pass")}
    secret = _backups(*make_vm(base / "enc"), base / "secret", 2, key)
    assert secret[1].disks[0].key.endswith(".hsdelta.hsenc")
    return Chains(
        base / "repo",
        [r.export_id for r in plain],
        plain[0].disks[0].key,
        base / "secret",
        [r.export_id for r in secret],
        base / "pass",
        base / "wrong",
        base / "home",
    )


def _copy(repo: Path, tmp_path: Path) -> Path:
    """A private copy of a repository for a test that damages or might change it."""
    dst = tmp_path / repo.name
    shutil.copytree(repo, dst)
    return dst


def _state(repo: Path) -> dict[str, str]:
    """Every file under ``repo`` (lock objects and temporary files included) and its hash."""
    return {
        str(p.relative_to(repo)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file()
    }


def _fails(chains: Chains, code: int, *args: str, names: tuple[str, ...] = ()) -> str:
    """Run ``hyperctl args``: it must exit ``code`` with exactly one line on stderr that contains
    every string of ``names``, and no traceback. Returns that line."""
    env = {k: v for k, v in os.environ.items() if k != "HYPERSDK_VERBOSE"}
    env["HYPERSDK_HOME"] = str(chains.home)
    res = subprocess.run(
        [HYPERCTL, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in names:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _restore_fails(
    chains: Chains, code: int, out: Path, *args: str, names: tuple[str, ...] = ()
) -> str:
    """``hyperctl restore ... OUT`` fails as ``_fails`` says, and leaves nothing in OUT's
    directory (no image under its name, no temporary file, no directory made)."""
    where = out.parent
    while not where.exists():
        where = where.parent
    before = sorted(os.listdir(where))
    line = _fails(chains, code, "restore", "db01", str(out), *args, names=names)
    assert sorted(os.listdir(where)) == before, "the failed restore left something behind"
    return line


def test_unknown_vm_is_named(chains, tmp_path):
    repo = f"file://{chains.plain}"
    for args in (
        ("backups", "list", "ghost", "-t", repo),
        ("restore", "ghost", str(tmp_path / "x.raw"), "-t", repo),
        ("forget", "ghost", "-t", repo, "--keep-last", "1"),
    ):
        _fails(chains, 1, *args, names=("'ghost'", "no backups"))
    assert not list(tmp_path.iterdir())


def test_cli_restore_and_forget_are_audited(chains, tmp_path, monkeypatch):
    """hyperctl restore and forget (no flow run) append their audit line too, a failure with
    its error; the chain verifies."""
    from hypersdk.audit import AuditLog

    log = tmp_path / "audit.log"
    monkeypatch.setenv("HYPERSDK_AUDIT_LOG", str(log))
    repo = f"file://{_copy(chains.plain, tmp_path)}"
    _fails(chains, 1, "restore", "ghost", str(tmp_path / "x.raw"), "-t", repo)
    forget = ["forget", "db01", "-t", repo, "--keep-last", "1", "--dry-run"]
    res = subprocess.run([HYPERCTL, *forget], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["action"], x["result"]) for x in lines] == [("restore", "failed"), ("forget", "ok")]
    assert "'ghost'" in lines[0]["error"] and lines[1]["what"]["policy"] == {"keep_last": 1}
    assert AuditLog(log).verify().count == 2


def test_unknown_and_malformed_export_ids_are_named(chains, tmp_path):
    repo = f"file://{chains.plain}"
    absent = chains.plain_ids[0][:-8] + "deadbeef"  # well-formed, no such point
    _restore_fails(chains, 1, tmp_path / "x.raw", "-t", repo, "--at", absent, names=(absent,))
    for garbage in ("../../etc/passwd", "yesterday?", ""):
        line = _restore_fails(
            chains, 2, tmp_path / "x.raw", "-t", repo, "--at", garbage, names=("malformed",)
        )
        assert repr(garbage) in line


def test_a_target_directory_that_does_not_exist_is_named(chains, tmp_path):
    missing = tmp_path / "no-such-repo"
    url = f"file://{missing}"
    for args in (
        ("backups", "list", "db01", "-t", url),
        ("forget", "db01", "-t", url, "--keep-last", "1"),
    ):
        _fails(chains, 1, *args, names=(url, "no such directory"))
    _restore_fails(chains, 1, tmp_path / "x.raw", "-t", url, names=(url, "no such directory"))
    assert not missing.exists()  # a read creates nothing


def test_a_target_with_no_backups(chains, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other-vm").mkdir()
    url = f"file://{empty}"
    for args in (
        ("backups", "list", "db01", "-t", url),
        ("forget", "db01", "-t", url, "--keep-last", "1"),
    ):
        _fails(chains, 1, *args, names=("no backups", "'db01'", url))
    _restore_fails(chains, 1, tmp_path / "x.raw", "-t", url, names=("no backups", "'db01'"))
    assert _state(empty) == {}


def test_a_wrong_passphrase_is_named_and_changes_nothing(chains, tmp_path):
    repo = _copy(chains.secret, tmp_path)
    url = f"file://{repo}"
    before = _state(repo)
    newest = f"db01/{chains.secret_ids[1]}/disk0.hsdelta.hsenc"
    wrong = ("--passphrase-file", str(chains.wrong))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    names = ("wrong key or passphrase", ".hsenc")
    # an image file, and a directory that would become a VM directory
    _restore_fails(chains, 1, out_dir / "x.raw", "-t", url, "-O", "raw", *wrong, names=names)
    _restore_fails(chains, 1, out_dir / "vm", "-t", url, *wrong, names=names)
    # no key at all: an encrypted object of the chain is named
    _restore_fails(chains, 1, out_dir / "x.raw", "-t", url, names=(".hsenc", "is encrypted"))
    # forget must rebase the kept delta on a synthetic full: it cannot read the chain
    _fails(chains, 1, "forget", "db01", "-t", url, "--keep-last", "1", *wrong, names=names)
    _fails(chains, 1, "forget", "db01", "-t", url, "--keep-last", "1", names=(newest,))
    assert _state(repo) == before  # no synthetic full, no deletion, no lock left behind


def test_a_missing_object_in_the_chain_is_named(chains, tmp_path):
    repo = _copy(chains.plain, tmp_path)
    (repo / chains.plain_full_key).unlink()
    before = _state(repo)
    url = f"file://{repo}"
    for at in (chains.plain_ids[-1], chains.plain_ids[0]):  # a delta on it, and the full itself
        _restore_fails(
            chains, 1, tmp_path / "x.raw", "-t", url, "--at", at, names=(chains.plain_full_key,)
        )
    # forgetting the full means rebasing on it: named, and nothing forgotten
    _fails(
        chains, 1, "forget", "db01", "-t", url, "--keep-last", "2", names=(chains.plain_full_key,)
    )
    assert _state(repo) == before


def test_a_garbage_manifest_is_named_not_skipped(chains, tmp_path):
    repo = _copy(chains.plain, tmp_path)
    key = f"db01/{chains.plain_ids[1]}/manifest.json"  # in the middle of the newest's chain
    (repo / key).write_bytes(os.urandom(3000))
    before = _state(repo)
    url = f"file://{repo}"
    _fails(chains, 1, "backups", "list", "db01", "-t", url, names=(key,))
    _restore_fails(chains, 1, tmp_path / "x.raw", "-t", url, names=(key,))
    _restore_fails(
        chains, 1, tmp_path / "x.raw", "-t", url, "--at", chains.plain_ids[1], names=(key,)
    )
    _fails(chains, 1, "forget", "db01", "-t", url, "--keep-last", "1", names=(key,))
    assert _state(repo) == before


def test_out_in_a_directory_that_does_not_exist(chains, tmp_path):
    url = f"file://{chains.plain}"
    for out in (tmp_path / "nope" / "x.raw", tmp_path / "nope" / "vmdir"):
        _restore_fails(chains, 2, out, "-t", url, names=(str(tmp_path / "nope"), "directory"))
    assert not (tmp_path / "nope").exists()


def test_a_wrong_format_is_a_usage_error_and_a_planted_one_is_named(chains, tmp_path):
    """``-O nope`` is the user's mistake (exit 2); a manifest naming a format we do not write
    (tampered) is the repository's problem (exit 1), named by its manifest, the name escaped."""
    url = f"file://{chains.plain}"
    _restore_fails(chains, 2, tmp_path / "vm", "-t", url, "-O", "nope", names=("'nope'",))
    repo = _copy(chains.plain, tmp_path)
    key = f"db01/{chains.plain_ids[-1]}/manifest.json"
    doc = json.loads((repo / key).read_bytes())
    doc["disks"][0]["image_format"] = "vmfs\x1b[2J"
    (repo / key).write_text(json.dumps(doc))
    line = _restore_fails(chains, 1, tmp_path / "vm", "-t", f"file://{repo}", names=(key,))
    assert "\x1b" not in line and "unknown format 'vmfs" in line


def test_forget_without_a_keep_rule_is_refused(chains, tmp_path):
    repo = _copy(chains.plain, tmp_path)
    before = _state(repo)
    url = f"file://{repo}"
    _fails(chains, 2, "forget", "db01", "-t", url, names=("empty",))
    _fails(chains, 2, "forget", "db01", "-t", url, "--keep-last", "0", names=("keep_last",))
    assert _state(repo) == before


def test_the_chains_restore(chains, tmp_path):
    """The control: the same commands with good input succeed on these chains."""
    env = {**os.environ, "HYPERSDK_HOME": str(chains.home)}
    for repo, extra in (
        (chains.plain, ()),
        (chains.secret, ("--passphrase-file", str(chains.passphrase))),
    ):
        out = tmp_path / f"{repo.name}.raw"
        args = ["restore", "db01", str(out), "-t", f"file://{repo}", "-O", "raw", "-q", *extra]
        res = subprocess.run([HYPERCTL, *args], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert out.stat().st_size == SIZE
