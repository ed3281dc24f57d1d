"""Schedules, time windows and priority queues (issue 16; docs/scheduling.md).

Unit tests of hypersdk/windows.py (midnight, days, zones across DST, bad specs), then on a real
Prefect server with the deploy step and process workers of our own deployments:

- the deploy step creates the urgent/default/bulk queues, idempotently;
- a cron-scheduled run is created by Prefect's scheduler at its time and run then;
- an urgent run overtakes queued bulk runs on a worker with one slot;
- a run outside its window goes back to Scheduled at the opening, starts then, completes;
- a plain Python call outside its window waits in its process.

The cron deployment and its worker are set up first (module fixture) so the wait for the next
minute overlaps the other tests; its test comes last.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.errors import InvalidParameterError
from hypersdk.imagegen import write_realistic_disk
from hypersdk.windows import next_open, parse_window
from providers.sources.local import create_vm
from tests import qemu
from tests.fixtures.prefect_server import api_post as _post
from tests.fixtures.prefect_server import api_request, deploy_all, stop

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
WAIT = 240  # generous bound of any wait on a loaded machine (seconds)
# test-only queues of the pool: the deploy step's nightly deployment (02:00 UTC) and its
# friends queue their scheduled runs on `default`, which no worker of this file serves
CRON_QUEUE = "test-cron"
WINDOW_QUEUE = "test-window"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- hypersdk/windows.py -------------------------------------------------------------------


def test_window_crossing_midnight():
    w = parse_window("22:00-06:00")
    assert w.is_open(utc(2026, 12, 2, 23, 0)) and w.is_open(utc(2026, 12, 3, 5, 59, 59))
    assert not w.is_open(utc(2026, 12, 3, 6, 0))  # the end is outside
    assert next_open(w, utc(2026, 12, 3, 6, 0)) == utc(2026, 12, 3, 22, 0)
    assert next_open(w, utc(2026, 12, 3, 12, 0)) == utc(2026, 12, 3, 22, 0)
    now = utc(2026, 12, 3, 1, 2, 3)
    assert next_open(w, now) == now  # open: start now
    assert next_open("00:00-24:00", now) == now
    assert next_open("22:00-24:00", now) == utc(2026, 12, 3, 22, 0)


def test_window_seconds_and_spacing():
    w = parse_window("  10:00:30-10:00:45  ")
    assert w.spec == "10:00:30-10:00:45"
    assert next_open(w, utc(2026, 1, 1, 10, 0, 29)) == utc(2026, 1, 1, 10, 0, 30)
    assert next_open(w, utc(2026, 1, 1, 10, 0, 45)) == utc(2026, 1, 2, 10, 0, 30)
    naive = datetime(2026, 1, 1, 10, 0, 40)  # naive means UTC
    assert parse_window("10:00:30-10:00:45").is_open(naive)


def test_window_days():
    fri = parse_window("Fri 22:00-06:00")  # Friday's window ends on Saturday morning
    assert fri.is_open(utc(2026, 12, 5, 5, 0))  # Saturday 05:00
    assert not fri.is_open(utc(2026, 12, 5, 23, 0))  # Saturday night: not a Friday window
    assert next_open(fri, utc(2026, 12, 5, 23, 0)) == utc(2026, 12, 11, 22, 0)
    assert not fri.is_open(utc(2026, 12, 4, 5, 0))  # Friday morning: Thursday's, not open
    weekdays = parse_window("mon-FRI 08:00-18:00")
    assert sorted(weekdays.days) == [0, 1, 2, 3, 4]
    assert next_open(weekdays, utc(2026, 12, 5, 12, 0)) == utc(2026, 12, 7, 8, 0)  # Sat -> Mon
    assert sorted(parse_window("Fri-Mon 01:00-02:00").days) == [0, 4, 5, 6]  # wraps the week
    assert sorted(parse_window("Mon,Wed-Thu,Sun 01:00-02:00").days) == [0, 2, 3, 6]


def test_window_time_zones_and_dst():
    paris = parse_window("Mon-Fri 22:00-06:00 Europe/Paris")
    assert next_open(paris, utc(2026, 12, 5, 12, 0)) == utc(2026, 12, 7, 21, 0)  # CET, +1
    assert next_open(paris, utc(2026, 7, 4, 12, 0)) == utc(2026, 7, 6, 20, 0)  # CEST, +2
    # Friday 27 March 2026 22:00 CET until Saturday 06:00 CET; a week later, after the
    # change, 22:00 CEST until 06:00 CEST: same wall-clock times, one hour earlier in UTC
    assert paris.is_open(utc(2026, 3, 28, 4, 59)) and not paris.is_open(utc(2026, 3, 28, 5, 0))
    assert paris.is_open(utc(2026, 4, 4, 3, 59)) and not paris.is_open(utc(2026, 4, 4, 4, 0))
    # spring: 02:30 does not exist on 29 March 2026 (02:00 CET -> 03:00 CEST); the window opens
    # when the clock jumps past it, 03:00 CEST (01:00 UTC), and closes at 04:00 CEST
    gap = parse_window("02:30-04:00 Europe/Paris")
    assert next_open(gap, utc(2026, 3, 28, 23, 0)) == utc(2026, 3, 29, 1, 0)
    assert gap.is_open(utc(2026, 3, 29, 1, 59)) and not gap.is_open(utc(2026, 3, 29, 2, 0))
    # autumn: 02:30 happens twice on 25 October 2026; the window opens at the first one
    # (CEST, 00:30 UTC), and not again an hour later
    twice = parse_window("02:30-02:45 Europe/Paris")
    assert next_open(twice, utc(2026, 10, 25, 0, 0)) == utc(2026, 10, 25, 0, 30)
    assert next_open(twice, utc(2026, 10, 25, 0, 45)) == utc(2026, 10, 26, 1, 30)
    ny = parse_window("Sat 23:00-01:00 America/New_York")
    assert next_open(ny, utc(2026, 11, 1, 0, 0)) == utc(2026, 11, 1, 3, 0)  # Sat 31 Oct EDT
    assert next_open(ny, utc(2026, 11, 2, 0, 0)) == utc(2026, 11, 8, 4, 0)  # Sat 7 Nov EST


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("22:00", "not [DAYS ]HH:MM-HH:MM"),
        ("22:00 - 06:00", "not [DAYS ]HH:MM-HH:MM"),
        ("24:00-06:00", "24:00 is not a time of day"),
        ("22:60-06:00", "22:60 is not a time of day"),
        ("10:00:61-11:00", "10:00:61 is not a time of day"),
        ("10:00-10:00", "opens and closes at once"),
        ("Mo 10:00-11:00", "not [DAYS ]HH:MM-HH:MM"),
        ("Mon-Funday 10:00-11:00", "not [DAYS ]HH:MM-HH:MM"),
        ("10:00-11:00 Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("10:00-11:00 ../../etc/passwd", "not [DAYS ]HH:MM-HH:MM"),
        ("10:00-11:00 Europe/../../etc/passwd", "not [DAYS ]HH:MM-HH:MM"),
        ("10:00-11:00 /etc/localtime", "not [DAYS ]HH:MM-HH:MM"),
        ("10:00-11:00\nUTC", None),  # whitespace is one space: this one is valid
        ("Mon " * 60 + "10:00-11:00", "longer than 200 characters"),
        ("1" * 10_000_000, "longer than 200 characters"),
        (22, "a string is needed"),
    ],
)
def test_bad_windows_are_one_line(spec, says):
    if says is None:
        assert parse_window(spec).spec == "10:00-11:00 UTC"
        return
    with pytest.raises(InvalidParameterError) as err:
        parse_window(spec)
    message = str(err.value)
    assert says in message and "\n" not in message and len(message) < 400, message


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(0, 86399),
    length=st.integers(1, 86400),
    days=st.sets(st.integers(0, 6), min_size=1),
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]),
    now=st.datetimes(datetime(2025, 1, 1), datetime(2028, 1, 1)),
)
def test_next_open_is_the_next_opening(start, length, days, zone, now):
    """Whatever the window and the instant: next_open is now when open, else an instant the
    window is open at and was not one second before (and not at now either)."""
    end = (start + length) % 86400 or 86400
    if end == start:
        return
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    hms = lambda s: f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"  # noqa: E731
    spec = f"{','.join(names[d] for d in sorted(days))} {hms(start)}-{hms(end)} {zone}"
    w = parse_window(spec.replace("24:00:00", "24:00"))
    now = now.replace(tzinfo=UTC, microsecond=0)
    at = w.next_open(now)
    assert at >= now and at - now <= timedelta(days=8)
    assert w.is_open(at)
    if at == now:
        assert w.is_open(now)
    else:
        assert not w.is_open(now) and not w.is_open(at - timedelta(seconds=1))


# --- on a real Prefect server --------------------------------------------------------------


@contextlib.contextmanager
def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _run(api: str, run_id: str) -> dict:
    return api_request("GET", f"{api}/flow_runs/{run_id}").json()


def _states(api: str, run_id: str) -> list[dict]:
    res = api_request("GET", f"{api}/flow_run_states/", params={"flow_run_id": run_id})
    return sorted(res.json(), key=lambda s: s["timestamp"])


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _wait_for(api: str, run_id: str, state_types: set[str], timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = _run(api, run_id)
        if run["state_type"] in state_types:
            return run
        assert run["state_type"] not in {"FAILED", "CRASHED", "CANCELLED"}, run["state"]
        assert time.monotonic() < deadline, f"{run['name']}: still {run['state_name']}"
        time.sleep(0.5)


def _submit(api: str, deployment: str, queue: str | None = None, **parameters) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment(
            deployment, parameters=parameters, timeout=0, work_queue_name=queue, as_subflow=False
        )
    return str(run.id)


@contextlib.contextmanager
def _worker(env: dict, log: Path, *queues: str, limit: int | None = None):
    args = [str(Path(sys.executable).with_name("prefect")), "worker", "start"]
    args += ["--pool", "hypersdk-local", "--type", "process"]
    for q in queues:
        args += ["--work-queue", q]
    if limit is not None:
        args += ["--limit", str(limit)]
    out = open(log, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        args, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        stop(proc)
        out.close()


def _wait_for_worker(api: str, queue: str, timeout: float = WAIT) -> None:
    """Until a worker polls ``queue`` (a worker takes seconds to start on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        res = api_request("GET", f"{api}/work_pools/hypersdk-local/queues/{queue}")
        if res.json().get("last_polled"):
            return
        assert time.monotonic() < deadline, f"no worker polls {queue}"
        time.sleep(0.5)


def _vm(home: Path, name: str, seed: int, size: int = 4 * MiB) -> Path:
    vm_dir = create_vm(home / "vms", name, {"disk0": size})
    write_realistic_disk(vm_dir / "disk0.img", size, seed=seed)
    return vm_dir


def _check_export(home: Path, vm_dir: Path) -> None:
    [export] = sorted((home / "exports" / vm_dir.name).glob("*/disk0.qcow2"))
    qemu.check(export, "qcow2")
    qemu.compare(vm_dir / "disk0.img", export, "raw", "qcow2")


def _cleanup_runs(api: str, run_ids) -> None:
    """Runs a failed test left queued would be taken by the next test file's workers."""
    for run_id in run_ids:
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{api}/flow_runs/{run_id}", timeout=30)


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory):
    """The deploy step on the session's server, then (so its first minute passes during the
    other tests) a cron deployment of backup-vm with its own worker."""
    api, env = prefect_server
    tmp = tmp_path_factory.mktemp("schedules")
    home = tmp / "hshome"
    env = {**env, "HYPERSDK_HOME": str(home)}
    boot = deploy_all(env)
    assert "urgent (priority 1), default (priority 2), bulk (priority 3)" in boot.stdout

    cron_vm = _vm(home, "cron01", seed=60, size=2 * MiB)
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists

    with _client(api) as client:
        for queue in (CRON_QUEUE, WINDOW_QUEUE):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=queue, work_pool_name="hypersdk-local")
        flow_id = client.create_flow_from_name("backup-vm")
        created = datetime.now(UTC)
        cron_id = client.create_deployment(
            flow_id,
            "every-minute",
            entrypoint="flows/backup.py:backup_vm",
            work_pool_name="hypersdk-local",
            work_queue_name=CRON_QUEUE,
            parameters={"vm": cron_vm.name},
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ],
            schedules=[
                DeploymentScheduleCreate(schedule=CronSchedule(cron="* * * * *", timezone="UTC"))
            ],
        )
    try:
        with _worker(env, tmp / "cron-worker.log", CRON_QUEUE, limit=1):
            yield {
                "api": api,
                "env": env,
                "home": home,
                "tmp": tmp,
                "cron": (cron_id, created, cron_vm),
            }
    finally:
        with contextlib.suppress(httpx.HTTPError):  # its scheduled runs go with it
            httpx.delete(f"{api}/deployments/{cron_id}", timeout=30)


def test_only_a_deferred_deployment_attempt_skips_the_job_start_event(monkeypatch):
    """The webhooks' job.started hook asks the guard first: a deployment run about to be handed
    back to Scheduled has not started; a run inside its window, or a plain call that waits in
    its process (and then starts), has."""
    from types import SimpleNamespace

    from flows.window import will_defer

    now = datetime.now(UTC)
    later = f"{now + timedelta(minutes=10):%H:%M:%S}-{now + timedelta(minutes=20):%H:%M:%S}"
    inside = f"{now - timedelta(minutes=5):%H:%M:%S}-{now + timedelta(minutes=30):%H:%M:%S}"
    run = SimpleNamespace(id="0b5e", deployment_id="d1")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5e")
    assert will_defer(later, run)
    assert not will_defer(inside, run) and not will_defer(None, run)
    assert not will_defer("not a window", run)  # the guard fails the run with one line
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID")
    assert not will_defer(later, run)  # a plain call: it waits here, then starts
    assert not will_defer(later, SimpleNamespace(id="0b5e", deployment_id=None))


def test_deploy_step_creates_priority_queues(stack):
    from deployments.queues import ensure_queues

    api = stack["api"]
    with _client(api) as client:
        first = {
            q.name: q.priority for q in client.read_work_queues(work_pool_name="hypersdk-local")
        }
        assert first["urgent"] < first["default"] < first["bulk"], first
        assert (first["urgent"], first["default"], first["bulk"]) == (1, 2, 3)
        # someone reordered them: the deploy step puts them back, and changes nothing more
        res = client.request(
            "PATCH",
            "/work_pools/{pool}/queues/{name}",
            path_params={"pool": "hypersdk-local", "name": "bulk"},
            json={"priority": 1},
        )
        res.raise_for_status()
        assert ensure_queues(client)["bulk"] == 3
        again = ensure_queues(client)
    assert {k: again[k] for k in ("urgent", "default", "bulk")} == {
        "urgent": 1,
        "default": 2,
        "bulk": 3,
    }


def test_urgent_run_overtakes_queued_bulk_runs(stack):
    """Three bulk runs wait in the pool, then an urgent one comes: the worker's one slot takes
    the urgent run first (by scheduled time alone it would be last), then the oldest bulk."""
    api, env, home, tmp = stack["api"], stack["env"], stack["home"], stack["tmp"]
    names = ("bulk1", "bulk2", "bulk3", "urgent1")
    vms = {name: _vm(home, name, seed=70 + i) for i, name in enumerate(names)}
    runs: dict[str, str] = {}
    try:
        for name in names:
            queue = "urgent" if name == "urgent1" else "bulk"
            runs[name] = _submit(api, "migrate-vm/on-demand", queue, vm=name)
        scheduled = {n: _time(_run(api, r)["next_scheduled_start_time"]) for n, r in runs.items()}
        assert scheduled["urgent1"] > max(scheduled[n] for n in names[:3])  # queued last
        with _worker(env, tmp / "priority-worker.log", "urgent", "bulk", limit=1):
            urgent = _wait_for(api, runs["urgent1"], {"COMPLETED"})
            started = _time(urgent["start_time"])
            for name in names[:3]:  # none started before it
                run = _run(api, runs[name])
                assert run["start_time"] is None or _time(run["start_time"]) > started, (
                    name,
                    run["start_time"],
                    started,
                )
            # then the bulk runs, oldest first (not waited for to the end: time)
            oldest = _wait_for(api, runs["bulk1"], {"RUNNING", "COMPLETED"})
            assert _time(oldest["start_time"]) > _time(urgent["end_time"])
            for name in ("bulk2", "bulk3"):
                assert _run(api, runs[name])["state_type"] == "SCHEDULED", name
        for name in names:
            queue = "urgent" if name == "urgent1" else "bulk"
            assert _run(api, runs[name])["work_queue_name"] == queue
        _check_export(home, vms["urgent1"])
    finally:
        _cleanup_runs(api, [r for r in runs.values() if _run(api, r)["state_type"] != "COMPLETED"])


def _window_opening_in(seconds: int) -> tuple[str, datetime]:
    opens = (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0)
    closes = opens + timedelta(minutes=30)
    return f"{opens:%H:%M:%S}-{closes:%H:%M:%S}", opens


def _deferred_run(api: str, home: Path, margin: int) -> tuple[str | None, str, datetime, Path]:
    """Submit a run whose window opens ``margin`` s from now; its id if the guard deferred it,
    None if the worker started it only once the window was (nearly) open."""
    vm_dir = _vm(home, f"win{margin}", seed=margin)
    window, opens = _window_opening_in(margin)
    run_id = _submit(api, "migrate-vm/on-demand", WINDOW_QUEUE, vm=vm_dir.name, window=window)
    deadline = time.monotonic() + WAIT + margin
    while True:  # the worker starts it; the guard puts it back, Scheduled at the opening
        states = _states(api, run_id)
        if any(s["name"] == "AwaitingWindow" for s in states):
            return run_id, window, opens, vm_dir
        assert not [s for s in states if s["type"] in ("FAILED", "CRASHED")], states
        running = [_time(s["timestamp"]) for s in states if s["type"] == "RUNNING"]
        if running and running[0] >= opens - timedelta(seconds=5):
            # this machine took longer than the margin to start the run: rightly not deferred
            _wait_for(api, run_id, {"COMPLETED"})
            return None, window, opens, vm_dir
        assert not [s for s in states if s["type"] == "COMPLETED"], "ran before its window"
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


def test_run_outside_its_window_is_rescheduled_to_the_opening(stack):
    api, env, home, tmp = stack["api"], stack["env"], stack["home"], stack["tmp"]
    run_id = None
    try:
        with _worker(env, tmp / "window-worker.log", WINDOW_QUEUE):
            _wait_for_worker(api, WINDOW_QUEUE)
            # the opening must leave the worker time to start the run (tens of seconds on a
            # loaded machine): when it did not, the same again with more time
            for margin in (45, 120, 300):
                run_id, window, opens, vm_dir = _deferred_run(api, home, margin)
                if run_id is not None:
                    break
            assert run_id is not None, "the worker never started a run before its window"
            run = _run(api, run_id)
            if datetime.now(UTC) < opens - timedelta(seconds=12):  # not yet picked up again
                assert run["state_type"] == "SCHEDULED" and run["state_name"] == "AwaitingWindow"
                assert _time(run["next_scheduled_start_time"]) == opens
            done = _wait_for(api, run_id, {"COMPLETED"}, timeout=WAIT + margin)
        states = _states(api, run_id)
        [deferred] = [s for s in states if s["name"] == "AwaitingWindow"]
        assert deferred["type"] == "SCHEDULED"
        assert _time(deferred["state_details"]["scheduled_time"]) == opens
        assert window in deferred["message"]
        assert not [s for s in states if s["type"] in ("CRASHED", "FAILED")], states
        running = [_time(s["timestamp"]) for s in states if s["type"] == "RUNNING"]
        # the first attempt ran only the guard, before the opening; the second from it (the
        # server's WaitForScheduledTime rounds to the second; the guard waits out the rest)
        assert len(running) == 2 and running[0] < opens - timedelta(seconds=5), (running, opens)
        assert running[1] >= opens - timedelta(seconds=1), (running, opens)
        tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        assert tasks and min(_time(t["start_time"]) for t in tasks) >= opens
        assert done["parameters"]["window"] == window
        logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        assert any("outside its window" in log["message"] for log in logs)
        _check_export(home, vm_dir)
    finally:
        if run_id and _run(api, run_id)["state_type"] != "COMPLETED":
            _cleanup_runs(api, [run_id])


def test_plain_python_call_waits_for_its_window(stack, monkeypatch):
    """A plain Python call: inside its window it runs at once (one Running state); outside
    it waits in its process (it cannot be handed to a worker) and starts at the opening."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.migrate import migrate_vm

    api, home = stack["api"], stack["home"]
    monkeypatch.setenv("HYPERSDK_HOME", str(home))
    vm_dir = _vm(home, "py01", seed=90, size=2 * MiB)
    window, opens = _window_opening_in(8)
    run_logs = logging.getLogger("prefect.flow_runs")
    level = run_logs.level
    run_logs.setLevel(logging.INFO)  # the session's WARNING (conftest) would drop the guard's line
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            with pytest.raises(InvalidParameterError, match="invalid window '25:00-26:00'"):
                migrate_vm(vm="py01", window="25:00-26:00")
            result = migrate_vm(vm="py01", window=window)
            assert datetime.now(UTC) >= opens
            second = migrate_vm(vm="py01", window=window)
            first_logs = _logs_with(api, result.flow_run_id, "export of py01")
            second_logs = _logs_with(api, second.flow_run_id, "export of py01")
    finally:
        run_logs.setLevel(level)
    states = _states(api, result.flow_run_id)
    assert [s["type"] for s in states].count("RUNNING") == 1
    tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [result.flow_run_id]}}})
    assert min(_time(t["start_time"]) for t in tasks) >= opens
    assert any("outside its window" in m and "waiting in this process" in m for m in first_logs)
    assert not any("window" in m for m in second_logs)  # open: not a word about it
    assert second.kind == "incremental"
    _check_export(home, vm_dir)


def _logs_with(api: str, run_id: str, needle: str, timeout: float = WAIT) -> list[str]:
    """The run's log messages once one holds ``needle`` (an in-process run sends its logs in
    batches, from a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        messages = [log["message"] for log in logs]
        if any(needle in m for m in messages):
            return messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.5)


def test_cron_scheduled_run_is_created_and_run_at_its_time(stack):
    api, home = stack["api"], stack["home"]
    cron_id, created, vm_dir = stack["cron"]
    deadline = time.monotonic() + WAIT
    while True:
        runs = _post(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [str(cron_id)]}}})
        done = sorted(
            (r for r in runs if r["state_type"] == "COMPLETED"),
            key=lambda r: r["expected_start_time"],
        )
        if done:
            break
        assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
        assert time.monotonic() < deadline, [(r["name"], r["state_name"]) for r in runs]
        time.sleep(1)
    first = done[0]
    assert first["auto_scheduled"] is True  # created by Prefect's scheduler, not by us
    expected = _time(first["expected_start_time"])
    assert expected > created and expected.second == 0 and expected.microsecond == 0
    assert _time(first["start_time"]) >= expected  # not before its time
    # one of the first minutes after deploying (the scheduler's loop is a few seconds)
    assert expected - created <= timedelta(minutes=2)
    exports = sorted((home / "exports" / vm_dir.name).glob("*/disk0.qcow2"))
    assert exports
    qemu.check(exports[0], "qcow2")
    qemu.compare(vm_dir / "disk0.img", exports[0], "raw", "qcow2")
