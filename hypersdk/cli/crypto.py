"""``hyperctl encrypt`` / ``hyperctl decrypt``: local files, atomic output, progress bar.

Secrets are never taken on argv: a key file, a passphrase file, an env var NAME, or a hidden
prompt. Errors are HyperSDKError subclasses, printed as one line by main().
"""

from __future__ import annotations

import getpass
import os
import sys

import click

from hypersdk.cli.common import byte_counter, key_reference, progress_bar
from hypersdk.errors import CredentialsError, InvalidParameterError

key_file_opt = click.option("--key-file", help="File holding a 32-byte key")
pass_file_opt = click.option("--passphrase-file", help="File holding the passphrase")
pass_env_opt = click.option(
    "--passphrase-env", help="NAME of an environment variable holding the passphrase"
)
gnupghome_opt = click.option("--gnupghome", help="GnuPG home (default: $GNUPGHOME)")
quiet_opt = click.option("-q", "--quiet", is_flag=True, help="No progress bar")


def _key(
    key_file, passphrase_file, passphrase_env, gpg_recipient, gnupghome, kdf, chunk_size, *, confirm
):
    from hypersdk.crypto import KeySpec
    from hypersdk.crypto.keys import KeyMaterial

    ref = key_reference(key_file, passphrase_file, passphrase_env, gpg_recipient)
    if ref is not None:
        return KeySpec(**ref, kdf=kdf, chunk_size=chunk_size, gnupghome=gnupghome)
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


@click.command(help="Encrypt a file (AES-256-GCM container, or GPG to a recipient).")
@click.argument("src", help="Plaintext file")
@click.argument("dst", help="Encrypted output (written atomically)")
@key_file_opt
@pass_file_opt
@pass_env_opt
@click.option("--gpg-recipient", help="Encrypt with GPG to this recipient")
@gnupghome_opt
@click.option("--kdf", default="scrypt", help="Passphrase KDF: scrypt or argon2id")
@click.option("--chunk-size", default=1024 * 1024, help="Chunk size in bytes")
@quiet_opt
def encrypt(
    src: str,
    dst: str,
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
    gnupghome: str | None,
    kdf: str,
    chunk_size: int,
    quiet: bool,
) -> None:
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
                    if progress:
                        progress(n)
                sink.finish()
            finally:
                sink.close()


@click.command(help="Decrypt a file; nothing is written under OUT unless every byte authenticates.")
@click.argument("src", help="Encrypted file")
@click.argument("dst", help="Plaintext output (written atomically)")
@key_file_opt
@pass_file_opt
@pass_env_opt
@click.option("--gpg", is_flag=True, help="Decrypt a GPG message")
@gnupghome_opt
@quiet_opt
def decrypt(
    src: str,
    dst: str,
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg: bool,
    gnupghome: str | None,
    quiet: bool,
) -> None:
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


def register(group: click.Group) -> None:
    group.add_command(encrypt)
    group.add_command(decrypt)
