"""Task retries on a real Prefect server, with our real tasks and a real S3 API (moto): a target
that answers 503 and then drops a connection is retried by the task (AwaitingRetry states in
the task run's history, read through the API) and the export completes, correct; rejected
credentials are not retried (one run of the task, no retry state) and fail the flow run with
one clear line. Each error class declares whether a retry can heal it (hypersdk/errors.py);
tasks/common.py's retry condition reads it."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests import qemu
from tests.fixtures.moto_server import ACCESS_KEY, SECRET_KEY
from tests.fixtures.prefect_server import api_request
from tests.fleet_stack import make_vms

ROOT = Path(__file__).resolve().parent.parent
SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}


class FlakyProxy:
    """An HTTP proxy to ``upstream`` (one request per connection) that fails the requests
    ``match(method, path)`` picks, one fault each from ``faults`` in order: "503" answers with
    S3's SlowDown, "drop" closes the connection without an answer. Every other request is
    passed on unchanged (the signature covers the Host header, which is kept)."""

    def __init__(self, upstream: str, faults: list[str], match):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.faults, self.match = list(faults), match
        self.seen: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _fault(self, method: str, path: str) -> str:
        with self._lock:
            fault = self.faults.pop(0) if self.faults and self.match(method, path) else "pass"
            self.seen.append((method, path, fault))
            return fault

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        body = _read_body(req)
        req.close_connection = True
        fault = self._fault(req.command, req.path)
        if fault == "drop":
            return  # no answer: the client sees the connection closed
        if fault == "503":
            req.send_response(503, "Slow Down")
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(SLOW_DOWN)))
            req.send_header("Connection", "close")
            req.end_headers()
            req.wfile.write(SLOW_DOWN)
            return
        up = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            up.request(req.command, req.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            req.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    req.send_header(k, v)
            length = resp.getheader("Content-Length") if req.command == "HEAD" else None
            req.send_header("Content-Length", length or str(len(data)))
            req.send_header("Connection", "close")
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        finally:
            up.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    """The request's body: by Content-Length, or its chunks (Transfer-Encoding: chunked)."""
    if "chunked" in req.headers.get("Transfer-Encoding", "").lower():
        out = b""
        while True:
            size = int(req.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return out
            out += req.rfile.read(size)
            req.rfile.readline()
    length = int(req.headers.get("Content-Length") or 0)
    return req.rfile.read(length) if length else b""


def _run_flow(env: dict, flow: str, **params) -> tuple[str, str, str]:
    """A flow (``module:function``) as a client process on the server; (state type, flow run
    id, state message)."""
    module, name = flow.split(":")
    code = (
        f"import json, sys; from {module} import {name}; "
        f"s = {name}(**json.loads(sys.argv[1]), return_state=True); "
        "print('RUN', s.state_details.flow_run_id, s.type.value, json.dumps(s.message))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RUN ")), None)
    assert line, (done.stdout + done.stderr)[-4000:]
    run_id, state, message = line.split(" ", 3)[1:]
    return state, run_id, json.loads(message)


def _task_run(api: str, run_id: str, name: str) -> tuple[dict, list[str]]:
    """The flow run's task run called ``name`` and the names of its states, oldest first."""
    body = {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"name": {"any_": [name]}}}
    [task_run] = api_request("POST", f"{api}/task_runs/filter", json=body).json()
    res = api_request("GET", f"{api}/task_run_states/", params={"task_run_id": task_run["id"]})
    states = sorted(res.json(), key=lambda s: s["timestamp"])
    return task_run, [s["name"] for s in states]


def _env(prefect_server, tmp_path: Path, key: str, secret: str) -> dict:
    _, env = prefect_server
    return {
        **env,
        "HYPERSDK_HOME": str(tmp_path / "hshome"),
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
    }


def test_flaky_target_is_retried_then_the_export_completes(
    prefect_server, moto_s3, tmp_path, qemu_img
):
    api, _ = prefect_server
    make_vms(tmp_path / "vms", ["flaky01"])
    bucket = moto_s3.new_bucket()
    proxy = FlakyProxy(moto_s3.endpoint_url, ["503", "drop"], _manifest_put)
    try:
        target = (
            f"s3://{bucket}/b?endpoint_url={proxy.url}&region={moto_s3.region}"
            "&addressing_style=path&max_attempts=1"  # no retry inside boto3: the task retries
        )
        state, run_id, message = _run_flow(
            _env(prefect_server, tmp_path, ACCESS_KEY, SECRET_KEY),
            "flows.migrate:migrate_vm",
            vm="flaky01",
            source=f"local://{tmp_path / 'vms'}",
            target=target,
            format="qcow2",
        )
    finally:
        proxy.close()
    assert state == "COMPLETED", message
    puts = [fault for method, path, fault in proxy.seen if _manifest_put(method, path)]
    assert puts == ["503", "drop", "pass"], proxy.seen
    assert len(proxy.seen) > 10  # everything else went through the proxy too

    # the task publishing the manifest failed twice (SlowDown, then a dropped connection), each
    # time put in AwaitingRetry by its retry policy, and completed on its third run
    task_run, states = _task_run(api, run_id, "publish-manifest")
    assert states.count("AwaitingRetry") == 2, states
    assert states[-1] == "Completed" and task_run["run_count"] == 3, (states, task_run)
    assert states.index("AwaitingRetry") > states.index("Running")

    # the export is the VM's disk, stored on S3 through the (by then healthy) proxy
    s3 = moto_s3.client()
    [key] = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="b/flaky01/")["Contents"]
        if o["Key"].endswith("/disk0.qcow2")
    ]
    out = tmp_path / "disk0.qcow2"
    out.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    qemu.check(out, "qcow2")
    qemu.compare(tmp_path / "vms" / "flaky01" / "disk0.img", out, "raw", "qcow2")


def _manifest_put(method: str, path: str) -> bool:
    return method == "PUT" and path.split("?")[0].endswith("/manifest.json")


def test_rejected_credentials_are_not_retried(prefect_server, moto_s3, tmp_path):
    """verify-backups' verify-points task (2 retries for transient errors) on a bucket whose
    server rejects the keys: CredentialsError, not retryable."""
    from moto.core import enable_iam_authentication

    api, _ = prefect_server
    bucket = moto_s3.new_bucket()
    with enable_iam_authentication():  # moto now checks keys: these are no IAM user's
        state, run_id, message = _run_flow(
            _env(prefect_server, tmp_path, "AKIAWRONGWRONGWRONG0", "not-the-secret"),
            "flows.verify:verify_backups",
            vm="creds01",
            target=f"s3://{bucket}/b?endpoint_url={moto_s3.endpoint_url}"
            f"&region={moto_s3.region}&addressing_style=path&max_attempts=1",
        )
    assert state == "FAILED"
    assert "credentials rejected" in message and "\n" not in message, message
    assert "not-the-secret" not in message
    task_run, states = _task_run(api, run_id, "verify-points")
    assert "AwaitingRetry" not in states and "Retrying" not in states, states
    assert states[-1] == "Failed" and task_run["run_count"] == 1, (states, task_run)
