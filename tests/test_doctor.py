"""``hyperctl doctor`` against real services: a real Prefect server after the real deploy step,
a real process worker (alive, then stopped and no longer alive), a limit missing then created
by the deploy step's own script, moto's S3 with good and rejected credentials (whose secret
never shows), an API that refuses connections and one that never answers (a fail within the
timeout, one line), the JSON shape and the exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from hypersdk.doctor import Options, diagnose, worst
from hypersdk.doctor.endpoints import Endpoint, check_space, check_target, collect_endpoints
from hypersdk.doctor.model import Result, run_bounded, scrub
from tests.fixtures.prefect_server import deploy_all, free_port, stop

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hsdk-doctor-very-secret-" + uuid.uuid4().hex


def _doctor(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hypersdk.cli.main", "doctor", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _checks(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    data = json.loads(proc.stdout)
    return {c["name"]: c for c in data["checks"]}


def _base_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        HYPERSDK_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


# --- no server ---------------------------------------------------------------------------------


def test_refused_api_is_one_fail_line_and_exit_1(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    proc = _doctor(_base_env(tmp_path, dead), "--timeout", "10")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == ""  # no traceback, no warning noise
    [line] = [x for x in proc.stdout.splitlines() if " prefect api " in f" {x} "]
    assert line.startswith("FAIL") and dead in line and "ConnectError" in line
    for name in ("work pool", "workers", "deployments", "concurrency limits"):
        assert any(x.startswith("skip") and name in x for x in proc.stdout.splitlines()), name
    assert proc.stdout.splitlines()[-1].startswith(f"{len(proc.stdout.splitlines()) - 1} checks")


def test_api_that_never_answers_fails_after_the_timeout(tmp_path):
    """A server that accepts connections and says nothing (a hung proxy) is a fail once
    --timeout has passed, not a hung command."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the backlog; nobody ever answers
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        started = time.monotonic()
        proc = _doctor(_base_env(tmp_path, api), "--json", "--timeout", "3", timeout=120)
        elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    check = _checks(proc)["prefect api"]
    assert check["status"] == "fail"
    assert "no answer" in check["detail"] and api in check["detail"]
    assert "\n" not in check["detail"]
    assert elapsed < 100  # the hang is endless: finishing at all is the point


def test_json_shape_and_usage_errors(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    proc = _doctor(_base_env(tmp_path, dead), "--json", "--timeout", "10")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert set(data) == {"status", "counts", "checks"}
    assert data["status"] == "fail"
    assert set(data["counts"]) == {"ok", "warn", "fail", "skip"}
    assert sum(data["counts"].values()) == len(data["checks"])
    for check in data["checks"]:
        assert set(check) == {"name", "status", "detail", "hint"}
        assert check["status"] in ("ok", "warn", "fail", "skip")
        assert check["detail"] and "\n" not in check["detail"]
    names = [c["name"] for c in data["checks"]]
    for expected in ("prefect api", "python", "prefect", "qemu-img", "free space HYPERSDK_HOME"):
        assert expected in names
    # the default source (HYPERSDK_HOME/vms) does not exist: a warning, not a fail
    source = next(c for c in data["checks"] if c["name"].startswith("source local://"))
    assert source["status"] == "warn" and "does not exist" in source["detail"]

    for bad in (["--timeout", "soon"], ["--no-such-option"], ["--timeout", "0"]):
        usage = _doctor(_base_env(tmp_path, dead), *bad)
        assert usage.returncode == 2, (bad, usage.stdout, usage.stderr)


def test_s3_target_good_and_rejected_credentials(tmp_path, moto_s3):
    bucket = moto_s3.new_bucket()
    options = f"endpoint_url={moto_s3.endpoint_url}&addressing_style=path&region=us-east-1"
    good = f"s3://{bucket}/exports?{options}&max_attempts=1"
    missing = f"s3://no-such-{bucket}?{options}&max_attempts=1"
    env = _base_env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    env.update(AWS_ACCESS_KEY_ID="AKIADOCTORTEST", AWS_SECRET_ACCESS_KEY=SECRET)
    proc = _doctor(env, "--json", "--timeout", "20", "--target", good, "--target", missing)
    out = proc.stdout + proc.stderr
    assert SECRET not in out
    checks = _checks(proc)
    ok = checks[f"target s3://{bucket}/exports?{options}&max_attempts=1"]
    assert ok["status"] == "ok" and "credentials accepted" in ok["detail"], ok
    gone = checks[f"target s3://no-such-{bucket}?{options}&max_attempts=1"]
    assert gone["status"] == "fail" and "bucket does not exist" in gone["detail"], gone


def test_rejected_s3_credentials_fail_and_never_show(tmp_path, moto_s3, moto_iam_auth):
    bucket = "hsdk-doctor-any"
    options = f"endpoint_url={moto_s3.endpoint_url}&addressing_style=path&region=us-east-1"
    url = f"s3://{bucket}?{options}&max_attempts=1"
    env = _base_env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    env.update(AWS_ACCESS_KEY_ID="AKIADOCTORTEST", AWS_SECRET_ACCESS_KEY=SECRET)
    # a secret in a URL is refused, and not shown either
    with_secret = f"s3://{bucket}?{options}&secret_access_key={SECRET}"
    proc = _doctor(env, "--timeout", "20", "--target", url, "--target", with_secret)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert SECRET not in out
    [line] = [
        x
        for x in proc.stdout.splitlines()
        if f"target s3://{bucket}?endpoint_url" in x and "secret_access_key" not in x
    ]
    assert line.startswith("FAIL") and "credentials rejected" in line, line
    [refused] = [x for x in proc.stdout.splitlines() if "secret_access_key" in x]
    assert refused.startswith("FAIL"), refused


# --- pieces ------------------------------------------------------------------------------------


def test_a_hanging_check_is_a_fail_after_its_timeout():
    release = threading.Event()
    started = time.monotonic()
    try:
        results = run_bounded(
            [
                ("hangs", lambda: (release.wait(60), Result("hangs", "ok", "late"))[1]),
                ("quick", lambda: Result("quick", "ok", "fine")),
                ("raises", lambda: 1 / 0),
            ],
            timeout=0.5,
        )
    finally:
        release.set()
    assert time.monotonic() - started < 50
    assert [(r.name, r.status) for r in results] == [
        ("hangs", "fail"),
        ("quick", "ok"),
        ("raises", "fail"),
    ]
    assert "no answer within 0.5 s" in results[0].detail
    assert results[2].detail == "ZeroDivisionError: division by zero"
    assert worst(results) == "fail" and worst(results[1:2]) == "ok"


def test_free_space_thresholds(tmp_path):
    where = str(tmp_path / "not" / "yet")  # measured at the nearest existing directory
    assert check_space("x", where, warn_gib=0, fail_gib=0).status == "ok"
    warned = check_space("x", where, warn_gib=1e9, fail_gib=0)
    assert warned.status == "warn" and str(tmp_path) in warned.detail
    assert check_space("x", where, warn_gib=1e9, fail_gib=1e9).status == "fail"


def test_local_target_writable_or_not(tmp_path):
    ok = check_target(Endpoint("target", f"file://{tmp_path}/out", "given"))
    assert ok.status == "ok" and "writable" in ok.detail
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    bad = check_target(Endpoint("target", f"file://{blocker}/out", "given"))
    assert bad.status == "fail" and "not a directory" in bad.detail


def test_endpoints_from_deployments_given_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSDK_HOME", str(tmp_path))
    deployments = [
        {"name": "a", "flow_name": "backup-vm", "parameters": {"source": "local:///vms"}},
        {"name": "b", "flow_name": "f", "parameters": {"target": "x" * 5000}},  # too long
        {"name": "c", "flow_name": "f", "parameters": "not a dict"},
    ]
    found, left = collect_endpoints(deployments, ["local:///vms"], ["file:///out"])
    assert left == 0
    by_url = {(e.kind, e.url): e.origin for e in found}
    assert by_url == {
        ("source", "local:///vms"): "given",  # the strongest origin wins
        ("target", "file:///out"): "given",
        ("source", f"local://{tmp_path}/vms"): "default",
        ("target", f"file://{tmp_path}/exports"): "default",
    }


def test_scrub_hides_secrets_and_url_passwords():
    results = [Result("target s3://k:pw@h/b", "fail", f"boom {SECRET} at s3://k:pw@h/b", SECRET)]
    [clean] = scrub(results, ["s3://k:pw@h/b"], [SECRET])
    assert SECRET not in str(clean) and "pw" not in clean.detail and "***" in clean.detail
    # a worker named by a hostile API cannot break the line or drive the terminal
    [named] = scrub([Result("workers", "ok", "1 alive (w\n1\x1b[2J)")], [], [])
    assert named.detail == "1 alive (w 1\\x1b[2J)"


def test_worker_alive_by_its_own_heartbeat_interval():
    from datetime import UTC, datetime, timedelta

    from hypersdk.doctor.api import Facts
    from hypersdk.doctor.prefect_checks import check_workers

    now = datetime(2026, 1, 1, tzinfo=UTC)

    def worker(name: str, ago: float, interval: int | None) -> dict:
        beat = (now - timedelta(seconds=ago)).isoformat().replace("+00:00", "Z")
        return {"name": name, "last_heartbeat_time": beat, "heartbeat_interval_seconds": interval}

    pool = {"name": "hypersdk-local", "type": "process"}
    fresh = Facts(pool=pool, workers=[worker("a", 80, None), worker("b", 7, 2)])
    result = check_workers(fresh, now)
    assert result.status == "ok" and "1 alive" in result.detail and "(a)" in result.detail
    stale = Facts(pool=pool, workers=[worker("a", 95, 30), worker("b", 700, None)])
    result = check_workers(stale, now)
    assert result.status == "fail" and "95 s ago" in result.detail and "2 known" in result.detail
    assert check_workers(Facts(pool=pool), now).detail.startswith("no worker ever polled")


def test_a_missing_limit_fails_only_with_fleet_deployments():
    from hypersdk.doctor.api import Facts
    from hypersdk.doctor.prefect_checks import check_limits

    given = [Endpoint("source", "vsphere://vc1/DC", "given")]
    plain = Facts(deployments=[{"name": "nightly", "tags": ["backup"]}])
    fleet = Facts(deployments=[{"name": "fleet", "tags": ["backup", "fleet"]}])
    [warned] = check_limits(plain, given)
    [failed] = check_limits(fleet, given)
    assert (warned.status, failed.status) == ("warn", "fail")
    assert "hypersdk-source:vsphere:" in failed.detail and "missing" in failed.detail
    assert "--source 'vsphere://vc1/DC=N'" in failed.hint


def test_names_agree_with_the_deploy_step():
    from deployments.bootstrap import WORK_POOL
    from deployments.limits import ZOMBIE_AUTOMATION
    from hypersdk.doctor import api

    assert api.WORK_POOL == WORK_POOL
    assert api.ZOMBIE_AUTOMATION == ZOMBIE_AUTOMATION
    from deployments.queues import QUEUES

    assert tuple(q[0] for q in QUEUES) == api.QUEUES


# --- a real Prefect server ---------------------------------------------------------------------


def _by_name(results: list[Result]) -> dict[str, Result]:
    return {r.name: r for r in results}


def _server(api: str, sources: list[str]) -> dict[str, Result]:
    """The server-side checks only (what the polls need: no tools, no endpoints)."""
    from hypersdk.doctor.api import Api, ApiClient, read_facts
    from hypersdk.doctor.endpoints import collect_endpoints
    from hypersdk.doctor.prefect_checks import check_limits, check_workers

    with ApiClient(Api(api, "test"), 30) as client:
        facts = read_facts(client)
    endpoints, _ = collect_endpoints(facts.deployments, sources, [])
    return _by_name([check_workers(facts), *check_limits(facts, endpoints)])


def _wait_for(probe, what: str, deadline: float = 240):
    end = time.monotonic() + deadline
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"waited {deadline} s for {what}")
        time.sleep(1)


def test_server_pool_workers_deployments_limits(prefect_server, tmp_path, monkeypatch):
    api, env = prefect_server
    env = {**env, "HYPERSDK_HOME": str(tmp_path / "home")}
    vms = tmp_path / "vms"
    vms.mkdir()
    source = f"local://{vms}"
    deploy_all(env)

    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("HYPERSDK_HOME", str(tmp_path / "home"))
    opts = Options(sources=[source], timeout=30)
    got = _by_name(diagnose(opts))
    assert got["prefect api"].status == "ok", got["prefect api"]
    assert "healthy" in got["prefect api"].detail and "3.9" in got["prefect api"].detail
    assert got["work pool hypersdk-local"].status == "ok"
    for queue in ("urgent", "default", "bulk"):  # the deploy step made them: polled or not
        assert got[f"work queue {queue}"].status in ("ok", "warn"), got[f"work queue {queue}"]
        assert "missing" not in got[f"work queue {queue}"].detail
    assert got["deployments"].status == "ok" and "backup-vm/nightly" in got["deployments"].detail
    assert got["automation hypersdk-crashed-runs"].status == "ok"
    assert got[f"source {source}"].status == "ok" and "0 VM(s)" in got[f"source {source}"].detail
    limit = got[f"limit source {source}"]
    assert limit.status in ("warn", "fail") and "missing" in limit.detail, limit
    assert "deployments.limits" in limit.hint

    made = subprocess.run(
        [sys.executable, "-m", "deployments.limits", "--source", f"{source}=3"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    limit = _server(api, [source])[f"limit source {source}"]
    assert limit.status == "ok" and "3 at once" in limit.detail, limit

    name = f"doctor-{uuid.uuid4().hex[:8]}"
    worker_env = {**env, "PREFECT_WORKER_HEARTBEAT_SECONDS": "2"}
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "worker",
            "start",
            "--pool",
            "hypersdk-local",
            "--type",
            "process",
            "--name",
            name,
        ],
        env=worker_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def alive():
            r = _server(api, [source])["workers"]
            return r if r.status == "ok" and name in r.detail else None

        seen = _wait_for(alive, "the worker to be alive")
        assert "alive on hypersdk-local" in seen.detail
    finally:
        stop(worker)

    def dead():
        r = _server(api, [source])["workers"]
        return r if r.status == "fail" else None

    gone = _wait_for(dead, "the stopped worker to count as dead")
    assert "none alive" in gone.detail and "last heartbeat" in gone.detail
    proc = _doctor({**env, "PREFECT_API_URL": api}, "--timeout", "30", "--source", source)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"ok    limit source {source}" in proc.stdout
    [line] = [x for x in proc.stdout.splitlines() if x.split()[1:2] == ["workers"]]
    assert line.startswith("FAIL") and "make worker" in line
