"""Names from sources become single path components; URLs never carry secrets (hypersdk.names,
hypersdk.urls, and the one place providers open URLs)."""

from __future__ import annotations

import os

import pytest

from hypersdk.errors import InvalidParameterError
from hypersdk.names import (
    MAX_COMPONENT,
    check_export_id,
    component_name,
    is_export_id,
    safe_component,
)
from hypersdk.urls import check_url, redact_url
from providers import open_source, open_target

# --- names -----------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../victim/20261128T163952Z-b513c4cf/disk0",
    "../" * 9,
    "a/b/c/d/e/f/g/h/i/j",
    ".",
    "..",
    ".hidden.partial-123",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "100%",
    "%2E%2E",
    "nul\0byte",
    "tab\tnew\nline\r\x1b[31mred",
    "\u202eevil-rtl",
    "lone \udc80 surrogate",
    "disk 0 (système) \u65e5\u672c",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_component_is_one_safe_reversible_path_part(name, tmp_path):
    comp = safe_component(name)
    assert "/" not in comp and "\\" not in comp and "\0" not in comp
    assert not comp.startswith(".") and comp.isprintable()
    assert component_name(comp) == name  # reversible: the same name always maps back
    # a real file under that name stays directly inside the directory
    path = os.path.join(tmp_path, comp)
    assert os.path.dirname(os.path.normpath(path)) == str(tmp_path)
    with open(path, "wb") as f:
        f.write(b"x")
    assert os.listdir(tmp_path) == [comp]


def test_plain_names_stay_readable():
    for name in ("disk0", "scsi0:0", "web01", "20261128T163952Z-b513c4cf", "d.e.f"):
        assert safe_component(name) == name


def test_distinct_names_distinct_components():
    names = [*HOSTILE_NAMES, "%", "%25", "/", "%2F", ".a", "%2Ea", "a", "A"]
    comps = [safe_component(n) for n in names]
    assert len(set(comps)) == len(names)


def test_long_names_are_bounded_and_still_distinct(tmp_path):
    long_a = "a" * 400
    long_b = "a" * 399 + "b"
    wide = "\u65e5" * 300  # 3 UTF-8 bytes each
    escaped = "/" * 300  # 3 characters of escape each
    comps = [safe_component(n) for n in (long_a, long_b, wide, escaped)]
    for comp in comps:
        assert len(comp.encode()) <= MAX_COMPONENT
        (tmp_path / comp).write_bytes(b"")  # a valid file name on a real filesystem
    assert len(set(comps)) == 4
    with pytest.raises(InvalidParameterError, match="shortened"):
        component_name(comps[0])
    # an escape is never cut in half
    assert all(part[:2].isalnum() for part in comps[3].split("%")[1:-1])


def test_empty_and_malformed():
    with pytest.raises(InvalidParameterError, match="empty"):
        safe_component("", "disk name")
    with pytest.raises(InvalidParameterError, match="not an encoded name"):
        component_name("bad%zzescape")


def test_export_ids():
    for good in ("20261128T163952Z-b513c4cf", "ova-0123456789ab", "no-such-change-id"):
        assert is_export_id(good) and check_export_id(good) == good
    for bad in ("", ".", "..", "../x", "a/b", "a.b", "-x", "x" * 200, "id\n", None, 7):
        assert not is_export_id(bad)
        with pytest.raises(InvalidParameterError, match="malformed"):
            check_export_id(bad)


# --- URLs ------------------------------------------------------------------------------------

SECRET = "S3cr3tVa1ue"
SECRET_URLS = [
    f"vsphere://administrator:{SECRET}@vc.example.com/DC1/vm/web01",
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix",
    f"s3://AKIAEXAMPLE:ab/{SECRET}+x@bucket/prefix",  # a secret key holding a slash
    f"https://acct.blob.core.windows.net/c?sv=2022-11-02&ss=b&sig={SECRET}",
    f"az://container/p?sas_token={SECRET}",
    f"az://container/p?SAS={SECRET}",
    f"s3://bucket/p?storage_class=GLACIER&secret_access_key={SECRET}",
    f"s3://bucket/p?X-Amz-Signature={SECRET}",
    f"gs://bucket?token={SECRET}",
    f"gs://bucket?credentials_json={SECRET}",
    f"s3://bucket?endpoint_url=http%3A%2F%2Fminio%3A{SECRET}%40minio.local%3A9000",
    f"local:///vms?password={SECRET}",
    f"file:///exports#key={SECRET}",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_check_url_refuses_secrets_without_echoing_them(url):
    with pytest.raises(InvalidParameterError) as exc:
        check_url(url, "target URL")
    assert SECRET not in str(exc.value) and "target URL" in str(exc.value)
    assert SECRET not in redact_url(url)


def test_user_name_alone_is_fine_where_logins_exist():
    for url in (
        "vsphere://admin@vc.example.com/DC1",
        "local:///var/lib/vms",
        "/var/lib/vms",
        "C:\\vms",
        "file:///exports?cache=none",
        "s3://bucket/p?storage_class=GLACIER&endpoint_url=http://minio:9000",
        "vsphere://[::1]:8443/DC1",
    ):
        assert check_url(url, "source URL") == url
        assert redact_url(url) == url
    # a key id in an S3 URL's user info is refused: s3:// has no logins
    with pytest.raises(InvalidParameterError, match="user info") as exc:
        check_url("s3://AKIAEXAMPLEKEYID@bucket", "target URL")
    assert "AKIAEXAMPLEKEYID" not in str(exc.value)


def test_redact_keeps_what_is_not_secret():
    assert redact_url(f"vsphere://admin:{SECRET}@vc/DC") == "vsphere://admin:***@vc/DC"
    assert (
        redact_url(f"https://a.blob.core.windows.net/c?sv=2022&sig={SECRET}")
        == "https://a.blob.core.windows.net/c?sv=2022&sig=***"
    )


@pytest.mark.parametrize("url", SECRET_URLS)
def test_open_source_and_target_refuse_before_anything_runs(url):
    for opener in (open_source, open_target):
        with pytest.raises(InvalidParameterError) as exc:
            opener(url)
        assert SECRET not in str(exc.value)


def test_vsphere_host_parsing_never_quotes_a_password():
    from providers.vsphere.connection import _govc_url, _split_host

    with pytest.raises(InvalidParameterError) as exc:
        _split_host(f"admin:{SECRET}@vc.example.com:notaport")
    assert SECRET not in str(exc.value)
    with pytest.raises(InvalidParameterError) as exc:
        _govc_url({"GOVC_URL": f"https://admin:{SECRET}@[vc.example.com"})
    assert SECRET not in str(exc.value)
