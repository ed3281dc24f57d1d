"""Is the process that holds a repository lock provably dead?

A lock names its owner by host and pid; a pid alone proves nothing (pids are reused, other pid
namespaces and machines have their own), so the owner also records who the process is:

- ``started``: its start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), so a
  pid reused by a later process is told apart;
- ``boot_id``: the kernel's boot id (``/proc/sys/kernel/random/boot_id``), the same for every
  process and container of one boot of one machine: two machines that share a host name have
  different ones;
- ``pid_ns``: the pid namespace (``/proc/self/ns/pid``): a container sharing the host's name
  (``--network host``) has pids of its own that this one cannot see.

A holder is provably dead only when all of that is ours (same host name, boot and pid namespace:
we see the same processes it did) and its pid is gone, is a zombie, or belongs to a process that
started at another time. Anything else (another host, a lock written without these fields, a
system without /proc) is left to the stale rule. Everything read from a lock object comes from
the target and is checked before use: a pid is a bounded int, the rest only compared.
"""

from __future__ import annotations

import os
import socket
from typing import Any

MAX_PID = 1 << 22  # Linux's pid_max ceiling
_PROC = "/proc"


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace").strip()
    except OSError:
        return None


def boot_id() -> str | None:
    return _read(f"{_PROC}/sys/kernel/random/boot_id", 64) or None


def pid_namespace() -> str | None:
    try:
        return os.readlink(f"{_PROC}/self/ns/pid")
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid`` from /proc/<pid>/stat, None if there is no such process
    (or no /proc). The command name may hold spaces and parentheses: fields are counted after
    the last ')'."""
    raw = _read(f"{_PROC}/{pid}/stat")
    if raw is None:
        return None
    fields = raw[raw.rfind(")") + 1 :].split()
    try:
        return fields[0], int(fields[19])  # field 3 (state) and field 22 (starttime)
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    found = _stat(pid)
    return found[1] if found else None


def identity(pid: int | None = None) -> dict[str, Any]:
    """What a lock owner records about process ``pid`` (this one by default) besides host and
    pid; None for what this system cannot tell."""
    return {
        "started": start_time(pid or os.getpid()),
        "boot_id": boot_id(),
        "pid_ns": pid_namespace(),
    }


def _pid(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_PID:
        return None
    return value


def dead_holder(owner: dict[str, Any]) -> str | None:
    """Why the process ``owner`` names is provably dead, or None when it may be alive (or
    cannot be checked from here)."""
    pid = _pid(owner.get("pid"))
    if pid is None or owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") != boot_id() or owner.get("pid_ns") != pid_namespace():
        return None  # another machine of the same name, another boot or pid namespace
    if not os.path.isdir(_PROC):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"no process {pid} on this host"
        except OSError:
            pass  # it exists, under another user
        return None
    found = _stat(pid)
    if found is None:
        return f"no process {pid} on this host"
    state, started = found
    if state in ("Z", "X"):
        return f"process {pid} has exited (a zombie)"
    recorded = owner.get("started")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded != started:
        return f"pid {pid} now belongs to another process"
    return None
