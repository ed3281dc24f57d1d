"""Local directory target: atomic publication (temp name, fsync, rename), sparse files.

Objects are written with O_DIRECT by default (``cache=none``, see hypersdk.atomic): a backup of a
large disk then neither floods the host's page cache nor stalls on flushing it, and verifying an
export afterwards reads what reached the disk. ``file:///exports?cache=writeback`` goes through
the page cache (then fsync) for filesystems where direct I/O is slow.

A write in progress is the hidden file ``.<name>.partial-<random>`` next to its final name (see
hypersdk.atomic), never listed as an object; a killed run leaves it behind, and
``pending_uploads`` / ``abort_upload`` find and remove such files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from hypersdk.atomic import (
    atomic_file,
    check_cache_mode,
    fsync_dir,
    temp_name,
    write_bytes_atomic,
)
from hypersdk.errors import InvalidParameterError, ObjectNotFoundError, TargetError
from hypersdk.io import FileRangeReader, RangeReader, target_error
from hypersdk.models import ObjectInfo
from providers.base import ObjectWriter, PendingUpload, Target

_PARTIAL = ".partial-"


def _is_partial(name: str) -> bool:
    """A temporary name of an unfinished write (hypersdk.atomic.temp_name, or an older
    version's): hidden, never an object. Object names never start with a dot (key segments
    are made by hypersdk.names.safe_component, which encodes a leading one)."""
    return name.startswith(".") and _PARTIAL in name


class LocalObjectWriter(ObjectWriter):
    def __init__(self, path: str, cache: str = "none"):
        self._cm = atomic_file(path, cache)
        self._sink = self._cm.__enter__()
        self._done = False

    def write(self, data) -> int:
        return self._sink.write(data)

    def write_zeros(self, length: int) -> None:
        self._sink.write_zeros(length)

    def tell(self) -> int:
        return self._sink.tell()

    def commit(self) -> None:
        if not self._done:
            self._done = True
            self._cm.__exit__(None, None, None)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._cm.__exit__(TargetError, TargetError("aborted"), None)


class LocalTarget(Target):
    schemes = ("file",)

    def __init__(self, root: str, cache: str = "none"):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.cache = check_cache_mode(cache)

    @classmethod
    def from_url(cls, url: str, **options) -> LocalTarget:
        cache = options.pop("cache", "none")
        if options:
            raise InvalidParameterError(
                f"local target takes only the cache option (got {', '.join(options)})"
            )
        parts = urlsplit(url)
        path = unquote(parts.path) if parts.scheme == "file" else url
        if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
            raise InvalidParameterError(f"file URL must be local: {url!r}")
        return cls(path, cache)

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def path(self, key: str) -> str:
        full = os.path.normpath(os.path.join(self.root, key))
        if not (full == self.root or full.startswith(self.root + os.sep)):
            raise InvalidParameterError(f"object key escapes the target directory: {key!r}")
        return full

    def preflight(self) -> None:
        """The directory, or the nearest one that exists above it, must take new files."""
        place = self.root
        while not os.path.exists(place):
            parent = os.path.dirname(place)
            if parent == place:
                break
            place = parent
        if not os.path.isdir(place):
            raise TargetError(f"{self.root}: {place} is not a directory")
        if not os.access(place, os.W_OK | os.X_OK):
            raise TargetError(f"{self.root}: {place} is not writable")

    def location(self, key: str) -> str:
        return self.path(key)

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        return LocalObjectWriter(self.path(key), self.cache)

    def open_reader(self, key: str) -> FileRangeReader:
        path = self.path(key)
        if not os.path.isfile(path):
            raise ObjectNotFoundError(f"{path}: no such export object")
        return FileRangeReader(path)

    def open_coalesced(self, key: str, **options) -> RangeReader:
        """The file itself: pread of a local file is cheap and the kernel reads ahead."""
        return self.open_reader(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write a whole temporary file, then hard-link it to the final name: link(2) fails
        with EEXIST if anything is there (a symlink included, never followed), so exactly one
        concurrent caller wins and nobody ever sees a partial object. Filesystems without hard
        links fall back to O_CREAT|O_EXCL on the final name (still exclusive, but a crash
        mid-write can leave a short object)."""
        path = self.path(key)
        tmp = temp_name(path)
        write_bytes_atomic(tmp, data)  # makes the directory; fsync; the published mode
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise target_error(path, exc, "conditional write") from None
            return _create_exclusive(path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(os.path.dirname(path))
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.path(os.path.dirname(prefix)) if prefix else self.root
        if not os.path.isdir(base):
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if _is_partial(name):
                    continue  # an unfinished write, never an object
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    st = os.stat(full)
                    yield ObjectInfo(
                        key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC)
                    )

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """The temporary files of writes that never finished (their final key under
        ``prefix``): regular files only, never followed through a link."""
        base = self.path(os.path.dirname(prefix)) if prefix else self.root
        out: list[PendingUpload] = []
        if not os.path.isdir(base):
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if not _is_partial(name):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
                final = name[1 : name.rfind(_PARTIAL)]
                key = f"{rel}/{final}" if rel != "." else final
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue  # finished or removed meanwhile
                if not stat.S_ISREG(st.st_mode) or not key.startswith(prefix):
                    continue
                out.append(
                    PendingUpload(
                        key=key,
                        upload_id=os.path.relpath(full, self.root).replace(os.sep, "/"),
                        started=datetime.fromtimestamp(st.st_mtime, UTC),
                        size=st.st_size,
                    )
                )
        return out

    def abort_upload(self, upload: PendingUpload) -> None:
        """Remove the temporary file (only a hidden ``.partial-`` regular file inside the
        target), then the directories it leaves empty."""
        path = self.path(upload.upload_id)
        if not _is_partial(os.path.basename(path)):
            raise InvalidParameterError(f"{path}: not the temporary file of an unfinished write")
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise InvalidParameterError(f"{path}: not a regular file: left alone")
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise target_error(path, exc, "remove") from None
        self._prune(os.path.dirname(path))

    def delete(self, key: str) -> None:
        """Remove the object, then the directories it leaves empty (an object store has no
        directories: a forgotten export leaves nothing behind here either)."""
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._prune(os.path.dirname(path))

    def _prune(self, parent: str) -> None:
        while parent != self.root and parent.startswith(self.root + os.sep):
            try:
                os.rmdir(parent)  # only if empty
            except OSError:
                break
            parent = os.path.dirname(parent)


def _create_exclusive(path: str, data: bytes) -> bool:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise target_error(path, exc, "conditional write") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise target_error(path, exc, "conditional write") from None
    finally:
        os.close(fd)
    return True


TARGET = LocalTarget
