"""Audit log and webhooks for a flow, as Prefect state hooks: ``attach_ops_hooks(flow, kind)``
adds them to a flow in place (one line per flow module, whatever Flow subclass it is).

- on_running: ``job.started`` queued, progress (the progress bus, this run's stages only)
  queued through the throttle, a sender thread started so events arrive while the run works.
- on_completion / on_failure / on_crashed / on_cancellation: ``job.completed`` or
  ``job.failed`` queued, one audit line (who, what, where, result), then the outbox drained for
  at most $HYPERSDK_WEBHOOK_DRAIN_SECONDS (10 s), not at all for a cancelled or crashed run
  (it must stop at once); what is left goes with ``hyperctl webhooks deliver``.

Neither may change a run's outcome: Prefect logs a hook's exception and moves on, and the hooks
catch their own errors to say which part failed. A SIGKILLed run runs no hook: its audit line
and final event are missing (the Prefect-native automation in docs/audit-webhooks.md covers
crashed runs server-side).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from hypersdk import config
from hypersdk.audit import AuditLog, scrub

log = logging.getLogger("hypersdk.ops")
DRAIN_ENV = "HYPERSDK_WEBHOOK_DRAIN_SECONDS"
# progress events: at most one per this many seconds, and per this many percent
PROGRESS_SECONDS_ENV = "HYPERSDK_WEBHOOK_PROGRESS_SECONDS"
PROGRESS_STEP_ENV = "HYPERSDK_WEBHOOK_PROGRESS_PERCENT"
PROGRESS_STAGES = frozenset({"export", "restore"})
# audit action and job kind by flow name (forget: a retention policy applied, points deleted)
KINDS = {
    "migrate-vm": "export",
    "backup-vm": "backup",
    "restore-vm": "restore",
    "forget-backups": "forget",
}


@dataclass
class _RunOps:
    events: Any  # JobEvents | None
    sender: Any  # Sender | None
    unsubscribe: Any  # Callable[[], None] | None


_runs: dict[str, _RunOps] = {}
_lock = threading.Lock()


def _where(kind: str, params: dict[str, Any]) -> tuple[str | None, str | None]:
    exporting = kind in ("export", "backup")
    source = params.get("source") or (config.default_source_url() if exporting else None)
    target = params.get("target") or config.default_target_url()
    return source, target


def _progress_listener(run_id: str, events: Any):
    """A progress-bus listener counting only this run's stages. The bus is per process: the
    run is told by the Prefect context of the reporting thread, or, for the pipeline's own
    threads that carry none, by being the only run of the process (the usual case: a worker
    runs one flow run per process). Several runs in one process get no progress from such
    threads rather than each other's."""
    from prefect.context import FlowRunContext

    totals = {"done": 0, "total": 0}
    lock = threading.Lock()

    def listener(event: str, stage: str, n: int, total: int | None) -> None:
        if stage not in PROGRESS_STAGES:
            return
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            if str(ctx.flow_run.id) != run_id:
                return
        elif list(_runs) != [run_id]:
            # reported from a thread without the run's context (the pipeline's own workers):
            # ours only if this is the one run of the process with webhooks on
            return
        with lock:
            if event == "start" and total:
                totals["total"] += total
            elif event == "advance":
                totals["done"] += n
            else:
                return
            done, whole = totals["done"], totals["total"]
        try:
            events.progress(done, whole)
        except Exception:  # noqa: BLE001 - progress must never fail the run
            log.warning("webhook progress event not queued", exc_info=True)

    return listener


def _start(kind: str):
    def on_running(flow, flow_run, state) -> None:
        run_id = str(flow_run.id)
        with _lock:
            if run_id in _runs:  # a retry of the run: its job goes on
                return
        from flows.window import will_defer

        if will_defer((flow_run.parameters or {}).get("window"), flow_run):
            return  # outside its window: back to Scheduled, it starts (and says so) later
        try:
            from hypersdk.progress import subscribe
            from hypersdk.webhooks import (
                Job,
                JobEvents,
                Outbox,
                ProgressThrottle,
                Sender,
                load_endpoints,
            )

            endpoints = load_endpoints()
            if not endpoints:
                return
            source, target = _where(kind, dict(flow_run.parameters or {}))
            job = Job(run_id, kind, flow_run.parameters.get("vm"), source, target)
            throttle = ProgressThrottle(
                interval=float(os.environ.get(PROGRESS_SECONDS_ENV, "30")),
                step=float(os.environ.get(PROGRESS_STEP_ENV, "10")),
            )
            events = JobEvents(Outbox(), endpoints, job, throttle)
            events.started()
            sender = Sender(events.outbox, endpoints)
            sender.start()
            unsubscribe = subscribe(_progress_listener(run_id, events))
            with _lock:
                _runs[run_id] = _RunOps(events, sender, unsubscribe)
        except Exception as exc:  # noqa: BLE001 - webhooks never fail a run
            log.warning("webhooks for run %s not started: %s", run_id, scrub(str(exc), 300))

    on_running.__name__ = f"ops-started-{kind}"
    return on_running


def _summary(kind: str, state) -> tuple[dict[str, Any], int | None]:
    """What the run did (for the audit line) and the bytes it moved, from its result."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a result that cannot be read: say less
        return {}, None
    if isinstance(result, BaseException) or result is None:
        return {}, None
    what: dict[str, Any] = {}
    moved: int | None = None
    if kind in ("export", "backup") and hasattr(result, "disks"):
        moved = sum(getattr(d, "object_size", 0) for d in result.disks)
        what = {
            "export_id": result.export_id,
            "kind": result.kind,
            "disks": [d.name for d in result.disks],
            "bytes": moved,
            "manifest": result.manifest,
        }
    elif kind == "restore" and hasattr(result, "disks"):
        moved = sum(getattr(d, "file_size", 0) for d in result.disks)
        what = {"export_id": result.export_id, "out": result.out, "bytes": moved}
    elif kind == "forget" and hasattr(result, "forgotten"):
        what = {
            "policy": result.policy,
            "dry_run": result.dry_run,
            "forgotten": result.forgotten,
            "kept": len(result.kept),
            "rebased": result.rebased,
        }
    return what, moved


def _settings(params: dict[str, Any]) -> dict[str, Any]:
    """The run's plain parameters (format, at, keep_*, dry_run...) for the audit line: URLs
    go under "where", the key reference is left out."""
    skip = {"vm", "source", "target", "encryption"}
    return {
        k: v
        for k, v in params.items()
        if k not in skip and v is not None and isinstance(v, str | int | float | bool)
    }


def _finish(kind: str, outcome: str):
    def on_end(flow, flow_run, state) -> None:
        run_id = str(flow_run.id)
        params = dict(flow_run.parameters or {})
        what, moved = _summary(kind, state) if outcome == "ok" else ({}, None)
        error = None if outcome == "ok" else (state.message or state.name or outcome)
        with _lock:
            ops = _runs.pop(run_id, None)
        try:
            source, target = _where(kind, params)
            AuditLog().append(
                kind,
                what={"vm": params.get("vm"), "flow": flow.name, **_settings(params), **what},
                source=source,
                target=target,
                result=outcome,
                error=error,
                flow_run_id=run_id,
            )
        except Exception as exc:  # noqa: BLE001 - said loudly, the run's outcome stands
            log.error("audit log not written for run %s: %s", run_id, scrub(str(exc), 300))
        if ops is None:
            return
        try:
            ops.unsubscribe()
            if outcome == "ok":
                ops.events.completed(moved if moved is not None else None)
            else:
                ops.events.failed(error or outcome, state=outcome)
            stopping = outcome not in ("ok", "failed")
            ops.sender.stop(wait=not stopping)
            # a cancelled or crashed run is being stopped (SIGTERM, a grace period, SIGKILL):
            # it must end at once, its events wait in the outbox for `webhooks deliver`
            wait = 0.0 if stopping else float(os.environ.get(DRAIN_ENV, "10"))
            left = ops.sender.drain(wait) if wait > 0 else ops.sender.outbox.pending()
            if left:
                log.warning(
                    "%d webhook delivery(ies) still pending: 'hyperctl webhooks deliver' sends "
                    "them",
                    left,
                )
        except Exception as exc:  # noqa: BLE001
            log.warning("webhooks for run %s: %s", run_id, scrub(str(exc), 300))
        finally:
            ops.sender.close(wait=outcome in ("ok", "failed"))

    on_end.__name__ = f"ops-{outcome}-{kind}"
    return on_end


def attach_ops_hooks(flow, kind: str | None = None):
    """Add the audit and webhook hooks to ``flow`` (in place; returns it). ``kind`` (the audit
    action, the webhook job kind) defaults by flow name: migrate-vm is an export."""
    kind = kind or KINDS.get(flow.name, flow.name)
    flow.on_running_hooks.append(_start(kind))
    flow.on_completion_hooks.append(_finish(kind, "ok"))
    flow.on_failure_hooks.append(_finish(kind, "failed"))
    flow.on_crashed_hooks.append(_finish(kind, "crashed"))
    flow.on_cancellation_hooks.append(_finish(kind, "cancelled"))
    return flow
