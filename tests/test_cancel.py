"""Cancellation (docs/cancel.md): a stopped run stops within a block, everywhere, and cleans up.

- the engine's copy and verify loops stop within one block of a stop request (the token);
- SIGTERM reaches the worker threads under Prefect's own SIGTERM handler, which stays Prefect's;
- ``hyperctl migrate`` SIGTERMed during its verify phase: exit 143 at once, one line;
- a ``migrate-vm/on-demand`` run of a process worker, cancelled through the API while its
  upload to S3 (moto) is under way: Cancelled within 10 s, no multipart upload, no object,
  snapshot removed; the worker then runs the same VM's next export to completion.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hypersdk import cancel
from hypersdk.errors import Interrupted
from hypersdk.extents import ExtentMap
from hypersdk.io import IO_CHUNK, FileRangeReader
from hypersdk.pipeline import export_stream
from hypersdk.verify import stored_object_problem
from providers.sources.local import create_vm
from tests.fixtures.prefect_server import api_request, stop

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(autouse=True)
def _unstopped():
    cancel.reset()
    yield
    cancel.reset()


def _random_disk(path: Path, size: int, seed: int) -> None:
    """Incompressible data, no holes: every block is read, converted and stored (fast to make)."""
    rng = np.random.default_rng(seed)
    with open(path, "r+b" if path.exists() else "wb") as f:
        for start in range(0, size, 16 * MiB):
            f.write(rng.bytes(min(16 * MiB, size - start)))


class _StopAfter(FileRangeReader):
    """A disk whose ``stop_at``-th block read asks the process to stop; counts reads after."""

    def __init__(self, path: Path, stop_at: int):
        super().__init__(path)
        self.reads = 0
        self.after = 0
        self._stop_at = stop_at

    def readinto(self, offset: int, view: memoryview) -> None:
        super().readinto(offset, view)
        self.reads += 1
        if cancel.requested():
            self.after += 1
        elif self.reads == self._stop_at:
            cancel.request("test")


class _Count:
    """A sink that keeps nothing."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.n += length

    def tell(self) -> int:
        return self.n


# Blocks already in flight when the stop comes: the reader's ring (depth 4) and the jobs queued
# for the download stage; everything after them is never read.
IN_FLIGHT = 8


def test_token_stops_the_export_stream_within_a_block(tmp_path):
    disk = tmp_path / "disk.raw"
    _random_disk(disk, 64 * MiB, seed=1)
    source = _StopAfter(disk, stop_at=3)
    out = _Count()
    with pytest.raises(Interrupted, match="interrupted"):
        export_stream(source, ExtentMap.full(source.size), True, "qcow2", out)
    assert source.after <= IN_FLIGHT, source.after
    assert source.reads < 64 * MiB // IO_CHUNK
    assert out.n < 32 * MiB


def test_token_stops_the_verify_pass_within_a_block(tmp_path):
    obj = tmp_path / "object"
    _random_disk(obj, 64 * MiB, seed=2)
    reader = _StopAfter(obj, stop_at=3)

    class Target:
        def open_reader(self, key):
            return reader

    class Disk:
        key = "vm/1/disk0.raw"
        object_size = 64 * MiB
        object_blake3 = "0" * 64

    with pytest.raises(Interrupted):
        stored_object_problem(Target(), Disk())
    assert reader.after <= IN_FLIGHT, reader.after
    assert reader.reads < 64 * MiB // IO_CHUNK


_UNDER_PREFECT = """
import os, signal, sys, threading, time
from prefect.exceptions import TerminationSignal
from prefect.utilities.engine import capture_sigterm, is_prefect_sigterm_handler_installed
from hypersdk import cancel

stopped = threading.Event()

def work():  # an engine thread: one block at a time
    while True:
        try:
            cancel.check()
        except Exception:
            stopped.set()
            return
        time.sleep(0.01)

with capture_sigterm():  # what a flow run does
    assert cancel.watch_signals()
    assert is_prefect_sigterm_handler_installed()  # the worker's cancel protocol checks this
    threading.Thread(target=work, daemon=True).start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    except TerminationSignal:
        print("main: TerminationSignal", flush=True)
    print("worker stopped:", stopped.wait(30), cancel.exit_code(), flush=True)
    os._exit(0)
"""


def test_sigterm_reaches_the_threads_under_prefects_handler():
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_UNDER_PREFECT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "main: TerminationSignal" in res.stdout, res.stdout + res.stderr
    assert "worker stopped: True 143" in res.stdout, res.stdout + res.stderr


def _open_files(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found.add(os.readlink(fd))
    return found


def _verifying(proc: subprocess.Popen, target: Path) -> bool:
    """The run published its export (a manifest) and has its disk object open: the verify
    pass is reading it (the writer wrote a temporary name, closed before the manifest)."""
    for manifest in target.glob("*/*/manifest.json"):
        objects = [str(p) for p in manifest.parent.glob("disk0.*")]
        if set(objects) & _open_files(proc.pid):
            return True
    return False


def test_hyperctl_migrate_sigterm_during_verify(prefect_server, tmp_path):
    _, env = prefect_server
    env = {**env, "HYPERSDK_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    vm_dir = create_vm(tmp_path / "vms", "web01", {"disk0": 256 * MiB})
    _random_disk(vm_dir / "disk0.img", 256 * MiB, seed=3)
    target = tmp_path / "exports"
    proc = subprocess.Popen(
        [HYPERCTL, "migrate", "web01", "-s", str(tmp_path / "vms"), "-t", str(target)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not _verifying(proc, target):
            assert time.monotonic() < deadline, "no verify phase in 300 s"
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before its verify phase was seen"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    [line] = err.strip().splitlines()
    assert line.startswith("interrupted: export ") and "was published" in line, err
    assert "verification did not finish" in line, err
    assert took < 30, took  # before: killed by the signal itself, no word, no cleanup of its own
    assert not list((vm_dir / ".hypersdk" / "snapshots").iterdir())
    assert not [p for p in target.rglob("*") if ".partial-" in p.name]


PART_SECONDS = 1.5  # the S3 endpoint takes this long per part: a slow link, the export lasts


def _prefect(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _state(api: str, run_id) -> dict:
    return api_request("GET", f"{api}/flow_runs/{run_id}").json()["state"]


def _wait_final(api: str, run_id, timeout: float = 300) -> tuple[dict, float]:
    """The run's final state, and when it was first seen (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        state = _state(api, run_id)
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state, time.monotonic()
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_worker_run_cancelled_mid_upload(prefect_server, moto_s3, tmp_path, monkeypatch):
    from moto.s3.responses import S3Response
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    api, env = prefect_server
    home = tmp_path / "home"
    env = {
        **env,
        "HYPERSDK_HOME": str(home),
        "HYPERSDK_CHECKOUT": str(ROOT),
        "HYPERSDK_PREFECT_SERVER": "off",
        "AWS_ACCESS_KEY_ID": "hsdk-test-key",
        "AWS_SECRET_ACCESS_KEY": "hsdk-test-secret",
    }
    vms = home / "vms"
    vm_dir = create_vm(vms, "db02", {"disk0": 128 * MiB})
    _random_disk(vm_dir / "disk0.img", 128 * MiB, seed=4)
    bucket = moto_s3.new_bucket()
    s3 = moto_s3.client()
    target = (
        f"s3://{bucket}/vms?endpoint_url={moto_s3.endpoint_url}&region={moto_s3.region}"
        f"&addressing_style=path&part_size={5 * MiB}&workers=2&max_inflight=2"
    )

    part_arrived = threading.Event()
    slow = threading.Event()
    slow.set()
    upload_part = S3Response.upload_part

    def slow_upload_part(self):
        if self.bucket_name == bucket:
            part_arrived.set()
            if slow.is_set():
                time.sleep(PART_SECONDS)
        return upload_part(self)

    monkeypatch.setattr(S3Response, "upload_part", slow_upload_part)

    # the pool (once per server) and the on-demand deployment of prefect.yaml
    pool = _prefect(env, "work-pool", "create", "hypersdk-local", "--type", "process")
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout
    deploy = _prefect(
        env, "--no-prompt", "deploy", "--prefect-file", "prefect.yaml", "--name", "on-demand"
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "hypersdk-local", "--type", "process"]
            + ["--limit", "2"],  # the next run need not wait for the cancel's hook process
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    params = {"vm": "db02", "source": str(vms), "target": target, "incremental": False}
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            run = run_deployment("migrate-vm/on-demand", parameters=params, timeout=0)
            deadline = time.monotonic() + 300
            while not part_arrived.wait(0.2):  # the upload is under way
                assert _state(api, run.id)["type"] in ("SCHEDULED", "PENDING", "RUNNING")
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            asked = client.set_flow_run_state(run.id, Cancelling(message="cancelled by a test"))
            requested = time.monotonic()
            assert asked.status.value == "ACCEPT", asked
            state, seen = _wait_final(api, run.id, timeout=120)
            assert state["type"] == "CANCELLED", (state, log.read_text(errors="replace")[-3000:])
            assert seen - requested <= 10, seen - requested

            # cleaned up: no unfinished upload, nothing under a final name, no snapshot
            assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
            assert not [k for k in keys if k.endswith((".qcow2", "manifest.json"))], keys
            assert not list((vm_dir / ".hypersdk" / "snapshots").iterdir())

            # the worker lives on, and the VM's next run (its lock, its slot free) completes
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            slow.clear()
            params["verify"] = False  # verify is tested elsewhere: the export completes
            again = run_deployment("migrate-vm/on-demand", parameters=params, timeout=0)
            state, _ = _wait_final(api, again.id, timeout=300)
            assert state["type"] == "COMPLETED", (state, log.read_text(errors="replace")[-3000:])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert len([k for k in keys if k.endswith("/disk0.qcow2")]) == 1, keys
        assert len([k for k in keys if k.endswith("/manifest.json")]) == 1, keys
    finally:
        stop(worker)
