"""forget_backups: apply a retention policy to a VM's backup repository (``hyperctl forget`` as a
flow; the ``forget`` deployment runs it after each nightly backup).

Thin over hypersdk.repository.forget: restic's rules pick the points to keep; a kept delta whose
parent goes is first rebased on a synthetic full built from the stored objects, so every kept
point stays restorable. A table artifact lists each point, kept or forgotten, and why.

The policy is one parameter per rule (keep_last, keep_daily, ...), not one nested object: the
run form then shows each rule as its own field with its description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows.checked import checked_flow, checked_key, checked_target
from flows.ops_hooks import attach_ops_hooks
from flows.params import EncryptionRef, TargetUrl, VmName
from flows.repo_slot import repository_slot
from hypersdk.errors import InvalidParameterError
from hypersdk.repository.retention import RetentionPolicy

KeepLast = Annotated[int, Field(ge=1, le=1_000_000)] | None
KeepCount = Annotated[int, Field(ge=-1, le=1_000_000)] | None  # -1: every hour/day/...
KeepWithin = Annotated[str, Field(min_length=2, max_length=40)] | None
KEEP_RULES = (
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
)

DOC = """Forget a VM's backup points by a retention policy (restic's rules): the points no rule
    keeps are deleted, newest first; a kept delta whose parent goes is first rebased on a
    synthetic full built from the stored objects, so every kept point stays restorable.

    Args:
        vm: The VM whose points to forget (its name in the repository).
        target: Target URL of the repository: file:///dir, s3://bucket/prefix,
            az://container/prefix, gs://bucket/prefix. Empty: $HYPERSDK_HOME/exports.
        keep_last: Keep the N newest points.
        keep_hourly: Keep the newest point of each of the N newest hours that have one
            (-1: of every hour).
        keep_daily: Keep the newest point of each of the N newest days that have one (-1: all).
        keep_weekly: Keep the newest point of each of the N newest ISO weeks (-1: all).
        keep_monthly: Keep the newest point of each of the N newest months (-1: all).
        keep_yearly: Keep the newest point of each of the N newest years (-1: all).
        keep_within: Keep every point within this of the newest one, e.g. 30d or 1y6m
            (years, months, days, hours).
        dry_run: Only say what would be forgotten and rebased; change nothing.
        encryption: Key of an encrypted repository (needed to rebase an encrypted delta): a
            key reference, never the key, e.g. {"method": "keyfile", "ref": "/etc/k"}.
"""


@dataclass(frozen=True)
class ForgetArgs:
    vm: str
    target: str
    policy: RetentionPolicy
    dry_run: bool
    encryption: Any | None


def check_forget(params: dict[str, Any]) -> ForgetArgs:
    """Everything a forget can check without reading the repository: one typed error each (an
    empty policy is refused: forgetting every point is never what a missing rule means)."""
    vm = params.get("vm")
    if not isinstance(vm, str) or not vm:
        raise InvalidParameterError("name the VM whose points to forget (vm=NAME)")
    policy = RetentionPolicy.model_validate(
        {k: params[k] for k in KEEP_RULES if params.get(k) is not None}
    )
    target = checked_target(params)
    key = checked_key(params)
    return ForgetArgs(vm, target, policy, bool(params.get("dry_run", False)), key)


class ForgetSummary(BaseModel):
    vm: str
    target: str
    policy: str
    dry_run: bool
    kept: list[str]  # newest first
    forgotten: list[str]  # newest first
    rebased: list[str]  # kept deltas rebased on synthetic fulls
    steps: list[str]  # what was done, in order (none on a dry run)
    rows: list[dict[str, str]]  # the table artifact's rows


def table_rows(result: Any) -> list[dict[str, str]]:
    """One row per point, newest first: kept or forgotten, why, and whether it was rebased."""
    plan, rebase = result.plan, set(result.chain.rebase)
    entries = [(k.point, "kept", ", ".join(k.reasons)) for k in plan.keep]
    gone = "would be forgotten" if result.dry_run else "forgotten"
    entries += [(p, gone, "no rule keeps it") for p in plan.forget]
    entries.sort(key=lambda e: (e[0].time, e[0].id), reverse=True)
    rebased = (
        "would be rebased on a synthetic full" if result.dry_run else "rebased on a synthetic full"
    )
    return [
        {
            "point": p.id,
            "taken": p.time.isoformat(timespec="seconds"),
            "decision": decision,
            "reasons": why,
            "rebased": rebased if p.id in rebase else "",
        }
        for p, decision, why in entries
    ]


@task(name="apply-retention", task_run_name="apply-retention", cache_policy=NO_CACHE)
def apply_retention(args: ForgetArgs) -> ForgetSummary:
    """Plan, and unless a dry run carry out, the forgetting (holding the VM's repository slot
    and lock while objects change)."""
    import contextlib

    from prefect import runtime

    from hypersdk.repository.forget import forget
    from hypersdk.repository.locks import default_owner
    from providers import open_target

    logger = get_run_logger()
    logger.info("%s for %r on %s", args.policy.describe(), args.vm, args.target)
    run_id = runtime.flow_run.id
    with open_target(args.target) as target:
        slot = contextlib.nullcontext() if args.dry_run else repository_slot(target, args.vm)
        with slot as slot_lease:
            # the slot's lease: a run finding this lock's holder dead frees its slot with it
            owner = default_owner("forget", str(run_id) if run_id else None)
            result = forget(
                target,
                args.vm,
                args.policy,
                args.encryption,
                args.dry_run,
                say=logger.info,
                owner=owner | {"slot_lease": slot_lease},
            )
    rows = table_rows(result)
    for row in rows:
        logger.info(
            "%s %s (%s)%s",
            row["decision"],
            row["point"],
            row["reasons"],
            f"; {row['rebased']}" if row["rebased"] else "",
        )
    return ForgetSummary(
        vm=args.vm,
        target=args.target,
        policy=args.policy.describe(),
        dry_run=args.dry_run,
        kept=result.plan.keep_ids,
        forgotten=result.plan.forget_ids,
        rebased=list(result.chain.rebase),
        steps=result.done,
        rows=rows,
    )


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60] or "vm"


@checked_flow("forget-backups", DOC, check_forget)
def forget_backups(
    vm: VmName,
    target: TargetUrl = None,
    keep_last: KeepLast = None,
    keep_hourly: KeepCount = None,
    keep_daily: KeepCount = None,
    keep_weekly: KeepCount = None,
    keep_monthly: KeepCount = None,
    keep_yearly: KeepCount = None,
    keep_within: KeepWithin = None,
    dry_run: bool = False,
    encryption: EncryptionRef = None,
) -> ForgetSummary:
    args = check_forget(locals())
    summary = apply_retention(args)
    what = "dry run: " if args.dry_run else ""
    create_table_artifact(
        summary.rows,
        key=f"forget-{_artifact_key(args.vm)}",
        description=(
            f"{what}{summary.policy} of {args.vm} on {args.target}: {len(summary.kept)} kept, "
            f"{len(summary.forgotten)} {'to forget' if args.dry_run else 'forgotten'}"
            + (f", rebased: {', '.join(summary.rebased)}" if summary.rebased else "")
        ),
    )
    print(
        f"{what}{len(summary.kept)} point(s) of {args.vm} kept, {len(summary.forgotten)} "
        f"{'would be forgotten' if args.dry_run else 'forgotten'}"
    )
    return summary


attach_ops_hooks(forget_backups)  # audit line and webhooks (flows/ops_hooks.py)
