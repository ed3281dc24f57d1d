"""Webhooks from the persisted outbox to a real HTTP receiver (http.server on 127.0.0.1, a free
port) that is down for a while: it refuses connections, then answers 500, then accepts. Every
event arrives acknowledged exactly once, in order per job, with a signature that verifies; a
wrong secret, a stale timestamp and an altered body fail verification; nothing secret reaches
a payload or the outbox; progress events are throttled; endpoints never hold secrets."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hypersdk.errors import InvalidParameterError
from hypersdk.webhooks import (
    Endpoint,
    Job,
    JobEvents,
    Outbox,
    ProgressThrottle,
    Sender,
    SignatureError,
    load_endpoints,
    sign,
    verify_signature,
)
from hypersdk.webhooks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER

SECRET = "whsec-test-3f9a1c"
FAST = {"base_delay": 0.02, "max_delay": 0.2, "lease": 5.0}


class Receiver:
    """A webhook receiver whose availability the test drives: "down" (the port is bound but
    not listening: connections are refused), "error" (500 to everything), "up" (200)."""

    def __init__(self, secret: str = SECRET):
        self.secret = secret
        self.mode = "error"
        self.requests: list[dict] = []  # every request that reached the server
        self.acked: list[dict] = []  # payloads answered 200, in arrival order
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    entry = {"headers": dict(self.headers), "body": body}
                    receiver.requests.append(entry)
                    status = 200 if receiver.mode == "up" else 500
                    if status == 200:
                        verify_signature(receiver.secret, self.headers, body, tolerance=60)
                        receiver.acked.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()  # bound, not listening: connections are refused
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread: threading.Thread | None = None

    def start(self, mode: str) -> None:
        self.mode = mode
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread:
            self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HS_TEST_WEBHOOK_SECRET", SECRET)
    return "HS_TEST_WEBHOOK_SECRET"


def _endpoint(url: str, env: str, **kw) -> Endpoint:
    return Endpoint(name="ops", url=url, secret_env=env, timeout=2.0, **kw)


def _jobs(outbox: Outbox, endpoints: list[Endpoint]) -> dict[str, list[str]]:
    """Two jobs' full event sequences queued (progress let through at every 10% band), as a
    run produces them: {run id: [event ids in order]}."""
    queued: dict[str, list[str]] = {}
    for n, (run_id, fails) in enumerate((("run-a", False), ("run-b", True))):
        job = Job(run_id, "export", f"vm{n}", "vsphere://admin@vc/dc", "s3://bucket/p")
        ev = JobEvents(outbox, endpoints, job, ProgressThrottle(interval=0.0, step=25.0))
        ids = [ev.started()]
        for done in (30, 60, 90):
            ids.append(ev.progress(done, 100))
        ids.append(ev.failed("disk read failed: EIO") if fails else ev.completed(100))
        queued[run_id] = ids
    return queued


def test_a_receiver_down_for_a_while_gets_every_event_once_in_order(tmp_path, receiver, secret_env):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    endpoint = _endpoint(receiver.url, secret_env)
    queued = _jobs(outbox, [endpoint])
    assert all(None not in ids for ids in queued.values()) and outbox.pending() == 10

    sender = Sender(outbox, [endpoint], **FAST)
    assert sender.drain(0.4) == 10  # connections refused: all still queued
    assert not receiver.requests
    errors = {r["last_error"] for r in outbox.rows()}
    assert any("ConnectError" in (e or "") for e in errors)

    # the outbox outlives the sender (a run that ended, a process that died): a new one
    # on the same file carries on
    sender.close()
    sender = Sender(Outbox(outbox.path), [endpoint], **FAST)
    receiver.start("error")
    assert sender.drain(0.4) == 10  # 500s: still queued
    failed_attempts = len(receiver.requests)
    assert failed_attempts >= 2 and not receiver.acked
    tried = [r for r in outbox.rows() if r["attempts"]]
    # only each job's first event was tried: event n+1 waits until n is acknowledged
    assert [r["event_id"] for r in tried] == [queued["run-a"][0], queued["run-b"][0]]
    assert all(r["last_error"] == "HTTP 500" for r in tried)

    receiver.mode = "up"
    assert sender.drain(15) == 0
    sender.close()

    got = [p["id"] for p in receiver.acked]
    assert sorted(got) == sorted(i for ids in queued.values() for i in ids)
    assert len(got) == len(set(got))  # each event acknowledged once
    for run_id, ids in queued.items():
        mine = [p for p in receiver.acked if p["job"]["run_id"] == run_id]
        assert [p["id"] for p in mine] == ids  # in order per job
        assert [p["sequence"] for p in mine] == [0, 1, 2, 3, 4]
        assert [p["type"] for p in mine][0] == "job.started"
        assert [p["type"] for p in mine][1:4] == ["job.progress"] * 3
    last_b = [p for p in receiver.acked if p["job"]["run_id"] == "run-b"][-1]
    assert last_b["type"] == "job.failed" and last_b["data"]["error"] == "disk read failed: EIO"
    last_a = [p for p in receiver.acked if p["job"]["run_id"] == "run-a"][-1]
    assert last_a["type"] == "job.completed" and last_a["data"]["bytes"] == 100
    assert last_a["job"] == {
        "run_id": "run-a",
        "kind": "export",
        "vm": "vm0",
        "source": "vsphere://admin@vc/dc",
        "target": "s3://bucket/p",
    }
    # every request, refused-then-retried ones included, carried a valid signature and the
    # event id as its idempotency key
    for r in receiver.requests:
        verify_signature(SECRET, r["headers"], r["body"], tolerance=60)
        assert r["headers"]["X-HyperSDK-Event-Id"] == json.loads(r["body"])["id"]
    assert outbox.pending() == 0 and len(outbox.rows("delivered")) == 10


def test_two_senders_on_one_outbox_deliver_each_event_once_in_order(tmp_path, receiver, secret_env):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    endpoint = _endpoint(receiver.url, secret_env)
    queued = _jobs(outbox, [endpoint])
    receiver.start("up")
    senders = [Sender(Outbox(outbox.path), [endpoint], **FAST) for _ in range(2)]
    threads = [threading.Thread(target=s.drain, args=(15,)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in senders:
        s.close()
    got = [p["id"] for p in receiver.acked]
    assert len(got) == len(set(got)) == 10
    for run_id, ids in queued.items():
        assert [p["id"] for p in receiver.acked if p["job"]["run_id"] == run_id] == ids


def test_a_sender_that_died_mid_delivery_is_retried_after_its_lease(tmp_path, receiver, secret_env):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    endpoint = _endpoint(receiver.url, secret_env)
    ev = JobEvents(outbox, [endpoint], Job("run-c", "restore", "vm"))
    first, second = ev.started(), ev.completed(5)
    claimed = outbox.claim(lease=0.3)  # a sender took the head, then died
    assert [r.event_id for r in claimed] == [first]
    assert outbox.claim(lease=0.3) == []  # leased head, and the next waits behind it
    receiver.start("up")
    sender = Sender(outbox, [endpoint], **FAST)
    assert sender.drain(10) == 0
    sender.close()
    assert [p["id"] for p in receiver.acked] == [first, second]


def test_signatures_refuse_a_wrong_secret_a_stale_timestamp_and_an_altered_body():
    body = b'{"id":"e1","type":"job.started"}'
    now = 1_800_000_000
    headers = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(SECRET, now, body)}
    assert verify_signature(SECRET, headers, body, tolerance=300, now=now + 10) == now
    lowered = {k.lower(): v for k, v in headers.items()}
    assert verify_signature(SECRET, lowered, body, now=now) == now  # any header case
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature("another-secret", headers, body, now=now)
    with pytest.raises(SignatureError, match="replay window"):
        verify_signature(SECRET, headers, body, tolerance=300, now=now + 301)
    with pytest.raises(SignatureError, match="replay window"):
        verify_signature(SECRET, headers, body, tolerance=300, now=now - 301)  # from the future
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(SECRET, headers, body.replace(b"started", b"failed"), now=now)
    # a captured delivery replayed with a fresh timestamp: the signature covers the old one
    replayed = {**headers, TIMESTAMP_HEADER: str(now + 3600)}
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(SECRET, replayed, body, now=now + 3600)
    with pytest.raises(SignatureError, match="missing"):
        verify_signature(SECRET, {TIMESTAMP_HEADER: str(now)}, body, now=now)
    rotating = {**headers, SIGNATURE_HEADER: f"{sign('old', now, body)},{sign(SECRET, now, body)}"}
    assert verify_signature(SECRET, rotating, body, now=now) == now


def test_a_receiver_with_the_wrong_secret_never_acknowledges(tmp_path, secret_env):
    receiver = Receiver(secret="not-the-sender-secret")
    try:
        receiver.start("up")
        outbox = Outbox(tmp_path / "outbox.sqlite")
        endpoint = _endpoint(receiver.url, secret_env)
        JobEvents(outbox, [endpoint], Job("run-d", "export")).started()
        sender = Sender(outbox, [endpoint], **FAST)
        assert sender.drain(0.3) == 1  # the receiver's check raises: no 200, still queued
        sender.close()
        assert receiver.requests and not receiver.acked
    finally:
        receiver.close()


def test_no_secret_in_payloads_or_the_outbox(tmp_path, monkeypatch):
    monkeypatch.setenv("HS_TEST_WEBHOOK_SECRET", SECRET)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    endpoints = [
        _endpoint("http://127.0.0.1:9/hook", "HS_TEST_WEBHOOK_SECRET"),  # discard port
        Endpoint(name="unset", url="http://127.0.0.1:9/x", secret_env="HS_TEST_UNSET_VAR"),
    ]
    job = Job("run-e", "export", "vm", "s3://KEYID:S3CRET@bucket/p", "az://c/p?sig=SASVALUE")
    ev = JobEvents(outbox, endpoints, job)
    ev.started()
    ev.failed("PUT https://acct.blob.core.windows.net/c/x?sig=SASVALUE2 failed: 403")
    sender = Sender(outbox, endpoints, **FAST)
    assert sender.drain(0.2) == 4
    sender.close()
    rows = outbox.rows()
    assert any("HS_TEST_UNSET_VAR is not set" in r["last_error"] for r in rows)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in (SECRET, "KEYID", "S3CRET", "SASVALUE", "SASVALUE2"):
        assert secret.encode() not in raw
    with sqlite3.connect(outbox.path) as db:
        bodies = [json.loads(b) for (b,) in db.execute("SELECT body FROM deliveries")]
    assert bodies[0]["job"]["source"] == "s3://***@bucket/p"
    assert bodies[0]["job"]["target"] == "az://c/p?sig=***"


def test_progress_is_throttled_by_time_and_by_band():
    t = [0.0]
    throttle = ProgressThrottle(interval=30.0, step=10.0, clock=lambda: t[0])
    sent = []
    for second in range(1, 301):  # 300 s, 1/3 % a second
        t[0] = float(second)
        if throttle.due(second / 3):
            sent.append((second, int(second / 3)))
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:], strict=False)]
    assert sent and all(g >= 30 for g in gaps)  # at most one per 30 s
    bands = [p // 10 for _, p in sent]
    assert bands == sorted(set(bands)) and all(p < 100 for _, p in sent)  # one per 10% band
    fast = ProgressThrottle(interval=30.0, step=10.0, clock=lambda: 1.0)
    assert not any(fast.due(p) for p in range(0, 101))  # a job done within 30 s: none


def test_endpoints_come_from_a_file_without_secrets(tmp_path, monkeypatch):
    good = tmp_path / "webhooks.toml"
    good.write_text(
        '[[endpoint]]\nname = "ops"\nurl = "https://hooks.example.com/h"\n'
        'secret_env = "OPS_SECRET"\nevents = ["job.failed"]\n'
        '[[endpoint]]\nname = "chat"\nurl = "https://chat.example.com/h"\n'
        'secret_block = "chat-webhook"\n'
    )
    monkeypatch.setenv("HYPERSDK_WEBHOOKS", str(good))
    ops, chat = load_endpoints()
    assert ops.wants("job.failed") and not ops.wants("job.started")
    assert chat.secret_block == "chat-webhook" and chat.wants("job.progress")
    monkeypatch.setenv("HYPERSDK_HOME", str(tmp_path / "none"))
    monkeypatch.delenv("HYPERSDK_WEBHOOKS")
    assert load_endpoints() == []  # no file: webhooks off
    bad = tmp_path / "bad.toml"
    for text, problem in (
        ('name = "x"\nurl = "https://h/p"\nsecret = "abc"', "holds a secret"),
        ('name = "x"\nurl = "https://h/p?token=abc"\nsecret_env = "E"', "secret option"),
        ('name = "x"\nurl = "https://u:pw@h/p"\nsecret_env = "E"', "password"),
        ('name = "x"\nurl = "https://h/p"', "exactly one of"),
        ('name = "x"\nurl = "ftp://h/p"\nsecret_env = "E"', "http"),
    ):
        bad.write_text("[[endpoint]]\n" + text + "\n")
        with pytest.raises(InvalidParameterError, match=problem) as info:
            load_endpoints(bad)
        assert "abc" not in str(info.value) and "pw" not in str(info.value)


def test_cli_deliver_and_list(tmp_path, receiver, secret_env, monkeypatch, capsys):
    from hypersdk.cli.main import main

    config = tmp_path / "webhooks.toml"
    config.write_text(
        f'[[endpoint]]\nname = "ops"\nurl = "{receiver.url}"\nsecret_env = "{secret_env}"\n'
    )
    monkeypatch.setenv("HYPERSDK_WEBHOOKS", str(config))
    monkeypatch.setenv("HYPERSDK_WEBHOOK_OUTBOX", str(tmp_path / "outbox.sqlite"))
    endpoints = load_endpoints()
    ev = JobEvents(Outbox(), endpoints, Job("run-f", "backup", "vm"))
    ids = [ev.started(), ev.completed(7)]
    assert main(["webhooks", "list"]) == 0
    assert "2 pending" in capsys.readouterr().out
    receiver.start("up")
    started = time.monotonic()
    assert main(["webhooks", "deliver", "--timeout", "10"]) == 0
    assert time.monotonic() - started < 10
    assert "2 delivered, 0 pending" in capsys.readouterr().out
    assert [p["id"] for p in receiver.acked] == ids
