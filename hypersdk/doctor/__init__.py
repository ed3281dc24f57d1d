"""``hyperctl doctor``: is this machine ready to run exports and fleet operations?

Each check answers a Result (name, ok / warn / fail / skip, one line, a hint). They run side by
side, each bounded by a timeout (hypersdk.doctor.model.run_bounded), in three rounds:

1. the Prefect API (which one, /health, versions) and the tools' versions;
2. what the server says about our setup (pool, queues, workers, deployments, limits,
   automation: one bounded read, hypersdk.doctor.api);
3. the judgement of those facts, the credentials of every source and target (the deployments'
   parameters, the command line, hypersdk.config's defaults) and the free space.

So the whole run takes at most about three timeouts, whatever hangs. Nothing printed carries a
secret: URLs are redacted and secret values from the environment masked (model.scrub).

Modules: ``model`` (Result, the bounded runner, scrub), ``api`` (which API, its reads),
``prefect_checks``, ``endpoints`` (credentials, free space), ``tools`` (versions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypersdk.doctor.model import (
    STATUSES,
    Result,
    Status,
    inner,
    run_bounded,
    scrub,
    secret_values,
)

__all__ = ["STATUSES", "Options", "Result", "Status", "diagnose", "worst"]

SERVER_CHECKS = ("work pool", "workers", "deployments", "automation", "concurrency limits")


@dataclass
class Options:
    sources: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    timeout: float = 15.0  # seconds, per check
    min_free_gib: float = 10.0
    # set PREFECT_API_URL to the API found, for providers that load Prefect Secret blocks (the
    # CLI does; a library caller keeps its environment)
    export_api: bool = False


def worst(results: list[Result]) -> Status:
    """The run's verdict: fail if any check failed, else warn if any warned, else ok."""
    found = {r.status for r in results}
    return next((s for s in ("fail", "warn") if s in found), "ok")


def _api_round(opts: Options, api, why: str) -> tuple[Result, object | None]:
    """The API check, and the Api when it is usable (None otherwise)."""
    from hypersdk.doctor.api import ApiError
    from hypersdk.doctor.prefect_checks import check_api
    from hypersdk.localapi import mode_off

    if api is None:
        status: Status = "warn" if mode_off() else "fail"
        hint = "hyperctl server start, or export PREFECT_API_URL=... (docs/prefect-local.md)"
        return Result("prefect api", status, why, hint), None
    try:
        result = check_api(api, inner(opts.timeout))
    except ApiError as exc:
        hint = (
            "start it (hyperctl server start, make server) or fix PREFECT_API_URL"
            if api.where.startswith("PREFECT_API_URL") or "profile" in api.where
            else "hyperctl server status tells what runs use"
        )
        return Result("prefect api", "fail", f"{exc} (from {api.where})", hint), None
    return result, (api if result.status != "fail" else None)


def diagnose(opts: Options) -> list[Result]:
    """Every check's result, in the table's order (see the module doc)."""
    from hypersdk.doctor import endpoints as ep_mod
    from hypersdk.doctor import prefect_checks as pc
    from hypersdk.doctor.api import ApiClient, Facts, read_facts, resolve_api
    from hypersdk.doctor.tools import version_checks

    holder: dict[str, object] = {}
    # which API: local files and at most one 2 s probe of the local port
    found, why = resolve_api(min(2.0, opts.timeout))
    waiting = {"prefect api": found.url} if found else {}

    def api_job() -> Result:
        result, api = _api_round(opts, found, why)
        holder["api"] = api
        return result

    first = run_bounded(
        [("prefect api", api_job), *version_checks(opts.timeout)], opts.timeout, waiting
    )
    head, versions = first[:1], first[1:]
    api = holder.get("api")

    facts: Facts | None = None
    if api is not None:
        if opts.export_api:  # Secret blocks must come from this API, not an ephemeral one
            os.environ.setdefault("PREFECT_API_URL", api.url)  # type: ignore[attr-defined]

        def facts_job() -> Result:
            with ApiClient(api, inner(opts.timeout)) as client:  # type: ignore[arg-type]
                holder["facts"] = read_facts(client)
            return Result("server facts", "ok", "read")

        read = run_bounded(
            [("prefect api reads", facts_job)], opts.timeout, {"prefect api reads": api.url}
        )
        facts = holder.get("facts")  # type: ignore[assignment]
        if facts is None:
            head.append(read[0])

    endpoints, left_out = ep_mod.collect_endpoints(
        facts.deployments if facts else [], opts.sources, opts.targets
    )
    server: list[Result] = []
    if facts is not None:
        server += pc.check_pool(facts)
        server.append(pc.check_workers(facts))
        server.append(pc.check_deployments(facts))
        server.append(pc.check_automation(facts))
        server += pc.check_limits(facts, endpoints)
    else:
        why_not = "the Prefect API could not be read" if api else "no Prefect API to ask"
        server = [Result(name, "skip", why_not) for name in SERVER_CHECKS]

    jobs = []
    for ep in endpoints:
        check = ep_mod.check_source if ep.kind == "source" else ep_mod.check_target
        jobs.append((ep_mod.label(ep), lambda ep=ep, check=check: check(ep)))
    for what, path in ep_mod.space_places(endpoints):
        jobs.append(
            (
                f"free space {what}",
                lambda what=what, path=path: ep_mod.check_space(what, path, opts.min_free_gib),
            )
        )
    local = run_bounded(jobs, opts.timeout)
    if left_out:
        local.append(
            Result(
                "endpoints",
                "warn",
                f"{left_out} more source/target URL(s) in the deployments were not checked",
                "check them with --source/--target",
            )
        )
    results = [*head, *server, *local, *versions]
    urls = [e.url for e in endpoints] + opts.sources + opts.targets
    return scrub(results, urls, secret_values())
