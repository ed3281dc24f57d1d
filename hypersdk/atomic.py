"""Atomic publication of local files: write under a temporary name, fsync, then rename.

A reader never sees a half-written file under its final name, whatever happens mid-way (full disk,
crash, Ctrl-C): the temporary file is removed on failure.

The temporary name is ``.<name>.partial-<random>`` (targets hide names of that shape from
listings), created with O_CREAT|O_EXCL|O_NOFOLLOW: a file or symlink planted there by someone
sharing the directory makes the open fail instead of being written through or truncated. Until
it is published the file is readable by its owner only (mode 0600: a decrypted image is
plaintext); publishing gives it the usual mode (0644 less the umask). The rename replaces
a regular file or a symlink at the final name: the link itself is replaced, never the file it
points to. A FIFO, socket or device there is refused before anything is written: replacing
``/dev/sdb`` with a regular file is never what ``convert disk.vmdk /dev/sdb`` meant.

Cache modes, with qemu-img's names and meaning:
- ``writeback`` (default): through the page cache, fsync before the rename: durable.
- ``none``: O_DIRECT (bypassing the page cache), then fsync: durable, and steady on large files
  because no dirty pages pile up; falls back to writeback where the filesystem refuses O_DIRECT.
- ``unsafe``: page cache, no fsync (qemu-img convert's default). The rename is still atomic for
  running processes, but after a power loss the file may hold less than it claims.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Iterator

from hypersdk.errors import InvalidParameterError
from hypersdk.io import DirectFileSink, FileSink, target_error

log = logging.getLogger(__name__)

CACHE_MODES = ("writeback", "none", "unsafe")
PUBLISHED_MODE = 0o644  # less the umask
_TEMP_STEM_BYTES = 150  # of the final name kept in the temporary one: stays within 255 bytes


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new name in ``path`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(path: str) -> str:
    """A fresh, unguessable temporary name next to ``path``."""
    stem = os.fsencode(os.path.basename(path))[:_TEMP_STEM_BYTES]
    name = f".{os.fsdecode(stem)}.partial-{secrets.token_hex(8)}"
    return os.path.join(os.path.dirname(path), name)


def _create(tmp: str, direct: bool) -> tuple[int, bool]:
    """Create ``tmp`` (never an existing file, never through a symlink), owner-only; ask for
    O_DIRECT afterwards so a filesystem that refuses it (tmpfs) costs no second create."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    if direct:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            direct = False  # tmpfs and friends: no O_DIRECT, the page cache it is
            log.warning(
                "%s: the filesystem refuses direct I/O (cache=none): writing through the page "
                "cache, then fsync",
                os.path.dirname(tmp) or ".",
            )
    return fd, direct


def check_cache_mode(cache: str) -> str:
    if cache not in CACHE_MODES:
        raise InvalidParameterError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    return cache


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two names atomically


def _exchange(a: str, b: str) -> bool:
    """Swap the files at ``a`` and ``b`` atomically (Linux renameat2); False where the system or
    the filesystem cannot."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), b)


def _publish_unflushed(tmp: str, path: str) -> None:
    """Put ``tmp`` (written without fsync) under ``path``.

    A plain rename over an existing file is what ext4 calls replace-via-rename: its
    auto_da_alloc then writes the whole new file out before the rename returns (2-3 s per GiB
    here), the very flush ``unsafe`` promises to skip, and a back-to-back convert was 3.5x
    slower than qemu-img's (which truncates its output in place). Exchanging the two names
    keeps the replacement atomic (the name always holds a whole file, old or new) without that
    flush; the old file, now under the temporary name, is then removed."""
    if os.path.lexists(path) and not os.path.isdir(path) and _exchange(tmp, path):
        os.unlink(tmp)
        return
    os.replace(tmp, path)


def refuse_special_file(path: str) -> None:
    """InvalidParameterError if ``path`` exists as something other than a regular file, a
    symlink or a directory (a directory fails at the rename with its own message)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISBLK: "a block device"}
    kinds[stat.S_ISCHR] = "a character device"
    for test, kind in kinds.items():
        if test(mode):
            raise InvalidParameterError(
                f"{path} is {kind}: outputs are written as regular files only "
                "(choose another name, or remove it first)"
            )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, cache: str = "writeback") -> Iterator[FileSink]:
    """Yield a FileSink on a temp file next to ``path``; publish it on clean exit only."""
    check_cache_mode(cache)
    path = os.fspath(path)
    refuse_special_file(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise target_error(directory, exc) from None
    tmp = temp_name(path)
    fd, sink, published, ours = -1, None, False, True
    # the temporary file is removed whatever stops us from the moment it may exist: a Ctrl-C
    # (KeyboardInterrupt) can land between any two bytecodes, even right after the create
    try:
        try:
            fd, direct = _create(tmp, cache == "none" and hasattr(os, "O_DIRECT"))
        except OSError as exc:
            ours = exc.errno != errno.EEXIST  # a file already there is not ours to remove
            raise target_error(path, exc) from None
        sink = DirectFileSink(fd, path) if direct else FileSink(fd, path)
        yield sink
        sink.finish()
        try:
            os.fchmod(fd, PUBLISHED_MODE & ~_umask())
            if cache != "unsafe":
                os.fsync(fd)
        except OSError as exc:
            raise target_error(path, exc) from None
        os.close(fd)
        fd = -1
        if cache == "unsafe":
            _publish_unflushed(tmp, path)
        else:
            os.replace(tmp, path)
        published = True
        if cache != "unsafe":
            fsync_dir(directory)
    finally:
        if sink is not None:
            sink.close()
        if fd >= 0:
            os.close(fd)
        if not published and ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as sink:
        sink.write(data)
