"""Encryption of exports: an AES-256-GCM streaming container (passphrase or key) or GPG.

Pipeline: format writer -> ``encrypting_sink(spec, target_writer)`` -> target; ``finish()`` seals
the end. Restore/verify read encrypted objects through ``DecryptingReader`` (random access) or
``decrypt_stream`` (whole file). Nothing here imports Prefect.
"""

from __future__ import annotations

from hypersdk.crypto.container import (
    DEFAULT_CHUNK,
    HEADER_SIZE,
    DecryptingReader,
    Encryptor,
    container_params,
    parse_header,
)
from hypersdk.crypto.gpg import GpgEncryptor, gpg_decrypt_stream, is_container
from hypersdk.crypto.keys import KeyMaterial, KeySpec
from hypersdk.errors import DecryptionError
from hypersdk.io import FileRangeReader

__all__ = [
    "DEFAULT_CHUNK",
    "DecryptingReader",
    "Encryptor",
    "GpgEncryptor",
    "KeyMaterial",
    "KeySpec",
    "container_params",
    "decrypt_file",
    "decrypt_stream",
    "encrypt_file",
    "encrypting_sink",
    "object_params",
]


def encrypting_sink(key_spec: KeySpec, inner_sink, threads: int = 2):
    """A Sink with ``finish()`` that encrypts into ``inner_sink`` per ``key_spec``."""
    if key_spec.method == "gpg":
        return GpgEncryptor(key_spec.ref, inner_sink, key_spec.gnupghome)
    return Encryptor(key_spec.resolve(), inner_sink, key_spec.chunk_size, threads)


def object_params(sink) -> dict:
    """Manifest entry for what ``encrypting_sink`` produced (never a key)."""
    if isinstance(sink, Encryptor):
        return container_params(sink.header)
    return {"method": "gpg", "recipient": sink._recipient}


def _as_key(key) -> KeyMaterial | KeySpec:
    return key.resolve() if isinstance(key, KeySpec) and key.method != "gpg" else key


def decrypt_stream(reader, out_sink, key, progress=None) -> int:
    """Decrypt a whole object (container or GPG) from a RangeReader into a Sink; returns size.

    ``key`` is a KeyMaterial or KeySpec. Failures raise DecryptionError; plaintext already written
    to ``out_sink`` must be discarded by the caller (atomic output does that).
    """
    key = _as_key(key)
    if not is_container(reader):
        if isinstance(key, KeySpec) and key.method == "gpg":
            return gpg_decrypt_stream(reader, out_sink, key.gnupghome, progress)
        parse_header(reader.read(0, HEADER_SIZE), getattr(reader, "name", "<input>"))
    if isinstance(key, KeySpec):
        raise DecryptionError(f"{reader.name}: is an AES container, not a GPG message")
    total = 0
    with DecryptingReader(reader, key) as dec:
        for chunk in dec.iter_chunks():
            out_sink.write(chunk)
            total += len(chunk)
            if progress:
                progress(len(chunk))
    return total


def encrypt_file(src, dst, key_spec: KeySpec, progress=None) -> dict:
    """Encrypt a local file to ``dst`` atomically; returns the manifest params."""
    from hypersdk.atomic import atomic_file
    from hypersdk.io import IO_CHUNK

    with FileRangeReader(src) as reader, atomic_file(dst) as out:
        sink = encrypting_sink(key_spec, out)
        try:
            for off in range(0, reader.size, IO_CHUNK):
                n = min(IO_CHUNK, reader.size - off)
                sink.write(reader.read(off, n))
                if progress:
                    progress(n)
            sink.finish()
        finally:
            sink.close()
        return object_params(sink)


def decrypt_file(src, dst, key, progress=None) -> int:
    """Decrypt a local file to ``dst``; on any failure nothing appears under ``dst``."""
    from hypersdk.atomic import atomic_file

    with FileRangeReader(src) as reader, atomic_file(dst) as out:
        return decrypt_stream(reader, out, key, progress)
