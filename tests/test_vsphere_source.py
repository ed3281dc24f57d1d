"""vSphere provider against vcsim: login, TLS, session pool, inventory, snapshots, CBT, CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    InvalidParameterError,
    VMNotFoundError,
)
from providers import open_source, source_classes
from providers.vsphere import connection
from providers.vsphere.connection import resolve_credentials
from tests.fixtures.vcsim import reconfigure, snapshot_names

MiB = 1024 * 1024
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


@pytest.fixture
def src(vcsim):
    with open_source(vcsim.source_url(), **vcsim.options()) as s:
        yield s


# -- credentials and connection ------------------------------------------------------------------
def test_scheme_registered():
    assert source_classes()["vsphere"].__name__ == "VSphereSource"


def test_govc_env_credentials():
    env = {"GOVC_URL": "https://alice:s%3Acret@vc.example.com/sdk", "GOVC_INSECURE": "1"}
    c = resolve_credentials("vc.example.com", env=env)
    assert (c.user, c.password.get_secret_value(), c.insecure) == ("alice", "s:cret", True)
    assert "s:cret" not in repr(c) and "s:cret" not in str(c.model_dump())
    # GOVC_USERNAME/PASSWORD win over the URL's, TLS verification stays on by default
    env = {**env, "GOVC_USERNAME": "bob", "GOVC_PASSWORD": "pw", "GOVC_INSECURE": ""}
    c = resolve_credentials("vc.example.com", env=env)
    assert (c.user, c.password.get_secret_value(), c.insecure) == ("bob", "pw", False)
    # a password embedded in GOVC_URL is never sent to another host
    with pytest.raises(CredentialsError, match="GOVC_USERNAME"):
        resolve_credentials("other.example.com", env={"GOVC_URL": "alice:pw@vc.example.com"})
    # host from GOVC_URL when the source URL has none
    c = resolve_credentials("", env={"GOVC_URL": "alice:pw@vc.example.com:8443"})
    assert (c.host, c.port) == ("vc.example.com", 8443)


def test_url_hides_credentials(vcsim):
    url = f"vsphere://{vcsim.user}:{vcsim.password}@{vcsim.host}:{vcsim.port}/DC0"
    with pytest.raises(InvalidParameterError, match="user info") as exc:  # no secrets in URLs
        open_source(url, insecure=True)
    assert vcsim.password not in str(exc.value)
    # a bare user name in the URL is fine: the password comes from an option, env or a block
    url = f"vsphere://{vcsim.user}@{vcsim.host}:{vcsim.port}/DC0"
    s = open_source(url, password=vcsim.password, insecure=True)
    assert s.url == f"vsphere://{vcsim.host}:{vcsim.port}/DC0"
    assert vcsim.password not in repr(s) and vcsim.password not in s.url
    assert len(s.list_vms()) == 4
    s.close()


def test_tls_verified_unless_insecure(vcsim):
    with pytest.raises(CredentialsError, match="not trusted.*GOVC_INSECURE"):
        open_source(vcsim.source_url(), user=vcsim.user, password=vcsim.password).list_vms()


def test_wrong_password_is_clear(vcsim, caplog):
    caplog.set_level(logging.DEBUG)
    s = open_source(vcsim.source_url(), **vcsim.options(password="wrong-secret-pw"))
    with pytest.raises(CredentialsError, match="wrong user name or password") as exc:
        s.list_vms()
    assert "wrong-secret-pw" not in str(exc.value) and "wrong-secret-pw" not in caplog.text


def test_unreachable_endpoint():
    with pytest.raises(EndpointUnreachableError, match="cannot reach vSphere"):
        open_source("vsphere://127.0.0.1:9", user="u", password="p", insecure=True).list_vms()


def test_session_pool_reused_and_revived(vcsim):
    connection.logout_all()
    a = open_source(vcsim.source_url(), **vcsim.options())
    b = open_source(vcsim.source_url(), **vcsim.options())
    assert a.session is b.session  # one session per host+user in a process
    a.close()
    b.close()
    first = open_source(vcsim.source_url(), **vcsim.options()).session
    first.content.sessionManager.Logout()  # the server drops it (expiry, restart)
    revived = open_source(vcsim.source_url(), **vcsim.options()).session
    assert revived is not first and revived.alive()
    unpooled = open_source(vcsim.source_url(), **vcsim.options(pooled=False))
    sess = unpooled.session
    assert sess is not revived
    unpooled.close()  # clean logout
    assert not sess.alive()


def test_session_expired_mid_export_logs_in_again(vcsim):
    """vCenter drops a session left idle while a long download runs on the data path: the
    export reads on, and the SOAP calls after it (inventory, snapshot removal) log in again
    instead of failing and leaving the snapshot behind."""
    vm = "DC0_H0_VM0"
    reconfigure(vcsim, vm, disk_size=8 * MiB)
    data = bytes(range(256)) * (6 * MiB // 256)
    vcsim.flat_file(vm).write_bytes(data)
    connection.logout_all()
    with open_source(vcsim.source_url(), **vcsim.options(workers=2)) as src:
        with src.snapshot(vm) as snap:
            disk = snap.disks[0].disk
            reader = src.open_disk(snap, disk)
            try:
                assert reader.read(0, MiB) == data[:MiB]
                expired = src.session
                expired.content.sessionManager.Logout()  # the server drops it mid-export
                assert reader.read(MiB, 2 * MiB) == data[MiB : 3 * MiB]
            finally:
                reader.close()
            assert len(src.list_vms()) == 4  # a SOAP call after the expiry
            assert src.session is not expired and src.session.alive()
            expired = src.session
            expired.content.sessionManager.Logout()  # and once more before the cleanup
        assert snapshot_names(vcsim, vm) == []  # removed on a fresh login
        assert src.session is not expired


# -- inventory -----------------------------------------------------------------------------------
def test_list_vms(src):
    vms = src.list_vms()
    assert [v.name for v in vms] == sorted(
        ["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"]
    )
    vm = next(v for v in vms if v.name == "DC0_H0_VM1")
    assert vm.id.startswith("vm-") and vm.annotations["datacenter"] == "DC0"
    assert vm.cpus >= 1 and vm.memory_mib >= 1 and vm.firmware == "bios"
    assert vm.power_state == "poweredOn" and vm.guest_os
    (disk,) = vm.disks
    assert disk.name == "scsi0-0" and disk.controller == "scsi0" and disk.key
    assert disk.backing == "[LocalDS_0] DC0_H0_VM1/disk1.vmdk" and disk.capacity > 0
    (nic,) = vm.nics
    assert nic.mac and nic.adapter == "e1000"
    # by name, by moref, and a source URL naming one VM by inventory path
    assert src.get_vm("DC0_H0_VM1").id == vm.id
    assert src.get_vm(vm.id).name == "DC0_H0_VM1"
    one = open_source(src.url + "/DC0/vm/DC0_H0_VM1", **_opts(src))
    assert [v.name for v in one.list_vms()] == ["DC0_H0_VM1"]


def _opts(src) -> dict:
    return {
        "user": src.creds.user,
        "password": src.creds.password.get_secret_value(),
        "insecure": True,
    }


def test_unknown_vm_and_path(src):
    with pytest.raises(VMNotFoundError, match="'nope' not found"):
        src.get_vm("nope")
    with pytest.raises(VMNotFoundError):
        src.get_vm("vm-999999")
    with pytest.raises(VMNotFoundError, match="inventory path"):
        open_source(src.url + "/DC0/vm/ghost", **_opts(src)).list_vms()
    with pytest.raises(VMNotFoundError):
        src.create_snapshot("nope")


# -- snapshots and CBT -----------------------------------------------------------------------------
def test_snapshot_removed_on_success_and_failure(vcsim, src):
    vm = "DC0_C0_RP0_VM0"
    with src.snapshot(vm) as snap:
        assert snap.consistency == "crash-consistent"  # Tools not running
        assert snapshot_names(vcsim, vm) == [snap.provider_data["name"]]
    assert snapshot_names(vcsim, vm) == []
    src.remove_snapshot(snap)  # idempotent
    with pytest.raises(RuntimeError, match="injected"), src.snapshot(vm):
        raise RuntimeError("injected failure")
    assert snapshot_names(vcsim, vm) == []


def test_a_dead_runs_snapshot_is_removed_by_the_next_snapshot(vcsim, src, monkeypatch):
    """A run killed outright leaves its hypersdk- snapshot; the next snapshot of the VM removes
    every one of ours older than STALE_SECONDS (a day; 0 here, so the first counts as old)."""
    from providers.vsphere import snapshots

    vm = "DC0_C0_RP0_VM1"
    dead = src.create_snapshot(vm)  # never removed: its run "died"
    monkeypatch.setattr(snapshots, "STALE_SECONDS", 0.0)
    with src.snapshot(vm) as snap:
        assert snapshot_names(vcsim, vm) == [snap.provider_data["name"]]
    assert dead.provider_data["name"] != snap.provider_data["name"]
    assert snapshot_names(vcsim, vm) == []


def test_remove_snapshot_from_another_process_view(vcsim, src):
    """A Snapshot carried across tasks (serialised) is removed by a fresh source."""
    from hypersdk.models import Snapshot

    snap = src.create_snapshot("DC0_C0_RP0_VM1")
    again = Snapshot.model_validate_json(snap.model_dump_json())
    connection.logout_all()
    with open_source(vcsim.source_url(), **vcsim.options()) as other:
        other.remove_snapshot(again)
        other.remove_snapshot(again)
    assert snapshot_names(vcsim, "DC0_C0_RP0_VM1") == []


def test_cbt_enable_status_and_paging(vcsim_factory):
    server = vcsim_factory("-cbt-max-extents", "3")
    vm = "DC0_H0_VM0"
    reconfigure(server, vm, disk_size=4 * MiB)
    data = bytearray(4 * MiB)
    for i in range(0, 4 * MiB, 256 * 1024):  # 16 separate 4 KiB islands
        data[i : i + 4096] = os.urandom(4096)
    server.flat_file(vm).write_bytes(data)
    with open_source(server.source_url(), **server.options()) as s:
        assert s.cbt_status(vm)["enabled"] is False
        snap = s.create_snapshot(vm)
        try:
            no_cbt = s.changed_extents(snap, snap.disks[0].disk, None)
        finally:
            s.remove_snapshot(snap)
        assert no_cbt.change_id is None and "hyperctl cbt enable" in no_cbt.note
        assert no_cbt.extents.data_bytes == 4 * MiB  # whole disk, nothing lost
        assert s.enable_cbt(vm) is True
        assert s.enable_cbt(vm) is False
        state = s.cbt_status(vm)
        assert state["enabled"] and state["disks"]["scsi0-0"]
        from providers.vsphere import cbt

        with s.snapshot(vm) as snap:
            ref = s.vm_ref(vm)
            from pyVmomi import vim

            sref = vim.vm.Snapshot(snap.provider_data["snapshot"], s.session.si._stub)
            res = cbt.query(ref, sref, int(snap.disks[0].disk.key), 4 * MiB, "*")
            assert res.calls == 6  # 16 extents, 3 per call (5 full pages + the rest)
            assert [e.offset for e in res.extents] == list(range(0, 4 * MiB, 256 * 1024))
            full = s.changed_extents(snap, snap.disks[0].disk, None)
            assert full.extents.data_bytes == 16 * 64 * 1024 and not full.incremental
            assert full.change_id == snap.disks[0].change_id
        assert snapshot_names(server, vm) == []


def test_cli_cbt(vcsim_factory):
    vcsim = vcsim_factory()  # a fresh server: CBT still off everywhere
    env = {
        **os.environ,
        "GOVC_URL": f"{vcsim.host}:{vcsim.port}",
        "GOVC_USERNAME": vcsim.user,
        "GOVC_PASSWORD": vcsim.password,
        "GOVC_INSECURE": "1",
    }
    url = vcsim.source_url()
    res = subprocess.run(
        [HYPERCTL, "cbt", "enable", "DC0_H0_VM1", "--source", url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "CBT enabled on DC0_H0_VM1" in res.stdout
    res = subprocess.run(
        [HYPERCTL, "cbt", "status", "DC0_H0_VM1", "--source", url, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert '"enabled": true' in res.stdout and '"scsi0-0": "52 ' in res.stdout
    res = subprocess.run(
        [HYPERCTL, "cbt", "status", "ghost", "--source", url],
        capture_output=True,
        text=True,
        env={**env, "GOVC_PASSWORD": "bad"},
        timeout=120,
    )
    assert res.returncode != 0 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert "wrong user name or password" in res.stderr


def test_remove_unknown_snapshot_is_a_noop(vcsim, src):
    from hypersdk.models import Snapshot, VMInfo

    bogus = Snapshot(
        id="x",
        vm=VMInfo(name="DC0_H0_VM0", id="vm-1"),
        disks=[],
        provider_data={"snapshot": "snapshot-999999"},
    )
    src.remove_snapshot(bogus)  # already gone (or never made): fine, and nothing else touched
    assert snapshot_names(vcsim, "DC0_H0_VM0") == []


def test_inventory_scale_few_round_trips(vcsim_factory):
    """1200 VMs: container views and RetrievePropertiesEx, no per-VM round trips."""
    server = vcsim_factory("-vms", "600")
    with open_source(server.source_url(), **server.options()) as s:
        stub = s.session.si._stub
        calls = []
        original = stub.InvokeMethod

        def counting(mo, info, args):
            calls.append(info.name)
            return original(mo, info, args)

        stub.InvokeMethod = counting
        try:
            vms = s.list_vms()
        finally:
            del stub.InvokeMethod
    assert len(vms) == 1200 and all(v.disks for v in vms)
    # datacenters, then all VMs in one RetrievePropertiesEx (vcsim ignores maxObjects, so no
    # ContinueRetrievePropertiesEx here); the rest is the datacenter's path: nothing per VM
    assert calls.count("RetrievePropertiesEx") == 2, calls
    assert len(calls) <= 12, calls  # (its time is a benchmark's matter: benchmarks/vsphere)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(("-tools-running",), "quiesced"), (("-tools-running", "-quiesce-fault"), "crash-consistent")],
)
def test_quiesced_snapshot_and_fallback(vcsim_factory, flags, expected):
    server = vcsim_factory(*flags)
    vm = "DC0_H0_VM0"
    with open_source(server.source_url(), **server.options()) as s:
        assert s.get_vm(vm).annotations["tools"] == "guestToolsRunning"
        with s.snapshot(vm) as snap:
            assert snap.consistency == expected
            assert snapshot_names(server, vm) == [snap.provider_data["name"]]  # no leftover
        assert snapshot_names(server, vm) == []
