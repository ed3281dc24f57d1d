"""``hyperctl backups list``, ``hyperctl restore`` and ``hyperctl verify``: the points of a VM's
backup repository, any of them back as image files or a local VM directory, and every one of
them checked (hypersdk.repository)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from hypersdk.cli.common import Group, byte_counter, key_reference, progress_bar

if TYPE_CHECKING:
    from hypersdk.crypto import KeySpec

backups_app = Group("backups", help="The points in a VM's backup repository.", no_args_is_help=True)

target_opt = click.option("--target", "-t", help="Target URL (default: local exports)")
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output")


def _key(key_file: str | None, passphrase_file: str | None, passphrase_env: str | None):
    spec = key_reference(key_file, passphrase_file, passphrase_env, None)
    if spec is None:
        return None
    from hypersdk.crypto import KeySpec

    return KeySpec.model_validate(spec)


def key_options(what: str) -> Callable[[Callable], Callable]:
    """--key-file, --passphrase-file and --passphrase-env for ``what`` (e.g. "an encrypted
    chain"), handed to the command as one ``key`` (a KeySpec, or None)."""

    def wrap(command: Callable) -> Callable:
        @functools.wraps(command)
        def with_key(*args, key_file=None, passphrase_file=None, passphrase_env=None, **kwargs):
            return command(*args, key=_key(key_file, passphrase_file, passphrase_env), **kwargs)

        for option in (
            click.option("--passphrase-env", help="Environment variable holding the passphrase"),
            click.option("--passphrase-file", help=f"Passphrase file of {what}"),
            click.option("--key-file", help=f"Key file of {what}"),
        ):
            with_key = option(with_key)
        return with_key

    return wrap


def _target(url: str | None):
    """The repository's target. A local directory named by ``-t`` must exist: a mistyped path
    is not an empty repository (and a read creates nothing)."""
    from hypersdk import config
    from providers import open_target
    from providers.targets.local import LocalTarget

    target = open_target(url or config.default_target_url())
    if url and isinstance(target, LocalTarget) and not os.path.isdir(target.root):
        from hypersdk.errors import ObjectNotFoundError

        target.close()
        raise ObjectNotFoundError(f"{target.url}: no such directory (no backup repository there)")
    return target


@backups_app.command("list", help="List a VM's points, oldest first: kind, disks, chain.")
@click.argument("vm", help="VM name")
@target_opt
@json_opt
def backups_list(vm: str, target: str | None, as_json: bool) -> None:
    from hypersdk.repository.chain import point_manifest
    from hypersdk.repository.restore import points
    from hypersdk.units import human

    rows = []
    with _target(target) as t:
        for export_id in points(t, vm):
            m = point_manifest(t, vm, export_id)
            rows.append(
                {
                    "export_id": m.export_id,
                    "created": m.created.isoformat(),
                    "kind": m.kind,
                    "disks": [
                        {
                            "name": d.name,
                            "kind": d.kind,
                            "format": d.format,
                            "virtual_size": d.virtual_size,
                            "stored_bytes": d.object_size,
                            "parent": d.parent.export_id if d.parent else None,
                            "encrypted": bool(d.encryption),
                        }
                        for d in m.disks
                    ],
                }
            )
    if not rows:
        from hypersdk.errors import ObjectNotFoundError

        raise ObjectNotFoundError(f"no backups of VM {vm!r} on {target or 'the local exports'}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        disks = ", ".join(
            f"{d['name']} {d['kind']} {human(d['stored_bytes'])}"
            + (f" on {d['parent']}" if d["parent"] else "")
            for d in r["disks"]
        )
        click.echo(f"{r['export_id']}  {r['created'][:19]}  {r['kind']:<11}  {disks}")


@click.command(
    help="Restore a point of a VM (the newest by default): every link of its chain checked and "
    "verified, then written as one image per disk into OUT (a directory becomes a local VM "
    "directory the local source reads back), or as one image file for a one-disk VM. OUT's "
    "parent directory must exist; a failed restore leaves nothing under OUT."
)
@click.argument("vm", help="VM name")
@click.argument("out", help="Output directory, or an image file for a one-disk VM")
@click.option("--at", default="latest", show_default=True, help="Export id of the point")
@target_opt
@click.option("-O", "--format", "output_format", help="Image format (default: the chain's)")
@key_options("an encrypted chain")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar")
@json_opt
def restore(
    vm: str,
    out: str,
    at: str,
    target: str | None,
    output_format: str | None,
    key: KeySpec | None,
    quiet: bool,
    as_json: bool,
) -> None:
    from hypersdk import config
    from hypersdk.audit import audited
    from hypersdk.repository.restore import restore_point
    from hypersdk.units import human

    what = {"vm": vm, "at": at, "out": os.path.abspath(out)}
    with (
        audited("restore", target=target or config.default_target_url(), what=what) as done,
        _target(target) as t,
        progress_bar(not quiet and sys.stderr.isatty()) as bar,
    ):
        manifest, restored = restore_point(
            t, vm, at, out, output_format, key, progress=byte_counter(bar, "restore", None)
        )
        done["export_id"] = manifest.export_id
    if as_json:
        click.echo(
            json.dumps(
                {
                    "export_id": manifest.export_id,
                    "disks": [
                        {
                            "name": r.name,
                            "path": r.path,
                            "format": r.format,
                            "virtual_size": r.virtual_size,
                            "chain": r.chain,
                        }
                        for r in restored
                    ],
                },
                indent=2,
            )
        )
        return
    for r in restored:
        click.echo(
            f"{r.name}: {r.path} ({r.format}, {human(r.virtual_size)}) from point "
            f"{manifest.export_id}, a chain of {len(r.chain)} object(s), verified, "
            f"{r.seconds:.1f} s"
        )


@click.command(
    help="Forget points of a VM by a retention policy (restic's rules). A kept delta whose "
    "parent goes is first rebased on a synthetic full built from the stored objects, so every "
    "kept point stays restorable."
)
@click.argument("vm", help="VM name")
@target_opt
@click.option("--keep-last", type=int, help="Keep the N newest points")
@click.option("--keep-hourly", type=int, help="Keep the newest point of each of N hours")
@click.option("--keep-daily", type=int, help="Keep the newest point of each of N days")
@click.option("--keep-weekly", type=int, help="Keep the newest point of each of N weeks")
@click.option("--keep-monthly", type=int, help="Keep the newest point of each of N months")
@click.option("--keep-yearly", type=int, help="Keep the newest point of each of N years")
@click.option("--keep-within", help="Keep every point within this of the newest (e.g. 30d)")
@click.option("--dry-run", is_flag=True, help="Only say what would go")
@key_options("an encrypted chain (to rebase deltas)")
@json_opt
def forget(
    vm: str,
    target: str | None,
    dry_run: bool,
    key: KeySpec | None,
    as_json: bool,
    **keep: int | str | None,
) -> None:
    from hypersdk.repository.forget import forget as forget_points
    from hypersdk.repository.retention import RetentionPolicy

    if all(v is None for v in keep.values()):  # forgetting every point is never meant
        from hypersdk.errors import InvalidParameterError

        raise InvalidParameterError(
            "the retention policy is empty: give at least one rule (--keep-last, --keep-hourly, "
            "--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly or --keep-within)"
        )
    policy = RetentionPolicy.model_validate({k: v for k, v in keep.items() if v is not None})
    say = (lambda _line: None) if as_json else click.echo
    from hypersdk import config
    from hypersdk.audit import audited

    what = {"vm": vm, "policy": policy.model_dump(exclude_none=True), "dry_run": dry_run}
    with (
        audited("forget", target=target or config.default_target_url(), what=what) as done,
        _target(target) as t,
    ):
        result = forget_points(t, vm, policy, key, dry_run=dry_run, say=say)
        done["forgot"] = [] if dry_run else result.plan.forget_ids
    if as_json:
        click.echo(
            json.dumps(
                {
                    "keep": result.plan.keep_ids,
                    "forget": result.plan.forget_ids,
                    "rebase": list(result.chain.rebase),
                    "reasons": {k: list(v) for k, v in result.plan.reasons().items()},
                    "dry_run": dry_run,
                    "steps": result.done,
                },
                indent=2,
            )
        )
        return
    for pid, why in result.plan.reasons().items():
        click.echo(f"keep   {pid}  ({', '.join(why)})")
    verb = "would forget" if dry_run else "forgot"
    for pid in result.plan.forget_ids:
        click.echo(f"{verb} {pid}")
    for pid in result.chain.rebase:  # a kept delta whose parent goes
        verb = "would rebase" if dry_run else "rebased"
        click.echo(f"{verb} {pid} on a synthetic full (its parent goes)")


@click.command(
    help="Verify a VM's backup points: every manifest, every parent link, every stored object "
    "of every chain re-read (object hash and every chunk hash; each object once). One line per "
    "point; exit 1 when any point is bad. The newest point (with its whole chain) unless --all "
    "or --at. VM/EXPORT_ID/manifest.json instead of a VM verifies that one export."
)
@click.argument("vm", help="VM name (or the key of one export's manifest)")
@target_opt
@click.option("--all", "every", is_flag=True, help="Every point, oldest first")
@click.option("--at", help="Export id of the point  [default: latest]")
@key_options("an encrypted repository")
@json_opt
def verify(
    vm: str,
    target: str | None,
    every: bool,
    at: str | None,
    key: KeySpec | None,
    as_json: bool,
) -> None:
    from hypersdk.errors import InvalidParameterError

    if every and at:
        raise InvalidParameterError("give --all or --at, not both")
    if vm.endswith("manifest.json"):  # the older form: one export, by its manifest's key
        if every or at:
            raise InvalidParameterError(f"{vm} names one export: --all and --at do not apply")
        _verify_one_export(vm, target, key, as_json)
        return
    from hypersdk.repository.verify import verify_backups

    with _target(target) as t:
        verdicts = verify_backups(t, vm, "all" if every else at or "latest", key)
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in verdicts], indent=2))
    else:
        for v in verdicts:
            click.echo(f"{v.export_id}  {v.kind or '?':<5}  {v.summary()}")
    if not all(v.ok for v in verdicts):
        raise SystemExit(1)


def _verify_one_export(manifest: str, target: str | None, key, as_json: bool) -> None:
    from hypersdk.verify import verify_export

    with _target(target) as t:
        verdicts = verify_export(t, manifest, key)
    if as_json:
        rows = [
            {"name": v.name, "key": v.key, "ok": v.ok, "chunks": v.chunks_checked} for v in verdicts
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for v in verdicts:
        click.echo(f"{v.key}: OK ({v.chunks_checked} chunks)")


def register(group: click.Group) -> None:
    group.add_command(restore)
    group.add_command(verify)
    group.add_command(forget)
    group.add_command(backups_app)
