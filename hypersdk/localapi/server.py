"""The managed server: reuse the recorded one, else start ``prefect server start`` detached under
the lock and wait for its health; stop it; report its status."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hypersdk.localapi.model import (
    HOST,
    PORT_VAR,
    START_TIMEOUT,
    TIMEOUT_VAR,
    ApiInfo,
    Echo,
    LocalServerError,
    ServerState,
    urls,
)
from hypersdk.localapi.process import (
    free_port,
    healthy,
    is_ours,
    last_error,
    port_taken,
    proc_stat,
    spawned,
    terminate,
)
from hypersdk.localapi.settings import choose_port, configured_api, database, mode_off, prefect_home
from hypersdk.localapi.state import (
    forget,
    locked,
    log_path,
    read_state,
    state_dir,
    state_path,
    write_state,
)


def _reuse_recorded(wait: float = 0.0) -> ApiInfo | None:
    """The recorded server if it is ours and healthy. With ``wait`` (under the lock), give a live
    but silent one that long (a CLI killed while its server was starting), then stop it."""
    state = read_state()
    if state is None:
        return None
    deadline = time.monotonic() + wait
    while is_ours(state):
        if healthy(state.url):
            return ApiInfo(state.url, state.ui_url, "managed", state.pid)
        if time.monotonic() >= deadline:
            if wait:  # alive but silent all that time: stuck
                terminate(state.pid, 10)
            break
        time.sleep(0.25)
    if wait:  # under the lock: a dead or stuck server's record goes
        forget(state.pid)
    return None


class _PortRace(LocalServerError):
    """Someone bound the port between our check and the server's."""


def start_server(echo: Echo | None = None, timeout: float | None = None) -> ApiInfo:
    """The managed server (reused, or started and healthy) or an ``existing`` one on the port;
    LocalServerError when neither can be had."""
    say = echo or (lambda _msg: None)
    if timeout is None:
        raw = os.environ.get(TIMEOUT_VAR, "")
        timeout = float(raw) if raw.replace(".", "", 1).isdigit() else START_TIMEOUT
    try:
        return _start(say, timeout)
    except OSError as exc:  # the state directory: missing, read-only, full
        where = exc.filename or state_dir()
        raise LocalServerError(f"{where}: {exc.strerror or exc}") from None


def _start(say: Echo, timeout: float) -> ApiInfo:
    if info := _reuse_recorded():
        return info
    with locked(timeout + 30, say):
        if info := _reuse_recorded(wait=timeout):  # another CLI may have started it meanwhile
            return info
        port, forced = choose_port()
        url, ui_url = urls(port)
        if healthy(url):
            return ApiInfo(url, ui_url, "existing")
        if port_taken(port):
            if forced:
                raise LocalServerError(
                    f"port {port} ({PORT_VAR}) is in use by something that is not a Prefect server"
                )
            port = free_port()
        try:
            return _launch(port, say, timeout)
        except _PortRace:
            if forced:
                raise
            return _launch(free_port(), lambda _msg: None, timeout)


def _launch(port: int, say: Echo, timeout: float) -> ApiInfo:
    """``prefect server start`` detached (own session, output to the log), then its health."""
    import subprocess

    url, ui_url = urls(port)
    home = prefect_home()
    log = log_path()
    with contextlib.suppress(FileNotFoundError):
        os.replace(log, log.with_name(log.name + ".1"))  # one previous log kept, no growth
    drop = ("PREFECT_API_URL", "PREFECT_UI_URL", "HYPERSDK_EPHEMERAL_OWNER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # no telemetry (fails offline, too)
        DO_NOT_TRACK="1",
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_UI_API_URL=url,  # else the UI calls the default port
        COLUMNS="200",  # its one-line errors stay one line in the log
    )
    # slot leases in files under PREFECT_HOME, beside the database: a restarted server still
    # knows the leases of the runs it had (Prefect keeps them in memory by default)
    env.setdefault(
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
        "prefect.server.concurrency.lease_storage.filesystem",
    )
    if env.get("PREFECT_LOGGING_LEVEL", "").upper() in ("", "CRITICAL", "ERROR"):
        env["PREFECT_LOGGING_LEVEL"] = "WARNING"  # the CLI's terminal default is not the log's
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    say(f"starting a local Prefect server for the UI at {ui_url} (first run only) ...")
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=state_dir(),
                start_new_session=True,  # survives the CLI, and Ctrl-C at its terminal
            )
    except OSError as exc:
        raise LocalServerError(f"cannot run {sys.executable} -m prefect: {exc}") from None
    spawned.append(proc)
    stat = proc_stat(proc.pid)
    began = time.monotonic()
    state = ServerState(
        pid=proc.pid,
        port=port,
        url=url,
        ui_url=ui_url,
        prefect_home=str(home),
        database=database(home),
        log=str(log),
        started=time.time(),
        started_by=" ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv else "",
        proc_start=stat[1] if stat else None,
    )
    write_state(state)
    deadline = began + timeout
    while not healthy(url):
        code = proc.poll()
        if code is not None:
            forget(proc.pid)
            why = last_error(log)
            error = _PortRace if "already in use" in why else LocalServerError
            raise error(f"the Prefect server exited with code {code}: {why} (log: {log})")
        if time.monotonic() > deadline:
            terminate(proc.pid, 10)
            forget(proc.pid)
            raise LocalServerError(
                f"the Prefect server did not answer within {timeout:.0f} s (log: {log})"
            )
        time.sleep(0.25)
    with contextlib.suppress(OSError):  # for status and benchmarks: how long a start takes
        write_state(replace(state, ready_after=round(time.monotonic() - began, 1)))
    return ApiInfo(url, ui_url, "managed", proc.pid, started=True)


def stop_server(timeout: float = 30.0) -> ServerState | None:
    """Stop the server this tool started (its whole process group) and wait for it to exit.
    None if there is none running; a pid that is no longer our server is never signalled."""
    state = read_state()
    if state is None:
        return None
    try:
        if not is_ours(state):
            forget(state.pid)
            return None
        if not terminate(state.pid, timeout):
            raise LocalServerError(f"the Prefect server (pid {state.pid}) did not exit")
        forget(state.pid)
    except OSError as exc:
        raise LocalServerError(f"{exc.filename or state_path()}: {exc.strerror or exc}") from None
    return state


@dataclass(frozen=True)
class Status:
    """What ``hyperctl server status`` shows."""

    state: ServerState | None  # ours, alive
    healthy: bool
    configured: tuple[str, str] | None  # the user's API, which runs use instead
    existing: str | None  # a server we did not start, answering on our port
    mode_off: bool


def server_status() -> Status:
    state = read_state()
    if state is not None and not is_ours(state):
        state = None
    try:
        configured = configured_api()
    except Exception:  # a broken Prefect setting: status still answers
        configured = None
    existing = None
    if state is None:
        with contextlib.suppress(LocalServerError):
            url = urls(choose_port()[0])[0]
            existing = url if healthy(url) else None
    return Status(
        state=state,
        healthy=state is not None and healthy(state.url),
        configured=configured,
        existing=existing,
        mode_off=mode_off(),
    )
