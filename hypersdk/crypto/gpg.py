"""GPG as a second method: encrypt to a recipient's public key, decrypt with the private key.

We drive ``gpg --batch`` over pipes ourselves (python-gnupg's helpers spool whole outputs in
memory): plaintext goes in through a bounded pipe and ciphertext comes out on a reader thread, so
nothing is staged on disk and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading

from hypersdk.errors import CryptoError, DecryptionError
from hypersdk.io import IO_CHUNK, ZeroBytesSink

GPG_MAGIC_HINT = "OpenPGP"


def _gpg_argv(gnupghome: str | None, *args: str) -> list[str]:
    exe = shutil.which("gpg")
    if exe is None:
        raise CryptoError("gpg is not installed (apt-get install gnupg)")
    argv = [exe, "--batch", "--no-tty", "--quiet", "--yes"]
    if gnupghome:
        argv += ["--homedir", gnupghome]
    return argv + list(args)


def _drain(stream, out: list) -> None:
    out.append(stream.read())


class GpgEncryptor(ZeroBytesSink):
    """A Sink that pipes plaintext through ``gpg --encrypt`` into ``inner``; ``finish()`` ends it."""

    def __init__(self, recipient: str, inner, gnupghome: str | None = None):
        argv = _gpg_argv(
            gnupghome,
            "--trust-model",
            "always",
            "--compress-algo",
            "none",
            "--encrypt",
            "--recipient",
            recipient,
            "--output",
            "-",
        )
        self._recipient = recipient
        self._inner = inner
        self._pos = 0
        self._error: BaseException | None = None
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._stderr: list[bytes] = []
        self._err_thread = threading.Thread(
            target=_drain, args=(self._proc.stderr, self._stderr), daemon=True
        )
        self._out_thread = threading.Thread(target=self._pump, daemon=True)
        self._err_thread.start()
        self._out_thread.start()

    def _pump(self) -> None:
        try:
            while chunk := self._proc.stdout.read(IO_CHUNK):
                self._inner.write(chunk)
        except BaseException as exc:  # surfaced in write()/finish()
            self._error = exc
            self._proc.kill()

    def _fail(self) -> None:
        if self._error is not None:
            raise self._error
        self._proc.wait()
        self._err_thread.join()
        msg = b"".join(self._stderr).decode(errors="replace").strip().splitlines()
        raise CryptoError(
            f"gpg encryption to {self._recipient!r} failed: {msg[-1] if msg else 'unknown error'}"
        )

    def write(self, data: bytes | memoryview) -> int:
        try:
            self._proc.stdin.write(data)
        except (BrokenPipeError, ValueError):
            self._out_thread.join()
            self._fail()
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()
        self._out_thread.join()
        rc = self._proc.wait()
        self._err_thread.join()
        if rc != 0 or self._error is not None:
            self._fail()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> GpgEncryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        """Release threads/subprocess; does not finish (an error must not seal a short file)."""
        self.close()


def gpg_decrypt_stream(reader, out_sink, gnupghome: str | None = None, progress=None) -> int:
    """Decrypt a whole GPG object from ``reader`` into ``out_sink``; returns plaintext bytes.

    gpg reports tampering (MDC failure) or a missing private key only at the end: the caller
    writes through atomic output so nothing is published under the final name in that case.
    """
    argv = _gpg_argv(gnupghome, "--decrypt", "--output", "-")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    errs: list[bytes] = []
    feed_error: list[BaseException] = []

    def feed() -> None:
        try:
            for off in range(0, reader.size, IO_CHUNK):
                proc.stdin.write(reader.read(off, min(IO_CHUNK, reader.size - off)))
        except BrokenPipeError:
            pass
        except BaseException as exc:
            feed_error.append(exc)
            proc.kill()
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

    err_thread = threading.Thread(target=_drain, args=(proc.stderr, errs), daemon=True)
    feeder = threading.Thread(target=feed, daemon=True)
    err_thread.start()
    feeder.start()
    total = 0
    try:
        while chunk := proc.stdout.read(IO_CHUNK):
            out_sink.write(chunk)
            total += len(chunk)
            if progress:
                progress(len(chunk))
    finally:
        if proc.poll() is None and feed_error:
            proc.kill()
        feeder.join()
        rc = proc.wait()
        err_thread.join()
    if feed_error:
        raise feed_error[0]
    if rc != 0:
        lines = b"".join(errs).decode(errors="replace").strip().splitlines()
        name = getattr(reader, "name", "<input>")
        raise DecryptionError(
            f"{name}: gpg decryption failed: {lines[-1] if lines else f'exit code {rc}'}"
        )
    return total


def is_container(reader) -> bool:
    from hypersdk.crypto.container import MAGIC

    return reader.size >= len(MAGIC) and reader.read(0, len(MAGIC)) == MAGIC


def default_gnupghome() -> str | None:
    return os.environ.get("GNUPGHOME")
