"""What killed runs leave, and how the next run clears it: a lock whose holder on this host is
provably dead is taken over at once (a live one, or one on another host, is not); every target
lists and aborts the unfinished uploads a killed writer leaves, never a committed object; and
the repository cleanup deletes exactly the export objects no manifest names, under the VM's
lock, and nothing at all while a manifest cannot be read."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypersdk.errors import RepositoryLockedError
from hypersdk.repository import liveness
from hypersdk.repository.cleanup import clean_abandoned
from hypersdk.repository.locks import RepositoryLock, default_owner, read_lock
from providers.targets.local import LocalTarget

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB


def _local(tmp_path) -> LocalTarget:
    return LocalTarget(str(tmp_path / "repo"), cache="writeback")


def _s3(request):
    from providers.targets.s3 import S3Target

    moto = request.getfixturevalue("moto_s3")
    return S3Target.from_url(f"s3://{moto.new_bucket()}/repo", **moto.options(part_size=5 * MiB))


def _azure(request):
    from providers.targets.azure_blob import AzureBlobTarget

    azurite = request.getfixturevalue("azurite")
    return AzureBlobTarget.from_url(
        f"az://{azurite.new_container()}/repo", **azurite.options(block_size=MiB)
    )


def _gcs(request):
    from providers.targets.gcs import GCSTarget

    fake = request.getfixturevalue("fake_gcs")
    return GCSTarget.from_url(
        f"gs://{fake.new_bucket()}/repo", **fake.options(chunk_size=256 * KiB)
    )


@pytest.fixture(params=["local", "s3", "azure", "gcs"])
def target(request, tmp_path):
    kind = request.param
    t = _local(tmp_path) if kind == "local" else globals()[f"_{kind}"](request)
    yield t
    t.close()


# --- a dead holder on this host ---------------------------------------------------------------

HOLDER = """
import sys, time
from hypersdk.repository.locks import RepositoryLock, default_owner
from providers.targets.local import LocalTarget
lock = RepositoryLock(LocalTarget(sys.argv[1], cache="writeback"), "db01/", default_owner("backup"))
lock.acquire(wait=0)
print("held", flush=True)
time.sleep(600)
"""


def _holder(tmp_path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "repo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout.readline().strip() == "held", child.stderr.read()
    return child


def _lock(target, purpose="backup", **kw) -> RepositoryLock:
    kw.setdefault("poll", 0.05)
    return RepositoryLock(target, "db01/", default_owner(purpose), **kw)


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """kill -9 of a lock holder: while it lives, the next run is refused (wait 0); once it is
    a zombie, and once it is reaped, the lock is taken over at once (not after 15 minutes),
    and the warning names the dead holder."""
    t = _local(tmp_path)
    child = _holder(tmp_path)
    try:
        owner = read_lock(t, "db01/lock.json").owner
        assert owner["pid"] == child.pid and owner["host"] == socket.gethostname()
        assert owner["started"] == liveness.start_time(child.pid)  # recorded by the holder
        assert liveness.dead_holder(owner) is None  # alive
        with pytest.raises(RepositoryLockedError, match=f"pid {child.pid}"):
            _lock(t).acquire(wait=0)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while liveness.dead_holder(owner) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "zombie" in liveness.dead_holder(owner)  # killed, not reaped yet
    finally:
        child.kill()
        child.wait()
    assert liveness.dead_holder(owner) == f"no process {child.pid} on this host"
    caplog.set_level(logging.WARNING, "hypersdk.repository.locks")
    lock = _lock(t, "next backup")
    started = time.monotonic()
    lock.acquire(wait=0)
    assert time.monotonic() - started < 2
    assert lock.held and lock.took_over.owner["pid"] == child.pid
    assert lock.takeover_reason == f"dead holder: no process {child.pid} on this host"
    assert f"took over the lock of a dead holder, host {socket.gethostname()} pid {child.pid}" in (
        caplog.text
    )
    assert read_lock(t, "db01/lock.json").owner["purpose"] == "next backup"
    assert sorted(os.listdir(tmp_path / "repo" / "db01")) == ["lock.json"]  # no marker left
    lock.release()


def test_a_pid_reused_by_another_process_counts_as_dead():
    owner = default_owner("backup")
    assert liveness.dead_holder(owner) is None  # this very process
    owner["started"] -= 1  # the pid is ours, the process that took the lock started earlier
    assert liveness.dead_holder(owner) == f"pid {os.getpid()} now belongs to another process"


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "change",
    [
        {"host": "another-host"},  # the stale rule only, whatever its pid
        {"boot_id": "0" * 36},  # same name, another machine (or boot)
        {"pid_ns": "pid:[1]"},  # a container sharing our host name
        {"boot_id": None, "pid_ns": None, "started": None},  # an older lock: cannot prove
        {"pid": True},
        {"pid": -1},
        {"pid": 1 << 40},
        {"pid": "1/../self"},
        {"pid": None},
    ],
)
def test_holders_that_cannot_be_proven_dead_wait_for_the_stale_rule(tmp_path, change):
    owner = {**default_owner("backup"), "pid": _dead_pid(), **change}
    assert liveness.dead_holder(owner) is None
    t = _local(tmp_path)
    doc = {
        "schema": "hypersdk.lock/v1",
        "token": "ab" * 16,
        "owner": owner,
        "created": "2026-01-01T00:00:00+00:00",
        "refreshed": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    }
    t.put_bytes("db01/lock.json", json.dumps(doc).encode())
    with pytest.raises(RepositoryLockedError):
        _lock(t).acquire(wait=0)
    lock = _lock(t, stale_after=0.5)
    lock.acquire(wait=5)  # the stale rule still applies
    assert lock.takeover_reason.startswith("stale")
    lock.release()


def test_a_takeover_marker_of_a_dead_taker_is_cleared_at_once(tmp_path):
    """A run killed while taking over leaves its marker: a marker whose taker is provably dead
    no longer blocks the takeover for 15 minutes."""
    t = _local(tmp_path)
    dead = {**default_owner("backup"), "pid": _dead_pid()}
    dead["started"] = 1
    record = {
        "schema": "hypersdk.lock/v1",
        "owner": dead,
        "created": "2026-01-01T00:00:00+00:00",
        "refreshed": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    }
    t.put_bytes("db01/lock.json", json.dumps({**record, "token": "cd" * 16}).encode())
    marker = f"db01/lock.json.takeover-{'cd' * 16}"
    t.put_bytes(marker, json.dumps({**record, "token": "ef" * 16}).encode())
    lock = _lock(t)
    started = time.monotonic()
    lock.acquire(wait=5)  # the first try clears the dead taker's marker, the next takes over
    assert time.monotonic() - started < 2 and lock.took_over.owner["pid"] == dead["pid"]
    assert not t.exists(marker)
    lock.release()


# --- unfinished uploads on every target -------------------------------------------------------


def _abandon(target, key: str, size: int):
    """A writer that sent ``size`` bytes and was never committed nor aborted (its process was
    killed): the parts are on the target, the thread pool is simply let go."""
    w = target.writer(key, None)
    w.write(os.urandom(size))
    pool = getattr(w, "_pool", None)
    if pool is not None:
        for f in list(w._futures):
            f.result()  # every part is stored
        pool.shutdown(wait=True)
    return w


def test_unfinished_uploads_are_listed_and_aborted_never_a_committed_object(target):
    target.put_bytes("db01/a/done.raw", b"committed")
    target.put_bytes("db01/a/again.raw", b"committed too")
    big = 6 * MiB if "s3" in target.url else 2 * MiB
    killed = [  # kept referenced: a local writer collected would remove its own temp file
        _abandon(target, "db01/a/pending.raw", big),  # a killed upload of a new object
        _abandon(target, "db01/a/again.raw", big),  # a killed rewrite of a committed one
        _abandon(target, "other/x.raw", big),  # outside the prefix asked
    ]
    found = sorted(target.pending_uploads("db01/"), key=lambda u: u.key)
    assert [o.key for o in target.list("db01/")] == ["db01/a/again.raw", "db01/a/done.raw"]
    if target.url.startswith("gs://"):
        assert found == []  # resumable sessions are no objects and cannot be listed
        return
    if target.url.startswith("az://"):
        # blocks staged onto a committed blob show in no listing (Azure drops them in a week)
        assert [u.key for u in found] == ["db01/a/pending.raw"]
        assert found[0].size == big
    else:
        assert [u.key for u in found] == ["db01/a/again.raw", "db01/a/pending.raw"]
    assert all(u.started is not None for u in found)
    for upload in found:
        target.abort_upload(upload)
        target.abort_upload(upload)  # already gone: no error
    assert target.pending_uploads("db01/") == []
    assert [u.key for u in target.pending_uploads("other/")] == ["other/x.raw"]
    assert target.get_bytes("db01/a/done.raw") == b"committed"
    assert target.get_bytes("db01/a/again.raw") == b"committed too"
    del killed
    if target.url.startswith("az://"):
        from providers.base import PendingUpload

        # asked to abort a name that has a committed blob: the blob is left as it is
        target.abort_upload(PendingUpload(key="db01/a/again.raw", upload_id="x"))
        assert target.get_bytes("db01/a/again.raw") == b"committed too"


def test_local_abort_removes_only_temporary_files(tmp_path):
    from hypersdk.errors import InvalidParameterError
    from providers.base import PendingUpload

    t = _local(tmp_path)
    t.put_bytes("db01/a/done.raw", b"committed")
    for upload_id in ("db01/a/done.raw", "../outside/.x.partial-0123456789abcdef"):
        with pytest.raises(InvalidParameterError):
            t.abort_upload(PendingUpload(key="db01/a/done.raw", upload_id=upload_id))
    os.symlink(tmp_path / "victim", tmp_path / "repo" / "db01" / "a" / ".v.partial-0")
    (tmp_path / "victim").write_bytes(b"precious")
    assert t.pending_uploads("db01/") == []  # a symlink is no unfinished write of ours
    with pytest.raises(InvalidParameterError, match="not a regular file"):
        t.abort_upload(PendingUpload(key="db01/a/v", upload_id="db01/a/.v.partial-0"))
    assert (tmp_path / "victim").read_bytes() == b"precious"
    assert t.get_bytes("db01/a/done.raw") == b"committed"


# --- the repository cleanup -------------------------------------------------------------------

A, B, C, D, E = (f"20260101T00000{n}Z-0000000{n}" for n in range(5))


def _disk(key: str, fmt: str = "qcow2", parent=None, replaces=None):
    from hypersdk.manifest import DiskManifest, ObjectRef, ParentLink

    return DiskManifest(
        name="disk0",
        kind="delta" if parent else "full",
        parent=ParentLink(**parent) if parent else None,
        replaces=ObjectRef(key=replaces, object_blake3="2" * 64) if replaces else None,
        virtual_size=1,
        format="hsdelta" if parent else fmt,
        key=key,
        object_size=1,
        object_blake3="1" * 64,
        data_bytes=0,
        defined_bytes=0,
        chunks=[],
    )


def _commit(target, export_id: str, disk) -> None:
    from hypersdk.manifest import ExportManifest
    from hypersdk.models import VMInfo

    m = ExportManifest(
        export_id=export_id,
        kind="incremental" if disk.parent else "full",
        source="local:///vms",
        vm=VMInfo(name="db01", id="db01"),
        snapshot_id=export_id,
        snapshot_consistency="stopped",
        disks=[disk],
    )
    target.put_bytes(f"db01/{export_id}/manifest.json", m.to_json())


def _repository(target) -> set[str]:
    """Points A (full), B (rebased on a synthetic full; the delta it replaced still there), C
    (a delta on B, its parent link naming B's old delta), and what killed runs left: D's disk
    (no manifest), E's objects (a forgotten point), a stray object in A; plus what is not an
    export object. Returns the keys that must stay."""
    for key in (f"db01/{A}/disk0.qcow2", f"db01/{B}/disk0.qcow2", f"db01/{B}/disk0.hsdelta"):
        target.put_bytes(key, b"x")
    target.put_bytes(f"db01/{C}/disk0.hsdelta", b"x")
    _commit(target, A, _disk(f"db01/{A}/disk0.qcow2"))
    _commit(target, B, _disk(f"db01/{B}/disk0.qcow2", replaces=f"db01/{B}/disk0.hsdelta"))
    link = {"export_id": B, "disk": "disk0", "key": f"db01/{B}/disk0.hsdelta"}
    link.update(object_blake3="2" * 64, virtual_size=1)  # names B's replaced delta
    _commit(target, C, _disk(f"db01/{C}/disk0.hsdelta", parent=link))
    leftovers = [f"db01/{D}/disk0.hsdelta", f"db01/{E}/disk0.qcow2", f"db01/{E}/x/deeper"]
    leftovers.append(f"db01/{A}/stray.bin")
    others = [
        "db01/lock.json.takeover-" + "ab" * 16,  # a lock protocol object, not an export's
        "db01/notes.txt",
        "db01/not an id/disk0.qcow2",
        f"db01x/{D}/disk0.qcow2",  # another VM whose name starts alike
        f"db0/{D}/disk0.qcow2",
        f"db01/{D}/keep.bin",  # asked to keep
    ]
    for key in leftovers + others:
        target.put_bytes(key, b"y" * 10)
    return {
        f"db01/{A}/disk0.qcow2",
        f"db01/{B}/disk0.qcow2",
        f"db01/{C}/disk0.hsdelta",
        *(f"db01/{p}/manifest.json" for p in (A, B, C)),
        *others,
        "db01/lock.json",
    }


def _all_keys(target) -> set[str]:
    return {o.key for o in target.list("")}


def test_cleanup_deletes_exactly_what_no_manifest_names(target):
    stays = _repository(target)
    big = 6 * MiB if "s3" in target.url else 2 * MiB
    killed = _abandon(target, f"db01/{D}/disk0.qcow2", big)  # the killed run's upload
    if isinstance(target, LocalTarget):  # another run creating the lock: not an export's write
        creating = Path(target.root, "db01", ".lock.json.partial-0123456789abcdef")
        creating.write_bytes(b"{}")
    lines: list[str] = []
    with RepositoryLock(target, "db01/", default_owner("backup")) as lock:
        keep = {f"db01/{D}/keep.bin"}
        report = clean_abandoned(target, "db01", lock, keep=keep, say=lines.append)
        assert _all_keys(target) == stays
    if isinstance(target, LocalTarget):
        assert [u.key for u in target.pending_uploads("db01/")] == ["db01/lock.json"]
        creating.unlink()
    assert target.pending_uploads("db01/") == [] and killed
    gone = {f"db01/{B}/disk0.hsdelta", f"db01/{D}/disk0.hsdelta", f"db01/{E}/disk0.qcow2"}
    gone |= {f"db01/{E}/x/deeper", f"db01/{A}/stray.bin"}
    assert set(report.deleted) == gone and report.deleted_bytes == 1 + 4 * 10
    assert not report.unreadable and not report.problems
    said = "\n".join(lines)
    replaced = f"the delta replaced by the synthetic full of point {B}"
    assert f"deleted db01/{B}/disk0.hsdelta (1 B): {replaced}" in said
    assert f"deleted db01/{D}/disk0.hsdelta (10 B): point {D} has no manifest" in said
    assert f"deleted db01/{A}/stray.bin (10 B): not named by the manifest of point {A}" in said
    if not target.url.startswith("gs://"):
        assert report.aborted == [f"db01/{D}/disk0.qcow2"]
        assert f"aborted the unfinished upload of db01/{D}/disk0.qcow2" in said
    assert lines[-1].startswith(f"cleanup of 'db01' on {target.url}: {len(report.aborted)} ")
    assert lines[-1].endswith(f"{len(gone)} unreferenced object(s) deleted (41 B)")
    # a second pass finds nothing and says nothing
    with RepositoryLock(target, "db01/", default_owner("backup")) as lock:
        again = clean_abandoned(target, "db01", lock, keep=keep, say=lines.append)
    assert again.removed == 0 and len(lines) == len(said.splitlines())


def test_nothing_is_deleted_while_a_manifest_cannot_be_read(tmp_path):
    t = _local(tmp_path)
    stays = _repository(t)
    t.put_bytes(f"db01/{C}/manifest.json", b'{"schema": "hypersdk.export/v9"}')  # a newer tool
    killed = _abandon(t, f"db01/{D}/disk0.qcow2", MiB)
    before = _all_keys(t)
    lines: list[str] = []
    with RepositoryLock(t, "db01/", default_owner("forget")) as lock:
        report = clean_abandoned(t, "db01", lock, say=lines.append)
    assert _all_keys(t) == before and before > stays - {"db01/lock.json"}  # leftovers stay
    assert report.unreadable == [f"db01/{C}/manifest.json"] and not report.deleted
    assert report.aborted == [f"db01/{D}/disk0.qcow2"] and killed  # no manifest names one
    assert any(f"cannot read db01/{C}/manifest.json" in line and "v9" in line for line in lines)
    assert any("no readable manifest names left in place" in line for line in lines)


def test_cleanup_needs_the_vms_lock_still_held(tmp_path):
    t = _local(tmp_path)
    _repository(t)
    before = _all_keys(t)
    lock = _lock(t)
    with pytest.raises(RepositoryLockedError, match="needs the lock"):
        clean_abandoned(t, "db01", lock)  # not taken
    other = RepositoryLock(t, "db01x/", default_owner("backup"))
    with other, pytest.raises(RepositoryLockedError, match="needs the lock"):
        clean_abandoned(t, "db01", other)  # another VM's
    lock.acquire()
    # another run took the lock over meanwhile (we stalled): the refresh finds out
    record = json.loads(t.get_bytes("db01/lock.json"))
    t.put_bytes("db01/lock.json", json.dumps({**record, "token": "ef" * 16}).encode())
    with pytest.raises(RepositoryLockedError, match="held by"):
        clean_abandoned(t, "db01", lock)
    assert _all_keys(t) - {"db01/lock.json"} == before  # (the other run's lock)
