"""migrate_vm with a vsphere:// source: full, then incremental from CBT, then a failing run, all
against vcsim; credentials from the environment as govc documents them."""

from __future__ import annotations

import pytest

from hypersdk.errors import HyperSDKError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from tests import qemu
from tests.fixtures.vcsim import reconfigure, snapshot_names

MiB = 1024 * 1024
BS = 64 * 1024


@pytest.fixture
def govc_env(vcsim, monkeypatch):
    monkeypatch.setenv("GOVC_URL", f"https://{vcsim.host}:{vcsim.port}/sdk")
    monkeypatch.setenv("GOVC_USERNAME", vcsim.user)
    monkeypatch.setenv("GOVC_PASSWORD", vcsim.password)
    monkeypatch.setenv("GOVC_INSECURE", "1")


def test_migrate_vm_full_incremental_and_failure(prefect_api, vcsim, govc_env, tmp_path, qemu_img):
    from flows.migrate import migrate_vm
    from providers import open_source

    vm = "DC0_H0_VM0"
    size = 12 * MiB + 64 * 1024
    reconfigure(vcsim, vm, disk_size=size)
    flat = vcsim.flat_file(vm)
    write_realistic_disk(flat, size, seed=21)
    source = vcsim.source_url(f"DC0/vm/{vm}")
    with open_source(source) as src:
        src.enable_cbt(vm)
    target = tmp_path / "exports"

    r1 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    assert r1.kind == "full" and r1.verified and r1.vm == vm
    out1 = target / r1.disks[0].key
    qemu.compare(flat, out1, "raw", "qcow2")
    assert snapshot_names(vcsim, vm) == []

    changed = mutate_disk(flat, 5, seed=2)
    r2 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    d2 = r2.disks[0]
    assert r2.kind == "incremental" and d2.incremental and d2.base_key == r1.disks[0].key
    assert d2.data_bytes == len(changed) * BS  # CBT: only the changed blocks moved
    assert d2.stages["download"]["bytes"] == d2.data_bytes
    qemu.compare(flat, target / d2.key, "raw", "qcow2")  # base + delta == the new disk
    assert snapshot_names(vcsim, vm) == []

    blocked = tmp_path / "exports2"
    blocked.mkdir()
    (blocked / vm).write_text("a file where the VM's export directory should be")
    with pytest.raises(HyperSDKError):  # past the pre-run checks: fails while uploading
        migrate_vm(
            source=source, target=f"file://{blocked}", vm=vm, format="qcow2", incremental=False
        )
    assert snapshot_names(vcsim, vm) == []  # removed after the failure too


def test_credentials_from_prefect_secret_block(prefect_api, vcsim, monkeypatch):
    from prefect.blocks.system import Secret

    from providers import open_source
    from providers.vsphere import connection

    for var in ("GOVC_URL", "GOVC_USERNAME", "GOVC_PASSWORD", "GOVC_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    Secret(value={"username": vcsim.user, "password": vcsim.password}).save(
        "vcsim-login", overwrite=True
    )
    connection.logout_all()
    with open_source(vcsim.source_url(), secret="vcsim-login", insecure=True) as src:
        assert len(src.list_vms()) == 4
        assert vcsim.password not in repr(src.creds) and vcsim.password not in src.url
        assert "SecretStr('**********')" in repr(src.creds)
    Secret(value=json_login(vcsim.user, "wrong")).save("vcsim-bad", overwrite=True)
    with pytest.raises(HyperSDKError, match="wrong user name or password"):
        open_source(vcsim.source_url(), secret="vcsim-bad", insecure=True).list_vms()
    with pytest.raises(HyperSDKError, match="Secret block 'missing-block'"):
        open_source(vcsim.source_url(), secret="missing-block", insecure=True)


def json_login(user: str, password: str) -> str:
    import json

    return json.dumps({"username": user, "password": password})
