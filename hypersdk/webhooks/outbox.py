"""The webhook outbox: one SQLite row per event per endpoint, written before anything is sent,
so events survive a receiver that is down, a run that ends, and a process that dies.

Rows of one (endpoint, job) queue go out strictly in order: only the oldest undelivered row of a
queue can be claimed, so event n+1 waits until n is acknowledged (or given up). A claim is a
lease: a sender that dies mid-delivery frees the row when the lease runs out and the row is sent
again (at-least-once; the receiver deduplicates on the event id). WAL mode lets runs append while
a sender works; the file belongs on local disk (SQLite's WAL needs shared memory, not NFS).
Nothing secret is stored: bodies carry redacted URLs, errors are scrubbed, secrets are read at
signing time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hypersdk import config

ENV_PATH = "HYPERSDK_WEBHOOK_OUTBOX"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    job TEXT NOT NULL,
    event TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    lease_until REAL,
    delivered REAL,
    dead REAL,
    last_error TEXT,
    UNIQUE (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS pending ON deliveries (endpoint, job, id)
    WHERE delivered IS NULL AND dead IS NULL;
"""


def default_path() -> Path:
    if env := os.environ.get(ENV_PATH):
        return Path(env).expanduser()
    return config.home() / "webhooks" / "outbox.sqlite"


@dataclass(frozen=True)
class Row:
    id: int
    event_id: str
    endpoint: str
    job: str
    event: str
    body: bytes
    created: float
    attempts: int


class Outbox:
    """The outbox file; each call opens its own connection (threads and processes share the
    file, never a connection)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def enqueue(self, event_id: str, job: str, event: str, body: bytes, endpoints: Iterable[str]):
        """One row per endpoint; the same event twice is one row (the event id is the key)."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (event_id, endpoint, job, event, body, created,"
                " next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(event_id, e, job, event, body, now, now) for e in endpoints],
            )
            db.execute("COMMIT")

    def claim(self, lease: float, limit: int = 100, now: float | None = None) -> list[Row]:
        """The due heads of their queues, leased to the caller for ``lease`` seconds."""
        now = time.time() if now is None else now
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT d.id, d.event_id, d.endpoint, d.job, d.event, d.body, d.created,"
                " d.attempts FROM deliveries d"
                " WHERE d.delivered IS NULL AND d.dead IS NULL AND d.next_attempt <= ?"
                " AND (d.lease_until IS NULL OR d.lease_until < ?)"
                " AND d.id = (SELECT MIN(e.id) FROM deliveries e WHERE e.endpoint = d.endpoint"
                "   AND e.job = d.job AND e.delivered IS NULL AND e.dead IS NULL)"
                " ORDER BY d.id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE deliveries SET lease_until = ? WHERE id = ?",
                [(now + lease, r[0]) for r in rows],
            )
            db.execute("COMMIT")
        return [Row(*r) for r in rows]

    def ack(self, row_id: int) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE deliveries SET delivered = ?, lease_until = NULL, attempts = attempts + 1,"
                " last_error = NULL WHERE id = ?",
                (time.time(), row_id),
            )

    def retry(self, row_id: int, error: str, at: float) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt = ?,"
                " lease_until = NULL WHERE id = ?",
                (error, at, row_id),
            )

    def give_up(self, row_id: int, error: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE deliveries SET dead = ?, attempts = attempts + 1, last_error = ?,"
                " lease_until = NULL WHERE id = ?",
                (time.time(), error, row_id),
            )

    def pending(self) -> int:
        with self._db() as db:
            return db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE delivered IS NULL AND dead IS NULL"
            ).fetchone()[0]

    def next_due(self) -> float | None:
        """When the earliest pending row may be tried (None: nothing pending)."""
        with self._db() as db:
            row = db.execute(
                "SELECT MIN(MAX(next_attempt, COALESCE(lease_until, 0))) FROM deliveries"
                " WHERE delivered IS NULL AND dead IS NULL"
            ).fetchone()
        return row[0]

    def rows(self, state: str = "pending", limit: int = 100) -> list[dict]:
        """For ``hyperctl webhooks list``: pending, dead or delivered rows, oldest first."""
        where = {
            "pending": "delivered IS NULL AND dead IS NULL",
            "dead": "dead IS NOT NULL",
            "delivered": "delivered IS NOT NULL",
        }[state]
        with self._db() as db:
            db.row_factory = sqlite3.Row
            got = db.execute(
                "SELECT id, event_id, endpoint, job, event, created, attempts, next_attempt,"
                f" delivered, dead, last_error FROM deliveries WHERE {where} ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(r) for r in got]

    def purge(self, older_than: float) -> int:
        """Forget delivered rows older than ``older_than`` seconds."""
        with self._db() as db:
            cur = db.execute(
                "DELETE FROM deliveries WHERE delivered IS NOT NULL AND delivered < ?",
                (time.time() - older_than,),
            )
            return cur.rowcount
