"""Read a finished flow run back through the Prefect REST API and check that it tells the
story a user looks for in the UI: a task per stage, engine log lines with bytes and
throughput, progress artifacts that reached 100%."""

from __future__ import annotations

import re
import time

from tests.fixtures.prefect_server import api_post as _post

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
STAGES = ("download", "convert", "upload")


def flow_run_id(text: str) -> str:
    """The flow run id a CLI or `prefect deployment run` printed."""
    found = UUID.findall(text)
    assert found, f"no flow run id in: {text[-2000:]}"
    return found[-1]


def latest_flow_run(api: str, flow_name: str) -> str:
    """The id of the newest run of ``flow_name`` (for runs started elsewhere, e.g. a worker)."""
    runs = _post(
        api,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1},
    )
    assert runs, f"no run of {flow_name}"
    return runs[0]["id"]


def read_story(api: str, run_id: str) -> dict:
    by_run = {"flow_runs": {"id": {"any_": [run_id]}}}
    tasks = _post(api, "/task_runs/filter", by_run)
    logs = _post(
        api,
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"},
    )
    artifacts = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {"tasks": tasks, "logs": logs, "artifacts": artifacts}


def assert_tells_the_story(api: str, run_id: str, disks: tuple[str, ...] = ("disk0",)) -> dict:
    """Assertions on a completed export run; returns what was read (for more checks)."""
    # logs arrive in batches and task runs from events the server records as they come: give
    # the last of them a moment after the process that made the run has exited
    deadline = time.monotonic() + 30
    while True:
        story = read_story(api, run_id)
        text = "\n".join(entry["message"] for entry in story["logs"])
        done = {t["name"] for t in story["tasks"] if t["state_type"] == "COMPLETED"}
        expected = {"remove-snapshot", "publish-manifest", "verify-export"} | {
            f"{stage}-{disk}" for disk in disks for stage in ("cbt-diff", *STAGES)
        }
        if ("verified" in text and expected <= done) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = {t["name"] for t in story["tasks"]}
    states = {t["name"]: t["state_type"] for t in story["tasks"]}
    for fixed in ("preflight", "snapshot", "remove-snapshot", "publish-manifest", "verify-export"):
        assert any(n.startswith(fixed) for n in names), (fixed, sorted(names))
    for disk in disks:
        for stage in ("cbt-diff", *STAGES):
            name = f"{stage}-{disk}"
            assert name in names, (name, sorted(names))
            assert states[name] == "COMPLETED", (name, states[name])
        # each stage says what it moved and how fast, from the engine's own figures
        for stage in STAGES:
            assert re.search(
                rf"{stage} of {disk}: [\d.,]+ \w*B in [\d.]+ s \([\d.]+ s busy", text
            ), (
                stage,
                text,
            )
        assert re.search(rf"{disk}: .*extents, [\d.,]+ \w*B to read of", text), text
    assert re.search(r"snapshot \S+ of .*: (clone|stopped)", text), text
    assert "manifest published" in text and "removed" in text, text
    assert re.search(r"verified: \d+ chunk hashes", text), text
    progress = [a for a in story["artifacts"] if a["type"] == "progress"]
    assert len(progress) >= 2 * len(disks), story["artifacts"]  # change scan + export, per disk
    for a in progress:
        assert float(a["data"]) == 100.0, a
    assert any(a["type"] == "markdown" for a in story["artifacts"]), story["artifacts"]
    return story
