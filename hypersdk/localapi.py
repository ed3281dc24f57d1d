"""Which Prefect API a run command uses, starting a local server on first use.

Without a configured API, Prefect starts an *ephemeral* server per process: ~20 s of database
migration on a fresh machine (long enough to time out on a loaded one), 10-20 s of overhead on
every later run, and runs nobody sees in the UI. So the run commands call :func:`ensure_api`
first, which picks, in order:

1. ``user``: an API the user configured (PREFECT_API_URL in the environment, the active profile
   of Prefect's profiles.toml, ``.env``/``prefect.toml``/``pyproject.toml`` here);
2. ``managed``: the server this tool started earlier (``<home>/prefect/server.json``), if that
   process is still alive and answers ``/api/health``;
3. ``existing``: a Prefect server already answering on 127.0.0.1:4200 (``make server``);
4. ``managed``: a new ``prefect server start`` in the background, detached, under a file lock so
   concurrent CLIs start one; it outlives the CLI and is stopped by ``hyperctl server stop``;
5. ``ephemeral``: Prefect's own mode, with a longer start-up timeout, if all of that fails or
   HYPERSDK_PREFECT_SERVER=off.

Nothing here imports Prefect: this runs before the flow modules are imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from hypersdk import config
from hypersdk.errors import HyperSDKError

How = Literal["user", "managed", "existing", "ephemeral"]
Echo = Callable[[str], None]

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
MODE_VAR = "HYPERSDK_PREFECT_SERVER"  # "off": never start a server, use ephemeral mode
PORT_VAR = "HYPERSDK_PREFECT_PORT"  # use exactly this port (default: 4200, else a free one)
TIMEOUT_VAR = "HYPERSDK_PREFECT_START_TIMEOUT"  # seconds to wait for a new server's health
# A fresh SQLite migration takes ~20 s on an idle 2-core machine, 30-60 s on a loaded one and
# over 100 s on an overloaded one. Giving up early gains nothing: the ephemeral fallback would
# migrate the same database again. So wait long for a server that is alive.
START_TIMEOUT = 300.0
EPHEMERAL_TIMEOUT = 300  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS in the fallback
_MAX_CONFIG_BYTES = 1 << 20  # profiles.toml, state file: bigger is not ours to parse


_spawned: list[Any] = []  # servers this process started: they outlive it, so no Popen warning


class LocalServerError(HyperSDKError):
    """The local Prefect server could not be started (or is not there to stop)."""


@dataclass(frozen=True)
class ApiInfo:
    """The API the flows of this process talk to; ``url`` is None in ephemeral mode."""

    url: str | None
    ui_url: str | None
    how: How
    pid: int | None = None  # the managed server's process
    started: bool = False  # started by this call
    detail: str = ""  # where the configuration came from, or why we fell back


@dataclass(frozen=True)
class ServerState:
    """What ``server.json`` records about the server this tool started."""

    pid: int
    port: int
    url: str
    ui_url: str
    prefect_home: str
    database: str
    log: str
    started: float  # epoch seconds
    started_by: str
    proc_start: str | None  # /proc/PID/stat start time: tells our server from a reused pid
    ready_after: float | None = None  # seconds from start to a healthy answer (None: starting)


# -- where things are ---------------------------------------------------------------------------


def state_dir() -> Path:
    return config.home() / "prefect"


def state_path() -> Path:
    return state_dir() / "server.json"


def log_path() -> Path:
    return state_dir() / "server.log"


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _database(home: Path) -> str:
    """The server's database, for ``status``: a path, or a URL without its credentials."""
    from urllib.parse import urlsplit, urlunsplit

    for var in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        if url := os.environ.get(var):
            parts = urlsplit(url)
            if parts.username or parts.password:
                host = parts.hostname or ""
                netloc = f"{host}:{parts.port}" if parts.port else host
                url = urlunsplit(parts._replace(netloc=netloc))
            return url
    return str(home / "prefect.db")


def _urls(port: int) -> tuple[str, str]:
    return f"http://{HOST}:{port}/api", f"http://{HOST}:{port}"


# -- the user's own configuration ---------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return {}
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}  # Prefect warns about a broken file itself


def _profiles_path() -> Path:
    """Where Prefect reads profiles from (prefect.settings.sources._get_profiles_path)."""
    if env := os.environ.get("PREFECT_PROFILES_PATH"):
        return Path(env).expanduser()
    return _prefect_home() / "profiles.toml"


def _dotenv_api_url(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == "PREFECT_API_URL":
            return value.strip().strip("'\"") or None
    return None


def configured_api() -> tuple[str, str] | None:
    """(url, where it is set) of an API the user configured, else None."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url, "PREFECT_API_URL"
    if "prefect.context" in sys.modules:  # already imported: ask Prefect (test harness, plugins)
        from prefect.settings import get_current_settings

        if url := get_current_settings().api.url:
            return url, "the current Prefect settings"
    cwd = Path.cwd()
    if url := _dotenv_api_url(cwd / ".env"):
        return url, str(cwd / ".env")
    for name, keys in (
        ("prefect.toml", ("api", "url")),
        ("pyproject.toml", ("tool", "prefect", "api", "url")),
    ):
        data: Any = _read_toml(cwd / name)
        for key in keys:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, str) and data:
            return data, str(cwd / name)
    path = _profiles_path()
    data = _read_toml(path)
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profiles = data.get("profiles")
    profile = profiles.get(active) if isinstance(profiles, dict) and active else None
    if isinstance(profile, dict) and isinstance(url := profile.get("PREFECT_API_URL"), str) and url:
        return url, f"profile {active!r} in {path}"
    return None


# -- processes and health -----------------------------------------------------------------------


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


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a process, from /proc."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return (fields[0].decode(), fields[19].decode()) if len(fields) > 19 else None


def _reap(pid: int) -> None:
    """Collect ``pid`` if this process started it and it exited (else it stays a zombie)."""
    for proc in _spawned:
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
    stat = _proc_stat(state.pid)
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
    stat = _proc_stat(pid)
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


def _terminate(pid: int, timeout: float) -> bool:
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


def _port_taken(port: int) -> bool:
    """The same test ``prefect server start`` makes before it binds."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def choose_port() -> tuple[int, bool]:
    """(port to use, forced by PORT_VAR?)."""
    raw = os.environ.get(PORT_VAR)
    if not raw:
        return DEFAULT_PORT, False
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise LocalServerError(f"{PORT_VAR}={raw!r} is not a port number")
    return int(raw), True


def _last_error(log: Path) -> str:
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


# -- the state file -----------------------------------------------------------------------------


def read_state() -> ServerState | None:
    """The recorded server, or None (no file, or a file that is not a valid record)."""
    path = state_path()
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(ServerState)}  # a newer version's extra keys are fine
        state = ServerState(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (state.pid, state.port))
    if not ints_ok or state.pid <= 1 or not 0 < state.port < 65536:
        return None
    if state.url != _urls(state.port)[0]:
        return None
    return state


def _write_state(state: ServerState) -> None:
    path = state_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _forget(pid: int) -> None:
    """Remove the state file if it still records ``pid``."""
    state = read_state()
    if state is None or state.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            state_path().unlink()


@contextlib.contextmanager
def _locked(wait: float, on_wait: Echo) -> Iterator[None]:
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


# -- using an API -------------------------------------------------------------------------------

_current: ApiInfo | None = None  # what this process chose, so a second call is free


def _export(info: ApiInfo) -> ApiInfo:
    """Point this process's Prefect at ``info`` (env vars: flow runs started later read them)."""
    global _current
    if info.url:
        os.environ["PREFECT_API_URL"] = info.url
        if info.ui_url:
            os.environ["PREFECT_UI_URL"] = info.ui_url
    else:
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
        raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "")
        if not raw.isdigit() or int(raw) < EPHEMERAL_TIMEOUT:
            os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(EPHEMERAL_TIMEOUT)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "prefect.context" in sys.modules:  # Prefect caches its settings at import
        sys.modules["prefect.context"].refresh_global_settings_context()
    _current = info
    return info


def _ephemeral(reason: str) -> ApiInfo:
    from hypersdk.ephemeral_guard import guard_ephemeral_server

    guard_ephemeral_server()  # a SIGKILLed CLI must not leave Prefect's server behind
    return _export(ApiInfo(None, None, "ephemeral", detail=reason))


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
                _terminate(state.pid, 10)
            break
        time.sleep(0.25)
    if wait:  # under the lock: a dead or stuck server's record goes
        _forget(state.pid)
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
    with _locked(timeout + 30, say):
        if info := _reuse_recorded(wait=timeout):  # another CLI may have started it meanwhile
            return info
        port, forced = choose_port()
        url, ui_url = _urls(port)
        if healthy(url):
            return ApiInfo(url, ui_url, "existing")
        if _port_taken(port):
            if forced:
                raise LocalServerError(
                    f"port {port} ({PORT_VAR}) is in use by something that is not a Prefect server"
                )
            port = _free_port()
        try:
            return _launch(port, say, timeout)
        except _PortRace:
            if forced:
                raise
            return _launch(_free_port(), lambda _msg: None, timeout)


def _launch(port: int, say: Echo, timeout: float) -> ApiInfo:
    """``prefect server start`` detached (own session, output to the log), then its health."""
    import subprocess

    url, ui_url = _urls(port)
    home = _prefect_home()
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
    _spawned.append(proc)
    stat = _proc_stat(proc.pid)
    began = time.monotonic()
    state = ServerState(
        pid=proc.pid,
        port=port,
        url=url,
        ui_url=ui_url,
        prefect_home=str(home),
        database=_database(home),
        log=str(log),
        started=time.time(),
        started_by=" ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv else "",
        proc_start=stat[1] if stat else None,
    )
    _write_state(state)
    deadline = began + timeout
    while not healthy(url):
        code = proc.poll()
        if code is not None:
            _forget(proc.pid)
            why = _last_error(log)
            error = _PortRace if "already in use" in why else LocalServerError
            raise error(f"the Prefect server exited with code {code}: {why} (log: {log})")
        if time.monotonic() > deadline:
            _terminate(proc.pid, 10)
            _forget(proc.pid)
            raise LocalServerError(
                f"the Prefect server did not answer within {timeout:.0f} s (log: {log})"
            )
        time.sleep(0.25)
    with contextlib.suppress(OSError):  # for status and benchmarks: how long a start takes
        _write_state(replace(state, ready_after=round(time.monotonic() - began, 1)))
    return ApiInfo(url, ui_url, "managed", proc.pid, started=True)


def mode_off() -> bool:
    """The user opted out of the local server (HYPERSDK_PREFECT_SERVER=off)."""
    return os.environ.get(MODE_VAR, "").strip().lower() in ("off", "0", "false", "no", "ephemeral")


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ensure_api(echo: Echo | None = None) -> ApiInfo:
    """Make this process's flow runs use a Prefect API that is up, starting the local server on
    first use; never raises. ``echo`` gets one line when a server starts (a slow first run) and
    one when we fall back to ephemeral mode, else nothing. Call before Prefect runs a flow: it
    reads PREFECT_API_URL from the environment."""
    say = echo or (lambda _msg: None)
    if _current is not None and os.environ.get("PREFECT_API_URL") == _current.url:
        return _current  # this process chose already (and nobody changed it since)
    if mode_off():
        return _ephemeral(f"{MODE_VAR}=off")
    try:
        if found := configured_api():
            url, where = found
            ui_url = os.environ.get("PREFECT_UI_URL") or (
                url.removesuffix("/api") if url.endswith("/api") else None
            )
            return ApiInfo(url, ui_url, "user", detail=where)
        return _export(start_server(say))
    except Exception as exc:  # whatever it was, the run goes on in ephemeral mode, as before
        reason = _one_line(str(exc) or type(exc).__name__)
        say(
            f"no local Prefect server ({reason}); this run uses a temporary Prefect API "
            "and will not show in the UI"
        )
        return _ephemeral(reason)


# -- stop and status ----------------------------------------------------------------------------


def stop_server(timeout: float = 30.0) -> ServerState | None:
    """Stop the server this tool started (its whole process group) and wait for it to exit.
    None if there is none running; a pid that is no longer our server is never signalled."""
    state = read_state()
    if state is None:
        return None
    try:
        if not is_ours(state):
            _forget(state.pid)
            return None
        if not _terminate(state.pid, timeout):
            raise LocalServerError(f"the Prefect server (pid {state.pid}) did not exit")
        _forget(state.pid)
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
            url = _urls(choose_port()[0])[0]
            existing = url if healthy(url) else None
    return Status(
        state=state,
        healthy=state is not None and healthy(state.url),
        configured=configured,
        existing=existing,
        mode_off=mode_off(),
    )
