"""The backup-repository flows on a real Prefect API: restore_vm brings any point back equal to a
copy of the disk taken then (an image file or a VM directory the local source reads back),
forget_backups plans (dry run) and applies a retention policy leaving every kept point
restorable, both publish artifacts that say what they did, bad input fails the run with one typed
line (or no run at all), and two backups of one VM into one repository queue on a Prefect
concurrency limit instead of colliding on the lock object."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from hypersdk.errors import DecryptionError, InvalidParameterError, ObjectNotFoundError
from tests import qemu
from tests.points import make_vm, run_chain


@pytest.fixture(scope="module")
def chain(prefect_api, tmp_path_factory):
    """Four points of db01 (a full and three deltas) and a copy of the disk at each."""
    base = tmp_path_factory.mktemp("chain")
    root, disk = make_vm(base)
    copies = base / "copies"
    copies.mkdir()
    repo = base / "repo"
    results = run_chain(str(root), f"file://{repo}", disk, copies)
    return root, repo, copies, [r.export_id for r in results]


def _run(flow, **params):
    """(flow run id, state) of a call of ``flow``."""
    state = flow(**params, return_state=True)
    return str(state.state_details.flow_run_id), state


def _artifacts(run_id: str) -> dict[str, list]:
    """The run's artifacts by type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_type: dict[str, list] = {}
    for a in found:
        by_type.setdefault(a.type, []).append(a)
    return by_type


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


def _stored(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


def test_restore_latest_into_a_file_and_first_into_a_vm_directory(chain, tmp_path, qemu_img):
    from flows.restore import restore_vm
    from providers import open_source

    _, repo, copies, ids = chain
    run_id, state = _run(restore_vm, vm="db01", out=str(tmp_path / "latest.raw"), target=str(repo))
    latest = state.result()
    assert latest.export_id == ids[-1] and latest.disks[0].chain == ids[::-1]
    qemu.compare(copies / f"{ids[-1]}.raw", tmp_path / "latest.raw", "raw", "raw")
    [markdown] = _artifacts(run_id)["markdown"]
    assert f"Point `{ids[-1]}`" in markdown.data and "| disk0 |" in markdown.data
    assert f"| 4 ({' ← '.join(ids[::-1])}) |" in markdown.data  # chain length and links
    [progress] = _artifacts(run_id)["progress"]
    assert float(progress.data) == 100.0

    # the first point, into a directory, as qcow2: a VM directory the local source reads back
    (tmp_path / "vms").mkdir()
    vm_dir = tmp_path / "vms" / "db01"
    first = restore_vm(
        vm="db01", out=str(vm_dir), target=f"file://{repo}", at=ids[0], format="qcow2"
    )
    assert first.export_id == ids[0] and first.disks[0].chain == [ids[0]]
    qemu.check(vm_dir / "disk0.qcow2", "qcow2")
    qemu.compare(copies / f"{ids[0]}.raw", vm_dir / "disk0.qcow2", "raw", "qcow2")
    with open_source(f"local://{vm_dir.parent}") as src:
        [vm] = src.list_vms()
    assert (vm.name, vm.disks[0].backing, vm.disks[0].format) == ("db01", "disk0.qcow2", "qcow2")


def test_forget_dry_run_then_for_real(chain, tmp_path, qemu_img):
    from flows.forget import forget_backups
    from flows.restore import restore_vm

    _, shared, copies, ids = chain
    repo = tmp_path / "repo"
    shutil.copytree(shared, repo)  # the chain stays intact for the other tests
    before = _stored(repo)

    run_id, state = _run(forget_backups, vm="db01", target=str(repo), keep_last=2, dry_run=True)
    dry = state.result()
    assert dry.forgotten == [ids[1], ids[0]] and dry.rebased == [ids[2]] and not dry.steps
    assert _stored(repo) == before  # a dry run changes nothing
    [table] = _artifacts(run_id)["table"]
    rows = json.loads(table.data)
    assert [r["point"] for r in rows] == ids[::-1]
    assert [r["decision"] for r in rows] == ["kept", "kept"] + ["would be forgotten"] * 2
    assert "last snapshot" in rows[0]["reasons"]
    assert rows[1]["rebased"] and not rows[0]["rebased"] and not rows[2]["rebased"]
    assert "dry run" in table.description

    run_id, state = _run(forget_backups, vm="db01", target=f"file://{repo}", keep_last=2)
    done = state.result()
    assert done.kept == [ids[3], ids[2]] and done.forgotten == [ids[1], ids[0]]
    assert done.steps[0].startswith("write synthetic full")
    assert sorted(p.name for p in (repo / "db01").iterdir() if p.is_dir()) == sorted(ids[2:])
    [table] = _artifacts(run_id)["table"]
    rows = json.loads(table.data)
    assert [r["decision"] for r in rows] == ["kept", "kept", "forgotten", "forgotten"]
    assert rows[1]["rebased"] == "rebased on a synthetic full"
    for export_id in ids[2:]:  # both kept points restore equal to the disk at that point
        out = tmp_path / f"{export_id}.raw"
        r = restore_vm(vm="db01", out=str(out), target=str(repo), at=export_id)
        assert len(r.disks[0].chain) == ids.index(export_id) - 1
        qemu.compare(copies / f"{export_id}.raw", out, "raw", "raw")


def _fails_with_one_line(state, error: type, match: str) -> str:
    assert state.is_failed(), state
    with pytest.raises(error, match=match) as caught:
        state.result()
    line = str(caught.value)
    assert "\n" not in line and line in state.message, state.message
    return line


def test_bad_input_fails_the_run_with_one_line(chain, tmp_path, qemu_img):
    from flows.backup import backup_vm
    from flows.restore import restore_vm
    from hypersdk.crypto.keys import generate_key_file

    root, repo, _, _ = chain
    out = str(tmp_path / "x.raw")
    _, state = _run(restore_vm, vm="db01", out=out, target=str(repo), at="20990101T000000Z")
    _fails_with_one_line(state, ObjectNotFoundError, "no backup '20990101T000000Z' of VM 'db01'")
    _, state = _run(restore_vm, vm="nobody", out=out, target=str(repo))
    _fails_with_one_line(state, ObjectNotFoundError, "no backups of VM 'nobody'")

    # an encrypted point restored with another key: the object fails authentication
    generate_key_file(tmp_path / "k1")
    generate_key_file(tmp_path / "k2")
    secret = tmp_path / "secret-repo"
    backup_vm(
        vm="db01",
        source=str(root),
        target=str(secret),
        encryption={"method": "keyfile", "ref": str(tmp_path / "k1")},
    )
    wrong = {"method": "keyfile", "ref": str(tmp_path / "k2")}
    _, state = _run(restore_vm, vm="db01", out=out, target=str(secret), encryption=wrong)
    _fails_with_one_line(state, DecryptionError, r"disk0\.qcow2\.hsenc: wrong key or passphrase")
    assert not Path(out).exists()


def test_parameter_mistakes_create_no_run(prefect_api, tmp_path):
    from flows.forget import forget_backups
    from flows.restore import restore_vm

    runs = _flow_runs()
    repo = str(tmp_path / "repo")
    with pytest.raises(InvalidParameterError, match="retention policy is empty"):
        forget_backups(vm="db01", target=repo)
    with pytest.raises(InvalidParameterError, match="keep_last: 0 is not a count"):
        forget_backups(vm="db01", target=repo, keep_last=0)
    with pytest.raises(InvalidParameterError, match="carries the secret option"):
        forget_backups(vm="db01", target="s3://b/p?secret_access_key=x", keep_last=1)
    with pytest.raises(InvalidParameterError, match="absolute path"):
        restore_vm(vm="db01", out="relative/disk.raw", target=repo)
    with pytest.raises(InvalidParameterError, match="cannot restore a disk as 'ova'"):
        restore_vm(vm="db01", out=str(tmp_path / "o.ova"), target=repo, format="ova")
    with pytest.raises(InvalidParameterError, match="unknown target scheme"):
        restore_vm(vm="db01", out=str(tmp_path / "o"), target="ftp://x/y")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InvalidParameterError, match="not an existing directory"):
        restore_vm(vm="db01", out=str(blocker / "d.raw"), target=repo)
    with pytest.raises(InvalidParameterError, match="not an existing directory"):
        restore_vm(vm="db01", out=str(tmp_path / "no" / "such" / "d.raw"), target=repo)
    assert _flow_runs() == runs  # none of them created a flow run


def test_two_backups_of_one_vm_queue_on_a_prefect_concurrency_limit(
    prefect_api, tmp_path, monkeypatch
):
    """Both start at once; the second waits for the first's slot in Prefect (it never finds the
    repository's lock object taken), then builds its delta on the first's point."""
    import flows.export
    from flows.backup import backup_vm
    from flows.repo_slot import limit_name
    from hypersdk.repository.locks import RepositoryLock
    from providers import open_target
    from providers.targets.local import LocalTarget

    root, _ = make_vm(tmp_path)
    repo = tmp_path / "repo"
    events: list[tuple[str, float]] = []
    lock_taken = []  # a lock object found held by the other run

    real_slot, real_enter, real_exit = (
        flows.export.repository_slot,
        RepositoryLock.__enter__,
        RepositoryLock.__exit__,
    )
    real_put = LocalTarget.put_if_absent

    both_asked = threading.Event()

    def slot(target, vm):
        events.append(("asked", time.monotonic()))
        if [e for e, _ in events].count("asked") == 2:
            both_asked.set()
        return real_slot(target, vm)

    def enter(self):
        got = real_enter(self)
        events.append(("locked", time.monotonic()))
        both_asked.wait(120)  # hold it until the other run has asked for the slot...
        time.sleep(1.0)  # ... and is waiting for it
        return got

    def leave(self, *exc):
        events.append(("released", time.monotonic()))
        return real_exit(self, *exc)

    def put_if_absent(self, key, data):
        created = real_put(self, key, data)
        if key.endswith("lock.json") and not created:
            lock_taken.append(key)
        return created

    monkeypatch.setattr(flows.export, "repository_slot", slot)
    monkeypatch.setattr(RepositoryLock, "__enter__", enter)
    monkeypatch.setattr(RepositoryLock, "__exit__", leave)
    monkeypatch.setattr(LocalTarget, "put_if_absent", put_if_absent)

    results, errors = [], []

    def backup():
        try:
            results.append(backup_vm(vm="db01", source=str(root), target=str(repo)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=backup) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and len(results) == 2, errors
    assert sorted(r.kind for r in results) == ["full", "incremental"]
    kinds = [e for e, _ in events]
    assert kinds.count("asked") == 2, events
    assert [e for e in kinds if e != "asked"] == ["locked", "released"] * 2, events  # no overlap
    second_asked = [t for e, t in events if e == "asked"][1]
    first_released = next(t for e, t in events if e == "released")
    assert second_asked < first_released, events  # it asked while the first held the slot
    assert lock_taken == []  # ... and waited in Prefect, never on the lock object

    from prefect.client.orchestration import get_client

    with open_target(str(repo)) as target:
        name = limit_name(target.url, "db01")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)


def test_limit_names_are_stable_and_prefect_accepts_any_vm_name(tmp_path):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.repo_slot import limit_name, repository_slot
    from providers import open_target

    with (
        open_target(str(tmp_path / "repo")) as plain,
        open_target(f"file://{tmp_path}/repo/?cache=writeback") as spelled,
        open_target(str(tmp_path / "other")) as other,
    ):
        # one repository, one limit, however its URL was spelled; another repository, another
        assert limit_name(plain.url, "db01") == limit_name(spelled.url, "db01")
        assert limit_name(plain.url, "db01") != limit_name(other.url, "db01")
        assert limit_name(plain.url, "db01").startswith("hypersdk-repo:")
        hostile = ["a/b", "a_b", "50%&<x>", "é" * 100, "db01 ", "../../etc"]
        names = {limit_name(plain.url, vm) for vm in hostile}
        assert len(names) == len(hostile)
        for name in names:  # no character Prefect refuses in a limit name
            GlobalConcurrencyLimitCreate(name=name, limit=1)
        with repository_slot(plain, "db01") as held:  # outside a Prefect run: nothing
            assert held is None
