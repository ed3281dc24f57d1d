"""Reading a small file someone else wrote (a VM description, a price list, a configuration):
a regular file only, never more than a bound, checked on the open descriptor.

``Path.read_text`` would hang forever on a FIFO, read a device without end and load a huge file
whole; a stat before the open could be raced by a rename."""

from __future__ import annotations

import os
import stat


class UnreadableFile(Exception):
    """Why the file was refused, in a few words (``str(exc)``); callers name the file."""


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them.

    FileNotFoundError passes through (callers often treat a missing file as "not configured");
    anything else refused is an ``UnreadableFile`` saying why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile("not a regular file")
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if got > limit:
        raise UnreadableFile(f"larger than {limit} bytes")
    return b"".join(chunks)
