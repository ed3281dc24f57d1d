"""Conditional creation (Target.put_if_absent) on every target against the real emulators, and
the repository locks built on it (local target and moto S3): waiting, naming the holder,
stale takeover (also of a SIGKILLed holder), refusing a non-owner, hostile lock objects."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hypersdk.errors import RepositoryLockedError
from hypersdk.repository.locks import RepositoryLock, default_owner, read_lock
from providers.targets.local import LocalTarget

ROOT = Path(__file__).resolve().parents[1]
RACERS = 12


def _local(tmp_path) -> LocalTarget:
    return LocalTarget(str(tmp_path / "repo"), cache="writeback")


def _s3(request):
    from providers.targets.s3 import S3Target

    moto = request.getfixturevalue("moto_s3")
    return S3Target.from_url(f"s3://{moto.new_bucket()}/repo", **moto.options())


def _azure(request):
    from providers.targets.azure_blob import AzureBlobTarget

    azurite = request.getfixturevalue("azurite")
    return AzureBlobTarget.from_url(f"az://{azurite.new_container()}/repo", **azurite.options())


def _gcs(request):
    from providers.targets.gcs import GCSTarget

    fake = request.getfixturevalue("fake_gcs")
    return GCSTarget.from_url(f"gs://{fake.new_bucket()}/repo", **fake.options())


def _open(kind: str, request, tmp_path):
    return _local(tmp_path) if kind == "local" else globals()[f"_{kind}"](request)


@pytest.fixture(params=["local", "s3", "azure", "gcs"])
def target(request, tmp_path):
    t = _open(request.param, request, tmp_path)
    yield t
    t.close()


@pytest.fixture(params=["local", "s3"])
def lock_target(request, tmp_path):
    t = _open(request.param, request, tmp_path)
    yield t
    t.close()


# --- put_if_absent ------------------------------------------------------------------------------


def test_put_if_absent_creates_once_never_overwrites(target):
    assert target.put_if_absent("vm/lock.json", b"first") is True
    assert target.put_if_absent("vm/lock.json", b"second") is False
    assert target.get_bytes("vm/lock.json") == b"first"
    assert [o.key for o in target.list("vm/")] == ["vm/lock.json"]  # no temporary left over
    target.put_bytes("vm/other", b"x")  # an object written the ordinary way counts as well
    assert target.put_if_absent("vm/other", b"y") is False
    assert target.get_bytes("vm/other") == b"x"
    target.delete("vm/lock.json")
    assert target.put_if_absent("vm/lock.json", b"third") is True
    assert target.get_bytes("vm/lock.json") == b"third"


def test_concurrent_creators_exactly_one_wins(target):
    for round_ in range(3):
        key = f"race{round_}/lock.json"
        start = threading.Barrier(RACERS)

        def create(i: int, key: str = key, start: threading.Barrier = start) -> bool:
            start.wait()
            return target.put_if_absent(key, f"racer {i}".encode())

        with ThreadPoolExecutor(RACERS) as pool:
            results = list(pool.map(create, range(RACERS)))
        winners = [i for i, won in enumerate(results) if won]
        assert len(winners) == 1, winners
        assert target.get_bytes(key) == f"racer {winners[0]}".encode()


def test_local_never_writes_through_a_symlink(tmp_path):
    t = _local(tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    Path(t.root, "vm").mkdir(parents=True)
    os.symlink(outside, Path(t.root, "vm", "lock.json"))
    assert t.put_if_absent("vm/lock.json", b"lock") is False
    assert outside.read_bytes() == b"precious"
    os.symlink(tmp_path / "nowhere", Path(t.root, "vm", "dangling"))  # even a dangling one
    assert t.put_if_absent("vm/dangling", b"lock") is False
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(Path(t.root, "vm"))) == ["dangling", "lock.json"]  # no temp left


def test_local_without_hard_links_still_exclusive(tmp_path, monkeypatch):
    """Where link(2) is refused (some FUSE and network filesystems), O_EXCL on the final
    name decides instead: still one winner, nothing overwritten, no temporary left."""
    import errno

    def no_links(src, dst, **_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    t = _local(tmp_path)
    assert t.put_if_absent("vm/lock.json", b"first") is True
    assert t.put_if_absent("vm/lock.json", b"second") is False
    assert t.get_bytes("vm/lock.json") == b"first"
    assert os.listdir(Path(t.root, "vm")) == ["lock.json"]


# --- repository locks ---------------------------------------------------------------------------


def _lock(target, purpose="backup", **kw) -> RepositoryLock:
    kw.setdefault("poll", 0.05)
    return RepositoryLock(
        target, "vm-a/", default_owner(purpose, flow_run_id=f"run-{purpose}"), **kw
    )


def test_second_acquirer_waits_then_fails_naming_the_holder(lock_target):
    holder = _lock(lock_target, "backup")
    holder.acquire(wait=0)
    other = _lock(lock_target, "forget")
    start = time.monotonic()
    with pytest.raises(RepositoryLockedError) as exc:
        other.acquire(wait=0.6)
    waited = time.monotonic() - start
    assert 0.6 <= waited < 5
    msg = str(exc.value)
    assert "vm-a/lock.json" in msg and "\n" not in msg
    for needle in (f"pid {os.getpid()}", "flow run run-backup", "purpose backup", "since 20"):
        assert needle in msg, msg
    assert exc.value.retryable is False
    assert read_lock(lock_target, "vm-a/lock.json").token == holder.token  # untouched
    # released while the next one waits: it gets the lock
    threading.Timer(0.3, holder.release).start()
    other.acquire(wait=10)
    assert read_lock(lock_target, "vm-a/lock.json").owner["purpose"] == "forget"
    other.release()
    assert not lock_target.exists("vm-a/lock.json")


def test_stale_lock_taken_over_and_old_holder_locked_out(lock_target, caplog):
    old = _lock(lock_target, "backup")
    old.acquire()
    time.sleep(0.8)
    new = _lock(lock_target, "restore", stale_after=0.5)
    with caplog.at_level(logging.WARNING, logger="hypersdk.repository.locks"):
        new.acquire(wait=0)
    assert new.took_over is not None and new.took_over.token == old.token
    assert "took over a stale lock of host" in caplog.text and "purpose backup" in caplog.text
    with pytest.raises(RepositoryLockedError, match="purpose restore"):
        old.refresh()  # it learns it lost the lock, and to whom
    with pytest.raises(RepositoryLockedError, match="purpose restore"):
        old.release()
    assert read_lock(lock_target, "vm-a/lock.json").token == new.token
    assert [o.key for o in lock_target.list("vm-a/")] == ["vm-a/lock.json"]  # marker removed


def test_release_by_non_owner_refused(lock_target):
    holder = _lock(lock_target, "backup")
    holder.acquire()
    stranger = _lock(lock_target, "backup")  # same host and purpose, another run
    with pytest.raises(RepositoryLockedError, match="cannot release a lock we do not hold"):
        stranger.release()
    assert read_lock(lock_target, "vm-a/lock.json").token == holder.token
    holder.release()
    assert not lock_target.exists("vm-a/lock.json")


def test_refresh_moves_the_time_and_context_manager_keeps_it_fresh(lock_target):
    with _lock(lock_target, "backup", refresh_every=0.1) as lock:
        first = read_lock(lock_target, "vm-a/lock.json")
        time.sleep(0.5)
        later = read_lock(lock_target, "vm-a/lock.json")
        assert later.token == lock.token == first.token
        assert later.created == first.created and later.refreshed > first.refreshed
    assert not lock_target.exists("vm-a/lock.json")


def test_concurrent_takeover_of_one_stale_lock_has_one_winner(lock_target):
    dead = _lock(lock_target, "backup")
    dead.acquire()
    time.sleep(0.6)
    start = threading.Barrier(6)
    takers = [_lock(lock_target, f"taker{i}", stale_after=0.5) for i in range(6)]

    def take(lock: RepositoryLock) -> str:
        start.wait()
        try:
            lock.acquire(wait=0)
            return "won"
        except RepositoryLockedError as exc:
            return str(exc)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(take, takers))
    assert results.count("won") == 1, results
    winner = takers[results.index("won")]
    assert read_lock(lock_target, "vm-a/lock.json").token == winner.token
    assert winner.took_over.token == dead.token


def test_takeover_marker_of_a_run_that_died_taking_over_is_cleared(lock_target):
    dead = _lock(lock_target, "backup")
    dead.acquire()
    marker = f"vm-a/lock.json.takeover-{dead.token}"
    lock_target.put_bytes(marker, dead._record(time.time()))  # a taker that died mid-way
    time.sleep(0.6)
    lock = _lock(lock_target, "backup", stale_after=0.5)
    lock.acquire(wait=5)  # the first try finds the stale marker and clears it, the next wins
    assert lock.took_over.token == dead.token
    assert [o.key for o in lock_target.list("vm-a/")] == ["vm-a/lock.json"]


@pytest.mark.parametrize(
    "content", [b"", b"\xff\xfenot json", b"[" * 100_000, b'{"schema": "hypersdk.lock/v1"}']
)
def test_unreadable_lock_counts_as_held_then_goes_stale(lock_target, content):
    lock_target.put_bytes("vm-a/lock.json", content)
    lock = _lock(lock_target, "backup")
    with pytest.raises(RepositoryLockedError, match="unknown owner .the lock object is unreadable"):
        lock.acquire(wait=0)
    time.sleep(1.2)  # the object's modification time dates it
    lock.stale_after = 1.0
    lock.acquire(wait=0)
    assert lock.took_over is not None and not lock.took_over.valid
    assert read_lock(lock_target, "vm-a/lock.json").token == lock.token


def test_oversized_lock_object_is_not_read(tmp_path):
    t = _local(tmp_path)
    t.put_bytes("vm-a/lock.json", b" " * (1 << 20))
    record = read_lock(t, "vm-a/lock.json")
    assert record is not None and not record.valid


HOLDER = """
import sys, time
from hypersdk.repository.locks import RepositoryLock, default_owner
kind, where = sys.argv[1], sys.argv[2]
if kind == "local":
    from providers.targets.local import LocalTarget
    target = LocalTarget(where, cache="writeback")
else:
    from providers.targets.s3 import S3Target
    endpoint, bucket = where.split(" ")
    target = S3Target(bucket, "repo", endpoint_url=endpoint, region="us-east-1",
                      access_key_id="k", secret_access_key="s", addressing_style="path")
lock = RepositoryLock(target, "vm-a/", default_owner("backup"))
lock.acquire(wait=0)
print("held", flush=True)
time.sleep(600)
"""


def test_killed_holder_leaves_a_lock_that_goes_stale_and_is_taken_over(lock_target):
    if isinstance(lock_target, LocalTarget):
        kind, where = "local", lock_target.root
    else:
        kind, where = "s3", f"{lock_target.endpoint_url} {lock_target.bucket}"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, kind, where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout.readline().strip() == "held", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stored = json.loads(lock_target.get_bytes("vm-a/lock.json"))
    assert stored["owner"]["pid"] == child.pid  # the dead run's lock is still there
    lock = _lock(lock_target, "backup", stale_after=1.0)
    start = time.monotonic()
    lock.acquire(wait=10)  # a holder on this host provably dead: taken over at once
    assert time.monotonic() - start < 8 and lock.takeover_reason.startswith("dead holder")
    assert lock.took_over.owner["pid"] == child.pid
    lock.release()
