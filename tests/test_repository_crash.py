"""kill -9 in the middle of a delta upload and in the middle of a forget (issue 13): every
committed point still restores equal to a copy of the disk taken then, the next run succeeds at
once (the dead holder's lock is taken over, not waited for), and it leaves no unfinished upload
and no object that no manifest names.

Runs of one VM also queue on a Prefect concurrency limit (flows/repo_slot.py), active here as
in production: a killed run never gives its slot back, and the next run frees it (the lock object
names the dead holder and its slot's lease) and marks the dead run's flow run Crashed, while a
holder that is alive (a stopped process) keeps its slot.

The runs are real ``hyperctl`` processes killed with SIGKILL. To kill them at a known moment the
S3 tests hold requests of the test's bucket on the moto server (it runs in this process): the
run waits for an answer that never comes, as on a slow network, and is killed there; the held
request is then failed, so the step it carried never happens. The local target has no server:
there the run is killed once its temporary file has grown (a large write, caught midway).

The points a test starts from are made once per module on a local directory and copied to each
test's repository, local or S3: a repository is the same keys and bytes on every target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.points import assert_point_equals, change_disk, make_vm

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
MiB = 1024 * 1024
DISK = 24 * MiB
CHANGED = 16 * MiB  # the delta: several S3 parts, a local write long enough to catch midway
PART = 5 * MiB  # S3 part size of the test's repositories (the smallest S3 allows)


# --- repositories on S3 (moto) and on a local directory ---------------------------------------


class Stall:
    """Holds the moto server's answer to matching requests of one bucket until released, then
    fails them (how a test stops a run at a chosen request)."""

    def __init__(self, bucket: str, match: Callable[[object], bool]):
        self.bucket, self.match = bucket, match
        self.hit, self.release = threading.Event(), threading.Event()

    def wrap(self, original):
        def handler(response):
            if response.bucket_name == self.bucket and self.match(response):
                self.hit.set()
                self.release.wait(60)
                return 503, {}, b"held by the test, then failed"
            return original(response)

        return handler


@dataclass
class Repo:
    kind: str
    url: str
    env: dict
    root: Path | None = None  # local
    bucket: str | None = None  # s3
    moto: object | None = None

    def target(self):
        from providers import open_target

        return open_target(self.url)

    def unfinished(self) -> list[str]:
        """The unfinished uploads, as the store itself (not our code) shows them."""
        if self.kind == "s3":
            found = self.moto.client().list_multipart_uploads(Bucket=self.bucket, Prefix="repo/")
            return sorted(u["Key"].removeprefix("repo/") for u in found.get("Uploads", []))
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(".*.partial-*"))

    def stored(self) -> set[str]:
        if self.kind == "s3":
            found = self.moto.client().list_objects_v2(Bucket=self.bucket, Prefix="repo/")
            return {o["Key"].removeprefix("repo/") for o in found.get("Contents", [])}
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}

    def plant(self, seed: Path) -> None:
        """Copy the repository ``seed`` (a local directory) here."""
        if self.kind == "local":
            shutil.copytree(seed, self.root)
            return
        client = self.moto.client()
        for path in sorted(p for p in seed.rglob("*") if p.is_file()):
            key = f"repo/{path.relative_to(seed)}"
            client.put_object(Bucket=self.bucket, Key=key, Body=path.read_bytes())

    @contextlib.contextmanager
    def stall(self, method: str, match: Callable[[object], bool]) -> Iterator[Stall]:
        from moto.s3.responses import S3Response

        stall = Stall(self.bucket, match)
        original = getattr(S3Response, method)
        setattr(S3Response, method, stall.wrap(original))
        try:
            yield stall
        finally:
            setattr(S3Response, method, original)
            stall.release.set()


@pytest.fixture
def repo(request, tmp_path, monkeypatch, prefect_api) -> Repo:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "HYPERSDK_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the test harness's server
    }
    if request.param == "local":
        repo = Repo("local", f"file://{tmp_path / 'repo'}", env, root=tmp_path / "repo")
    else:
        from tests.fixtures.moto_server import ACCESS_KEY, SECRET_KEY

        moto = request.getfixturevalue("moto_s3")
        for name, value in (
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ):
            monkeypatch.setenv(name, value)
            env[name] = value
        bucket = moto.new_bucket()
        url = (
            f"s3://{bucket}/repo?endpoint_url={moto.endpoint_url}&region={moto.region}"
            f"&addressing_style=path&part_size={PART}&max_attempts=1"
        )
        repo = Repo("s3", url, env, bucket=bucket, moto=moto)
    return repo


@dataclass
class Seed:
    """A VM, a local repository of its points, and a copy of its disk at each point."""

    vms: Path
    repo: Path
    copies: Path
    ids: list[str]

    def give(self, repo: Repo, tmp_path: Path) -> tuple[Path, Path, Path]:
        """This test's own copy: (VM root, its disk, the copies); the points go to ``repo``."""
        shutil.copytree(self.vms, tmp_path / "vms")
        shutil.copytree(self.copies, tmp_path / "copies")
        repo.plant(self.repo)
        return tmp_path / "vms", tmp_path / "vms" / "db01" / "disk0.img", tmp_path / "copies"


def _seed(base: Path, root: Path, disk: Path, points: int) -> Seed:
    from flows.backup import backup_vm

    copies = base / "copies"
    copies.mkdir()
    ids = []
    for step in range(points):
        if step:
            change_disk(disk, step)
        r = backup_vm(vm="db01", source=str(root), target=f"file://{base / 'repo'}")
        shutil.copyfile(disk, copies / f"{r.export_id}.raw")
        ids.append(r.export_id)
    return Seed(root, base / "repo", copies, ids)


@pytest.fixture(scope="module")
def one_full(prefect_api, tmp_path_factory) -> Seed:
    """A VM whose disk is large enough for a delta of several S3 parts, and its full."""
    from hypersdk.imagegen import write_realistic_disk
    from providers.sources.local import create_vm

    base = tmp_path_factory.mktemp("one-full")
    d = create_vm(base / "vms", "db01", {"disk0": DISK})
    write_realistic_disk(d / "disk0.img", DISK, seed=13)
    return _seed(base, base / "vms", d / "disk0.img", 1)


@pytest.fixture(scope="module")
def three_points(prefect_api, tmp_path_factory) -> Seed:
    """A full and two deltas (tests.points' VM)."""
    base = tmp_path_factory.mktemp("three-points")
    root, disk = make_vm(base)
    return _seed(base, root, disk, 3)


# --- helpers ----------------------------------------------------------------------------------


def _hyperctl(repo: Repo, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [HYPERCTL, *args], env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for ``proc`` to succeed; its stderr. A run that hangs is killed and shown."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout:g} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return err


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60) -> None:
    """Return as soon as ``ready()``; the test fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the run never reached the moment to stop it")
        time.sleep(0.005)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; the test fails if the run ends first."""
    try:
        _wait_for(proc, ready, timeout)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _grown(repo: Repo, stem: str, size: int) -> bool:
    """A temporary file ``.<stem>.partial-*`` of at least ``size`` bytes is being written."""
    for p in repo.root.rglob(f".{stem}.partial-*"):
        with contextlib.suppress(FileNotFoundError):  # published meanwhile
            if p.stat().st_size >= size:
                return True
    return False


def _owner(repo: Repo) -> dict:
    """The owner recorded in the VM's lock object ({} when there is none)."""
    from hypersdk.repository.locks import read_lock

    with repo.target() as t:
        record = read_lock(t, "db01/lock.json")
    return record.owner if record is not None else {}


def _limit(repo: Repo):
    """The VM's repository slot: its Prefect global concurrency limit."""
    from prefect.client.orchestration import get_client

    from flows.repo_slot import limit_name

    with repo.target() as t, get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(t.url, "db01"))


def _flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _warnings_since(since: datetime) -> list[str]:
    """The warnings flow runs logged to the Prefect API since ``since``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel, LogFilterTimestamp

    found = LogFilter(level=LogFilterLevel(ge_=30), timestamp=LogFilterTimestamp(after_=since))
    with get_client(sync_client=True) as client:
        return [entry.message for entry in client.read_logs(log_filter=found)]


def _points(repo: Repo) -> list[str]:
    from hypersdk.repository.restore import points

    with repo.target() as t:
        return points(t, "db01")


def _named_keys(repo: Repo) -> set[str]:
    """Every manifest and every object a manifest names."""
    from hypersdk.repository.chain import point_manifest

    with repo.target() as t:
        keys = set()
        for pid in _points(repo):
            keys.add(f"db01/{pid}/manifest.json")
            keys.update(d.key for d in point_manifest(t, "db01", pid).disks)
        return keys


def _restore_all(repo: Repo, copies: Path, tmp_path: Path) -> list[str]:
    """Every point that has a manifest restores equal to the copy of the disk taken then."""
    found = _points(repo)
    for pid in found:
        assert_point_equals(repo.url, "db01", pid, copies / f"{pid}.raw", tmp_path).unlink()
    return found


# --- kill -9 in the middle of a delta upload --------------------------------------------------


@pytest.mark.parametrize("repo", ["s3", "local"], indirect=True)
def test_backup_killed_mid_delta_upload(repo, one_full, tmp_path, qemu_img):
    from hypersdk.repository.chain import point_manifest
    from hypersdk.repository.locks import read_lock

    root, disk, copies = one_full.give(repo, tmp_path)
    [full] = one_full.ids
    change_disk(disk, 1)
    with open(disk, "r+b") as f:  # a large changed area: the delta takes several parts
        f.seek(4 * MiB)
        f.write(os.urandom(CHANGED))
    args = ("backup", "db01", "-s", str(root), "-t", repo.url)
    if repo.kind == "s3":
        # the delta's second part is held: its multipart upload is under way, unfinished
        def second_part(r) -> bool:
            return r._get_int_param("partNumber") >= 2 and r.parse_key_name().endswith(".hsdelta")

        with repo.stall("upload_part", second_part) as stall:
            run = _hyperctl(repo, *args)
            _kill_when(run, lambda: stall.hit.is_set() and bool(repo.unfinished()))
    else:
        run = _hyperctl(repo, *args)
        _kill_when(run, lambda: _grown(repo, "disk0.hsdelta", 64 * 1024))
    # the window was hit: the delta's upload is left unfinished, and the dead run's lock
    [left] = repo.unfinished()
    assert ".hsdelta" in left and left.startswith("db01/")
    with repo.target() as t:
        assert read_lock(t, "db01/lock.json").owner["pid"] == run.pid
    assert _restore_all(repo, copies, tmp_path) == [full]  # the committed point

    # the killed run still holds its slot of the VM's limit, which is active with limit 1
    limit = _limit(repo)
    assert (limit.active, limit.limit, limit.active_slots) == (True, 1, 1)
    dead_run = _owner(repo)["flow_run_id"]
    assert _owner(repo)["slot_lease"]

    since = datetime.now(UTC)
    started = time.monotonic()
    err = _finish(_hyperctl(repo, *args), 120)
    # at once: not the slot's lease (flows.repo_slot.LEASE_SECONDS), the lock's wait or 15 min
    assert time.monotonic() - started < 40
    assert f"took over the lock of a dead holder, host {socket.gethostname()}" in err
    assert f"pid {run.pid}" in err and "no process" in err
    freed = [w for w in _warnings_since(since) if "released the slot of a dead holder" in w]
    assert len(freed) == 1 and f"pid {run.pid}" in freed[0], freed
    assert _limit(repo).active_slots == 0  # the next run gave its slot back
    assert _flow_run(dead_run).state.type.value == "CRASHED"  # no longer shown Running
    assert repo.unfinished() == []
    ids = _points(repo)
    assert len(ids) == 2 and ids[0] == full
    with repo.target() as t:
        assert point_manifest(t, "db01", ids[1]).kind == "incremental"
    assert repo.stored() == _named_keys(repo)  # nothing else: no lock, no leftover
    shutil.copyfile(disk, copies / f"{ids[1]}.raw")
    assert _restore_all(repo, copies, tmp_path) == ids


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_killed_backup_flow_run_ends_crashed(repo, one_full, tmp_path):
    """Killed right after it took its slot and its lock, and its slot's lease revoked (as a
    server's lease expiry does before the next nightly run): the next run gets the slot at once
    and still marks the dead run's flow run Crashed (the UI showed it Running: nothing else
    would end it)."""
    from prefect.client.orchestration import get_client

    root, _, _ = one_full.give(repo, tmp_path)
    args = ("backup", "db01", "-s", str(root), "-t", repo.url)
    run = _hyperctl(repo, *args)
    _kill_when(run, lambda: _owner(repo).get("pid") == run.pid)
    dead_run = _owner(repo)["flow_run_id"]
    assert _flow_run(dead_run).state.type.value == "RUNNING"
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(_owner(repo)["slot_lease"])
    assert _limit(repo).active_slots == 0

    _finish(_hyperctl(repo, *args), 120)
    state = _flow_run(dead_run).state
    assert state.type.value == "CRASHED", state
    assert f"no process {run.pid} on this host" in state.message
    assert len(_points(repo)) == 2 and _limit(repo).active_slots == 0


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_killed_backup_in_ephemeral_mode(repo, one_full, tmp_path):
    """With no Prefect server (HYPERSDK_PREFECT_SERVER=off: each hyperctl runs its own
    temporary one, sharing PREFECT_HOME's database) the killed run's slot lease is still found
    and freed by the next run: its server kept it in files, not in its memory."""
    root, _, _ = one_full.give(repo, tmp_path)
    repo.env.pop("PREFECT_API_URL")
    repo.env.pop("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", None)
    repo.env |= {"HYPERSDK_PREFECT_SERVER": "off", "PREFECT_HOME": str(tmp_path / "prefect")}
    args = ("backup", "db01", "-s", str(root), "-t", repo.url)
    run = _hyperctl(repo, *args)
    _kill_when(run, lambda: _owner(repo).get("pid") == run.pid, timeout=120)
    lease = _owner(repo)["slot_lease"]
    leases = tmp_path / "prefect" / "concurrency_leases"
    assert (leases / f"{lease}.json").is_file()  # what the dead run's server left

    err = _finish(_hyperctl(repo, *args), 120)  # not 12 h (flows.repo_slot.SLOT_WAIT)
    assert f"took over the lock of a dead holder, host {socket.gethostname()}" in err
    assert not (leases / f"{lease}.json").exists()  # released by the next run
    assert len(_points(repo)) == 2


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_live_holder_keeps_its_slot(repo, one_full, tmp_path, monkeypatch):
    """A holder that is alive (stopped mid-upload, SIGSTOP) is waited for, never freed: the
    second run gives up after SLOT_WAIT naming the limit and the holder, the first goes on when
    continued and succeeds."""
    import flows.repo_slot
    from flows.backup import backup_vm
    from hypersdk.errors import RepositoryLockedError

    root, disk, _ = one_full.give(repo, tmp_path)
    with open(disk, "r+b") as f:  # a delta long enough to stop midway
        f.seek(4 * MiB)
        f.write(os.urandom(CHANGED))
    run = _hyperctl(repo, "backup", "db01", "-s", str(root), "-t", repo.url)
    try:
        _wait_for(run, lambda: _grown(repo, "disk0.hsdelta", 64 * 1024))
        os.kill(run.pid, signal.SIGSTOP)
        owner = _owner(repo)
        assert owner["pid"] == run.pid and owner["slot_lease"]

        monkeypatch.setattr(flows.repo_slot, "SLOT_WAIT", 3.0)
        name = _limit(repo).name
        with pytest.raises(RepositoryLockedError, match=f"limit {name} for 3 s") as caught:
            backup_vm(vm="db01", source=str(root), target=repo.url)
        # it said whom it waited for: the holder the lock object names
        assert f"pid {run.pid} (flow run {owner['flow_run_id']}" in str(caught.value)
        assert _limit(repo).active_slots == 1  # the live holder's slot was not released
        assert _flow_run(owner["flow_run_id"]).state.type.value == "RUNNING"
    except BaseException:
        run.kill()
        run.communicate(timeout=30)
        raise
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGCONT)
    _finish(run, 120)  # its slot and lock were kept: it finishes its delta
    assert len(_points(repo)) == 2 and _limit(repo).active_slots == 0
    assert _flow_run(owner["flow_run_id"]).state.type.value == "COMPLETED"


# --- kill -9 in the middle of a forget --------------------------------------------------------

# keep-last 2 of a full and two deltas: the first delta is rebased on a synthetic full (object,
# then manifest), then the full is forgotten (manifest, then objects), then the replaced delta.
# The moment of the kill: the request held.
FORGET_KILLS = {
    "while the synthetic full is written": ("upload_part", "{rebased}"),
    "after the synthetic full, before its manifest": ("put_object", "db01/{kept}/manifest.json"),
    "after the rebased manifest, before any deletion": (
        "delete_object",
        "db01/{gone}/manifest.json",
    ),
}


@pytest.mark.parametrize("repo", ["s3"], indirect=True)
@pytest.mark.parametrize("moment", list(FORGET_KILLS))
def test_forget_killed_midway(repo, moment, three_points, tmp_path, qemu_img):
    _, _, copies = three_points.give(repo, tmp_path)
    ids = three_points.ids
    rebased = f"db01/{ids[1]}/disk0.qcow2"
    method, key = FORGET_KILLS[moment]
    key = key.format(rebased=rebased, kept=ids[1], gone=ids[0])
    with repo.stall(method, lambda r: r.parse_key_name() == f"repo/{key}") as stall:
        forget = _hyperctl(repo, "forget", "db01", "-t", repo.url, "--keep-last", "2")
        _kill_when(forget, stall.hit.is_set)
    stored = repo.stored()
    if method == "upload_part":
        assert repo.unfinished() == [rebased] and rebased not in stored
    else:
        assert repo.unfinished() == [] and rebased in stored  # committed, nothing deleted yet
        with repo.target() as t:
            from hypersdk.repository.chain import point_manifest

            kept = point_manifest(t, "db01", ids[1]).disks[0]
        assert (kept.key == rebased) == (method == "delete_object")  # rebased manifest or not
    assert f"db01/{ids[0]}/manifest.json" in stored
    assert _restore_all(repo, copies, tmp_path) == ids  # all three still restore
    # the next forget finishes the job: exactly the kept points, nothing unreferenced
    _finish(_hyperctl(repo, "forget", "db01", "-t", repo.url, "--keep-last", "2"), 60)
    assert repo.unfinished() == []
    assert repo.stored() == _named_keys(repo)
    assert rebased in repo.stored()  # the kept delta rests on its synthetic full
    assert _restore_all(repo, copies, tmp_path) == ids[1:]
