"""hyperctl encrypt / decrypt as a user runs them: secrets never on argv, atomic outputs,
one-line errors on tampering or a wrong passphrase."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import cli_run
from tests.cli_run import one_line_error
from tests.fixtures.tools import need_tool


def hyperctl(*args, env=None):
    """``hyperctl ARGS`` with ``env`` added to ours."""
    return cli_run.hyperctl(*args, env=dict(os.environ, **(env or {})), timeout=120)


def nothing_published(directory: Path, name: str) -> None:
    assert not (directory / name).exists()
    assert not [p.name for p in directory.iterdir() if ".partial-" in p.name]


@pytest.fixture()
def plain(tmp_path):
    p = tmp_path / "plain.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return p


def test_key_file_round_trip_and_tamper(tmp_path, plain):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    res = hyperctl("encrypt", plain, tmp_path / "x.enc", "--key-file", key, "-q")
    assert res.returncode == 0, res.stderr
    res = hyperctl("decrypt", tmp_path / "x.enc", tmp_path / "back", "--key-file", key, "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "back").read_bytes() == plain.read_bytes()
    blob = bytearray((tmp_path / "x.enc").read_bytes())
    for name, bad in {
        "flip": blob[:2_000_000] + bytes([blob[2_000_000] ^ 1]) + blob[2_000_001:],
        "truncated": blob[: 111 + (1024 * 1024 + 16)],
        "garbage": blob + b"xx",
    }.items():
        (tmp_path / f"{name}.enc").write_bytes(bytes(bad))
        res = hyperctl("decrypt", tmp_path / f"{name}.enc", tmp_path / f"{name}.out",
                       "--key-file", key)  # fmt: skip
        one_line_error(res, f"{name}.enc")
        nothing_published(tmp_path, f"{name}.out")


def test_passphrase_file_and_env(tmp_path, plain):
    pw = tmp_path / "pw"
    pw.write_text("s3cret passphrase\n")
    res = hyperctl("encrypt", plain, tmp_path / "x.enc", "--passphrase-file", pw,
                   "--chunk-size", 65536, "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "s3cret" not in res.stderr + res.stdout
    res = hyperctl("decrypt", tmp_path / "x.enc", tmp_path / "back", "--passphrase-env",
                   "HSDK_PW", env={"HSDK_PW": "s3cret passphrase"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "back").read_bytes() == plain.read_bytes()
    res = hyperctl("decrypt", tmp_path / "x.enc", tmp_path / "wrong", "--passphrase-env",
                   "HSDK_PW", env={"HSDK_PW": "not it"})  # fmt: skip
    one_line_error(res, "wrong key or passphrase")
    nothing_published(tmp_path, "wrong")


def test_no_passphrase_on_argv_and_usage_errors(tmp_path, plain):
    res = hyperctl("encrypt", plain, tmp_path / "x", "--passphrase", "oops")
    assert res.returncode != 0 and not (tmp_path / "x").exists()
    res = hyperctl("encrypt", plain, tmp_path / "x")  # no key, no terminal for a prompt
    one_line_error(res, "no key given")
    res = hyperctl("decrypt", plain, tmp_path / "y", "--key-file", plain)
    one_line_error(res, "32")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    res = hyperctl("decrypt", plain, tmp_path / "y", "--key-file", key)
    one_line_error(res, "not an encrypted hypersdk container")
    nothing_published(tmp_path, "y")
    res = hyperctl("encrypt", tmp_path / "missing", tmp_path / "z", "--key-file", key)
    one_line_error(res, "missing")
    nothing_published(tmp_path, "z")


def test_gpg_cli(tmp_path, plain):
    gpg = need_tool("gpg")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    subprocess.run(
        [gpg, "--batch", "--homedir", str(home), "--passphrase", "", "--quick-gen-key",
         "cli@example.invalid", "default", "default", "never"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        res = hyperctl("encrypt", plain, tmp_path / "x.gpg", "--gpg-recipient",
                       "cli@example.invalid", "--gnupghome", home, "-q")  # fmt: skip
        assert res.returncode == 0, res.stderr
        res = hyperctl("decrypt", tmp_path / "x.gpg", tmp_path / "back", "--gpg", "-q",
                       env={"GNUPGHOME": str(home)})  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "back").read_bytes() == plain.read_bytes()
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
