"""Repository locks: one run at a time writes (backs up, forgets) a VM's exports on a target.

The lock is the object ``<vm prefix>lock.json``, created with ``Target.put_if_absent`` (atomic
on every target: of racing creators exactly one wins). It holds::

    {"schema": "hypersdk.lock/v1", "token": <random hex, the holder's identity>,
     "owner": {"host", "pid", "started", "boot_id", "pid_ns", "flow_run_id", "purpose"},
     "created": <ISO 8601 UTC>, "refreshed": <ISO 8601 UTC>}

The holder rewrites ``refreshed`` while it works (``refresh``; the context manager does it in a
thread every ``stale_after / 3``). A lock not refreshed for ``stale_after`` seconds (15 minutes)
belongs to a run that died: the next run takes it over, and says so in the log. A holder on this
host that is provably dead (its pid gone, a zombie, or reused by another process: see
hypersdk.repository.liveness for what proves it) is taken over at once, by the same protocol, with
a warning naming it: a killed backup does not hold its VM for 15 minutes.

Taking over: the taker first creates ``<lock>.takeover-<stale token>`` with put_if_absent, so
of several runs waiting on the same dead holder only one goes on; it reads the lock again (still
that token, still stale or dead), deletes it, creates its own and removes the marker. A marker
left by a taker that died is removed once it is stale, or at once when its taker is provably
dead. Targets have no conditional delete, so two windows remain, both a few milliseconds wide
and both needing a holder that already stalled for ``stale_after``: a stalled holder whose
refresh (read, compare, write) lands between a taker's delete and create overwrites the taker's
lock, and one whose release (read, compare, delete) lands there deletes it. Either way the next refresh of the run
that lost the lock raises RepositoryLockedError instead of going on unnoticed.

The lock object comes from the target, which anyone with write access can fill: it is read
with a size bound and checked; an unreadable one counts as held by an unknown owner since the
object's modification time (so it too goes stale and is taken over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypersdk.errors import ObjectNotFoundError, RepositoryLockedError
from hypersdk.references import printable
from hypersdk.repository.liveness import dead_holder, identity

log = logging.getLogger(__name__)

SCHEMA = "hypersdk.lock/v1"
LOCK_NAME = "lock.json"
STALE_AFTER = 900.0  # seconds without a refresh before a lock counts as abandoned
MAX_LOCK_BYTES = 64 * 1024
_TOKEN = re.compile(r"[0-9a-f]{16,64}")
_SHOWN = 80  # characters of a stored owner field shown in messages


def default_owner(purpose: str, flow_run_id: str | None = None) -> dict[str, Any]:
    """Who holds a lock, as shown to the runs that wait for it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **identity(),  # started, boot_id, pid_ns: what proves this process dead later
        "flow_run_id": flow_run_id,
        "purpose": purpose,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def _show(value: Any) -> str:
    return printable(str(value)[:_SHOWN])


@dataclass(frozen=True)
class LockRecord:
    """A lock object as read from the target (``valid`` False: it could not be parsed, and the
    times are the object's modification time)."""

    token: str
    owner: dict[str, Any]
    created: float
    refreshed: float
    valid: bool = True

    def describe(self, now: float) -> str:
        if not self.valid:
            who = "an unknown owner (the lock object is unreadable)"
        else:
            o = self.owner
            extra = [f"purpose {_show(o.get('purpose'))}"] if o.get("purpose") else []
            if o.get("flow_run_id"):
                extra.insert(0, f"flow run {_show(o['flow_run_id'])}")
            who = f"host {_show(o.get('host'))} pid {_show(o.get('pid'))}"
            if extra:
                who += f" ({', '.join(extra)})"
        ago = max(0, round(now - self.refreshed))
        return f"{who} since {_iso(self.created)}, last refreshed {ago} s ago"


@dataclass
class RepositoryLock:
    """The lock of one VM's exports on ``target`` (see the module). ``vm_prefix`` is the VM's
    key prefix (``hypersdk.repository.vm_prefix``); ``owner`` says who we are
    (``default_owner``). ``wait`` and ``refresh_every`` serve the context manager."""

    target: Any
    vm_prefix: str
    owner: dict[str, Any]
    stale_after: float = STALE_AFTER
    wait: float = 0.0
    poll: float = 2.0
    refresh_every: float | None = None
    took_over: LockRecord | None = field(default=None, init=False)  # the dead holder we replaced
    takeover_reason: str | None = field(default=None, init=False)  # why it counted as dead
    lost: RepositoryLockedError | None = field(default=None, init=False)  # background refresh

    def __post_init__(self) -> None:
        prefix = self.vm_prefix
        self.key = f"{prefix}{'' if not prefix or prefix.endswith('/') else '/'}{LOCK_NAME}"
        self.token = secrets.token_hex(16)
        self.held = False
        self._created = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # --- public ---------------------------------------------------------------------------
    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait`` seconds for its holder to release it (polling
        every ``poll`` seconds); a stale lock, or one of a provably dead holder, is taken over.
        RepositoryLockedError naming the holder when it is still held after ``wait``."""
        if self.held:
            return
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            self._created = time.time()
            if self.target.put_if_absent(self.key, self._record(self._created)):
                self.held = True
                return
            current = self.read()
            if current is not None:
                if current.token == self.token:  # our create went through; its answer was lost
                    self.held = True
                    return
                if self._abandoned(current) and self._take_over(current):
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                held_by = (
                    f"locked by {current.describe(time.time())}"
                    if current is not None
                    else "the lock can be neither created nor read (is something else there?)"
                )
                raise RepositoryLockedError(
                    f"{self._where()}: {held_by}; gave up after waiting {wait:g} s"
                )
            # no lock to read: released between our create and our read, try again soon
            time.sleep(min(self.poll if current is not None else 0.05, left))

    def refresh(self) -> None:
        """Rewrite the lock with a new ``refreshed`` time, if it is still ours (read, compare,
        write: see the module for the window); RepositoryLockedError if it is not."""
        if self._ours("refresh") is None:
            self.held = False
            raise RepositoryLockedError(f"{self._where()}: cannot refresh: the lock is gone")
        self.target.put_bytes(self.key, self._record(self._created, time.time()))

    def release(self) -> None:
        """Delete the lock if it is ours; RepositoryLockedError (and nothing deleted) if someone
        else holds it. A lock already gone is only logged."""
        self._stop_refresher()
        if self._ours("release") is None:
            log.warning("%s: the lock was already gone at release", self._where())
        else:
            self.target.delete(self.key)
        self.held = False

    def __enter__(self) -> RepositoryLock:
        self.acquire(self.wait)
        every = self.refresh_every or self.stale_after / 3
        self._stop.clear()
        self._refresher = threading.Thread(
            target=self._keep_fresh, args=(every,), name="lock-refresh", daemon=True
        )
        self._refresher.start()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.release()
            if self.lost is not None:
                raise self.lost
            return
        try:
            self.release()
        except Exception as err:  # the body's error matters more
            log.warning("%s: could not release the lock: %s", self._where(), err)

    def read(self) -> LockRecord | None:
        """The lock as stored now (None when there is none)."""
        return read_lock(self.target, self.key)

    # --- internals ------------------------------------------------------------------------
    def _where(self) -> str:
        return self.target.location(self.key)

    def _record(self, created: float, refreshed: float | None = None, token: str = "") -> bytes:
        doc = {
            "schema": SCHEMA,
            "token": token or self.token,
            "owner": self.owner,
            "created": _iso(created),
            "refreshed": _iso(refreshed if refreshed is not None else created),
        }
        return json.dumps(doc, indent=2, default=str).encode()

    def _stale(self, record: LockRecord) -> bool:
        return time.time() - record.refreshed > self.stale_after

    def _abandoned(self, record: LockRecord) -> str | None:
        """Why ``record``'s holder is gone (stale, or provably dead), or None."""
        if self._stale(record):
            return f"stale: not refreshed for {self.stale_after:g} s"
        if record.valid:
            dead = dead_holder(record.owner)
            if dead is not None:
                return f"dead holder: {dead}"
        return None

    def _ours(self, doing: str) -> LockRecord | None:
        """The stored lock if it is ours, None if there is none; RepositoryLockedError naming
        the holder if someone else holds it."""
        current = self.read()
        if current is not None and current.token != self.token:
            self.held = False
            raise RepositoryLockedError(
                f"{self._where()}: cannot {doing} a lock we do not hold: it is held by "
                f"{current.describe(time.time())}"
            )
        return current

    def _take_over(self, stale: LockRecord) -> bool:
        """Replace ``stale`` (stale or dead) by our lock; False when another run is doing it (or
        did)."""
        marker = f"{self.key}.takeover-{stale.token}"
        if not self.target.put_if_absent(marker, self._record(time.time())):
            self._clear_abandoned_marker(marker)
            return False
        try:
            current = self.read()
            if current is None or current.token != stale.token:
                return False  # released or taken over
            why = self._abandoned(current)
            if why is None:
                return False  # refreshed after all
            self.target.delete(self.key)
            self._created = time.time()
            if not self.target.put_if_absent(self.key, self._record(self._created)):
                return False  # a run that found no lock at all was quicker
        finally:
            self.target.delete(marker)
        self.held = True
        self.took_over = stale
        self.takeover_reason = why
        if why.startswith("dead"):
            log.warning(
                "%s: took over the lock of a dead holder, %s (%s)",
                self._where(),
                stale.describe(time.time()),
                why.removeprefix("dead holder: "),
            )
        else:
            log.warning(
                "%s: took over a stale lock of %s (stale after %g s)",
                self._where(),
                stale.describe(time.time()),
                self.stale_after,
            )
        return True

    def _clear_abandoned_marker(self, marker: str) -> None:
        """A takeover marker left by a run that died taking over: removed once it is stale
        itself (or its taker provably dead), so the dead lock can still be taken over."""
        record = read_lock(self.target, marker)
        if record is not None and self._abandoned(record):
            self.target.delete(marker)

    def _keep_fresh(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except RepositoryLockedError as exc:
                self.lost = exc
                log.error("%s", exc)
                return
            except Exception as exc:  # a network hiccup: the next round tries again
                log.warning("%s: lock refresh failed: %s", self._where(), exc)

    def _stop_refresher(self) -> None:
        self._stop.set()
        thread, self._refresher = self._refresher, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def read_lock(target, key: str) -> LockRecord | None:
    """The lock object under ``key`` (None if there is none), read with a size bound; one that
    is not a valid lock becomes an invalid LockRecord dated by the object's modification
    time."""
    try:
        reader = target.open_reader(key)
        try:
            size = reader.size
            raw = reader.read(0, size) if size <= MAX_LOCK_BYTES else b""
        finally:
            reader.close()
    except ObjectNotFoundError:  # none, or deleted between the size and the bytes
        return None
    record = _parse(raw) if size <= MAX_LOCK_BYTES else None
    if record is not None:
        return record
    modified = next((o.modified for o in target.list(key) if o.key == key), None)
    when = modified.timestamp() if modified is not None else time.time()
    digest = hashlib.sha256(raw + f"/{size}/{when}".encode()).hexdigest()[:32]
    return LockRecord(token=f"x{digest}", owner={}, created=when, refreshed=when, valid=False)


def _parse(raw: bytes) -> LockRecord | None:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return None
    token, owner = doc.get("token"), doc.get("owner")
    created, refreshed = _parse_time(doc.get("created")), _parse_time(doc.get("refreshed"))
    if not isinstance(token, str) or not _TOKEN.fullmatch(token) or not isinstance(owner, dict):
        return None
    if created is None or refreshed is None or refreshed > time.time() + STALE_AFTER:
        return None  # a refresh time far in the future would never go stale
    return LockRecord(token=token, owner=owner, created=created, refreshed=refreshed)
