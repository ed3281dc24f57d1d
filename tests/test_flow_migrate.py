"""migrate_vm end to end on the local provider: full, incremental, verify, and bad input."""

from __future__ import annotations

import json
import os

import pytest

from hypersdk.errors import HyperSDKError, InvalidParameterError, TargetError, VMNotFoundError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from hypersdk.manifest import ExportManifest
from providers.sources.local import create_vm
from tests import qemu
from tests.points import assert_point_equals

MiB = 1024 * 1024
BS = 64 * 1024


@pytest.fixture
def vm_root(tmp_path):
    root = tmp_path / "vms"
    d = create_vm(root, "app01", {"disk0": 24 * MiB + 12345})
    write_realistic_disk(d / "disk0.img", 24 * MiB + 12345, seed=11)
    return root


def _snapshots_left(vm_root) -> list:
    return list((vm_root / "app01/.hypersdk/snapshots").iterdir())


def test_full_then_incremental_qcow2(prefect_api, vm_root, tmp_path, qemu_img):
    from flows.migrate import migrate_vm

    target = tmp_path / "exports"
    disk = vm_root / "app01/disk0.img"
    r1 = migrate_vm(
        source=f"local://{vm_root}", target=f"file://{target}", vm="app01", format="qcow2"
    )
    assert r1.kind == "full" and r1.verified
    out1 = target / r1.disks[0].key
    qemu.check(out1, "qcow2")
    qemu.compare(disk, out1, "raw", "qcow2")
    manifest = ExportManifest.from_json(
        (target / f"app01/{r1.export_id}/manifest.json").read_bytes()
    )
    assert manifest.disks[0].object_size == os.path.getsize(out1)
    assert sum(n for _, n, _ in manifest.disks[0].chunks) == manifest.disks[0].virtual_size

    changed = mutate_disk(disk, 6, seed=4)
    r2 = migrate_vm(
        source=f"local://{vm_root}", target=f"file://{target}", vm="app01", format="qcow2"
    )
    d2 = r2.disks[0]
    assert r2.kind == "incremental" and d2.incremental and d2.base_key == r1.disks[0].key
    # only the changed blocks were read from the source
    assert d2.data_bytes == sum(min(BS, os.path.getsize(disk) - o) for o in changed)
    assert d2.stages["download"]["bytes"] == d2.data_bytes
    out2 = target / d2.key
    assert out2.name == "disk0.hsdelta" and d2.format == "hsdelta"
    m2 = ExportManifest.from_json((target / f"app01/{r2.export_id}/manifest.json").read_bytes())
    link = m2.disks[0].parent
    assert link.export_id == r1.export_id and link.object_blake3 == manifest.disks[0].object_blake3
    assert_point_equals(f"file://{target}", "app01", r2.export_id, disk, tmp_path)  # base + delta
    assert os.path.getsize(out2) < os.path.getsize(out1) / 4
    assert not _snapshots_left(vm_root)

    # --full ignores history
    r3 = migrate_vm(
        source=f"local://{vm_root}", target=f"file://{target}", vm="app01", incremental=False
    )
    assert r3.kind == "full" and not r3.disks[0].incremental


def test_raw_export_and_single_vm_source(prefect_api, vm_root, tmp_path, qemu_img):
    from flows.migrate import migrate_vm

    target = tmp_path / "out"
    r = migrate_vm(source=str(vm_root / "app01"), target=str(target), vm="app01", format="raw")
    qemu.compare(vm_root / "app01/disk0.img", target / r.disks[0].key, "raw", "raw")
    st = os.stat(target / r.disks[0].key)
    assert st.st_blocks * 512 < st.st_size  # sparse


def test_the_disks_of_a_vm_stream_at_the_same_time(prefect_api, tmp_path, monkeypatch):
    """Each disk's export waits at a barrier until the other's has begun: were the disks
    exported one after the other, the barrier would break and the run fail (no timing)."""
    import threading

    import flows.export
    from flows.migrate import migrate_vm

    d = create_vm(tmp_path / "vms", "two", {"disk0": 3 * MiB, "disk1": 2 * MiB})
    write_realistic_disk(d / "disk0.img", 3 * MiB, seed=1)
    write_realistic_disk(d / "disk1.img", 2 * MiB, seed=2)
    both_begun = threading.Barrier(2, timeout=60)
    export_disk = flows.export._export_disk

    def meet_then_export(*args):
        both_begun.wait()
        return export_disk(*args)

    monkeypatch.setattr(flows.export, "_export_disk", meet_then_export)
    r = migrate_vm(source=f"local://{d.parent}", target=f"file://{tmp_path / 'out'}", vm="two")
    assert [x.name for x in r.disks] == ["disk0", "disk1"] and r.verified


def _flow_runs() -> int:
    import asyncio

    from prefect.client.orchestration import get_client

    async def count():
        async with get_client() as client:
            return len(await client.read_flow_runs())

    return asyncio.run(count())


def test_bad_parameters_are_clear(prefect_api, vm_root, tmp_path):
    """Every mistake a run can find without side effects is one typed error, raised before a
    flow run exists."""
    from flows.migrate import migrate_vm

    runs = _flow_runs()
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(TargetError, match="not a directory"):
        migrate_vm(source=str(vm_root), target=str(blocker / "exports"), vm="app01")
    with pytest.raises(InvalidParameterError, match="name the VM"):
        migrate_vm(source=str(vm_root), target=str(tmp_path / "o"), vm="")
    with pytest.raises(HyperSDKError, match="unknown format 'vhdz'"):
        migrate_vm(source=str(vm_root), target=str(tmp_path / "o"), vm="app01", format="vhdz")
    with pytest.raises(InvalidParameterError, match="no option"):
        migrate_vm(
            source=str(vm_root),
            target=str(tmp_path / "o"),
            vm="app01",
            format_options={"bogus": "1"},
        )
    with pytest.raises(VMNotFoundError, match="nosuch"):
        migrate_vm(source=str(vm_root), target=str(tmp_path / "o"), vm="nosuch")
    with pytest.raises(InvalidParameterError, match="unknown source scheme"):
        migrate_vm(source="ftp://x/y", target=str(tmp_path / "o"), vm="app01")
    with pytest.raises(HyperSDKError, match="does not exist"):
        migrate_vm(source=str(tmp_path / "no-such-dir"), target=str(tmp_path / "o"), vm="app01")
    assert not (tmp_path / "o").exists()
    assert _flow_runs() == runs  # none of them created a flow run


def test_failure_removes_snapshot_and_publishes_nothing(
    prefect_api, vm_root, tmp_path, monkeypatch
):
    from flows.migrate import migrate_vm
    from providers.targets.local import LocalTarget

    real_writer = LocalTarget.writer

    def full_disk(self, key, expected_size=None):
        if key.endswith(".json"):  # the lock object and the manifest still write
            return real_writer(self, key, expected_size)
        raise TargetError(f"{self.location(key)}: No space left on device")

    # The lock object is written, the snapshot taken; then the disk's upload fails.
    monkeypatch.setattr(LocalTarget, "writer", full_disk)
    target = tmp_path / "exports"
    with pytest.raises(TargetError, match="No space left"):
        migrate_vm(source=str(vm_root), target=str(target), vm="app01")
    assert not _snapshots_left(vm_root)
    assert [p for p in target.rglob("*") if p.is_file()] == []  # no manifest, no lock


def test_manifest_detects_tampering(prefect_api, vm_root, tmp_path, qemu_img):
    from flows.migrate import migrate_vm
    from hypersdk.errors import VerificationError
    from hypersdk.verify import verify_export
    from providers import open_target

    target = tmp_path / "exports"
    r = migrate_vm(source=str(vm_root), target=str(target), vm="app01", format="qcow2")
    key = f"app01/{r.export_id}/manifest.json"
    t = open_target(str(target))
    assert verify_export(t, key)[0].ok
    path = target / r.disks[0].key
    mapping = json.loads(qemu.run("map", "--output=json", "-f", "qcow2", str(path)).stdout)
    host = next(m["offset"] for m in mapping if m["data"] and m.get("offset") is not None)
    with open(path, "r+b") as f:  # flip one byte of guest data inside the stored image
        f.seek(host + 100)
        byte = f.read(1)
        f.seek(host + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(VerificationError, match="differ"):
        verify_export(t, key)


def test_backup_forces_full_every_n_deltas(prefect_api, vm_root, tmp_path, qemu_img):
    from prefect.client.orchestration import get_client

    from flows.backup import backup_vm

    target = tmp_path / "backups"
    kinds = []
    for i in range(4):
        mutate_disk(vm_root / "app01/disk0.img", 2, seed=100 + i)
        r = backup_vm(vm="app01", source=str(vm_root), target=str(target), full_every=2)
        kinds.append(r.kind)
        assert_point_equals(
            f"file://{target}", "app01", r.export_id, vm_root / "app01/disk0.img", tmp_path
        )
    assert kinds == ["full", "incremental", "incremental", "full"]

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    latest = [a for a in asyncio.run(artifact()) if a.key == "export-app01"]
    assert latest and "Full export of `app01`" in latest[0].data


def test_ova_export_of_a_multi_disk_vm(prefect_api, tmp_path, qemu_img):
    """format=ova packages the whole VM (descriptor, manifest, every disk) as one object."""
    import subprocess
    import tarfile

    from flows.migrate import migrate_vm
    from hypersdk.ovf import parse_ovf

    root = tmp_path / "vms"
    d = create_vm(root, "multi", {"disk0": 6 * MiB, "disk1": 3 * MiB + 512})
    write_realistic_disk(d / "disk0.img", 6 * MiB, seed=1)
    write_realistic_disk(d / "disk1.img", 3 * MiB + 512, seed=2)
    target = tmp_path / "out"
    r = migrate_vm(source=str(root), vm="multi", target=str(target), format="ova")
    assert r.verified and len(r.disks) == 2 and r.disks[0].key == r.disks[1].key
    ova = target / r.disks[0].key
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf")
        vm, files = parse_ovf(tar.extractfile(names[0]).read())
        assert [f.disk.capacity for f in files] == [6 * MiB, 3 * MiB + 512]
        tar.extractall(tmp_path / "x", filter="data")
    assert vm.name == "multi" and vm.cpus == 2
    for name, f in zip(("disk0", "disk1"), files, strict=True):
        extracted = tmp_path / "x" / f.href
        res = subprocess.run(
            [
                "qemu-img",
                "compare",
                "-f",
                "raw",
                "-F",
                "vmdk",
                str(d / f"{name}.img"),
                str(extracted),
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_encrypted_export_decrypts_to_the_disk(prefect_api, vm_root, tmp_path, qemu_img):
    """encryption={keyfile}: the stored object is ciphertext; decrypted, it is the disk in qcow2."""
    from flows.migrate import migrate_vm
    from hypersdk.crypto import decrypt_file
    from hypersdk.crypto.keys import KeySpec, generate_key_file
    from hypersdk.errors import DecryptionError
    from hypersdk.verify import verify_export
    from providers import open_target

    key = tmp_path / "export.key"
    generate_key_file(key)
    target = tmp_path / "enc"
    spec = {"method": "keyfile", "ref": str(key)}
    r = migrate_vm(source=str(vm_root), vm="app01", target=str(target), encryption=spec)
    stored = target / r.disks[0].key
    assert r.encrypted and r.verified and stored.name.endswith(".qcow2.hsenc")
    assert not stored.read_bytes().startswith(b"QFI\xfb")
    manifest = ExportManifest.from_json(
        (target / f"app01/{r.export_id}/manifest.json").read_bytes()
    )
    params = manifest.disks[0].encryption
    assert params and "key" not in json.dumps(params).lower().replace("keyfile", "")
    plain = tmp_path / "plain.qcow2"
    decrypt_file(stored, plain, KeySpec.model_validate(spec))
    qemu.check(plain, "qcow2")
    qemu.compare(vm_root / "app01/disk0.img", plain, "raw", "qcow2")
    # the second run is an encrypted delta on the encrypted full, restored through the
    # container's random access; verification needs the key
    mutate_disk(vm_root / "app01/disk0.img", 2, seed=8)
    r2 = migrate_vm(source=str(vm_root), vm="app01", target=str(target), encryption=spec)
    assert r2.kind == "incremental" and r2.disks[0].key.endswith(".hsdelta.hsenc")
    assert not (target / r2.disks[0].key).read_bytes().startswith(b"HSDELTA")
    assert_point_equals(
        f"file://{target}",
        "app01",
        r2.export_id,
        vm_root / "app01/disk0.img",
        tmp_path,
        KeySpec.model_validate(spec),
    )
    other = tmp_path / "other.key"
    generate_key_file(other)
    with pytest.raises(DecryptionError):
        verify_export(
            open_target(str(target)),
            f"app01/{r2.export_id}/manifest.json",
            KeySpec(method="keyfile", ref=str(other)),
        )


def test_encryption_key_from_a_prefect_secret_block(prefect_api, vm_root, tmp_path, qemu_img):
    """encryption={secret-block}: the passphrase (or a raw key) lives in a Prefect Secret block;
    neither appears in the run's result or manifest, the export decrypts with the same spec, and
    a missing or empty block is a CredentialsError naming it."""
    from prefect.blocks.system import Secret

    from flows.migrate import migrate_vm
    from hypersdk.crypto import decrypt_file
    from hypersdk.crypto.keys import KeySpec
    from hypersdk.errors import CredentialsError

    passphrase = "correct horse battery staple 42"
    Secret(value=passphrase).save("hs-export-pass", overwrite=True)
    spec = {"method": "secret-block", "ref": "hs-export-pass"}
    target = tmp_path / "enc"
    r = migrate_vm(source=str(vm_root), vm="app01", target=str(target), encryption=spec)
    assert r.encrypted and r.verified
    manifest_bytes = (target / f"app01/{r.export_id}/manifest.json").read_bytes()
    assert passphrase.encode() not in manifest_bytes and passphrase not in repr(r)
    plain = tmp_path / "plain.qcow2"
    decrypt_file(target / r.disks[0].key, plain, KeySpec.model_validate(spec))
    qemu.compare(vm_root / "app01/disk0.img", plain, "raw", "qcow2")

    Secret(value="00" * 32).save("hs-export-key", overwrite=True)  # a raw 256-bit key, in hex
    assert KeySpec(method="secret-block", ref="hs-export-key", raw_key=True).resolve()
    with pytest.raises(CredentialsError, match="Secret block 'hs-no-such-block'"):
        KeySpec(method="secret-block", ref="hs-no-such-block").resolve()
    Secret(value=" ").save("hs-empty", overwrite=True)
    with pytest.raises(CredentialsError, match="empty"):
        KeySpec(method="secret-block", ref="hs-empty").resolve()


def test_encrypted_export_to_s3(prefect_api, moto_s3, vm_root, tmp_path, monkeypatch, qemu_img):
    """The same flow streams an encrypted qcow2 into an S3 multipart upload (moto server)."""
    from flows.migrate import migrate_vm
    from hypersdk.crypto import DecryptingReader
    from hypersdk.crypto.keys import KeySpec, generate_key_file
    from providers import open_target
    from tests.fixtures.moto_server import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = moto_s3.new_bucket()
    url = (
        f"s3://{bucket}/vms?endpoint_url={moto_s3.endpoint_url}&region={moto_s3.region}"
        "&addressing_style=path&storage_class=STANDARD_IA"
    )
    key = tmp_path / "k"
    generate_key_file(key)
    spec = KeySpec(method="keyfile", ref=str(key))
    r = migrate_vm(source=str(vm_root), vm="app01", target=url, encryption=spec.model_dump())
    assert r.verified and r.disks[0].location.startswith(f"s3://{bucket}/vms/app01/")
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"vms/{r.disks[0].key}")
    assert head.get("StorageClass") == "STANDARD_IA"
    target = open_target(url)
    reader = DecryptingReader(target.open_reader(r.disks[0].key), spec.resolve())
    plain = tmp_path / "plain.qcow2"
    plain.write_bytes(reader.read(0, reader.size))
    qemu.compare(vm_root / "app01/disk0.img", plain, "raw", "qcow2")
    with pytest.raises(InvalidParameterError, match="must not be given in a URL"):
        migrate_vm(source=str(vm_root), vm="app01", target=url + "&secret_access_key=x")


def test_incremental_chains_stop_where_readers_stop(prefect_api, vm_root, tmp_path, monkeypatch):
    """migrate_vm has no full_every by default: a full comes again once the chain is as long as
    readers follow (found the hard way: the 17th `make run` failed its verify)."""
    import hypersdk.repository.history as history
    from flows.migrate import migrate_vm

    monkeypatch.setattr(history, "MAX_DELTAS_IN_A_ROW", 2)
    target = tmp_path / "exports"
    kinds = []
    for i in range(4):
        mutate_disk(vm_root / "app01/disk0.img", 2, seed=200 + i)
        r = migrate_vm(vm="app01", source=str(vm_root), target=str(target))
        kinds.append(r.kind)
    assert kinds == ["full", "incremental", "incremental", "full"]
    assert "the longest chain kept" in r.disks[0].note


def test_the_longest_chain_kept_is_one_readers_open(tmp_path, qemu_img):
    """A full and MAX_DELTAS_IN_A_ROW deltas open; one more delta is past what readers follow."""
    from hypersdk.errors import FormatError
    from hypersdk.formats import open_image
    from hypersdk.repository import MAX_DELTAS_IN_A_ROW

    names = [tmp_path / f"layer{i}.qcow2" for i in range(MAX_DELTAS_IN_A_ROW + 2)]
    qemu.run("create", "-f", "qcow2", str(names[0]), "1M")
    for below, above in zip(names, names[1:], strict=False):
        res = qemu.run("create", "-f", "qcow2", "-b", below.name, "-F", "qcow2", str(above))
        assert res.returncode == 0, res.stderr
    with open_image(names[MAX_DELTAS_IN_A_ROW]) as image:  # full + MAX deltas
        assert image.size == 1 << 20
    with pytest.raises(FormatError, match="deeper than"):
        open_image(names[MAX_DELTAS_IN_A_ROW + 1])
