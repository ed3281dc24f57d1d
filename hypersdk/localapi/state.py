"""The record of the server this tool started (``<home>/prefect/server.json``) and the lock
that makes concurrent CLIs start one server (``server.lock``)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

from hypersdk import config
from hypersdk.localapi.model import MAX_CONFIG_BYTES, Echo, LocalServerError, ServerState, urls


def state_dir() -> Path:
    return config.home() / "prefect"


def state_path() -> Path:
    return state_dir() / "server.json"


def log_path() -> Path:
    return state_dir() / "server.log"


def read_state() -> ServerState | None:
    """The recorded server, or None (no file, or a file that is not a valid record)."""
    path = state_path()
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(ServerState)}  # a newer version's extra keys are fine
        state = ServerState(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (state.pid, state.port))
    if not ints_ok or state.pid <= 1 or not 0 < state.port < 65536:
        return None
    if state.url != urls(state.port)[0]:
        return None
    return state


def write_state(state: ServerState) -> None:
    path = state_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def forget(pid: int) -> None:
    """Remove the state file if it still records ``pid``."""
    state = read_state()
    if state is None or state.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            state_path().unlink()


@contextlib.contextmanager
def locked(wait: float, on_wait: Echo) -> Iterator[None]:
    """An exclusive flock on ``<home>/prefect/server.lock``; released by the kernel if we die."""
    import fcntl

    state_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir() / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    on_wait("waiting for the local Prefect server another hyperctl is starting ...")
                    told = True
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"another hyperctl has been starting the server for {wait:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)
