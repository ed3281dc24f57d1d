"""Key sources. A ``KeySpec`` names where a key lives (file, env var, Prefect Secret block, GPG
recipient), never the secret itself, so flows can take it as a parameter; ``resolve()`` fetches the
material only where it is used. Secrets stay in SecretStr/SecretBytes so they never print.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr

from hypersdk.errors import CredentialsError, DecryptionError, InvalidParameterError

# Strong defaults: scrypt n=2**17, r=8, p=1 (128 MiB, ~0.3 s); Argon2id t=3, m=64 MiB, 4 lanes.
SCRYPT_DEFAULT = (17, 8, 1)  # (log2 n, r, p)
ARGON2_DEFAULT = (3, 64 * 1024, 4)  # (iterations, memory KiB, lanes)

# Caps on what a header may ask for. The KDF runs before anything can authenticate the header
# (the passphrase is needed to check it), so a hostile file chooses its cost: it may ask for
# what we write plus a modest margin, never more. Memory is what the KDF allocates, work is how
# much it mixes (time grows with it). Writing checks the same caps, so we never write a file we
# would refuse to read.
MiB = 1024 * 1024
MAX_SCRYPT_MEMORY = 256 * MiB  # 128 * r * N: twice the default
MAX_SCRYPT_WORK = 2**21  # N * r * p (hence N * p too): twice the default's 2**20
MAX_SCRYPT_P = 16
MAX_ARGON2_MEMORY_KIB = 256 * 1024  # m: four times the default
MAX_ARGON2_WORK_KIB = 2 * 3 * 64 * 1024  # t * m: twice the default's 3 passes over 64 MiB
MAX_ARGON2_ITER = 16
MAX_ARGON2_LANES = 16


def _scrypt_refusal(log_n: int, r: int, p: int) -> str | None:
    if not (10 <= log_n <= 24 and 1 <= r <= 64 and 1 <= p <= MAX_SCRYPT_P):
        return "out of range (log2 N 10..24, r 1..64, p 1..16)"
    if log_n >= 16 * r:  # scrypt's own rule (RFC 7914: N < 2^(128*r/8)); OpenSSL enforces it
        return "N must be below 2^(16*r)"
    memory, work = 128 * r << log_n, (r * p) << log_n
    if memory > MAX_SCRYPT_MEMORY or work > MAX_SCRYPT_WORK:
        return (
            f"needs {memory // MiB} MiB and N*r*p = {work}; at most "
            f"{MAX_SCRYPT_MEMORY // MiB} MiB and {MAX_SCRYPT_WORK} are allowed"
        )
    return None


def _argon2_refusal(t: int, m: int, lanes: int) -> str | None:
    if not (1 <= t <= MAX_ARGON2_ITER and 1 <= lanes <= MAX_ARGON2_LANES and 8 * lanes <= m):
        return "out of range (t 1..16, lanes 1..16, m >= 8 KiB per lane)"
    if m > MAX_ARGON2_MEMORY_KIB or t * m > MAX_ARGON2_WORK_KIB:
        return (
            f"needs {m // 1024} MiB and t*m = {t * m} KiB; at most "
            f"{MAX_ARGON2_MEMORY_KIB // 1024} MiB and {MAX_ARGON2_WORK_KIB} KiB are allowed"
        )
    return None


def describe_kdf(kdf: int, params: tuple[int, int, int]) -> str:
    """``params`` spelled out for messages: ``scrypt N=2^17 r=8 p=1``."""
    from hypersdk.crypto.container import KDF_ARGON2ID, KDF_SCRYPT

    p1, p2, p3 = params
    if kdf == KDF_SCRYPT:
        return f"scrypt N=2^{p1} r={p2} p={p3}"
    if kdf == KDF_ARGON2ID:
        return f"argon2id t={p1} m={p2} KiB lanes={p3}"
    return f"KDF {kdf} {params}"


def kdf_refusal(kdf: int, params: tuple[int, int, int]) -> str | None:
    """Why ``params`` are out of range or too costly for ``kdf``, or None when they are fine."""
    from hypersdk.crypto.container import KDF_ARGON2ID, KDF_HKDF, KDF_SCRYPT

    if kdf == KDF_SCRYPT:
        return _scrypt_refusal(*params)
    if kdf == KDF_ARGON2ID:
        return _argon2_refusal(*params)
    if kdf == KDF_HKDF:
        return None if tuple(params) == (0, 0, 0) else "HKDF takes no parameters"
    return "unknown KDF"


def check_kdf_params(kdf: int, params: tuple[int, int, int], name: str = "<input>") -> None:
    """Refuse KDF parameters that are out of range or too costly (DecryptionError naming them),
    before the KDF runs."""
    why = kdf_refusal(kdf, params)
    if why:
        raise DecryptionError(
            f"{name}: KDF parameters {describe_kdf(kdf, params)} in header are refused: {why} "
            "(a header chooses what the KDF costs before anything can authenticate it)"
        )


class KeyMaterial:
    """A resolved secret: a passphrase (stretched by a KDF) or a raw 32-byte key (HKDF)."""

    def __init__(
        self,
        *,
        passphrase: SecretStr | None = None,
        key: SecretBytes | None = None,
        kdf: str = "scrypt",
        kdf_params: tuple[int, int, int] | None = None,
    ):
        if (passphrase is None) == (key is None):
            raise InvalidParameterError("give exactly one of a passphrase or a key")
        if key is not None and len(key.get_secret_value()) != 32:
            raise InvalidParameterError("a key must be exactly 32 bytes")
        if passphrase is not None and not passphrase.get_secret_value():
            raise InvalidParameterError("the passphrase is empty")
        if kdf not in ("scrypt", "argon2id"):
            raise InvalidParameterError(f"unknown KDF {kdf!r} (scrypt or argon2id)")
        self._passphrase = passphrase
        self._key = key
        self._kdf = kdf
        self._kdf_params = kdf_params

    def __repr__(self) -> str:
        return f"KeyMaterial({'passphrase' if self._passphrase else 'key'}=**********)"

    @classmethod
    def from_passphrase(cls, passphrase: str | SecretStr, **kw) -> KeyMaterial:
        if not isinstance(passphrase, SecretStr):
            passphrase = SecretStr(passphrase)
        return cls(passphrase=passphrase, **kw)

    @classmethod
    def from_key(cls, key: bytes | SecretBytes) -> KeyMaterial:
        if not isinstance(key, SecretBytes):
            key = SecretBytes(key)
        return cls(key=key)

    def kdf_choice(self) -> tuple[int, tuple[int, int, int]]:
        """KDF id and parameters for a new header."""
        from hypersdk.crypto.container import KDF_ARGON2ID, KDF_HKDF, KDF_SCRYPT

        if self._key is not None:
            return KDF_HKDF, (0, 0, 0)
        if self._kdf == "argon2id":
            kdf, params = KDF_ARGON2ID, self._kdf_params or ARGON2_DEFAULT
        else:
            kdf, params = KDF_SCRYPT, self._kdf_params or SCRYPT_DEFAULT
        why = kdf_refusal(kdf, tuple(params))
        if why:
            raise InvalidParameterError(
                f"KDF parameters {describe_kdf(kdf, tuple(params))} are refused: {why}"
            )
        return kdf, tuple(params)

    def derive_kek(self, kdf: int, params: tuple[int, int, int], salt: bytes) -> bytes:
        """The key-encryption key for a header's KDF; a key/passphrase mismatch cannot unwrap."""
        from hypersdk.crypto.container import KDF_ARGON2ID, KDF_HKDF, KDF_SCRYPT

        if kdf == KDF_HKDF:
            if self._key is None:
                raise DecryptionError("this file was encrypted with a key, not a passphrase")
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF

            return HKDF(hashes.SHA256(), 32, salt, b"hypersdk-kek-v1").derive(
                self._key.get_secret_value()
            )
        if self._passphrase is None:
            raise DecryptionError("this file was encrypted with a passphrase, not a key")
        secret = self._passphrase.get_secret_value().encode()
        check_kdf_params(kdf, params)  # whoever calls: never run a KDF past the caps
        p1, p2, p3 = params
        try:
            if kdf == KDF_SCRYPT:
                from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

                return Scrypt(salt=salt, length=32, n=1 << p1, r=p2, p=p3).derive(secret)
            if kdf == KDF_ARGON2ID:
                from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

                return Argon2id(
                    salt=salt, length=32, iterations=p1, lanes=p3, memory_cost=p2
                ).derive(secret)
        except MemoryError:  # within the caps, yet the host (or a ulimit) has less
            raise DecryptionError(
                f"not enough memory for {describe_kdf(kdf, params)}: free memory or raise the "
                "process's memory limit"
            ) from None
        raise DecryptionError(f"unknown KDF {kdf}")


def parse_key_bytes(value: bytes, where: str) -> bytes:
    """32 raw bytes, or 64 hex digits / base64 of 32 bytes (with optional trailing newline)."""
    if len(value) == 32:
        return value
    text = value.strip()
    for decode in (lambda t: bytes.fromhex(t.decode("ascii")), base64.b64decode):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(raw) == 32:
            return raw
    raise CredentialsError(
        f"{where}: a key must be 32 random bytes (or 64 hex digits, or base64 of 32 bytes)"
    )


def generate_key_file(path: str | os.PathLike) -> None:
    """Write a new 32-byte random key, readable by the owner only."""
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))


class KeySpec(BaseModel):
    """Where the key comes from; safe to log and to pass as a flow parameter.

    - ``passphrase``: ``ref`` is a file holding the passphrase (first line).
    - ``keyfile``: ``ref`` is a file holding a 32-byte key.
    - ``env``: ``ref`` is an environment variable name; holds a passphrase, or a key if ``raw_key``.
    - ``secret-block``: ``ref`` is a Prefect Secret block name; passphrase, or key if ``raw_key``.
    - ``gpg``: ``ref`` is the recipient (encrypt); decrypt uses the private key in ``gnupghome``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["passphrase", "keyfile", "env", "secret-block", "gpg"] = Field(
        description="Where the key comes from: a passphrase file, a 32-byte key file, an "
        "environment variable, a Prefect Secret block, or GPG"
    )
    ref: str = Field(
        max_length=4096,
        description="The file path, variable name, block name or GPG recipient (never the key; "
        "empty for gpg: the default key)",
    )
    raw_key: bool = Field(
        default=False, description="env / secret-block: the value is a key (hex), not a passphrase"
    )
    kdf: Literal["scrypt", "argon2id"] = Field(
        default="scrypt", description="How a passphrase becomes a key"
    )
    gnupghome: str | None = Field(default=None, description="GPG home directory (gpg only)")
    chunk_size: int = Field(
        default=1024 * 1024, description="Plaintext bytes per authenticated chunk"
    )

    def resolve(self) -> KeyMaterial:
        """Fetch the secret now (never stored in this model)."""
        if self.method == "gpg":
            raise InvalidParameterError("a GPG key spec has no symmetric key material")
        if self.method == "keyfile":
            return KeyMaterial.from_key(parse_key_bytes(_read_file(self.ref), self.ref))
        if self.method == "passphrase":
            return self._passphrase(_read_file(self.ref).decode("utf-8", "replace"), self.ref)
        if self.method == "env":
            value = os.environ.get(self.ref)
            if not value:
                raise CredentialsError(f"environment variable {self.ref} is not set or empty")
            return self._from_value(value, f"environment variable {self.ref}")
        from hypersdk.secrets import load_secret_block

        value = load_secret_block(self.ref, "encryption key")
        return self._from_value(str(value), f"Prefect Secret block {self.ref!r}")

    def _from_value(self, value: str, where: str) -> KeyMaterial:
        if self.raw_key:
            return KeyMaterial.from_key(parse_key_bytes(value.encode(), where))
        return self._passphrase(value, where)

    def _passphrase(self, text: str, where: str) -> KeyMaterial:
        text = text.splitlines()[0] if text.strip() else ""
        if not text:
            raise CredentialsError(f"{where}: the passphrase is empty")
        return KeyMaterial.from_passphrase(SecretStr(text), kdf=self.kdf)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024)
    except OSError as exc:
        raise CredentialsError(f"cannot read key file {path}: {exc.strerror}") from None
