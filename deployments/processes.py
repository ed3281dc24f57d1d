"""Stopping a process this tool started, by its PID: a polite signal, a wait, then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def stop_pid(pid: int, timeout: float = 20, sig: int = signal.SIGTERM, group: bool = True) -> None:
    """Send ``sig`` to ``pid`` (its whole process group when ``group``: a worker's own
    children), wait up to ``timeout`` s for it to go (reaping it if it is our child), then
    SIGKILL."""
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGKILL)
