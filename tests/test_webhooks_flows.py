"""The flows' audit lines and webhooks on a real Prefect API (flows/ops_hooks.py): a migrate run
appends one audit line (who, with its flow run id; what; where; ok) and sends started, progress
and completed, in order, signed; a restore that fails in its run is audited as failed and sends
job.failed; a forget (dry run) is audited with its policy. The chain verifies after all."""

from __future__ import annotations

import json

import pytest

from hypersdk.audit import AuditLog
from hypersdk.imagegen import write_realistic_disk
from hypersdk.webhooks import verify_signature
from providers.sources.local import create_vm
from tests.test_webhooks import SECRET, Receiver

MiB = 1024 * 1024


@pytest.fixture
def ops_env(tmp_path, monkeypatch):
    receiver = Receiver()
    receiver.start("up")
    config = tmp_path / "webhooks.toml"
    config.write_text(
        f'[[endpoint]]\nname = "ops"\nurl = "{receiver.url}"\nsecret_env = "HS_FLOW_WH_SECRET"\n'
    )
    monkeypatch.setenv("HS_FLOW_WH_SECRET", SECRET)
    monkeypatch.setenv("HYPERSDK_WEBHOOKS", str(config))
    monkeypatch.setenv("HYPERSDK_WEBHOOK_OUTBOX", str(tmp_path / "outbox.sqlite"))
    monkeypatch.setenv("HYPERSDK_AUDIT_LOG", str(tmp_path / "audit" / "audit.log"))
    monkeypatch.setenv("HYPERSDK_WEBHOOK_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("HYPERSDK_WEBHOOK_PROGRESS_PERCENT", "10")
    yield receiver
    receiver.close()


def _audit(tmp_path) -> list[dict]:
    path = tmp_path / "audit" / "audit.log"
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_runs_are_audited_and_send_their_events(prefect_api, ops_env, tmp_path):
    from flows.forget import forget_backups
    from flows.migrate import migrate_vm
    from flows.restore import restore_vm

    receiver = ops_env
    root = tmp_path / "vms"
    d = create_vm(root, "web01", {"disk0": 12 * MiB})
    write_realistic_disk(d / "disk0.img", 12 * MiB, seed=3)
    target = f"file://{tmp_path / 'repo'}"
    state = migrate_vm(
        vm="web01", source=f"local://{root}", target=target, format="raw", return_state=True
    )
    assert state.is_completed()
    run_id = str(state.state_details.flow_run_id)
    result = state.result()

    events = [p for p in receiver.acked if p["job"]["run_id"] == run_id]
    types = [p["type"] for p in events]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert "job.progress" in types  # the run's own stage progress, through the throttle
    assert [p["sequence"] for p in events] == list(range(len(events)))
    done = events[-1]["data"]
    assert done["bytes"] == sum(disk.object_size for disk in result.disks) > 0
    assert events[-1]["job"]["vm"] == "web01" and events[-1]["job"]["target"] == target
    for r in receiver.requests:
        verify_signature(SECRET, r["headers"], r["body"], tolerance=60)

    restore = restore_vm(
        vm="web01", out=str(tmp_path), target=target, at="no-such-point", return_state=True
    )
    assert restore.is_failed()
    restore_id = str(restore.state_details.flow_run_id)
    failed = [p for p in receiver.acked if p["job"]["run_id"] == restore_id]
    assert [p["type"] for p in failed] == ["job.started", "job.failed"]
    assert "no-such-point" in failed[-1]["data"]["error"]

    forget_backups(vm="web01", target=target, keep_last=1, dry_run=True)

    lines = _audit(tmp_path)
    assert [(r["action"], r["result"]) for r in lines] == [
        ("export", "ok"),
        ("restore", "failed"),
        ("forget", "ok"),
    ]
    export, failed_restore, forget = lines
    assert export["who"]["flow_run_id"] == run_id and export["who"]["user"]
    assert export["what"]["export_id"] == result.export_id and export["what"]["vm"] == "web01"
    assert export["where"] == {"source": f"local://{root}", "target": target}
    assert failed_restore["who"]["flow_run_id"] == restore_id
    assert "no-such-point" in failed_restore["error"]
    assert forget["what"]["dry_run"] is True and forget["what"]["forgotten"] == []
    assert AuditLog(tmp_path / "audit" / "audit.log").verify().count == 3
