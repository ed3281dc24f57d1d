"""Azure Blob target against a real Azurite on 127.0.0.1: staged block upload of an export,
ranged reads, access tier, nothing visible after a failure, clear errors."""

from __future__ import annotations

import socket
import time

import pytest
from pydantic import SecretStr

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    InvalidParameterError,
    ObjectNotFoundError,
    TargetError,
)
from providers import open_target
from providers.targets.azure_blob import AzureBlobTarget, MiB
from tests.fixtures.azurite import ACCOUNT, KEY
from tests.targets_common import SIZE, export, make_disk, read_back


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return make_disk(tmp_path_factory.mktemp("az"), seed=7)


def test_schemes_registered(azurite):
    for scheme in ("az", "azure"):
        t = open_target(f"{scheme}://cont/pre", **azurite.options())
        assert isinstance(t, AzureBlobTarget) and t.url == "az://cont/pre"


def test_staged_block_export_ranged_readback(azurite, disk):
    container = azurite.new_container()
    t = AzureBlobTarget.from_url(
        f"az://{container}/exports", **azurite.options(tier="Cool", block_size=4 * MiB)
    )
    assert export(t, "vm1/disk.raw", disk) == SIZE
    props = t.properties("vm1/disk.raw")
    assert props.size == SIZE and props.blob_type == "BlockBlob"
    assert props.blob_tier == "Cool"
    blocks, _ = (
        azurite.service().get_blob_client(container, "exports/vm1/disk.raw").get_block_list("all")
    )
    assert len(blocks) == 10  # 40 MiB in 4 MiB blocks: it really was staged block by block
    assert read_back(t, "vm1/disk.raw") == disk.read_bytes()
    [info] = list(t.list("vm1/"))
    assert (info.key, info.size) == ("vm1/disk.raw", SIZE)


def test_small_blob_listing_delete(azurite):
    t = AzureBlobTarget.from_url(
        f"az://{azurite.new_container()}", connection_string=azurite.connection_string, tier="Hot"
    )
    for i in range(4):
        t.put_bytes(f"m/{i}.json", b"y" * (i + 1))
    assert t.get_bytes("m/2.json") == b"yyy"
    assert t.properties("m/2.json").blob_tier == "Hot"
    assert [o.key for o in t.list("m/")] == [f"m/{i}.json" for i in range(4)]
    t.delete("m/0.json")
    t.delete("m/0.json")  # twice is fine
    assert not t.exists("m/0.json")
    with pytest.raises(ObjectNotFoundError):
        t.open_reader("m/0.json")


def test_credentials_from_environment(azurite, monkeypatch):
    container = azurite.new_container()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    t = AzureBlobTarget.from_url(f"az://{container}")
    t.put_bytes("k", b"env")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_KEY", KEY)
    t2 = AzureBlobTarget.from_url(f"az://{container}", account_url=azurite.account_url)
    assert t2.get_bytes("k") == b"env"


def test_failure_after_blocks_leaves_nothing_then_retry(azurite, disk):
    container = azurite.new_container()
    t = AzureBlobTarget.from_url(f"az://{container}/x", **azurite.options(block_size=4 * MiB))
    data = disk.read_bytes()
    with pytest.raises(RuntimeError, match="injected"), t.open_writer("disk.raw", SIZE) as w:
        for off in range(0, 5 * 4 * MiB, MiB):
            w.write(data[off : off + MiB])
        raise RuntimeError("injected failure after 5 blocks")
    blob = azurite.service().get_blob_client(container, "x/disk.raw")
    assert not blob.exists()
    assert list(t.list()) == []
    with t.open_writer("disk.raw", SIZE) as w:
        w.write(data)
    assert t.get_bytes("disk.raw") == data
    committed, uncommitted = blob.get_block_list("all")
    assert len(committed) == 10 and uncommitted == []


def test_invalid_options(azurite):
    with pytest.raises(InvalidParameterError, match="access tier"):
        AzureBlobTarget("c", tier="Lukewarm", **{k: v for k, v in azurite.options().items()})
    with pytest.raises(InvalidParameterError):
        AzureBlobTarget.from_url("az:///nocontainer")


def test_no_credentials_clear_error(monkeypatch):
    for var in (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CredentialsError, match="AZURE_STORAGE_CONNECTION_STRING"):
        AzureBlobTarget.from_url("az://c")


def test_missing_container_clear_error(azurite):
    t = AzureBlobTarget.from_url("az://nosuch-container", **azurite.options())
    with pytest.raises(TargetError, match=r"^az://nosuch-container: container does not exist"):
        t.put_bytes("k", b"data")
    with pytest.raises(TargetError, match="container does not exist"):
        t.open_reader("k")
    with pytest.raises(TargetError, match="container does not exist"):
        list(t.list())


def test_bad_key_rejected(azurite):
    container = azurite.new_container()
    bad = "QmFkS2V5" * 11
    t = AzureBlobTarget.from_url(f"az://{container}", **azurite.options(account_key=bad))
    with pytest.raises(CredentialsError, match="credentials rejected") as exc:
        t.put_bytes("k", b"data")
    assert bad not in str(exc.value)


def test_unreachable_endpoint_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = AzureBlobTarget(
        "c",
        account=ACCOUNT,
        account_url=f"http://127.0.0.1:{port}/{ACCOUNT}",
        account_key=KEY,
        max_attempts=2,
        connect_timeout=1,
    )
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"127.0.0.1:{port}"):
        t.put_bytes("k", b"x")
    assert time.monotonic() - started < 10


def test_sas_token(azurite):
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        ACCOUNT,
        KEY,
        resource_types=ResourceTypes(container=True, object=True),
        permission=AccountSasPermissions(read=True, write=True, list=True, delete=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    container = azurite.new_container()
    t = AzureBlobTarget.from_url(
        f"az://{container}/s", account_url=azurite.account_url, sas_token=SecretStr(sas)
    )
    t.put_bytes("k", b"sas")
    assert t.get_bytes("k") == b"sas"
    assert [o.key for o in t.list()] == ["k"]
