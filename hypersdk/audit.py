"""The audit log: who exported, restored or forgot what, where, when and with what result, one
JSON line per action, in a hash chain that ``hyperctl audit verify`` checks.

Each line carries ``seq`` (0, 1, ...), ``prev`` (the previous line's hash; the first line's is
GENESIS) and ``hash`` (SHA-256 of the line's canonical JSON without ``hash``). Editing a line
breaks its hash; deleting, inserting or moving one breaks the next line's ``prev`` and ``seq``.
A removed *last* line leaves a valid shorter chain, so a head file next to the log (``.head``:
count and last hash) is rewritten after every append, under the same lock: the log must reach
it. What the chain cannot see (a log rewritten whole with fresh hashes, or log and head both
replaced) is in docs/audit-webhooks.md.

Appends are serialised between processes (and hosts, on shared storage that honours POSIX
locks) by ``fcntl.lockf`` on ``<log>.lock``, and between threads by a process lock. A line is
written with one ``write`` and fsynced before the head moves; a torn last line (a crash in the
middle of a write) is never built upon: appends refuse until ``hyperctl audit repair`` moves the
torn bytes aside and records that it did.

Nothing here imports Prefect: a flow passes its run id, and the engine works without one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import hashlib
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypersdk import config
from hypersdk.atomic import fsync_dir
from hypersdk.errors import HyperSDKError
from hypersdk.urls import redact_url

ENV_PATH = "HYPERSDK_AUDIT_LOG"
GENESIS = hashlib.sha256(b"hypersdk audit log v1").hexdigest()
VERSION = 1
MAX_LINE = 64 * 1024  # one record; larger "what" details are cut, never the chain
LOCK_TIMEOUT = 60.0
_thread_lock = threading.Lock()


class AuditError(HyperSDKError):
    """The audit log is damaged (edited, truncated, torn) or cannot be written."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{path}: line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def default_path() -> Path:
    """``$HYPERSDK_AUDIT_LOG``, else ``$HYPERSDK_HOME/audit.log`` (point several workers at one
    file on shared storage to get one chain)."""
    if env := os.environ.get(ENV_PATH):
        return Path(env).expanduser()
    return config.home() / "audit.log"


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def line_hash(record: Mapping[str, Any]) -> str:
    """The hash a line must carry: over everything in it but ``hash`` (``prev`` included)."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def who(flow_run_id: str | None = None) -> dict[str, Any]:
    """OS user, host, process, and the Prefect flow run when there is one (asked of Prefect only
    if it is already loaded: the engine never imports it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = f"uid:{os.getuid()}"
    if flow_run_id is None and "prefect" in sys.modules:
        with contextlib.suppress(Exception):
            from prefect.runtime import flow_run

            flow_run_id = flow_run.id
    return {
        "user": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "flow_run_id": str(flow_run_id) if flow_run_id else None,
    }


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Head:
    count: int
    hash: str


@dataclass(frozen=True)
class Summary:
    """What ``verify`` found: ``count`` lines, the last one's hash, and whether the last line is
    beyond the head (an append whose head update a crash cut short)."""

    path: str
    count: int
    last_hash: str
    unanchored: int = 0


class AuditLog:
    """One audit log file, its head and its lock file."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.head = head_path(self.path)
        self.lock = self.path.with_name(self.path.name + ".lock")

    # -- locking -------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """The log's lock: a POSIX record lock on ``<log>.lock`` (it works between hosts on
        NFS), and a process lock (POSIX locks do not exclude threads of one process)."""
        if not _thread_lock.acquire(timeout=timeout):
            raise AuditError(self.path, f"audit log busy in this process for {timeout:.0f} s")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise AuditError(
                                self.path, f"audit log locked by another process for {timeout} s"
                            ) from None
                        time.sleep(0.005)
                try:
                    yield
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            _thread_lock.release()

    # -- reading ---------------------------------------------------------------------------

    def read_head(self) -> Head | None:
        try:
            data = json.loads(self.head.read_bytes())
            return Head(int(data["count"]), str(data["hash"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise AuditError(self.head, "head file is unreadable or not a head") from None

    def _write_head(self, head: Head) -> None:
        tmp = self.head.with_name(f".{self.head.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o664)
        try:
            os.write(fd, canonical({"count": head.count, "hash": head.hash}) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head)
        fsync_dir(self.head.parent)

    def _last_record(self, fd: int, size: int) -> dict[str, Any] | None:
        """The last line of a non-empty log, checked on its own (its hash), without reading the
        whole file; AuditError for a torn or damaged tail."""
        if size == 0:
            return None
        start = max(0, size - MAX_LINE - 2)
        tail = os.pread(fd, size - start, start)
        if not tail.endswith(b"\n"):
            raise AuditError(
                self.path,
                f"the last line is torn (no newline at byte {size}: an append cut short); "
                "run 'hyperctl audit repair' to move it aside",
            )
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut < 0 and start > 0:
            raise AuditError(self.path, f"the last line is longer than {MAX_LINE} bytes")
        record = _parse(tail[cut + 1 : -1])
        if record is None or record.get("hash") != line_hash(record):
            raise AuditError(self.path, "the last line is damaged: run 'hyperctl audit verify'")
        return record

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        action: str,
        *,
        what: Mapping[str, Any] | None = None,
        source: str | None = None,
        target: str | None = None,
        result: str = "ok",
        error: str | None = None,
        flow_run_id: str | None = None,
    ) -> dict[str, Any]:
        """Append one action as one line; returns the record written. ``source``/``target`` are
        redacted here whatever the caller passed."""
        body: dict[str, Any] = {
            "v": VERSION,
            "time": _utc_now(),
            "who": who(flow_run_id),
            "action": action,
            "what": dict(what or {}),
            "where": {
                "source": redact_url(source) if source else None,
                "target": redact_url(target) if target else None,
            },
            "result": result,
        }
        if error:
            body["error"] = scrub(error)
        if len(canonical(body)) > MAX_LINE - 512:
            body["what"] = {"truncated": True, "note": "details longer than an audit line"}
        with self.locked():
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o664)
            try:
                size = os.fstat(fd).st_size
                last = self._last_record(fd, size)
                self._check_head(last)
                record = {
                    **body,
                    "seq": last["seq"] + 1 if last else 0,
                    "prev": last["hash"] if last else GENESIS,
                }
                record["hash"] = line_hash(record)
                data = canonical(record) + b"\n"
                written = os.write(fd, data)  # O_APPEND: one write, at the end
                if written != len(data):  # a full disk: never leave half a line behind
                    os.ftruncate(fd, size)
                    raise AuditError(self.path, "short write (disk full?): nothing appended")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_head(Head(record["seq"] + 1, record["hash"]))
        return record

    def _check_head(self, last: dict[str, Any] | None) -> None:
        """The log's end agrees with the head: the head names the last line, or the one before
        it (a crash between the line's write and the head's). Anything else means lines were
        removed or replaced: appending would hide that, so refuse."""
        head = self.read_head()
        if last is None:
            if head is not None and head.count:
                raise AuditError(
                    self.path, f"log is empty but its head records {head.count} line(s)"
                )
            return
        if head is None:
            if last["seq"] == 0:
                return  # the first append's head was never written
            raise AuditError(self.path, f"head file {self.head.name} is missing")
        if head.count == last["seq"] + 1 and head.hash == last["hash"]:
            return
        if head.count == last["seq"] and head.hash == last["prev"]:
            return
        raise AuditError(
            self.path,
            f"log ends at line {last['seq'] + 1} but its head records {head.count} line(s): "
            "run 'hyperctl audit verify'",
        )

    def repair(self) -> dict[str, Any] | None:
        """Move a torn last line (and nothing else) aside into ``<log>.torn-<time>`` and record
        that in the log; None when the last line is whole. Tampering is never "repaired"."""
        with self.locked():
            try:
                data_size = self.path.stat().st_size
            except FileNotFoundError:
                return None
            with open(self.path, "r+b") as f:
                start = max(0, data_size - MAX_LINE - 2)
                f.seek(start)
                tail = f.read()
                if not tail or tail.endswith(b"\n"):
                    return None
                cut = tail.rfind(b"\n")
                keep = start + cut + 1 if cut >= 0 else start
                if cut < 0 and start > 0:
                    raise AuditError(self.path, "torn tail longer than one line: not repaired")
                torn = tail[cut + 1 :]
                stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
                aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
                aside.write_bytes(torn)
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        return self.append(
            "repair",
            what={
                "torn_bytes": len(torn),
                "torn_sha256": hashlib.sha256(torn).hexdigest(),
                "offset": keep,
                "saved_to": aside.name,
            },
        )

    # -- verifying -------------------------------------------------------------------------

    def verify(self) -> Summary:
        """Check every line and the head; AuditError naming the first bad line."""
        try:
            regular = stat.S_ISREG(os.stat(self.path).st_mode)
        except FileNotFoundError:
            raise AuditError(self.path, "no such audit log") from None
        except OSError as exc:
            raise AuditError(self.path, exc.strerror or "cannot be read") from None
        if not regular:
            raise AuditError(self.path, "not a regular file")
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):  # a read-only copy: check it as it is
                stack.enter_context(self.locked())
            return self._verify()

    def _verify(self) -> Summary:
        prev, before, count = GENESIS, GENESIS, 0
        with open(self.path, "rb") as f:
            # bounded reads: a line is never longer than MAX_LINE, whatever the file holds
            for raw in iter(lambda: f.readline(MAX_LINE + 1), b""):
                n = count + 1
                if len(raw) > MAX_LINE:
                    raise AuditError(self.path, f"longer than {MAX_LINE} bytes", n)
                if not raw.endswith(b"\n"):
                    raise AuditError(self.path, "torn (no newline: an append cut short)", n)
                record = _parse(raw[:-1])
                if record is None:
                    raise AuditError(self.path, "not a JSON audit record", n)
                if record.get("hash") != line_hash(record):
                    raise AuditError(self.path, "edited (its hash does not match its content)", n)
                if record.get("prev") != prev or record.get("seq") != count:
                    raise AuditError(
                        self.path,
                        f"does not follow line {count} (seq {record.get('seq')!r}, expected "
                        f"{count}): a line was deleted, inserted or moved here",
                        n,
                    )
                before, prev, count = prev, record["hash"], n
        head = self.read_head()
        if head is None:
            if count > 1:
                raise AuditError(self.path, f"head file {self.head.name} is missing")
            return Summary(str(self.path), count, prev, unanchored=count)
        if head.count > count:
            raise AuditError(
                self.path,
                f"ends after line {count} but its head records {head.count} line(s): "
                f"the last {head.count - count} line(s) were deleted",
            )
        if head.count == count:
            if head.hash != prev:
                raise AuditError(self.path, "replaced (differs from the head's last hash)", count)
            return Summary(str(self.path), count, prev)
        if head.count == count - 1 and head.hash == before:
            return Summary(str(self.path), count, prev, unanchored=1)
        raise AuditError(
            self.path,
            f"its head records {head.count} line(s) and hash {head.hash[:12]}..., which "
            f"this log of {count} line(s) does not reach",
            head.count + 1 if head.count < count else None,
        )


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def scrub(text: str, limit: int = 2000) -> str:
    """An error message fit for the log, a webhook or a database: every URL in it redacted,
    the whole cut to ``limit`` characters."""
    import re

    def one(m: re.Match[str]) -> str:
        return redact_url(m.group(0))

    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", one, str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record(action: str, **fields: Any) -> dict[str, Any]:
    """Append to the default audit log (``$HYPERSDK_AUDIT_LOG`` or ``$HYPERSDK_HOME``)."""
    return AuditLog().append(action, **fields)


@contextlib.contextmanager
def audited(action: str, path: str | os.PathLike[str] | None = None, **fields: Any):
    """One audit line for the block it wraps: ``ok`` when it ends, ``failed`` (with the error,
    scrubbed) when it raises; the block may add details to the yielded ``what`` dict. For
    engine callers outside the flows (whose state hooks audit them)."""
    what: dict[str, Any] = dict(fields.pop("what", None) or {})
    try:
        yield what
    except BaseException as exc:
        result = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        AuditLog(path).append(action, what=what, result=result, error=str(exc), **fields)
        raise
    AuditLog(path).append(action, what=what, **fields)
