"""The Azure source through its API, driven by the real SDK clients against the fake cloud
(ARM REST fake + Azurite behind the page-diff proxy; tests/azure_mgmt/README.md): inventory,
full and incremental page maps, reads, access grants always revoked, the previous snapshot's
loss, bad input, and no SAS in any log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hypersdk.errors import (
    CredentialsError,
    HyperSDKError,
    InvalidParameterError,
    SourceError,
    VMNotFoundError,
)
from hypersdk.extents import Extent, ExtentMap
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers import open_source
from tests.fixtures.azure_mgmt import CREDENTIAL_ENV

MiB = 1024 * 1024
BS = 64 * 1024


def _vm_with_data(azure_rg, tmp_path, name="vm1", sizes=(6 * MiB, 4 * MiB), seed=3):
    disks = {f"{name}-os": sizes[0], f"{name}-data": sizes[1]}
    azure_rg.add_vm(name, disks)
    files = {}
    for i, (disk, size) in enumerate(disks.items()):
        path = tmp_path / f"{disk}.raw"
        write_realistic_disk(path, size, seed=seed + i)
        azure_rg.write_file(disk, path)
        files["os" if i == 0 else "lun0"] = (disk, path)
    return files


def _data_map(path) -> ExtentMap:
    """The 64 KiB blocks of ``path`` holding anything but zeros (what was written)."""
    data = path.read_bytes()
    return ExtentMap(
        len(data),
        [
            Extent(o, min(BS, len(data) - o))
            for o in range(0, len(data), BS)
            if data[o : o + BS].strip(b"\0")
        ],
    )


def test_inventory(azure_rg):
    azure_rg.add_vm("web", {"web-os": 2 * MiB, "web-data1": 3 * MiB, "web-data2": MiB})
    azure_rg.add_vm("tl", {"tl-os": MiB}, size="Standard_D4s_v3", security_type="TrustedLaunch")
    azure_rg.add_vm("off", {"off-os": MiB}, size="Standard_B1s", power="deallocated")
    with open_source(azure_rg.url) as src:
        vms = {v.name: v for v in src.list_vms()}  # three VMs over two pages (nextLink)
        assert sorted(vms) == ["off", "tl", "web"]
        web = vms["web"]
        assert [(d.name, d.capacity, d.backing) for d in web.disks] == [
            ("os", 2 * MiB, "web-os"),
            ("lun0", 3 * MiB, "web-data1"),
            ("lun1", MiB, "web-data2"),
        ]
        assert (web.cpus, web.memory_mib, web.firmware, web.guest_os) == (2, 8192, "bios", "Linux")
        assert web.power_state == "poweredOn" and web.machine_type == "Standard_D2s_v3"
        assert [n.network for n in web.nics] == ["web-nic0"]
        tl = vms["tl"]
        assert (tl.firmware, tl.cpus, tl.annotations["security_type"]) == (
            "efi",
            4,
            "TrustedLaunch",
        )
        assert vms["off"].power_state == "poweredOff" and vms["off"].memory_mib == 1024
        assert src.get_vm("web") == web
        assert src.get_vm(web.id).name == "web"  # by vmId too
        with pytest.raises(VMNotFoundError, match="'nope' not found"):
            src.get_vm("nope")


def test_full_then_incremental_page_maps_and_reads(azure_rg, tmp_path):
    files = _vm_with_data(azure_rg, tmp_path)
    os_disk, os_file = files["os"]
    with open_source(azure_rg.url, poll_interval=0.05) as src:
        snap1 = src.create_snapshot("vm1")
        assert snap1.consistency == "crash-consistent" and len(snap1.disks) == 2
        for sd in snap1.disks:
            ch = src.changed_extents(snap1, sd.disk, None)
            assert not ch.incremental and ch.change_id == sd.change_id
            assert ch.extents == _data_map(files[sd.disk.name][1])  # the written pages only
            reader = src.open_disk(snap1, sd.disk, ch.extents)
            try:
                assert reader.read(0, reader.size) == files[sd.disk.name][1].read_bytes()
            finally:
                reader.close()
        src.remove_snapshot(snap1)
        assert azure_rg.active_grants() == []  # every grant revoked, snapshots kept as bases
        assert len(azure_rg.snapshots()) == 2

        changed = mutate_disk(os_file, 6, seed=11)
        azure_rg.write_file(os_disk, os_file, offsets=changed)
        snap2 = src.create_snapshot("vm1")
        os2 = next(sd for sd in snap2.disks if sd.disk.name == "os")
        since = snap1.disks[0].change_id
        ch = src.changed_extents(snap2, os2.disk, since)
        assert ch.incremental and ch.since == since
        # exactly the written blocks: Azurite alone answers every page (its issue 812)
        assert ch.extents == ExtentMap(os2.disk.capacity, [Extent(o, BS) for o in changed])
        reader = src.open_disk(snap2, os2.disk, ch.extents)
        try:
            data = os_file.read_bytes()
            for o in changed:
                assert reader.read(o, BS) == data[o : o + BS]
        finally:
            reader.close()
        lun2 = next(sd for sd in snap2.disks if sd.disk.name == "lun0")
        ch = src.changed_extents(snap2, lun2.disk, snap1.disks[1].change_id)
        assert ch.incremental and ch.extents.data_bytes == 0  # nothing written there
        src.remove_snapshot(snap2)
        assert azure_rg.active_grants() == []
        # the next export pruned what the base no longer needs: only bases and the new ones
        assert sorted(azure_rg.snapshots()) == sorted(
            [s.rsplit("/", 1)[1] for s in (sd.change_id for sd in snap1.disks + snap2.disks)]
        )


def test_azurite_alone_would_diff_every_page(azure_rg, tmp_path):
    """Why the fixture corrects Azurite (its issue 812): uncorrected, an incremental of one
    changed block would move every written page; corrected, that one block."""
    files = _vm_with_data(azure_rg, tmp_path, "vm0", sizes=(2 * MiB, MiB))
    disk, path = files["os"]
    proxy = azure_rg.cloud.proxy
    with open_source(azure_rg.url, poll_interval=0.05) as src:
        snap1 = src.create_snapshot("vm0")
        changed = mutate_disk(path, 1, seed=4)
        azure_rg.write_file(disk, path, offsets=changed)
        snap2 = src.create_snapshot("vm0")
        since, sd = snap1.disks[0].change_id, snap2.disks[0]
        proxy.correct_diffs = False
        try:
            raw = src.changed_extents(snap2, sd.disk, since)
        finally:
            proxy.correct_diffs = True
        fixed = src.changed_extents(snap2, sd.disk, since)
        src.remove_snapshot(snap2)
    assert raw.incremental and raw.extents == _data_map(path)  # every written page
    assert fixed.extents == ExtentMap(sd.disk.capacity, [Extent(changed[0], BS)])


def test_cleared_pages_are_zero_extents(azure_rg, tmp_path):
    azure_rg.add_vm("trim", {"trim-os": 2 * MiB})
    azure_rg.write("trim-os", 0, os.urandom(2 * MiB))
    with open_source(azure_rg.url, poll_interval=0.05) as src:
        snap1 = src.create_snapshot("trim")
        blob = azure_rg.cloud.arm.disk_blob(azure_rg.sub, azure_rg.name, "trim-os")
        blob.clear_page(offset=BS, length=2 * BS)  # a TRIM of two whole blocks
        blob.clear_page(offset=5 * BS, length=512)  # and of one sector
        snap2 = src.create_snapshot("trim")
        ch = src.changed_extents(snap2, snap2.disks[0].disk, snap1.disks[0].change_id)
        assert list(ch.extents) == [Extent(BS, 2 * BS, zero=True), Extent(5 * BS, BS)]
        src.remove_snapshot(snap2)


def test_previous_snapshot_gone_or_foreign_gives_full_with_reason(azure_rg, tmp_path):
    files = _vm_with_data(azure_rg, tmp_path, "vm2", sizes=(2 * MiB, MiB))
    with open_source(azure_rg.url, poll_interval=0.05, keep_snapshot=False) as src:
        snap1 = src.create_snapshot("vm2")
        src.remove_snapshot(snap1)  # keep_snapshot=false: deleted, not kept as a base
        assert azure_rg.snapshots() == []
        snap2 = src.create_snapshot("vm2")
        disk = snap2.disks[0].disk
        ch = src.changed_extents(snap2, disk, snap1.disks[0].change_id)
        assert not ch.incremental and "is gone: full export" in ch.note
        assert ch.extents == _data_map(files["os"][1])
        for hostile in ("../../etc/passwd", snap2.disks[0].change_id.replace(azure_rg.sub, "x")):
            ch = src.changed_extents(snap2, disk, hostile)
            assert not ch.incremental and "not a snapshot of ours" in ch.note
        # the data disk's snapshot is no base for the OS disk
        ch = src.changed_extents(snap2, disk, snap2.disks[1].change_id)
        assert not ch.incremental and "of another disk" in ch.note
        src.remove_snapshot(snap2)
        assert azure_rg.snapshots() == [] and azure_rg.active_grants() == []


def test_grant_revoked_when_a_read_fails(azure_rg, tmp_path):
    _vm_with_data(azure_rg, tmp_path, "vm3", sizes=(MiB, MiB))
    with open_source(azure_rg.url, poll_interval=0.05, attempts=1) as src:
        snap = src.create_snapshot("vm3")
        reader = src.open_disk(snap, snap.disks[0].disk)
        assert azure_rg.active_grants() == [snap.provider_data["snapshots"]["os"]]
        # access ends under the reader (as when an export outlives its grant): one typed error
        name = snap.provider_data["snapshots"]["os"]
        azure_rg.cloud.arm.revoke(azure_rg.sub, azure_rg.name, name)
        with pytest.raises(CredentialsError, match="access SAS refused"):
            reader.read(0, BS)
        azure_rg.cloud.arm.grant(
            azure_rg.sub, azure_rg.name, name, {"access": "Read", "durationInSeconds": 60}
        )
        assert azure_rg.active_grants() == [name]
        reader.close()  # the finally of every export
        assert azure_rg.active_grants() == []
        src.remove_snapshot(snap)


def test_bad_input_is_one_typed_error(azure_rg, azure_cloud, capsys, tmp_path):
    from hypersdk.cli.main import main

    azure_rg.add_vm("vm4", {"vm4-os": MiB})
    with open_source(azure_rg.url) as src, pytest.raises(VMNotFoundError, match="'ghost'"):
        src.get_vm("ghost")
    # an unknown VM, as a user names it: checked before any run starts
    assert main(["migrate", "ghost", "--source", azure_rg.url, "--target", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "VM 'ghost' not found" in err and "\n" not in err, err
    unknown = azure_cloud.source_url("00000000-1111-2222-3333-444444444444", "rg")
    cases = [
        (unknown, "subscription 00000000-1111-2222-3333-444444444444 not found"),
        (azure_cloud.source_url(azure_rg.sub, "no-such-rg"), "resource group 'no-such-rg'"),
        ("azure://not-a-guid/rg", "is not a subscription id"),
        (azure_rg.url + "&sig=abc", "carries the secret option sig"),
        (azure_rg.url.replace("ca_file", "nope"), "has no option nope"),
        (azure_rg.url.replace("https", "http"), "management_url must be https"),
    ]
    for url, message in cases:
        assert main(["vms", "list", "--source", url]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    # no trust for the fake's certificate: one line naming the option
    no_ca = azure_cloud.source_url(azure_rg.sub, azure_rg.name).split("&ca_file")[0]
    assert main(["vms", "list", "--source", no_ca]) != 0
    err = capsys.readouterr().err.strip()
    assert "TLS certificate not trusted" in err and "\n" not in err
    # no credentials anywhere: DefaultAzureCredential finds none (every step of its chain
    # tried); as a user runs it: one line on stderr, exit 1
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    hyperctl = str(Path(sys.executable).with_name("hyperctl"))
    res = subprocess.run(
        [hyperctl, "vms", "list", "--source", azure_rg.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: azure://{azure_rg.sub}/{azure_rg.name}: listing VMs: no Azure credentials found "
        "(DefaultAzureCredential: set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, use "
        "a managed identity, or run `az login`)"
    ], res.stderr
    with pytest.raises(InvalidParameterError):
        open_source("azure://" + azure_rg.sub)  # no resource group


def test_no_sas_in_logs(azure_rg, tmp_path, caplog):
    files = _vm_with_data(azure_rg, tmp_path, "vm5", sizes=(MiB, MiB))
    caplog.set_level(logging.DEBUG)
    with open_source(azure_rg.url, poll_interval=0.05) as src:
        snap = src.create_snapshot("vm5")
        sd = snap.disks[0]
        ch = src.changed_extents(snap, sd.disk, None)
        reader = src.open_disk(snap, sd.disk, ch.extents)
        try:
            assert reader.read(0, MiB) == files["os"][1].read_bytes()
            logging.getLogger("httpx").info("GET %s", reader.url)  # as httpx itself logs
        finally:
            reader.close()
        src.remove_snapshot(snap)
    sigs = azure_rg.cloud.proxy.issued
    assert sigs and caplog.text
    from urllib.parse import quote

    for sig in sigs:
        assert sig not in caplog.text and quote(sig, safe="") not in caplog.text
    assert "sig=***" in caplog.text


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from providers import open_source
    src = open_source(sys.argv[1], poll_interval=0.05)
    snap = src.create_snapshot(sys.argv[2])
    sd = snap.disks[0]
    ch = src.changed_extents(snap, sd.disk, None)
    reader = src.open_disk(snap, sd.disk, ch.extents)
    print(snap.provider_data["snapshots"]["os"], flush=True)
    reader.read(0, reader.size)  # held by the proxy: killed here
    """
)


def test_killed_run_leaves_grant_and_snapshot_the_next_run_removes(azure_rg, tmp_path):
    files = _vm_with_data(azure_rg, tmp_path, "vm6", sizes=(MiB, MiB))
    blob = azure_rg.cloud.arm.disk_blob(azure_rg.sub, azure_rg.name, files["os"][0])
    path = "/" + blob.url.split("/", 3)[3]
    release = azure_rg.cloud.proxy.hold(path)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, azure_rg.url, "vm6"],
        stdout=subprocess.PIPE,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        killed = proc.stdout.readline().decode().strip()
        deadline = time.monotonic() + 30
        while not azure_rg.cloud.proxy.seen_gets.get(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert azure_rg.cloud.proxy.seen_gets.get(path), "the killed run never downloaded"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert azure_rg.active_grants() == [killed]  # what a killed run leaves behind
    assert killed in azure_rg.snapshots()
    with open_source(azure_rg.url, poll_interval=0.05) as src:  # the next run of the VM
        snap = src.create_snapshot("vm6")
        for sd in snap.disks:
            src.changed_extents(snap, sd.disk, None)
        src.remove_snapshot(snap)
    assert azure_rg.active_grants() == []
    assert killed not in azure_rg.snapshots()
    assert sorted(azure_rg.snapshots()) == sorted(snap.provider_data["snapshots"].values())
    assert azure_rg.cloud.arm.delete_refusals == 0  # revoked before deleting, as Azure needs


def test_errors_are_typed_not_raw(azure_rg):
    with pytest.raises(HyperSDKError):
        open_source(azure_rg.url, workers=0)
    with open_source(azure_rg.url) as src, pytest.raises(SourceError):
        src.create_snapshot("missing-vm")
