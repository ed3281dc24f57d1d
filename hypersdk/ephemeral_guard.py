"""Stop Prefect's *ephemeral* API server when the process that started it dies, even by SIGKILL.

In ephemeral mode Prefect starts ``python -m uvicorn ... prefect.server.api.server:create_app``
as a child and stops it from an ``atexit`` hook, which never runs when the CLI is killed: the
server then lives on as an orphan. Prefect gives no hook to set PR_SET_PDEATHSIG on that child,
so a tiny watchdog does the job instead:

- the CLI tags its environment with a random token (Prefect passes ``os.environ`` to the server);
- the watchdog (a separate session, so Ctrl-C to the CLI does not stop it first) blocks on a
  pipe whose only writer is the CLI; the kernel closes it when the CLI exits, however it exits;
- on EOF it stops the processes whose *initial* environment holds both the token and Prefect's
  ephemeral-server marker, and exits. After a clean exit Prefect has already stopped the server,
  so it finds nothing.

Linux only (it reads ``/proc/PID/environ``); elsewhere it does nothing. Cost: one blocked
``python -I -S`` process (no CPU) for the life of the CLI.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

TAG_VAR = "HYPERSDK_EPHEMERAL_OWNER"
MARKER = "PREFECT__SERVER_EPHEMERAL=1"  # set by Prefect on its ephemeral server only

_WATCHDOG = r"""
import os, signal, sys, time
while os.read(0, 4096):
    pass
tag = sys.argv[1].encode()
marker = sys.argv[2].encode()
me = os.getpid()
def owned():
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if tag in env and marker in env:
            yield int(name)
pids = list(owned())
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
deadline = time.monotonic() + 10
while pids and time.monotonic() < deadline:
    time.sleep(0.2)
    pids = [p for p in pids if os.path.exists("/proc/%d" % p)]
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""

_guard: tuple[subprocess.Popen, int] | None = None  # (watchdog, pipe writer) while we live


def guard_ephemeral_server() -> bool:
    """Arm the watchdog once per process (before the ephemeral server starts); False where it
    cannot work (no /proc)."""
    global _guard
    if _guard is not None:
        return True
    if not os.path.isdir("/proc/self"):
        return False
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()  # not inheritable: no other child keeps the pipe open
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, f"{TAG_VAR}={token}", MARKER],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={},
            start_new_session=True,
        )
    except OSError:
        os.close(write_end)
        return False
    finally:
        os.close(read_end)
    os.environ[TAG_VAR] = token
    _guard = (watchdog, write_end)
    return True
