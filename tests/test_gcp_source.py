"""The GCP source against the Compute/Cloud Build REST fake (tests/gcp_compute, driven by the real
google-cloud-compute client) and fake-gcs-server (the export bucket): inventory; a backup of a VM
with two disks, full then incremental, restored equal to what the disks held (qemu-img compare),
the incremental storing only the blocks that changed; snapshot, image and export removed after
success, after a failed export and (by the next run) after a killed one; bad input is one line
and a non-zero exit; no credential in logs, manifests or the run's summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hypersdk.errors import SnapshotError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from tests.fixtures.gcp_compute import PROJECT, ZONE
from tests.points import assert_point_equals

MiB = 1024 * 1024
BS = 64 * 1024


def _vm(cloud, name="web1", sizes=(6 * MiB, 3 * MiB + 64 * 1024), **kwargs):
    disks = {f"{name}-boot": sizes[0], f"{name}-data": sizes[1]}
    paths = cloud.compute.add_instance(name, disks, **kwargs)
    for seed, path in enumerate(paths.values()):
        write_realistic_disk(path, os.path.getsize(path), seed=seed + 3)
    return list(paths.values())


def _run_objects(cloud) -> list[str]:
    """What runs leave in the bucket besides block maps: exports and run markers."""
    return [o for o in cloud.objects("hypersdk-gcp/") if "/maps/" not in o]


def test_inventory(gcp_cloud):
    from providers import open_source

    _vm(gcp_cloud, "web1")
    gcp_cloud.compute.add_instance(
        "old1", {"old1-disk": MiB}, machine_type="e2-medium", uefi=False, status="TERMINATED"
    )
    with open_source(gcp_cloud.source_url()) as src:
        vms = {vm.name: vm for vm in src.list_vms()}
        web = vms["web1"]
        assert (web.cpus, web.memory_mib, web.firmware, web.power_state) == (
            2,
            8192,
            "efi",
            "poweredOn",
        )
        assert [d.name for d in web.disks] == ["web1-boot", "web1-data"]
        assert all(d.capacity == 1024**3 for d in web.disks)  # sizeGb, whole GiB
        assert web.nics[0].network == "default" and web.nics[0].adapter == "GVNIC"
        assert web.machine_type == web.annotations["machine_type"] == "n2-standard-2"
        old = vms["old1"]
        assert (old.cpus, old.memory_mib, old.firmware, old.power_state) == (
            2,
            4096,
            "bios",
            "poweredOff",
        )
        assert src.get_vm("old1").id == old.id


def test_backup_full_then_incremental(gcp_cloud, prefect_api, tmp_path, caplog, qemu_img):
    from flows.backup import backup_vm
    from hypersdk.manifest import read_manifest
    from hypersdk.repository import manifest_key
    from hypersdk.summary import render_markdown
    from providers import open_target

    caplog.set_level(logging.DEBUG)
    disks = _vm(gcp_cloud, "db1")
    source = gcp_cloud.source_url()
    target = f"file://{tmp_path / 'repo'}"
    copies = []

    r1 = backup_vm(vm="db1", source=source, target=target, format="qcow2")
    assert r1.kind == "full"
    copies.append([d.read_bytes() for d in disks])
    for i, d in enumerate(r1.disks):
        work = tmp_path / f"p1-{i}"
        work.mkdir()
        (work / "copy.raw").write_bytes(copies[0][i])
        assert_point_equals(target, "db1", r1.export_id, work / "copy.raw", work, None, d.name)
    assert "no changed-block API" in r1.disks[0].note
    assert gcp_cloud.compute.leftovers() == {"snapshots": [], "images": []}
    assert _run_objects(gcp_cloud) == []  # export objects and run marker removed
    assert len(gcp_cloud.objects("hypersdk-gcp/maps/")) == 2  # one block map per disk

    changed = mutate_disk(disks[0], 4, seed=8)
    r2 = backup_vm(vm="db1", source=source, target=target, format="qcow2")
    assert r2.kind == "incremental"
    boot, data = r2.disks
    assert boot.incremental and boot.data_bytes == len(changed) * BS  # only the changed blocks
    assert data.incremental and data.data_bytes == 0  # nothing changed there
    assert "only blocks whose hash changed" in boot.note and "whole exported image" in boot.note
    for i, d in enumerate(r2.disks):
        work = tmp_path / f"p2-{i}"
        work.mkdir()
        assert_point_equals(target, "db1", r2.export_id, disks[i], work, None, d.name)
    assert gcp_cloud.compute.leftovers() == {"snapshots": [], "images": []}
    assert _run_objects(gcp_cloud) == []

    assert "restarting" not in caplog.text  # the export read each image in one forward pass

    # no credential anywhere a user or an attacker reads: logs, manifests, the run's summary
    with open_target(target) as t:
        manifests = [t.get_bytes(manifest_key("db1", r.export_id)).decode() for r in (r1, r2)]
        assert read_manifest(t, manifest_key("db1", r2.export_id)).source == source
    seen = caplog.text + "".join(manifests) + render_markdown(r1) + render_markdown(r2)
    for secret in gcp_cloud.secrets():
        assert secret not in seen
    assert str(gcp_cloud.credentials) not in "".join(manifests)


def test_failed_export_leaves_nothing(gcp_cloud):
    from providers import open_source

    _vm(gcp_cloud, "app1")
    gcp_cloud.compute.state.fail_exports = True
    with open_source(gcp_cloud.source_url()) as src, pytest.raises(SnapshotError) as err:
        src.create_snapshot("app1")
    assert "FAILURE" in str(err.value) and "\n" not in str(err.value)
    assert gcp_cloud.compute.leftovers() == {"snapshots": [], "images": []}
    assert _run_objects(gcp_cloud) == []


def test_killed_run_is_cleaned_by_the_next(gcp_cloud, tmp_path):
    """A run killed while it streams the exported image (SIGKILL of the process reading it; its
    snapshot is never released) leaves its export object and run marker; the next run of the
    same VM (stale_after tiny here) removes them before making its own."""
    from providers import open_source

    _vm(gcp_cloud, "app2", sizes=(16 * MiB, MiB))
    url = gcp_cloud.source_url(chunk_size=256 * 1024)
    with open_source(url) as src:
        snap = src.create_snapshot("app2")
    (tmp_path / "snap.json").write_text(snap.model_dump_json())
    script = textwrap.dedent(
        f"""
        import time
        from hypersdk.models import Snapshot
        from providers import split_options
        from providers.gcp.source import GcpSource  # not every source: a quick start
        snap = Snapshot.model_validate_json(open({str(tmp_path / "snap.json")!r}).read())
        src = GcpSource.from_url(*split_options({url!r})[:1], **split_options({url!r})[1])
        reader = src.open_disk(snap, snap.disks[0].disk)
        reader.read(0, 1024 * 1024)
        print("reading", flush=True)
        reader.read(8 * 1024 * 1024, 1024 * 1024)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],  # the checkout: providers/ importable
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "reading", proc.stderr.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = _run_objects(gcp_cloud)
    assert any(o.endswith(".tar.gz") for o in left) and any("/runs/" in o for o in left)
    # the image and snapshot went as soon as the export existed
    assert gcp_cloud.compute.leftovers() == {"snapshots": [], "images": []}
    with open_source(gcp_cloud.source_url(stale_after=0.001)) as src:
        time.sleep(0.01)
        snap2 = src.create_snapshot("app2")
        assert snap2.id != snap.id
        remaining = _run_objects(gcp_cloud)  # only the new run's: the killed run's are gone
        assert remaining and all(snap2.id in o for o in remaining)
        assert not set(left) & set(remaining)
        src.remove_snapshot(snap2)
    assert _run_objects(gcp_cloud) == []


def test_cleanup_of_a_run_stopped_mid_export(gcp_cloud):
    """A run that died while its image export build ran left a snapshot, an image and a build;
    ``cleanup`` (what the next run does with its stale markers) cancels the build and deletes
    them, and leaves a marker younger than ``older_than`` alone."""
    from providers import open_source
    from providers.gcp.export import RunPlan

    _vm(gcp_cloud, "app3")
    gcp_cloud.compute.state.export_delay = 30  # the build is still working when we stop
    with open_source(gcp_cloud.source_url()) as src:
        inst = src._instance("app3")
        plan = RunPlan(str(inst.id), "20261201T000000Z-deadbeef", [d.source for d in inst.disks])
        src.exporter.write_marker(plan)
        src.exporter.snapshot(plan, 0)
        src.exporter.image(plan, 0)
        plan.builds.append(src.exporter.start_export(plan, 0))
        src.exporter.write_marker(plan)
        assert gcp_cloud.compute.leftovers() == {
            "snapshots": [plan.resource(0)],
            "images": [plan.resource(0)],
        }
        # a planted marker naming what is not its own (a block map, another image) is ignored
        planted = RunPlan(str(inst.id), "20200101T000000Z-0badf00d", ["x"])
        fake = json.loads(planted.to_json("hypersdk-gcp"))
        fake.update(objects=["hypersdk-gcp/maps/precious.bmap"], images=[plan.resource(0)])
        bucket = gcp_cloud.gcs.client().bucket(gcp_cloud.bucket)
        bucket.blob("hypersdk-gcp/maps/precious.bmap").upload_from_string(b"keep me")
        bucket.blob(f"hypersdk-gcp/runs/{inst.id}/{planted.snap_id}.json").upload_from_string(
            json.dumps(fake)
        )
        assert src.cleanup("app3", older_than=3600) == []  # too young: maybe still running
        assert gcp_cloud.compute.leftovers()["images"] == [plan.resource(0)]
        assert src.cleanup("app3") == [plan.snap_id]
    assert gcp_cloud.compute.leftovers() == {"snapshots": [], "images": []}
    assert gcp_cloud.compute.state.builds[plan.builds[0]]["status"] == "CANCELLED"
    assert _run_objects(gcp_cloud) == [f"hypersdk-gcp/runs/{inst.id}/{planted.snap_id}.json"]
    assert bucket.blob("hypersdk-gcp/maps/precious.bmap").download_as_bytes() == b"keep me"


def _cli(capsys, *args) -> tuple[int, str]:
    from hypersdk.cli.main import main

    code = main(list(args))
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line(gcp_cloud, capsys, monkeypatch, tmp_path):
    _vm(gcp_cloud, "web2")
    url = gcp_cloud.source_url()
    code, err = _cli(capsys, "migrate", "ghost", "--source", url, "--target", str(tmp_path))
    _one_line(code, err, "ghost", "not found")
    other = url.replace(f"gcp://{PROJECT}/", "gcp://no-such-project/")
    code, err = _cli(capsys, "vms", "list", "--source", other)
    _one_line(code, err, "no-such-project")
    code, err = _cli(capsys, "vms", "list", "--source", url.replace(ZONE, "mars-north1-z"))
    _one_line(code, err, "mars-north1-z")
    code, err = _cli(capsys, "vms", "list", "--source", url + "&client_secret=x")
    _one_line(code, err, "client_secret")
    code, err = _cli(capsys, "vms", "list", "--source", f"gcp://{PROJECT}/not_a_zone")
    _one_line(code, err, "not a zone")

    # no Application Default Credentials at all (no file, no gcloud login, not on GCE)
    from google.auth.compute_engine import _metadata

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)
    code, err = _cli(capsys, "vms", "list", "--source", url)
    _one_line(code, err, "Application Default Credentials", "GOOGLE_APPLICATION_CREDENTIALS")
    # a key the token endpoint does not know is rejected, in one line
    creds = json.loads(gcp_cloud.credentials.read_text())
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    creds["private_key"] = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(creds))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(wrong))
    code, err = _cli(capsys, "vms", "list", "--source", url)
    _one_line(code, err, "credentials rejected")
    assert creds["private_key"].splitlines()[1] not in err
