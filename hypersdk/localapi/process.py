"""Processes and ports: is a server healthy, is a recorded pid still the server we started (not
a reused pid), stopping its process group, whether a port is free, and why a server stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from hypersdk.localapi.model import HOST, ServerState

spawned: list[Any] = []  # servers this process started: they outlive it, so no Popen warning


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """``GET <api>/health`` answers ``true`` (a Prefect server, up and migrated)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/health")
        response = conn.getresponse()
        return response.status == 200 and response.read(64).strip() == b"true"
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a process, from /proc."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return (fields[0].decode(), fields[19].decode()) if len(fields) > 19 else None


def _reap(pid: int) -> None:
    """Collect ``pid`` if this process started it and it exited (else it stays a zombie)."""
    for proc in spawned:
        if proc.pid == pid:
            proc.poll()


def is_ours(state: ServerState) -> bool:
    """The state's pid is alive and still the server we started (not a reused pid)."""
    _reap(state.pid)
    if not os.path.isdir("/proc/self"):  # no /proc: alive, and its port answers as a server
        try:
            os.kill(state.pid, 0)
        except OSError:
            return False
        return healthy(state.url)
    stat = proc_stat(state.pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    if state.proc_start is not None and stat[1] != state.proc_start:
        return False
    try:
        argv = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"prefect" in argv and b"server" in argv and b"start" in argv


def _gone(pid: int) -> bool:
    _reap(pid)
    stat = proc_stat(pid)
    if stat is not None:
        return stat[0] in ("Z", "X")
    if os.path.isdir("/proc/self"):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def terminate(pid: int, timeout: float) -> bool:
    """SIGTERM the process group ``pid`` leads (the server and anything it spawned), SIGKILL
    after ``timeout``; True once it is gone."""
    import signal

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def wait_gone(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not _gone(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    send(signal.SIGTERM)
    if wait_gone(timeout):
        return True
    send(signal.SIGKILL)
    return wait_gone(10.0)


def port_taken(port: int) -> bool:
    """The same test ``prefect server start`` makes before it binds."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def last_error(log: Path) -> str:
    """The line of a server log that says why it stopped."""
    import re

    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in lines if ln.strip()]
    telling = (
        re.compile(r"\w(Error|Exception): |already in use"),  # the exception, or Prefect's own
        re.compile(r"denied|No such file|failed|ERROR"),
    )
    for pattern in telling:
        for line in reversed(lines):
            if pattern.search(line) and not line.startswith("(Background on this error"):
                return line[:300]
    return lines[-1][:300] if lines else "no output"
