"""A private PostgreSQL cluster for a Prefect server, from Debian's postgresql-15 binaries.

Prefect's default SQLite database serialises writes: several workers and a fleet of flow runs
need PostgreSQL (docs/fleet.md). This script makes a cluster in a directory of its own
(no system-wide server, no systemd), listening on 127.0.0.1 only, trust auth for the local role
``prefect``, and prints the URL to give the server::

    python -m deployments.postgres start --dir /srv/hypersdk-pg --port 5433
    export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect@127.0.0.1:5433/prefect
    prefect server start            # or: python -m deployments.workers server ...
    python -m deployments.postgres stop --dir /srv/hypersdk-pg

initdb refuses to run as root: as root, every PostgreSQL command runs as the ``postgres`` OS
user (``runuser -u postgres --``) and the directory is handed to it. Stop is by the PID the
postmaster writes into ``postmaster.pid`` (SIGINT: PostgreSQL's fast shutdown).

Trust auth on 127.0.0.1 is for a single-host deployment where every local user may reach the
database; on a shared host or across machines use a managed PostgreSQL or set a password on the
role and ``scram-sha-256`` in pg_hba.conf, and keep the URL (which then carries the password) in
an environment file readable only by the server's user.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from deployments.processes import stop_pid

PG_BIN = Path(os.environ.get("HYPERSDK_PG_BIN", "/usr/lib/postgresql/15/bin"))
ROLE = "prefect"
DATABASE = "prefect"
OS_USER = "postgres"


def _as_owner(cmd: list[str]) -> list[str]:
    """``cmd`` as the postgres OS user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", OS_USER, "--", *cmd]
    return cmd


def available() -> str | None:
    """Why a cluster cannot be made here, or None."""
    for tool in ("initdb", "postgres", "pg_isready"):
        if not (PG_BIN / tool).exists():
            return f"{PG_BIN / tool} is missing (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no {OS_USER!r} OS user to run PostgreSQL"
        if not shutil.which("runuser"):
            return "running as root and runuser is missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One cluster: ``base/data`` (PGDATA), ``base/postgres.log``, socket in ``base``."""

    def __init__(self, base: str | os.PathLike, port: int, durable: bool = True):
        self.durable = durable  # False (tests): fsync off, a crash of the host may lose data
        self.base = Path(base).absolute()
        self.data = self.base / "data"
        self.port = port

    @property
    def url(self) -> str:
        """The SQLAlchemy URL for PREFECT_API_DATABASE_CONNECTION_URL."""
        return f"postgresql+asyncpg://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run(
            _as_owner([str(PG_BIN / cmd[0]), *cmd[1:]]),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(done.stdout + done.stderr)[-2000:]}")

    def init(self) -> None:
        """initdb (once) with the ``prefect`` role as its superuser, trust on 127.0.0.1."""
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        os.chmod(self.base, 0o700)
        if (self.data / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ROLE,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )

    def start(self, log: bool = True) -> int:
        """Start the postmaster in its own session; wait until it accepts connections and the
        ``prefect`` database exists. Returns its PID."""
        out = open(self.base / "postgres.log", "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            _as_owner(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.base),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=on" if self.durable else "fsync=off",
                ]
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                timeout=10,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready in 60 s: {self.log_tail()}")
            time.sleep(0.2)
        self._create_database()
        return self.pid() or proc.pid

    def _create_database(self) -> None:
        psql = [str(PG_BIN / "psql")]
        conn = ["-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-d", "postgres", "-tAc"]
        have = subprocess.run(
            [*psql, *conn, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if have.returncode != 0:
            raise RuntimeError(f"psql failed: {have.stderr[-1000:]}")
        if have.stdout.strip() != "1":
            made = subprocess.run(
                [*psql, *conn, f"CREATE DATABASE {DATABASE}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if made.returncode != 0:
                raise RuntimeError(f"CREATE DATABASE failed: {made.stderr[-1000:]}")

    def pid(self) -> int | None:
        """The postmaster's PID from postmaster.pid, if it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, someone else's (we are not root and not its owner)
        return pid

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL if it lingers."""
        pid = self.pid()
        if pid is None:
            return
        stop_pid(pid, timeout, sig=signal.SIGINT, group=False)

    def log_tail(self) -> str:
        try:
            return (self.base / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.postgres", description=__doc__)
    parser.add_argument("action", choices=("start", "stop", "url"))
    parser.add_argument("--dir", required=True, help="the cluster's directory (made if missing)")
    parser.add_argument("--port", type=int, default=5433)
    args = parser.parse_args(argv)
    if why := available():
        print(why, file=sys.stderr)
        return 2
    cluster = Cluster(args.dir, args.port)
    if args.action == "start":
        cluster.init()
        pid = cluster.pid() or cluster.start()
        print(f"PostgreSQL {pid} on 127.0.0.1:{args.port}, data in {cluster.data}")
        print(f"PREFECT_API_DATABASE_CONNECTION_URL={cluster.url}")
    elif args.action == "stop":
        cluster.stop()
    else:
        print(cluster.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
