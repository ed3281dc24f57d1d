"""The audit log's hash chain: an edited, deleted (middle or last), inserted or reordered line is
each reported naming the first bad line, by the engine and by ``hyperctl audit verify``; a torn
last line is reported and never built upon until repaired; appenders in several processes keep
one valid chain; nothing secret reaches a line."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from hypersdk.audit import GENESIS, AuditError, AuditLog, line_hash, scrub
from hypersdk.cli.main import main


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "audit.log")
    for i in range(n):
        log.append(
            "export",
            what={"vm": f"vm{i}", "bytes": i * 100},
            source=f"vsphere://admin@vc{i}/dc",
            target="s3://bucket/prefix",
            flow_run_id=f"run-{i}",
        )
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _bad_line(log: AuditLog) -> tuple[int | None, str]:
    with pytest.raises(AuditError) as info:
        log.verify()
    return info.value.line, info.value.problem


def test_a_clean_log_verifies_and_each_line_says_who_what_where_when(tmp_path):
    log = _log(tmp_path)
    summary = log.verify()
    assert summary.count == 5 and summary.unanchored == 0
    records = [json.loads(x) for x in _lines(log)]
    assert records[0]["prev"] == GENESIS
    for i, r in enumerate(records):
        assert r["seq"] == i and r["hash"] == line_hash(r)
        assert r["action"] == "export" and r["result"] == "ok"
        assert r["who"]["user"] and r["who"]["host"] and r["who"]["flow_run_id"] == f"run-{i}"
        assert r["time"].endswith("Z")
        assert r["where"] == {"source": f"vsphere://admin@vc{i}/dc", "target": "s3://bucket/prefix"}
        if i:
            assert r["prev"] == records[i - 1]["hash"]
    assert summary.last_hash == records[-1]["hash"]


def test_an_edited_line_is_named(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"result":"ok"', b'"result":"failed"')
    _write(log, lines)
    line, problem = _bad_line(log)
    assert line == 3 and "edited" in problem


def test_an_edited_line_with_its_own_hash_recomputed_breaks_the_next_line(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    r = json.loads(lines[1])
    r["what"]["vm"] = "someone-else"
    r["hash"] = line_hash(r)
    lines[1] = json.dumps(r).encode() + b"\n"
    _write(log, lines)
    line, problem = _bad_line(log)
    assert line == 3 and "deleted, inserted or moved" in problem


def test_a_deleted_middle_line_is_named(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    del lines[2]
    _write(log, lines)
    line, problem = _bad_line(log)
    assert line == 3 and "deleted, inserted or moved" in problem


def test_a_deleted_last_line_is_caught_by_the_head(tmp_path):
    log = _log(tmp_path)
    _write(log, _lines(log)[:-1])  # the shorter chain is valid on its own
    line, problem = _bad_line(log)
    assert "head records 5" in problem and "last 1 line(s) were deleted" in problem
    with pytest.raises(AuditError, match="head records 5"):  # never built upon either
        log.append("restore")


def test_an_inserted_line_is_named(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    forged = json.loads(lines[1])
    forged["what"]["vm"] = "forged"
    forged["hash"] = line_hash(forged)  # self-consistent, even chained onto line 1
    lines.insert(2, json.dumps(forged).encode() + b"\n")
    _write(log, lines)
    line, problem = _bad_line(log)
    assert line == 3 and "deleted, inserted or moved" in problem


def test_reordered_lines_are_named(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    line, problem = _bad_line(log)
    assert line == 2 and "deleted, inserted or moved" in problem


def test_a_deleted_head_is_reported(tmp_path):
    log = _log(tmp_path)
    log.head.unlink()
    _, problem = _bad_line(log)
    assert "head file" in problem and "missing" in problem
    with pytest.raises(AuditError, match="missing"):
        log.append("export")


def test_a_torn_last_line_is_reported_refused_then_repaired(tmp_path):
    log = _log(tmp_path, 3)
    good = log.path.read_bytes()
    torn = b'{"action":"export","hash":"ab'
    log.path.write_bytes(good + torn)  # a crash in the middle of an append
    line, problem = _bad_line(log)
    assert line == 4 and "torn" in problem
    with pytest.raises(AuditError, match="torn"):
        log.append("export")
    assert log.path.read_bytes() == good + torn  # nothing built on it
    done = log.repair()
    assert done is not None and done["action"] == "repair"
    assert done["what"]["torn_bytes"] == len(torn)
    assert (tmp_path / done["what"]["saved_to"]).read_bytes() == torn
    assert log.verify().count == 4  # 3 + the repair's own line
    assert log.repair() is None  # nothing torn now


def test_a_crash_between_the_line_and_the_head_is_one_unanchored_line(tmp_path):
    log = _log(tmp_path, 3)
    head = log.head.read_bytes()
    log.append("restore")
    log.head.write_bytes(head)  # as if the process died before moving the head
    summary = log.verify()
    assert summary.count == 4 and summary.unanchored == 1
    log.append("forget")  # the next append moves the head on
    assert log.verify().count == 5 and log.verify().unanchored == 0


def test_secrets_never_reach_a_line(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.append(
        "export",
        source="s3://AKIAKEY:SECRETVALUE@bucket/x",
        target="az://c/p?sig=SASSIG&sv=2020",
        result="failed",
        error="upload to https://acct.blob.core.windows.net/c?sig=SASSIG2 failed",
    )
    text = log.path.read_text()
    for secret in ("AKIAKEY", "SECRETVALUE", "SASSIG", "SASSIG2"):
        assert secret not in text
    assert "sig=***" in text
    assert scrub("see https://h/p?token=abc now") == "see https://h/p?token=*** now"


def _appender(path: str, worker: int, count: int) -> None:
    log = AuditLog(path)
    for i in range(count):
        log.append("backup", what={"worker": worker, "i": i})


def test_appenders_in_several_processes_keep_one_valid_chain(tmp_path):
    path = str(tmp_path / "shared" / "audit.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    summary = AuditLog(path).verify()
    assert summary.count == 160 and summary.unanchored == 0
    records = [json.loads(x) for x in Path(path).read_bytes().splitlines()]
    seen = {(r["what"]["worker"], r["what"]["i"]) for r in records}
    assert len(seen) == 160


def test_cli_verify_exit_codes(tmp_path, capsys):
    log = _log(tmp_path, 4)
    assert main(["audit", "verify", str(log.path)]) == 0
    out = capsys.readouterr().out
    assert "ok: 4 line(s)" in out
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    code = main(["audit", "verify", str(log.path)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "line 2" in err and "deleted, inserted or moved" in err


def test_cli_uses_the_configured_path(tmp_path, monkeypatch, capsys):
    path = tmp_path / "elsewhere" / "a.log"
    monkeypatch.setenv("HYPERSDK_AUDIT_LOG", str(path))
    from hypersdk.audit import record

    record("forget", what={"vm": "db01"}, target="file:///repo")
    assert main(["audit", "verify"]) == 0
    assert str(path) in capsys.readouterr().out


def test_audited_records_success_and_failure(tmp_path):
    from hypersdk.audit import audited
    from hypersdk.errors import ObjectNotFoundError

    path = tmp_path / "audit.log"
    with audited("restore", path, target="file:///repo", what={"vm": "db01"}) as what:
        what["export_id"] = "p1"
    with (
        pytest.raises(ObjectNotFoundError),
        audited("forget", path, target="s3://b/p?token=T0KEN"),
    ):
        raise ObjectNotFoundError("point gone at s3://b/p?token=T0KEN")
    ok, failed = (json.loads(x) for x in path.read_bytes().splitlines())
    assert ok["result"] == "ok" and ok["what"] == {"vm": "db01", "export_id": "p1"}
    assert failed["result"] == "failed" and "point gone" in failed["error"]
    assert b"T0KEN" not in path.read_bytes()
    assert AuditLog(path).verify().count == 2


def test_hostile_files_are_one_error_each(tmp_path):
    import os

    huge = AuditLog(tmp_path / "huge.log")
    huge.path.write_bytes(b"x" * (3 * 1024 * 1024))  # one line, no newline, 3 MiB
    line, problem = _bad_line(huge)
    assert line == 1 and "longer than" in problem
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(AuditError, match="not a regular file"):
        AuditLog(fifo).verify()  # never opened: a FIFO would block
    missing = tmp_path / "no" / "such.log"
    with pytest.raises(AuditError, match="no such audit log"):
        AuditLog(missing).verify()
    assert not missing.parent.exists()  # a mistyped path creates nothing
