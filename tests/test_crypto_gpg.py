"""GPG method: streaming encrypt to a recipient and decrypt with the private key, with a
throwaway keyring in a temp GNUPGHOME."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from hypersdk.crypto import KeySpec, decrypt_file, decrypt_stream, encrypt_file, encrypting_sink
from hypersdk.errors import CryptoError, DecryptionError
from hypersdk.io import StreamSink
from tests.fixtures.tools import need_tool

RECIPIENT = "hypersdk-test@example.invalid"


class BytesReader:
    def __init__(self, data: bytes):
        self._data, self.size, self.name = data, len(data), "mem.gpg"

    def read(self, offset: int, length: int) -> bytes:
        d = self._data[offset : offset + length]
        return d + bytes(length - len(d))

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def gnupghome(tmp_path_factory):
    gpg = need_tool("gpg")
    home = tmp_path_factory.mktemp("gnupg")
    os.chmod(home, 0o700)
    subprocess.run(
        [gpg, "--batch", "--homedir", str(home), "--passphrase", "", "--quick-gen-key",
         RECIPIENT, "ed25519", "cert", "never"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    fpr = subprocess.run(
        [gpg, "--batch", "--homedir", str(home), "--with-colons", "--list-keys", RECIPIENT],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    fp = next(ln.split(":")[9] for ln in fpr.splitlines() if ln.startswith("fpr:"))
    subprocess.run(
        [gpg, "--batch", "--homedir", str(home), "--passphrase", "", "--quick-add-key",
         fp, "cv25519", "encr", "never"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    yield str(home)
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30
    )


@pytest.mark.parametrize("size", [0, 1, 5 * 1024 * 1024 + 3])
def test_gpg_round_trip(gnupghome, size):
    spec = KeySpec(method="gpg", ref=RECIPIENT, gnupghome=gnupghome)
    data = os.urandom(size)
    out = io.BytesIO()
    sink = encrypting_sink(spec, StreamSink(out))
    for off in range(0, size, 1 << 20):
        sink.write(data[off : off + (1 << 20)])
    sink.finish()
    blob = out.getvalue()
    assert blob
    if size > 64:
        assert data[:64] not in blob
    back = io.BytesIO()
    assert decrypt_stream(BytesReader(blob), StreamSink(back), spec) == size
    assert back.getvalue() == data


def test_gpg_files_and_tampering(gnupghome, tmp_path):
    spec = KeySpec(method="gpg", ref=RECIPIENT, gnupghome=gnupghome)
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(300_000))
    params = encrypt_file(src, tmp_path / "x.gpg", spec)
    assert params == {"method": "gpg", "recipient": RECIPIENT}
    decrypt_file(tmp_path / "x.gpg", tmp_path / "back", spec)
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    blob = bytearray((tmp_path / "x.gpg").read_bytes())
    blob[len(blob) // 2] ^= 1
    (tmp_path / "bad.gpg").write_bytes(bytes(blob))
    with pytest.raises(DecryptionError):
        decrypt_file(tmp_path / "bad.gpg", tmp_path / "bad.out", spec)
    assert not (tmp_path / "bad.out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_gpg_unknown_recipient_and_missing_private_key(gnupghome, tmp_path):
    need_tool("gpg")
    with pytest.raises(CryptoError, match="nobody@example.invalid"):
        sink = encrypting_sink(
            KeySpec(method="gpg", ref="nobody@example.invalid", gnupghome=gnupghome),
            StreamSink(io.BytesIO()),
        )
        sink.write(b"x" * 1000)
        sink.finish()
    out = io.BytesIO()
    sink = encrypting_sink(
        KeySpec(method="gpg", ref=RECIPIENT, gnupghome=gnupghome), StreamSink(out)
    )
    sink.write(b"data")
    sink.finish()
    empty = tmp_path / "empty-home"
    empty.mkdir(mode=0o700)
    with pytest.raises(DecryptionError):
        decrypt_stream(
            BytesReader(out.getvalue()),
            StreamSink(io.BytesIO()),
            KeySpec(method="gpg", ref="", gnupghome=str(empty)),
        )
    subprocess.run(["gpgconf", "--homedir", str(empty), "--kill", "all"], capture_output=True)
