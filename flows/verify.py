"""verify_backups: re-read a VM's backup points (every manifest, parent link and stored object of
every chain) and publish one table row per point. The work is hypersdk.repository.verify; this
flow gives it retries on transient target errors, the run's logs and the table artifact, and
fails the run when any point is bad (after publishing, so the table says which and why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.checked import checked_flow, checked_key, checked_target
from flows.params import EncryptionRef, TargetUrl, VmName
from hypersdk.errors import InvalidParameterError, VerificationError
from hypersdk.names import is_export_id
from hypersdk.repository.verify import PointVerdict
from hypersdk.repository.verify import verify_backups as verify_points
from tasks.common import io_task_options

# "all", "latest" or an export id (the pattern of every one of them)
At = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]

DOC = """Verify a VM's backup points: every manifest readable, every parent link holding, every
    stored object of every chain re-read once (object hash and every chunk hash). Publishes a
    table (one row per point) and fails when any point is bad.

    Args:
        vm: The VM whose points to verify (its name in the repository).
        target: Target URL of the repository: file:///dir, s3://bucket/prefix,
            az://container/prefix, gs://bucket/prefix. Empty: $HYPERSDK_HOME/exports.
        at: "all" (every point), "latest" (the newest, with its chain) or an export id.
        encryption: Key of an encrypted repository: a key reference, never the key, e.g.
            {"method": "keyfile", "ref": "/etc/hypersdk/export.key"}; methods: keyfile,
            passphrase (a file), env (a variable), secret-block (a Prefect Secret).
"""


@dataclass(frozen=True)
class VerifyArgs:
    vm: str
    target: str
    at: str
    encryption: Any | None


def check_verify(params: dict[str, Any]) -> VerifyArgs:
    """Everything a verification can check without reading the repository: one typed error
    each (a URL carrying a secret, an unknown scheme, a malformed point or key reference)."""
    vm = params.get("vm")
    if not isinstance(vm, str) or not vm:
        raise InvalidParameterError("name the VM whose points to verify (vm=NAME)")
    at = params.get("at", "all")
    if not isinstance(at, str) or not is_export_id(at):
        raise InvalidParameterError('at must be "all", "latest" or an export id')
    target = checked_target(params)
    key = checked_key(params)
    return VerifyArgs(vm, target, at, key)


@task(
    name="verify-points", task_run_name="verify-points", cache_policy=NO_CACHE, **io_task_options(2)
)
def verify_points_task(args: VerifyArgs) -> list[PointVerdict]:
    """The engine's verdicts (retried only on transient target errors)."""
    from providers import open_target

    with open_target(args.target) as t:
        return verify_points(t, args.vm, args.at, args.encryption)


def table(verdicts: list[PointVerdict]) -> list[dict[str, str]]:
    """One artifact row per point, oldest first."""
    return [
        {
            "export id": v.export_id,
            "created": v.created.isoformat(timespec="seconds") if v.created else "-",
            "kind": v.kind or "?",
            "verdict": v.summary(),
        }
        for v in verdicts
    ]


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60] or "vm"


@checked_flow("verify-backups", DOC, check_verify)
def verify_backups(
    vm: VmName,
    target: TargetUrl = None,
    at: At = "all",
    encryption: EncryptionRef = None,
) -> list[dict[str, Any]]:
    args = check_verify(locals())  # a deployment run does not pass through CheckedFlow.__call__
    logger = get_run_logger()
    verdicts = verify_points_task(args)
    bad = [v for v in verdicts if not v.ok]
    for v in verdicts:
        say = logger.error if not v.ok else logger.info
        say("%s (%s): %s", v.export_id, v.kind or "unreadable", v.summary())
    create_table_artifact(
        table(verdicts),
        key=f"verify-{_artifact_key(args.vm)}",
        description=f"{len(verdicts)} point(s) of {args.vm} on {args.target} verified: "
        f"{len(bad)} bad",
    )
    if bad:
        raise VerificationError(
            f"{len(bad)} of {len(verdicts)} point(s) of {args.vm} are bad: "
            + ", ".join(v.export_id for v in bad)
        )
    print(f"{len(verdicts)} point(s) of {args.vm} verified: all OK")
    return [v.to_dict() for v in verdicts]
