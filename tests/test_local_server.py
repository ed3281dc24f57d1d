"""The local Prefect server the run commands start on first use (hypersdk.localapi), against real
``prefect server start`` processes: first start, reuse, a stale record, concurrent callers, stop,
the fallback to ephemeral mode (and no orphan after SIGKILL), the user's own API.

Every ensure_api call runs in a child process, as the CLI would, with its own HYPERSDK_HOME,
PREFECT_HOME and a free port (HYPERSDK_PREFECT_PORT), so nothing touches 127.0.0.1:4200 or the
session's Prefect settings. Each server started is stopped by PID at teardown, even on failure.
A fresh database takes ~20 s to migrate, so most tests start from a copy of the shared server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.prefect_server import free_port
from tests.fixtures.tools import need

pytestmark = pytest.mark.slow

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
CHILD_TIMEOUT = 400  # a server start on a loaded 2-core machine, plus margin

_ENSURE = """
import json, os, sys, time
from dataclasses import asdict
from hypersdk import localapi
t = time.monotonic()
lines = []
if sys.argv[1] == "configured":
    print(json.dumps({"configured": localapi.configured_api()}))
    sys.exit(0)
info = localapi.ensure_api(lines.append)
out = {**asdict(info), "echo": lines, "seconds": time.monotonic() - t,
       "env": {k: os.environ.get(k) for k in (
           "PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}}
print(json.dumps(out), flush=True)
if sys.argv[1] == "ephemeral-then-wait":  # start Prefect's own server, then wait to be killed
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        client.hello()
    print("READY", flush=True)
    time.sleep(600)
"""


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def servers_on(port: int) -> list[int]:
    """PIDs of ``prefect server start`` processes for ``port`` (whoever started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if b"prefect" in argv and b"server" in argv and str(port).encode() in argv:
                found.append(int(entry.name))
    return found


def kill_server(pid: int, timeout: float = 20) -> None:
    """SIGTERM (its process group if it leads one), then SIGKILL; only Prefect/uvicorn processes."""
    argv = _cmdline(pid)
    if not (b"prefect" in argv or b"uvicorn" in argv):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.partition("=")[::2] for item in raw.split("\0") if item)


def assert_no_telemetry(pid: int) -> None:
    """Offline, Prefect's telemetry service logs an ERROR on every run: it must be off."""
    env = environ(pid)
    analytics = env.get("PREFECT_SERVER_ANALYTICS_ENABLED", "").lower()
    assert analytics == "false" and env.get("DO_NOT_TRACK") == "1", env


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


class Homes:
    """One user's world: HYPERSDK_HOME, PREFECT_HOME, a forced port, and the env of its CLIs."""

    def __init__(self, root: Path, port: int | None = None):
        self.own_port = port is None  # else someone else's server may be on it
        self.root = root
        self.hs_home = root / "hshome"
        self.prefect_home = root / "prefecthome"
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.pids: set[int] = set()
        drop = (
            "PREFECT_API_URL",
            "PREFECT_UI_URL",
            "PREFECT_PROFILE",
            "PREFECT_PROFILES_PATH",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
            # conftest sets these already: the code under test must set them itself
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
            "PREFECT_SERVER_ANALYTICS_ENABLED",
            "DO_NOT_TRACK",
        )
        self.env = {
            k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HYPERSDK_")
        }
        self.env.update(
            HYPERSDK_HOME=str(self.hs_home),
            PREFECT_HOME=str(self.prefect_home),
            HYPERSDK_PREFECT_PORT=str(self.port),
            HYPERSDK_PREFECT_START_TIMEOUT="300",
            PREFECT_LOGGING_LEVEL="CRITICAL",  # as the CLI sets it
        )

    @property
    def state_file(self) -> Path:
        return self.hs_home / "prefect" / "server.json"

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def spawn(self, mode: str = "ensure", **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _ENSURE, mode],
            env={**self.env, **env},
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def collect(self, proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        result = json.loads(out.splitlines()[0])
        if result.get("pid"):
            self.pids.add(result["pid"])
        return result

    def ensure(self, mode: str = "ensure", **env: str) -> dict:
        return self.collect(self.spawn(mode, **env))

    def hyperctl(self, *args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [HYPERCTL, *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
        assert "Traceback" not in res.stderr, res.stderr
        return res

    def cleanup(self) -> None:
        state = self.state()
        if state and isinstance(state.get("pid"), int):
            self.pids.add(state["pid"])
        for pid in self.pids | set(servers_on(self.port) if self.own_port else ()):
            kill_server(pid)


def seed_database(src_home: Path, dst_home: Path) -> None:
    """A consistent copy of a migrated Prefect database (SQLite's online backup)."""
    src = sqlite3.connect(f"file:{src_home / 'prefect.db'}?mode=ro", uri=True)
    dst = sqlite3.connect(dst_home / "prefect.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One managed server, started by a first ensure_api on a fresh database."""
    need(os.path.isdir("/proc/self"), "these tests read /proc (Linux)")
    homes = Homes(tmp_path_factory.mktemp("shared"))
    try:
        homes.first = homes.ensure()
        yield homes
    finally:
        homes.cleanup()


@pytest.fixture
def make_homes(tmp_path, request):
    """Fresh homes; ``seed``: with a copy of the shared server's (migrated) database."""
    need(os.path.isdir("/proc/self"), "these tests read /proc (Linux)")
    made: list[Homes] = []

    def make(seed: bool = True, port: int | None = None) -> Homes:
        homes = Homes(tmp_path / f"u{len(made)}", port)
        if seed:
            seed_database(request.getfixturevalue("shared").prefect_home, homes.prefect_home)
        made.append(homes)
        return homes

    try:
        yield make
    finally:
        for homes in made:
            homes.cleanup()


def test_first_run_starts_a_detached_server_and_records_it(shared):
    info = shared.first
    url = f"http://127.0.0.1:{shared.port}/api"
    assert (info["how"], info["url"], info["started"]) == ("managed", url, True)
    assert len(info["echo"]) == 1 and "starting a local Prefect server" in info["echo"][0]
    # this process's flow runs go to it
    assert info["env"]["PREFECT_API_URL"] == url
    assert info["env"]["PREFECT_UI_URL"] == f"http://127.0.0.1:{shared.port}"
    # it outlived the CLI that started it, in a session of its own
    pid = info["pid"]
    assert _alive(pid) and os.getsid(pid) == pid
    assert_no_telemetry(pid)
    assert httpx.get(f"{url}/health", timeout=10).json() is True
    # the UI in the browser calls this server's API, not the default port's
    assert httpx.get(f"{info['ui_url']}/ui-settings", timeout=10).json()["api_url"] == url
    state = shared.state()
    assert state["pid"] == pid and state["port"] == shared.port and state["url"] == url
    assert state["prefect_home"] == str(shared.prefect_home)
    assert state["database"] == str(shared.prefect_home / "prefect.db")
    assert (shared.prefect_home / "prefect.db").is_file()
    assert "Check out the dashboard" in Path(state["log"]).read_text()


def test_later_runs_reuse_it_without_a_second_process(shared):
    info = shared.ensure()
    assert (info["how"], info["pid"], info["started"]) == ("managed", shared.first["pid"], False)
    assert info["echo"] == [] and info["seconds"] < 10
    assert info["env"]["PREFECT_API_URL"] == shared.first["url"]
    assert servers_on(shared.port) == [shared.first["pid"]]
    res = shared.hyperctl("server", "start")
    assert res.returncode == 0 and "already running" in res.stdout, res.stderr
    res = shared.hyperctl("server", "status")
    assert res.returncode == 0 and "running, healthy" in res.stdout, res.stdout + res.stderr
    rows = dict(ln.split(None, 1) for ln in res.stdout.splitlines() if ln.startswith("  "))
    assert rows["url"] == shared.first["url"] and rows["ui"] == shared.first["ui_url"]
    assert rows["pid"].startswith(f"{shared.first['pid']} ")
    assert rows["database"] == str(shared.prefect_home / "prefect.db")
    assert rows["uptime"].endswith(" s") or "min" in rows["uptime"]
    assert "by -c ensure, ready in " in rows["started"]  # the first ensure_api's process
    assert servers_on(shared.port) == [shared.first["pid"]]


def test_a_server_it_did_not_start_is_used_and_never_stopped(shared, make_homes):
    other = make_homes(seed=False, port=shared.port)  # someone else's `make server`
    info = other.ensure()
    assert (info["how"], info["url"], info["started"]) == ("existing", shared.first["url"], False)
    assert info["env"]["PREFECT_API_URL"] == shared.first["url"]
    assert other.state() is None
    res = other.hyperctl("server", "stop")
    assert res.returncode == 0 and "No local Prefect server started by hyperctl" in res.stdout
    assert _alive(shared.first["pid"])
    assert httpx.get(f"{shared.first['url']}/health", timeout=10).json() is True


def test_a_reused_pid_is_never_signalled(make_homes):
    homes = make_homes(seed=False)
    bystander = subprocess.Popen(["sleep", "60"])  # holds the recorded pid: not our server
    try:
        homes.state_file.parent.mkdir(parents=True)
        state = {
            "pid": bystander.pid,
            "port": homes.port,
            "url": f"http://127.0.0.1:{homes.port}/api",
            "ui_url": f"http://127.0.0.1:{homes.port}",
            "prefect_home": str(homes.prefect_home),
            "database": "x",
            "log": "x",
            "started": time.time(),
            "started_by": "hyperctl demo",
            "proc_start": None,
        }
        homes.state_file.write_text(json.dumps(state))
        res = homes.hyperctl("server", "status")
        assert res.returncode == 1 and "No local Prefect server" in res.stdout, res.stdout
        res = homes.hyperctl("server", "stop")
        assert res.returncode == 0 and "No local Prefect server" in res.stdout, res.stderr
        assert bystander.poll() is None  # still running
        assert homes.state() is None  # the stale record is gone
    finally:
        bystander.kill()
        bystander.wait()


def test_stale_record_and_two_concurrent_callers_start_one_server(make_homes):
    homes = make_homes()
    dead = subprocess.Popen(["true"])
    dead.wait()
    homes.state_file.parent.mkdir(parents=True)
    homes.state_file.write_text(
        json.dumps(
            {
                "pid": dead.pid,  # a server that died with the machine, say
                "port": homes.port,
                "url": f"http://127.0.0.1:{homes.port}/api",
                "ui_url": f"http://127.0.0.1:{homes.port}",
                "prefect_home": str(homes.prefect_home),
                "database": "x",
                "log": "x",
                "started": time.time() - 3600,
                "started_by": "hyperctl demo",
                "proc_start": "1",
            }
        )
    )
    a, b = homes.spawn(), homes.spawn()
    results = [homes.collect(a), homes.collect(b)]
    assert {r["how"] for r in results} == {"managed"}
    assert len({r["pid"] for r in results}) == 1 and len({r["url"] for r in results}) == 1
    assert sorted(r["started"] for r in results) == [False, True]
    starter = next(r for r in results if r["started"])
    waiter = next(r for r in results if not r["started"])
    assert len(starter["echo"]) == 1 and "starting a local Prefect server" in starter["echo"][0]
    assert len(waiter["echo"]) <= 1 and "starting a local" not in "".join(waiter["echo"])
    pid = starter["pid"]
    assert pid != dead.pid and homes.state()["pid"] == pid
    assert servers_on(homes.port) == [pid]

    res = homes.hyperctl("server", "stop")
    assert res.returncode == 0 and f"pid {pid}" in res.stdout, res.stdout + res.stderr
    assert not _alive(pid)  # stop waited for it
    assert homes.state() is None and servers_on(homes.port) == []
    with socket.socket() as s:  # its port is free again
        s.bind(("127.0.0.1", homes.port))
    res = homes.hyperctl("server", "status")
    assert res.returncode == 1 and "No local Prefect server" in res.stdout


def test_a_cli_killed_while_its_server_starts_leaves_it_to_the_next_run(make_homes):
    homes = make_homes()
    first = homes.spawn()
    try:
        deadline = time.monotonic() + 60
        while homes.state() is None:  # recorded as soon as it is spawned, before it answers
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        pid = homes.state()["pid"]
        homes.pids.add(pid)
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind in that CLI
        first.wait()
    assert _alive(pid)  # the half-started server lives on, in its own session
    info = homes.ensure()  # waits for it under the lock instead of starting a second one
    assert (info["how"], info["pid"], info["started"]) == ("managed", pid, False)
    assert servers_on(homes.port) == [pid]


def test_fallback_to_ephemeral_when_the_port_is_taken_and_no_orphan_after_sigkill(make_homes):
    homes = make_homes()
    with socket.socket() as listener:  # not a Prefect server
        listener.bind(("127.0.0.1", homes.port))
        listener.listen()
        child = homes.spawn("ephemeral-then-wait")
        ephemeral_pid = None
        try:
            info = json.loads(child.stdout.readline())
            assert info["how"] == "ephemeral" and info["url"] is None
            assert len(info["echo"]) == 1, info["echo"]
            assert f"port {homes.port}" in info["echo"][0] and "temporary" in info["echo"][0]
            assert int(info["env"]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 300
            assert info["env"]["PREFECT_API_URL"] is None
            assert homes.state() is None and servers_on(homes.port) == []
            assert child.stdout.readline().strip() == "READY", child.stderr.read()
            children = [
                int(p)
                for task in Path(f"/proc/{child.pid}/task").iterdir()
                for p in (task / "children").read_text().split()
            ]
            (ephemeral_pid,) = [p for p in children if b"uvicorn" in _cmdline(p)]
            assert_no_telemetry(ephemeral_pid)
            child.send_signal(signal.SIGKILL)  # no atexit: Prefect cannot stop its server
            child.wait()
            assert wait_gone(ephemeral_pid, 30), "Prefect's ephemeral server outlived the CLI"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if ephemeral_pid is not None:
                kill_server(ephemeral_pid)


def test_fallback_to_ephemeral_when_the_server_crashes(make_homes, tmp_path):
    homes = make_homes(seed=False)
    bad_db = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'prefect.db'}"
    info = homes.ensure(PREFECT_SERVER_DATABASE_CONNECTION_URL=bad_db)
    assert info["how"] == "ephemeral" and info["url"] is None
    assert len(info["echo"]) == 2, info["echo"]  # "starting ...", then why it did not
    assert "exited with code" in info["echo"][1] and "unable to open database" in info["echo"][1]
    assert str(homes.hs_home / "prefect" / "server.log") in info["echo"][1]
    assert homes.state() is None and servers_on(homes.port) == []


def test_the_users_own_api_is_respected(make_homes):
    homes = make_homes(seed=False)
    info = homes.ensure(PREFECT_API_URL="http://example.invalid:4200/api")
    assert (info["how"], info["url"], info["detail"]) == (
        "user",
        "http://example.invalid:4200/api",
        "PREFECT_API_URL",
    )
    assert info["ui_url"] == "http://example.invalid:4200" and info["echo"] == []
    # the active profile of Prefect's profiles.toml, read without importing Prefect
    (homes.prefect_home / "profiles.toml").write_text(
        'active = "mine"\n'
        '[profiles.mine]\nPREFECT_API_URL = "http://10.0.0.9:4200/api"\n'
        '[profiles.bare]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    info = homes.ensure()
    assert (info["how"], info["url"]) == ("user", "http://10.0.0.9:4200/api")
    assert "profile 'mine'" in info["detail"]
    assert info["env"]["PREFECT_API_URL"] is None  # Prefect reads its profile itself
    assert homes.ensure("configured", PREFECT_PROFILE="bare") == {"configured": None}
    # prefect.toml in the working directory
    (homes.root / "prefect.toml").write_text('[api]\nurl = "http://10.0.0.7:4200/api"\n')
    assert homes.ensure("configured", PREFECT_PROFILE="bare")["configured"][0] == (
        "http://10.0.0.7:4200/api"
    )
    res = homes.hyperctl("server", "start")
    assert res.returncode == 0 and "nothing to start" in res.stdout
    assert homes.state() is None and not (homes.hs_home / "prefect").exists()
    assert servers_on(homes.port) == []


def test_opting_out_means_ephemeral_mode(make_homes):
    homes = make_homes(seed=False)
    info = homes.ensure(HYPERSDK_PREFECT_SERVER="off")
    assert info["how"] == "ephemeral" and info["echo"] == []
    assert int(info["env"]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 300
    assert not (homes.hs_home / "prefect").exists() and servers_on(homes.port) == []


def test_an_unusable_home_falls_back_in_one_line(make_homes):
    homes = make_homes(seed=False)
    homes.root.joinpath("afile").write_text("not a directory")
    homes.env["HYPERSDK_HOME"] = str(homes.root / "afile" / "home")
    info = homes.ensure()
    assert info["how"] == "ephemeral" and len(info["echo"]) == 1, info["echo"]
    assert "afile" in info["echo"][0] and "temporary Prefect API" in info["echo"][0]
    res = homes.hyperctl("server", "start")
    lines = res.stderr.splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert servers_on(homes.port) == []


def test_a_server_too_slow_to_answer_is_stopped_before_the_fallback(make_homes):
    homes = make_homes(seed=False)
    info = homes.ensure(HYPERSDK_PREFECT_START_TIMEOUT="1")  # no server answers in 1 s
    assert info["how"] == "ephemeral" and len(info["echo"]) == 2, info["echo"]
    assert "did not answer within 1 s" in info["echo"][1]
    assert homes.state() is None and servers_on(homes.port) == []  # no server left behind
