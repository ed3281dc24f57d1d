"""Per-endpoint global concurrency limits on a real Prefect server: the deploy step creates
them (and the crashed-runs automation), exports inside a flow run never hold more slots of a
source than its limit, and a worker that requires limits refuses to run without one."""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prefect import flow

from deployments.limits import ZOMBIE_AUTOMATION, setup
from flows.endpoint_slots import endpoint_slots
from hypersdk.errors import InvalidParameterError
from hypersdk.fleet.limits import source_limit_name, target_limit_name


@contextlib.contextmanager
def _on(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@flow(name="slot-holders")
def _hold_slots(source: str, target: str, holders: int, seconds: float) -> int:
    """``holders`` threads of one flow run each hold the endpoint slots for ``seconds``;
    the most that held them at once."""
    lock, now, most = threading.Lock(), [0], [0]

    def hold(i: int) -> None:
        with endpoint_slots(source, target, f"vm{i}"):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(seconds)
            with lock:
                now[0] -= 1

    with ThreadPoolExecutor(holders) as pool:
        for f in [pool.submit(contextvars.copy_context().run, hold, i) for i in range(holders)]:
            f.result()
    return most[0]


def test_deploy_step_creates_limits_and_the_crash_automation(prefect_server):
    api, _ = prefect_server
    src, dst = "local:///srv/fleet-a/vms", "file:///srv/fleet-a/backups"
    # a long silence: this server is shared with other tests, whose runs must not be crashed
    with _on(api) as client:
        lines = setup({src: 3}, {dst: 5}, zombie_after=3600)
        assert "created" in lines[0] and "created" in lines[1]
        lines = setup({src: 4}, {dst: 5}, zombie_after=3600)  # again: updated / unchanged
        assert "(updated)" in lines[0] and "(unchanged)" in lines[1]
        got = client.read_global_concurrency_limit_by_name(source_limit_name(src))
        assert (got.limit, got.active) == (4, True)
        assert client.read_global_concurrency_limit_by_name(target_limit_name(dst)).limit == 5
        [automation] = client.read_automations_by_name(ZOMBIE_AUTOMATION)  # replaced, not added
        client.delete_automation(automation.id)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 3600
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    [action] = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"


def test_exports_never_hold_more_source_slots_than_the_limit(prefect_server, tmp_path, monkeypatch):
    api, _ = prefect_server
    src, dst = f"local://{tmp_path}/vms", f"file://{tmp_path}/out"
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("HYPERSDK_SLOT_TRACE", str(trace))
    with _on(api):
        setup({src: 2}, {dst: 10}, zombie_after=0)
        most = _hold_slots(src, dst, holders=5, seconds=1.0)
    assert most == 2  # bounded, and the bound reached
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(events) == 10
    assert all(e["limits"] == [source_limit_name(src), target_limit_name(dst)] for e in events)


def test_a_worker_requiring_limits_refuses_a_source_without_one(
    prefect_server, tmp_path, monkeypatch
):
    api, _ = prefect_server
    src, dst = f"local://{tmp_path}/nolimit", f"file://{tmp_path}/out2"
    with _on(api):
        # without the requirement: unbounded (nothing to take), the run goes on
        assert _hold_slots(src, dst, holders=3, seconds=0.5) == 3
        monkeypatch.setenv("HYPERSDK_REQUIRE_LIMITS", "1")
        with pytest.raises(InvalidParameterError, match="do not exist"):
            _hold_slots(src, dst, holders=1, seconds=0)
