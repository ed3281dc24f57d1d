"""backup_fleet / migrate_fleet: many VMs, each its own flow run of a deployment, spread over
the work pool's workers (docs/fleet.md argues the choice of ``run_deployment`` over subflows).

A fleet run picks its VMs (a list, or a selector over the source's inventory), splits them into
ordered groups (a group starts when the previous one has finished), and keeps at most
``max_parallel`` child runs in flight. Each child is a run of the per-VM deployment (backup-vm
or migrate-vm) linked to the fleet run as a subflow and tagged ``fleet:<fleet run id>``. The
per-source and per-target global concurrency limits (flows/endpoint_slots.py) bound the source
reads whatever else runs; ``max_parallel`` only bounds this fleet's queue.

A failing VM does not stop the others. A child that ends Crashed (its worker died: the
``hypersdk-crashed-runs`` automation marks runs whose heartbeats stopped, deployments/limits.py)
is run again, up to ``crash_attempts`` runs per VM: exports are idempotent per (VM, snapshot,
disk) and the next run cleans what the dead one left (repository lock takeover, abandoned
objects). A child that ends Failed is not re-run here: its tasks already retried what a retry
can heal. ``redo_failed_of=<fleet run id>`` re-runs an earlier fleet run with its parameters,
skipping every VM whose export completed in it (or in the fleet runs it re-did).

Each child goes to the work queue its ``priority`` names (urgent, default, bulk: the queues
of the ``hypersdk-local`` pool, created by the deploy step) and gets the fleet's ``window``.

Cancelling the fleet run cancels its children: Prefect 3.9 moves a deployment child to
Cancelling only once its parent is Cancelled, and a fleet run started outside a worker is never
taken from Cancelling to Cancelled by anyone. So the fleet watches its own state: at
Cancelling it starts no further child and cancels each one not final (Scheduled: Cancelled at
once; Pending or Running: Cancelling, which its worker acts on), waits for them, and ends
Cancelled. The ``on_cancellation`` hook does the same when a worker kills the fleet's process.

The fleet ends with one table artifact (VM, kind, bytes, duration, state, attempts, run), and in
Failed when any VM did not complete (Cancelled when the fleet run was cancelled).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_table_artifact
from prefect.states import Cancelled, Cancelling, Completed, Failed
from pydantic import Field

from flows.params import (
    EncryptionRef,
    FormatName,
    FormatOptions,
    FullEvery,
    Priority,
    SourceUrl,
    TargetUrl,
    TimeWindow,
)
from hypersdk.errors import InvalidParameterError
from hypersdk.fleet import Selector, plan_groups, select_vms
from hypersdk.units import human

POLL_SECONDS = 2.0  # how often a waiting slot reads its child run's state
PAGE = 200  # the API's largest page of flow runs
READ_ERRORS = 30  # failed state reads in a row before a VM's wait gives up
MAX_REDO_DEPTH = 20  # redo_failed_of chains followed at most this deep
VmList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=255)]], Field(max_length=10_000)
]
Groups = list[list[str]]
MaxParallel = Annotated[int, Field(ge=1, le=500)]
Attempts = Annotated[int, Field(ge=1, le=10)]
PendingTimeout = Annotated[int, Field(ge=10, le=86400)]
CANCEL_WAIT = 300.0  # seconds a cancelled fleet waits for its children to be final
CANCELLED_BY_FLEET = "The fleet run was cancelled."

FLEET_DOCS = """
        vms: The VMs, by name (or give ``select``).
        select: A selector over the source's inventory: {"names": ["db*"], "exclude": [],
            "tags": ["env=prod"], "folder": "/DC/vm/prod"}.
        groups: Ordered groups of name patterns, e.g. [["db*"], ["app*"]]: a group starts when
            the previous one has finished; VMs no pattern matches run last.
        max_parallel: Child runs of this fleet in flight at once (the per-source concurrency
            limit bounds source reads across every fleet and deployment).
        deployment: The per-VM deployment each child runs ("flow/deployment").
        crash_attempts: Runs per VM when runs end Crashed (a worker died): re-run until then.
        pending_timeout: Seconds a child may stay Pending (claimed by a worker, not started)
            before it counts as crashed (its worker died at that moment).
        redo_failed_of: The id of an earlier fleet run: run it again with its own parameters,
            skipping the VMs that completed.
        priority: The work queue each child runs on: "urgent" (taken first), "default" or
            "bulk" (taken last).
        window: The time window each child may run in (passed to each VM's run; see
            docs/scheduling.md). Empty: none.
        source: Source URL (see backup-vm). target: Target URL. format, encryption, verify:
            passed to each VM's run.
"""


def _children(client, fleet_run_id: str) -> list:
    """Every child run of a fleet run (by its tag), read a page of PAGE at a time."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    tagged = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"fleet:{fleet_run_id}"]))
    runs: list = []
    while True:
        page = client.read_flow_runs(
            flow_run_filter=tagged, sort=FlowRunSort.ID_DESC, limit=PAGE, offset=len(runs)
        )
        runs += page
        if len(page) < PAGE:
            return runs


def cancel_child(client, run, message: str = CANCELLED_BY_FLEET) -> bool:
    """Cancel one child run not final: Cancelled when no worker has it yet (Scheduled),
    Cancelling otherwise (its worker stops the process, then marks it Cancelled). True if a
    state was set."""
    state = run.state
    if state is None or state.is_final() or state.is_cancelling():
        return False
    new = Cancelled(message=message) if state.is_scheduled() else Cancelling(message=message)
    client.set_flow_run_state(run.id, new, force=True)
    return True


def cancel_children(client, fleet_run_id: str) -> int:
    """Cancel every child of a fleet run that is not final; how many were."""
    return sum(cancel_child(client, c) for c in _children(client, fleet_run_id))


def _on_cancellation(flow, flow_run, state) -> None:
    """on_cancellation hook: a worker is stopping the fleet's process; its children (other
    processes, maybe other machines) would run on without this."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        n = cancel_children(client, str(flow_run.id))
    get_run_logger().info("fleet run cancelled: %d child run(s) cancelled", n)


def completed_vms(client, fleet_run_id: str) -> tuple[dict[str, Any], set[str]]:
    """The parameters of fleet run ``fleet_run_id`` and the VMs whose export completed in it or
    in the fleet runs it re-did (followed back at most MAX_REDO_DEPTH runs)."""
    done: set[str] = set()
    params: dict[str, Any] | None = None
    run_id: str | None = fleet_run_id
    for _ in range(MAX_REDO_DEPTH):
        if not run_id:
            break
        try:
            run = client.read_flow_run(uuid.UUID(str(run_id)))
        except ValueError:
            raise InvalidParameterError(f"redo_failed_of: not a flow run id: {run_id!r}") from None
        if params is None:
            params = dict(run.parameters)
        done |= {
            c.parameters.get("vm")
            for c in _children(client, str(run.id))
            if c.state is not None and c.state.is_completed()
        }
        run_id = run.parameters.get("redo_failed_of")
    return params or {}, {v for v in done if v}


class _Fleet:
    """One fleet run's bookkeeping: children started, their final rows."""

    def __init__(
        self,
        kind: str,
        deployment: str,
        base: dict,
        attempts: int,
        target: str | None,
        pending_timeout: float,
        priority: str = "default",
    ):
        self.kind, self.deployment, self.base = kind, deployment, base
        self.pending_timeout, self.priority = pending_timeout, priority
        self.cancelled = threading.Event()  # the fleet run was cancelled
        self.done = threading.Event()  # the fleet has ended: stop watching
        self.attempts, self.target = attempts, target
        self.fleet_id = str(runtime.flow_run.id or uuid.uuid4())
        self.logger = get_run_logger()
        self.rows: list[dict] = []
        self._lock = threading.Lock()

    def run_vm(self, vm: str) -> dict:
        """Run ``vm``'s child until it ends other than Crashed, or attempts run out; its
        summary row. Never raises: a VM whose run cannot even be created is a Failed row."""
        try:
            run, attempt = self._attempts(vm)
            row = self._row(vm, run, attempt) if run is not None else not_started(vm)
        except Exception as exc:  # noqa: BLE001 - one VM must not stop the others
            row = {
                "vm": vm,
                "kind": "",
                "bytes": None,
                "stored": "",
                "duration_s": 0,
                "state": "Failed",
                "attempts": 0,
                "flow_run": "",
                "message": f"{type(exc).__name__}: {exc}"[:300],
            }
        with self._lock:
            self.rows.append(row)
        log = self.logger.info if row["state"] == "Completed" else self.logger.error
        log("%s: %s after %d run(s) %s", vm, row["state"], row["attempts"], row["message"])
        return row

    def _attempts(self, vm: str):
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        attempt, run = 0, None
        with get_client(sync_client=True) as client:
            while attempt < self.attempts and not self.cancelled.is_set():
                attempt += 1
                run = run_deployment(
                    self.deployment,
                    parameters={**self.base, "vm": vm},
                    timeout=0,
                    as_subflow=True,
                    work_queue_name=self.priority,
                    tags=[f"fleet:{self.fleet_id}"],
                    flow_run_name=vm if attempt == 1 else f"{vm} (attempt {attempt})",
                    idempotency_key=f"fleet:{self.fleet_id}:{vm}:{attempt}",
                )
                self.logger.info("%s: flow run %s (%s)", vm, run.name, run.id)
                run = self._wait(client, run)
                if not run.state.is_crashed() or self.cancelled.is_set():
                    break
                self.logger.warning(
                    "%s: run %s crashed (%s)%s",
                    vm,
                    run.name,
                    run.state.message or "no message",
                    ": running it again" if attempt < self.attempts else ": no attempts left",
                )
        return run, attempt

    def _wait(self, client, run):
        """Poll until the run is final; an API hiccup is waited out (READ_ERRORS in a row).
        Once the fleet is cancelled: cancel the run, then wait at most CANCEL_WAIT for it."""
        errors, cancel_deadline = 0, None
        while run.state is None or not run.state.is_final():
            if cancel_deadline is None:
                self.cancelled.wait(POLL_SECONDS)  # a cancel is acted on at once
            else:
                time.sleep(POLL_SECONDS)
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                self.logger.warning("run %s: not final %.0f s after cancel", run.id, CANCEL_WAIT)
                break
            try:
                run = client.read_flow_run(run.id)
                if self.cancelled.is_set():
                    if cancel_deadline is None:
                        cancel_child(client, run)
                        cancel_deadline = time.monotonic() + CANCEL_WAIT
                else:
                    self._crash_if_stuck(client, run)
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the server may be restarting
                errors += 1
                if errors >= READ_ERRORS:
                    raise
                self.logger.warning("cannot read flow run %s (%s): retrying", run.id, exc)
                if self.cancelled.is_set():
                    time.sleep(POLL_SECONDS)  # the wait above no longer waits
        return run

    def _crash_if_stuck(self, client, run) -> None:
        """A run Pending for pending_timeout seconds was claimed by a worker that died before
        starting it (no process, so no heartbeat will ever mark it): mark it Crashed."""
        from prefect.states import Crashed

        state = run.state
        if state is None or not state.is_pending() or state.timestamp is None:
            return
        age = time.time() - state.timestamp.timestamp()
        if age < self.pending_timeout:
            return
        client.set_flow_run_state(
            run.id,
            Crashed(message=f"Pending for {age:.0f} s: its worker never started it"),
            force=True,
        )

    def watch(self, client) -> None:
        """Set ``cancelled`` once the fleet run is Cancelling or Cancelled (from the UI or
        the API); until the fleet ends (``done``)."""
        errors = 0
        while not self.done.wait(POLL_SECONDS):
            try:
                state = client.read_flow_run(uuid.UUID(self.fleet_id)).state
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the server may be restarting
                errors += 1
                if errors % READ_ERRORS == 0:
                    self.logger.warning("cannot read the fleet run's state: %s", exc)
                continue
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                self.logger.warning("fleet run cancelled: cancelling its child runs")
                self.cancelled.set()
                return

    def _row(self, vm: str, run, attempts: int) -> dict:
        state = run.state.name if run.state else "Unknown"
        seconds = (
            (run.end_time - run.start_time).total_seconds()
            if run.start_time and run.end_time
            else run.total_run_time.total_seconds()
        )
        kind, size = "", None
        if run.state is not None and run.state.is_completed():
            kind, size = self._point(vm)
        return {
            "vm": vm,
            "kind": kind,
            "bytes": size,
            "stored": human(size) if size is not None else "",
            "duration_s": round(seconds, 1),
            "state": state,
            "attempts": attempts,
            "flow_run": str(run.id),
            "message": "" if state == "Completed" else (run.state.message or "")[:300],
        }

    def _point(self, vm: str) -> tuple[str, int | None]:
        """Kind and stored bytes of the VM's newest point on the target (what the child wrote:
        one export of a VM into a repository runs at a time)."""
        from hypersdk.repository.history import read_history
        from providers import open_target

        try:
            with open_target(self.target) as target:
                history = read_history(target, vm)
        except Exception as exc:  # noqa: BLE001 - the summary only shows less
            self.logger.warning("%s: cannot read its newest point: %s", vm, exc)
            return "", None
        if not history:
            return "", None
        newest = history[0]
        return newest.kind, sum(d.object_size for d in newest.disks)


def not_started(vm: str) -> dict:
    """The row of a VM whose child was never created: the fleet was cancelled first."""
    return {
        "vm": vm,
        "kind": "",
        "bytes": None,
        "stored": "",
        "duration_s": 0,
        "state": "Cancelled",
        "attempts": 0,
        "flow_run": "",
        "message": "not started: the fleet run was cancelled",
    }


def run_fleet(
    kind: str,
    vms: list[str] | None,
    select: Selector | None,
    groups: Groups | None,
    base: dict,
    max_parallel: int,
    deployment: str,
    crash_attempts: int,
    skip: set[str] | None = None,
    pending_timeout: float = 300,
    priority: str = "default",
):
    """The fleet: select, group, run each group's VMs, summarise. Returns the final state."""
    from hypersdk import config
    from providers import open_source

    logger = get_run_logger()
    if vms and select:
        raise InvalidParameterError("give vms or select, not both")
    if select is not None:
        with open_source(base.get("source") or config.default_source_url()) as source:
            vms = select_vms(source.list_vms(), select)
        logger.info("selector matched %d VM(s)", len(vms))
    if not vms:
        raise InvalidParameterError("no VM to run: give vms, or a select that matches some")
    skipped = [v for v in vms if v in (skip or set())]
    todo = [v for v in vms if v not in (skip or set())]
    target = base.get("target") or config.default_target_url()
    fleet = _Fleet(kind, deployment, base, crash_attempts, target, pending_timeout, priority)
    plan = plan_groups(todo, groups)
    started = time.monotonic()
    with _watching(fleet):
        for i, group in enumerate(plan, 1):
            if fleet.cancelled.is_set():
                fleet.rows += [not_started(vm) for vm in group]
                continue
            logger.info(
                "group %d/%d: %d VM(s): %s", i, len(plan), len(group), ", ".join(group[:20])
            )
            with ThreadPoolExecutor(min(max_parallel, len(group)), "fleet") as pool:
                futures = [
                    pool.submit(contextvars.copy_context().run, fleet.run_vm, vm) for vm in group
                ]
                for f in futures:
                    f.result()
    rows = sorted(fleet.rows, key=lambda r: r["vm"])
    rows += [
        {
            "vm": v,
            "kind": "",
            "bytes": None,
            "stored": "",
            "duration_s": 0,
            "state": "Skipped",
            "attempts": 0,
            "flow_run": "",
            "message": "completed in an earlier fleet run",
        }
        for v in sorted(skipped)
    ]
    failed = [r["vm"] for r in rows if r["state"] not in ("Completed", "Skipped")]
    wall = time.monotonic() - started
    create_table_artifact(
        rows,
        key=f"fleet-{kind}",
        description=(
            f"{kind} fleet: {len(rows) - len(failed)} of {len(rows)} VM(s) done, "
            f"{len(failed)} not, in {wall:.0f} s"
        ),
    )
    if fleet.cancelled.is_set():
        return Cancelled(
            message=f"fleet run cancelled: {len(rows) - len(failed)} of {len(rows)} VM(s) done",
            data=rows,
        )
    if failed:
        return Failed(
            message=f"{len(failed)} of {len(rows)} VM(s) did not complete: {', '.join(failed[:20])}",
            data=rows,
        )
    return Completed(message=f"{len(rows)} VM(s) done in {wall:.0f} s", data=rows)


@contextlib.contextmanager
def _watching(fleet: _Fleet):
    """A thread watching the fleet run's own state (a cancel) while the block runs."""
    from prefect.client.orchestration import get_client

    if not runtime.flow_run.id:  # not in a flow run: nothing can cancel it
        yield
        return
    with get_client(sync_client=True) as client:
        watcher = threading.Thread(target=fleet.watch, args=(client,), name="fleet-watch")
        watcher.start()
        try:
            yield
        finally:
            fleet.done.set()
            watcher.join()


def _redo(fn_params: dict, redo_failed_of: str | None) -> tuple[dict, set[str]]:
    """The parameters to run with and the VMs to skip (a redo: the earlier run's)."""
    if not redo_failed_of:
        return fn_params, set()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        earlier, done = completed_vms(client, redo_failed_of)
    get_run_logger().info(
        "redo of fleet run %s: %d VM(s) completed there, skipped", redo_failed_of, len(done)
    )
    return {**fn_params, **{k: v for k, v in earlier.items() if k != "redo_failed_of"}}, done


def _base(params: dict, keys: tuple[str, ...]) -> dict:
    return {k: params[k] for k in keys if params.get(k) is not None}


def _backup_fleet(
    vms: VmList | None = None,
    select: Selector | None = None,
    groups: Groups | None = None,
    source: SourceUrl = None,
    target: TargetUrl = None,
    format: FormatName = "qcow2",
    full_every: FullEvery = 7,
    encryption: EncryptionRef = None,
    verify: bool = True,
    max_parallel: MaxParallel = 8,
    deployment: str = "backup-vm/fleet-member",
    crash_attempts: Attempts = 3,
    pending_timeout: PendingTimeout = 300,
    redo_failed_of: str | None = None,
    priority: Priority = "default",
    window: TimeWindow = None,
):
    params, skip = _redo(dict(locals()), redo_failed_of)
    if isinstance(params.get("select"), dict):
        params["select"] = Selector.model_validate(params["select"])
    base = _base(
        params, ("source", "target", "format", "full_every", "encryption", "verify", "window")
    )
    return run_fleet(
        "backup",
        params.get("vms"),
        params.get("select"),
        params.get("groups"),
        _plain(base),
        params["max_parallel"],
        params["deployment"],
        params["crash_attempts"],
        skip,
        params["pending_timeout"],
        params.get("priority") or "default",
    )


def _migrate_fleet(
    vms: VmList | None = None,
    select: Selector | None = None,
    groups: Groups | None = None,
    source: SourceUrl = None,
    target: TargetUrl = None,
    format: FormatName = "qcow2",
    format_options: FormatOptions | None = None,
    incremental: bool = True,
    encryption: EncryptionRef = None,
    verify: bool = True,
    max_parallel: MaxParallel = 8,
    deployment: str = "migrate-vm/on-demand",
    crash_attempts: Attempts = 3,
    pending_timeout: PendingTimeout = 300,
    redo_failed_of: str | None = None,
    priority: Priority = "default",
    window: TimeWindow = None,
):
    params, skip = _redo(dict(locals()), redo_failed_of)
    if isinstance(params.get("select"), dict):
        params["select"] = Selector.model_validate(params["select"])
    base = _base(
        params,
        (
            "source",
            "target",
            "format",
            "format_options",
            "incremental",
            "encryption",
            "verify",
            "window",
        ),
    )
    return run_fleet(
        "migrate",
        params.get("vms"),
        params.get("select"),
        params.get("groups"),
        _plain(base),
        params["max_parallel"],
        params["deployment"],
        params["crash_attempts"],
        skip,
        params["pending_timeout"],
        params.get("priority") or "default",
    )


def _plain(base: dict) -> dict:
    """Child parameters as JSON (a key reference model as its dict)."""
    return {
        k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in base.items()
    }


_backup_fleet.__doc__ = (
    "Back up many VMs, each a run of the backup-vm deployment.\n\n    Args:" + FLEET_DOCS
)
_migrate_fleet.__doc__ = (
    "Migrate many VMs, each a run of the migrate-vm deployment.\n\n    Args:" + FLEET_DOCS
)
backup_fleet = flow(
    _backup_fleet,
    name="backup-fleet",
    log_prints=True,
    validate_parameters=True,
    on_cancellation=[_on_cancellation],
)
migrate_fleet = flow(
    _migrate_fleet,
    name="migrate-fleet",
    log_prints=True,
    validate_parameters=True,
    on_cancellation=[_on_cancellation],
)
