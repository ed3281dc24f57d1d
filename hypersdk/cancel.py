"""One process-wide cancellation token: a run asked to stop stops within one block, everywhere.

A run is stopped by a signal: ``hyperctl`` gets SIGTERM (or Ctrl-C), a run a Prefect worker
started gets SIGTERM when it is cancelled from the UI or the API. Python delivers a signal to
the main thread only, as an exception there (KeyboardInterrupt, Prefect's TerminationSignal);
the threads doing the work (the pipeline's stages, the verify pass's readers) never see it, and
the interpreter waits for them at exit. So the engine's long loops check this token once per
block (``check()``: an ``Event.is_set()``) and raise ``Interrupted``; every ``finally`` already
in place then runs (multipart upload aborted, nothing under a final name, snapshot removed).

Who sets it: ``watch_signals()`` relays SIGTERM and SIGINT to the token the moment they arrive,
through ``signal.set_wakeup_fd`` (CPython writes the signal number there whatever Python handler
runs), so it works under Prefect's own SIGTERM handler without replacing it (the worker's
cancellation protocol checks that handler is still Prefect's). ``stop_on_sigterm()`` is
``hyperctl``'s handler: SIGTERM stops it like Ctrl-C. Code that catches the main thread's
exception may also ``request()`` a stop itself. Nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from hypersdk.errors import Interrupted

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

_token = threading.Event()
_lock = threading.Lock()
_reason = ""
_signum: int | None = None
_watching = False
NOTHING_PUBLISHED = "nothing was published under a final name"
_leaves = NOTHING_PUBLISHED
_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def request(reason: str, signum: int | None = None) -> None:
    """Ask every loop of this process to stop (the first reason is the one reported)."""
    global _reason, _signum
    with _lock:
        if _signum is None:  # whoever saw the signal says which (the exit code)
            _signum = signum
        if _token.is_set():
            return
        _reason = reason
        _token.set()
    log.info("stopping: %s", reason)


def requested() -> bool:
    return _token.is_set()


def reason() -> str:
    """Why the run was asked to stop ("" if it was not)."""
    return _reason


def exit_code(default: int = 130) -> int:
    """The shell's code for the signal that stopped us (128 + its number: 143 for SIGTERM)."""
    return 128 + _signum if _signum else default


def error() -> Interrupted:
    """The error a stopped loop raises."""
    return Interrupted(f"interrupted ({_reason or 'stop requested'})")


def check() -> None:
    """Raise Interrupted if a stop was requested: once per block of every long loop."""
    if _token.is_set():
        raise error()


def is_stop(exc: BaseException) -> bool:
    """Is ``exc`` a run being stopped (Ctrl-C, Interrupted, Prefect's TerminationSignal) rather
    than failing? (Prefect is looked up only if loaded: the engine imports without it.)"""
    if isinstance(exc, KeyboardInterrupt | Interrupted):
        return True
    termination = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", None)
    return termination is not None and isinstance(exc, termination)


def wait(timeout: float) -> bool:
    """Sleep up to ``timeout`` seconds, waking at once on a stop; True if one was requested."""
    return _token.wait(timeout)


def leaves(message: str) -> None:
    """Say what a stop from now on leaves behind (once a run has published its export, a stop
    no longer means "nothing was published"): the line ``hyperctl`` prints when stopped."""
    global _leaves
    _leaves = message


def left_behind() -> str:
    return _leaves


def reset() -> None:
    """A new run in this process starts unstopped (tests, several runs in one interpreter)."""
    global _reason, _signum, _leaves
    with _lock:
        _token.clear()
        _reason, _signum, _leaves = "", None, NOTHING_PUBLISHED


def watch_signals() -> bool:
    """Set the token as soon as SIGTERM or SIGINT reaches this process, whoever handles it.

    Call from the main thread (only it may set the wakeup fd); once per process is enough.
    A wakeup fd that was already set keeps getting its bytes (we relay them), so an event loop
    that relied on it still wakes. Returns whether the relay is in place."""
    import socket  # here: hyperctl's start-up stays small

    global _watching
    with _lock:
        if _watching:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(theirs.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            ours.close()
            theirs.close()
            return False
        threading.Thread(
            target=_relay, args=(ours, theirs, previous), name="cancel-signals", daemon=True
        ).start()
        _watching = True
        return True


def _relay(ours: socket.socket, theirs: socket.socket, previous: int) -> None:
    """Read signal numbers off the wakeup fd: SIGTERM and SIGINT set the token."""
    while True:  # (``theirs``, the wakeup fd, is kept open by this frame)
        try:
            data = ours.recv(64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in _SIGNALS:
                request(f"{_SIGNALS[signum]} received", signum)
        if previous >= 0:
            with contextlib.suppress(OSError):
                os.write(previous, data)


def _stop(signum: int, frame: FrameType | None) -> None:
    request(f"{_SIGNALS.get(signum, signum)} received", signum)
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """``hyperctl``: SIGTERM stops the command as Ctrl-C does (KeyboardInterrupt in the main
    thread, every ``finally`` runs), and sets the token so the worker threads stop too. Inside
    a flow run Prefect swaps in its own handler and, for a SIGTERM nobody asked it to treat as
    a cancellation, calls this one again once the run is marked; the token is set either way
    (``watch_signals``)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _stop)
