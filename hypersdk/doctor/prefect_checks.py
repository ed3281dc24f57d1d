"""Checks of the Prefect side: the API answers and matches our client, the work pool and its
queues exist, workers are alive, our deployments are there, every endpoint they use has its
concurrency limit, and the crashed-runs automation exists. All but the first judge Facts read
once (hypersdk.doctor.api), so they are pure and instant."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from hypersdk.doctor.api import QUEUES, WORK_POOL, ZOMBIE_AUTOMATION, Api, ApiClient, Facts
from hypersdk.doctor.endpoints import Endpoint
from hypersdk.doctor.model import Result, one_line

INACTIVITY_MULTIPLE = 3  # missed heartbeats before Prefect's foreman calls a worker offline
FALLBACK_HEARTBEAT = 30  # seconds, when a worker did not say its interval
DEPLOY_HINT = "run the deploy step: make deploy (python -m deployments.bootstrap)"
WORKER_HINT = "start a worker: make worker, or python -m deployments.workers start (docs/fleet.md)"


def client_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefect")
    except PackageNotFoundError:
        return None


def _minor(v: str) -> tuple[str, ...]:
    return tuple(v.split(".")[:2])


def check_api(api: Api, timeout: float) -> Result:
    """``/health`` answers true; the server's version against the installed client's."""
    name = "prefect api"
    with ApiClient(api, timeout) as client:
        health = client.call("GET", "health")
        if health is not True:
            return Result(
                name,
                "fail",
                f"{api.url} (from {api.where}) answers /health with {one_line(repr(health), 60)}",
                "is this a Prefect server? check PREFECT_API_URL",
            )
        server = client.call("GET", "admin/version", missing_ok=True)
    ours = client_version()
    where = f"{api.url} (from {api.where}) is healthy"
    if not isinstance(server, str):
        return Result(name, "ok", f"{where}; server version not shown (Prefect Cloud?)")
    if ours is None:
        return Result(
            name,
            "warn",
            f"{where}, server {server}; Prefect is not installed here",
            "pip install prefect",
        )
    if _minor(server) != _minor(ours):
        return Result(
            name,
            "warn",
            f"{where}, but server {server} and client {ours} differ in their minor version",
            "run the same Prefect 3.x on both (pyproject.toml pins the client)",
        )
    return Result(name, "ok", f"{where}, server {server}, client {ours}")


def _unread(facts: Facts, part: str, name: str) -> Result | None:
    if part in facts.errors:
        return Result(name, "fail", facts.errors[part])
    return None


def check_pool(facts: Facts) -> list[Result]:
    """The work pool exists (process type, not paused) and has the agreed queues; a queue no
    worker polls is a warning (its runs would wait)."""
    name = f"work pool {WORK_POOL}"
    if bad := _unread(facts, "pool", name):
        return [bad]
    pool = facts.pool
    if pool is None:
        return [Result(name, "fail", "does not exist", DEPLOY_HINT)]
    out: list[Result] = []
    kind, paused = pool.get("type"), pool.get("is_paused")
    if paused:
        out.append(
            Result(
                name, "warn", "is paused: no run starts", f"prefect work-pool resume {WORK_POOL}"
            )
        )
    elif kind != "process":
        out.append(Result(name, "warn", f"has type {kind!r}, not process", DEPLOY_HINT))
    else:
        out.append(Result(name, "ok", f"exists (type process, status {pool.get('status', '?')})"))
    by_name = {str(q.get("name")): q for q in facts.queues}
    for queue in QUEUES:
        qname = f"work queue {queue}"
        q = by_name.get(queue)
        if q is None:
            status = "fail" if queue == "default" else "warn"
            out.append(Result(qname, status, f"missing in {WORK_POOL}", DEPLOY_HINT))
        elif q.get("is_paused"):
            out.append(
                Result(
                    qname,
                    "warn",
                    "is paused",
                    f"prefect work-queue resume {queue} --pool {WORK_POOL}",
                )
            )
        elif q.get("status") == "READY":
            out.append(
                Result(qname, "ok", f"priority {q.get('priority', '?')}, polled by a worker")
            )
        else:
            out.append(
                Result(
                    qname,
                    "warn",
                    f"priority {q.get('priority', '?')}, no worker polled it lately: its runs wait",
                    WORKER_HINT,
                )
            )
    return out


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _ago(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def worker_alive(worker: dict, now: datetime) -> tuple[bool, float | None]:
    """(alive, seconds since its last heartbeat): alive while fewer than INACTIVITY_MULTIPLE
    heartbeats were missed, the rule Prefect's foreman applies (here without its loop's lag)."""
    beat = _parse_time(worker.get("last_heartbeat_time"))
    if beat is None:
        return False, None
    age = (now - beat).total_seconds()
    interval = worker.get("heartbeat_interval_seconds") or FALLBACK_HEARTBEAT
    return age <= INACTIVITY_MULTIPLE * float(interval), age


def check_workers(facts: Facts, now: datetime | None = None) -> Result:
    name = "workers"
    if bad := _unread(facts, "pool", name):
        return bad
    if facts.pool is None:
        return Result(name, "skip", f"no work pool {WORK_POOL}")
    now = now or datetime.now(UTC)
    alive, newest = [], None
    for w in facts.workers:
        ok, age = worker_alive(w, now)
        if ok:
            alive.append(str(w.get("name")))
        if age is not None and (newest is None or age < newest):
            newest = age
    if alive:
        shown = ", ".join(sorted(alive)[:10]) + (" ..." if len(alive) > 10 else "")
        return Result(name, "ok", f"{len(alive)} alive on {WORK_POOL} ({shown})")
    if newest is None:
        return Result(name, "fail", f"no worker ever polled {WORK_POOL}", WORKER_HINT)
    return Result(
        name,
        "fail",
        f"none alive on {WORK_POOL}: the last heartbeat was {_ago(newest)} ago "
        f"({len(facts.workers)} known)",
        WORKER_HINT,
    )


def is_fleet(facts: Facts) -> bool:
    """A fleet deployment is ours: its workers refuse runs without their limits."""
    return any("fleet" in (d.get("tags") or []) for d in facts.deployments)


def check_deployments(facts: Facts) -> Result:
    name = "deployments"
    if bad := _unread(facts, "deployments", name):
        return bad
    deps = facts.deployments
    if not deps:
        return Result(name, "fail", f"none on {WORK_POOL}", DEPLOY_HINT)
    names = sorted(f"{d.get('flow_name')}/{d.get('name')}" for d in deps)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    queues = {str(q.get("name")) for q in facts.queues}
    stray = sorted(
        {str(d.get("work_queue_name")) for d in deps if d.get("work_queue_name")} - queues
    )
    if queues and stray:
        return Result(
            name,
            "warn",
            f"{len(deps)} on {WORK_POOL}, but queue(s) {', '.join(stray)} do not exist: {shown}",
            DEPLOY_HINT,
        )
    return Result(name, "ok", f"{len(deps)} on {WORK_POOL}: {shown}")


def check_limits(facts: Facts, endpoints: Iterable[Endpoint]) -> list[Result]:
    """Each source and target our deployments (or the command line) name has its per-endpoint
    global concurrency limit, active. Missing: a fail with fleet deployments (their workers
    refuse such runs), else a warning (the exports run unbounded)."""
    from hypersdk.fleet.limits import source_limit_name, target_limit_name
    from hypersdk.urls import redact_url

    if bad := _unread(facts, "limits", "concurrency limits"):
        return [bad]
    missing_status = "fail" if is_fleet(facts) else "warn"
    out: list[Result] = []
    seen: set[str] = set()
    for ep in endpoints:
        if ep.origin == "default":
            continue  # the operator creates limits for the endpoints runs are given
        label = f"limit {ep.kind} {redact_url(ep.url)}"
        naming = source_limit_name if ep.kind == "source" else target_limit_name
        try:
            limit_name = naming(ep.url)
        except Exception as exc:
            out.append(Result(label, "fail", one_line(str(exc))))
            continue
        if limit_name in seen:
            continue
        seen.add(limit_name)
        found = facts.limits.get(limit_name)
        hint = (
            f"python -m deployments.limits --{ep.kind} '{redact_url(ep.url)}=N' "
            f"(or HYPERSDK_{ep.kind.upper()}_LIMITS for make deploy)"
        )
        if found is None:
            out.append(
                Result(label, missing_status, f"{limit_name} missing (used by {ep.origin})", hint)
            )
        elif not found.get("active", True):
            out.append(Result(label, missing_status, f"{limit_name} is inactive", hint))
        else:
            out.append(Result(label, "ok", f"{limit_name}: {found.get('limit', '?')} at once"))
    if not out:
        out.append(
            Result(
                "concurrency limits",
                "ok",
                "no source or target in the deployments' parameters, none given: nothing to check",
                "give --source URL / --target URL to check the limits of the endpoints you use",
            )
        )
    return out


def check_automation(facts: Facts) -> Result:
    name = f"automation {ZOMBIE_AUTOMATION}"
    if bad := _unread(facts, "automations", name):
        return bad
    found = [a for a in facts.automations if a.get("name") == ZOMBIE_AUTOMATION]
    status = "fail" if is_fleet(facts) else "warn"
    if not found:
        return Result(
            name,
            status,
            "missing: runs whose worker died stay Running instead of Crashed (and re-run)",
            DEPLOY_HINT,
        )
    if not any(a.get("enabled", True) for a in found):
        return Result(name, status, "exists but is disabled", "enable it in the UI (Automations)")
    return Result(name, "ok", "marks runs without heartbeats Crashed")
