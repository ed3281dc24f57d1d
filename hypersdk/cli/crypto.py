"""``hyperctl encrypt`` / ``hyperctl decrypt``: local files, atomic output, progress bar.

Secrets are never taken on argv: a key file, a passphrase file, an env var NAME, or a hidden
prompt. Errors are HyperSDKError subclasses, printed as one line by main().
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Annotated

import typer

from hypersdk.cli.common import byte_counter, progress_bar
from hypersdk.errors import CredentialsError, InvalidParameterError

KeyFile = Annotated[str | None, typer.Option("--key-file", help="File holding a 32-byte key")]
PassFile = Annotated[
    str | None, typer.Option("--passphrase-file", help="File holding the passphrase")
]
PassEnv = Annotated[
    str | None,
    typer.Option("--passphrase-env", help="NAME of an environment variable holding the passphrase"),
]
GnupgHome = Annotated[
    str | None, typer.Option("--gnupghome", help="GnuPG home (default: $GNUPGHOME)")
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar")]


def _key(
    key_file, passphrase_file, passphrase_env, gpg_recipient, gnupghome, kdf, chunk_size, *, confirm
):
    from hypersdk.crypto import KeySpec
    from hypersdk.crypto.keys import KeyMaterial

    given = [x for x in (key_file, passphrase_file, passphrase_env, gpg_recipient) if x]
    if len(given) > 1:
        raise InvalidParameterError(
            "give only one of --key-file, --passphrase-file, --passphrase-env, --gpg-recipient"
        )
    common = {"kdf": kdf, "chunk_size": chunk_size, "gnupghome": gnupghome}
    if key_file:
        return KeySpec(method="keyfile", ref=key_file, **common)
    if passphrase_file:
        return KeySpec(method="passphrase", ref=passphrase_file, **common)
    if passphrase_env:
        return KeySpec(method="env", ref=passphrase_env, **common)
    if gpg_recipient is not None:
        return KeySpec(method="gpg", ref=gpg_recipient, **common)
    if not sys.stdin.isatty():
        raise CredentialsError(
            "no key given: use --key-file, --passphrase-file, --passphrase-env or a terminal prompt"
        )
    secret = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != secret:
        raise CredentialsError("the passphrases do not match")
    from pydantic import SecretStr

    return KeyMaterial.from_passphrase(SecretStr(secret), kdf=kdf)


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def encrypt(
    src: Annotated[str, typer.Argument(help="Plaintext file")],
    dst: Annotated[str, typer.Argument(help="Encrypted output (written atomically)")],
    key_file: KeyFile = None,
    passphrase_file: PassFile = None,
    passphrase_env: PassEnv = None,
    gpg_recipient: Annotated[
        str | None, typer.Option("--gpg-recipient", help="Encrypt with GPG to this recipient")
    ] = None,
    gnupghome: GnupgHome = None,
    kdf: Annotated[
        str, typer.Option("--kdf", help="Passphrase KDF: scrypt or argon2id")
    ] = "scrypt",
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Chunk size in bytes")] = 1024
    * 1024,
    quiet: Quiet = False,
) -> None:
    """Encrypt a file (AES-256-GCM container, or GPG to a recipient)."""
    from hypersdk.crypto import Encryptor, KeySpec, encrypt_file
    from hypersdk.crypto.container import check_chunk_size

    if kdf not in ("scrypt", "argon2id"):
        raise InvalidParameterError(f"unknown KDF {kdf!r} (scrypt or argon2id)")
    check_chunk_size(chunk_size)
    key = _key(
        key_file,
        passphrase_file,
        passphrase_env,
        gpg_recipient,
        gnupghome,
        kdf,
        chunk_size,
        confirm=True,
    )
    with progress_bar(not quiet and sys.stderr.isatty()) as bar:
        progress = byte_counter(bar, "encrypt", _size(src))
        if isinstance(key, KeySpec):
            encrypt_file(src, dst, key, progress)
            return
        # Prompted passphrase: no KeySpec can name it, so drive the Encryptor directly.
        from hypersdk.atomic import atomic_file
        from hypersdk.io import IO_CHUNK, FileRangeReader

        with FileRangeReader(src) as reader, atomic_file(dst) as out:
            sink = Encryptor(key, out, chunk_size)
            try:
                for off in range(0, reader.size, IO_CHUNK):
                    n = min(IO_CHUNK, reader.size - off)
                    sink.write(reader.read(off, n))
                    progress(n)
                sink.finish()
            finally:
                sink.close()


def decrypt(
    src: Annotated[str, typer.Argument(help="Encrypted file")],
    dst: Annotated[str, typer.Argument(help="Plaintext output (written atomically)")],
    key_file: KeyFile = None,
    passphrase_file: PassFile = None,
    passphrase_env: PassEnv = None,
    gpg: Annotated[bool, typer.Option("--gpg", help="Decrypt a GPG message")] = False,
    gnupghome: GnupgHome = None,
    quiet: Quiet = False,
) -> None:
    """Decrypt a file; nothing is written under OUT unless every byte authenticates."""
    from hypersdk.crypto import decrypt_file

    key = _key(
        key_file,
        passphrase_file,
        passphrase_env,
        "" if gpg else None,
        gnupghome,
        "scrypt",
        1024 * 1024,
        confirm=False,
    )
    with progress_bar(not quiet and sys.stderr.isatty()) as bar:
        decrypt_file(src, dst, key, byte_counter(bar, "decrypt", None))


def register(app: typer.Typer) -> None:
    app.command()(encrypt)
    app.command()(decrypt)
