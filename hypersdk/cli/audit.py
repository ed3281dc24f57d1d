"""``hyperctl audit verify|repair|show``: the audit log's hash chain checked, a torn last line
moved aside, the newest lines shown (hypersdk.audit)."""

from __future__ import annotations

import json

import click

from hypersdk.cli.common import Group

audit_app = Group(
    "audit",
    help="The audit log of exports, restores and forgets (hash-chained JSON lines).",
    no_args_is_help=True,
)
path_arg = click.argument("path", required=False, help="Audit log (default: $HYPERSDK_AUDIT_LOG)")


@audit_app.command(
    "verify",
    help="Check every line's hash, the chain and the head anchor: exit 0 with the count, or "
    "non-zero naming the first edited, deleted, inserted or moved line.",
)
@path_arg
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
def verify(path: str | None, as_json: bool) -> None:
    from hypersdk.audit import AuditLog

    summary = AuditLog(path).verify()  # AuditError: one red line, exit 1
    if as_json:
        click.echo(json.dumps(summary.__dict__, indent=2))
        return
    note = " (the last one not yet in the head: an append cut short)" if summary.unanchored else ""
    click.echo(
        f"ok: {summary.count} line(s) in {summary.path}, chain and head intact{note}; "
        f"last hash {summary.last_hash}"
    )


@audit_app.command(
    "repair",
    help="Move a torn last line (a crash mid-append) into <log>.torn-<time> and record that. "
    "Never touches anything else: an edited or shortened log stays an error.",
)
@path_arg
def repair(path: str | None) -> None:
    from hypersdk.audit import AuditLog

    log = AuditLog(path)
    done = log.repair()
    if done is None:
        click.echo(f"nothing to repair: the last line of {log.path} is whole")
        return
    what = done["what"]
    click.echo(
        f"moved a torn line of {what['torn_bytes']} byte(s) into {what['saved_to']}; "
        f"recorded as line {done['seq'] + 1}"
    )


@audit_app.command("show", help="The newest lines of the audit log, one per action.")
@path_arg
@click.option("-n", "--lines", default=20, help="How many lines")
def show(path: str | None, lines: int) -> None:
    from collections import deque

    from hypersdk.audit import AuditLog

    log = AuditLog(path)
    with open(log.path, "rb") as f:
        for raw in deque(f, maxlen=max(1, lines)):
            try:
                r = json.loads(raw)
                where = r["where"].get("target") or r["where"].get("source") or ""
                click.echo(
                    f"{r['seq'] + 1:>6}  {r['time'][:19]}  {r['who']['user']}@{r['who']['host']}"
                    f"  {r['action']:<8} {r['result']:<9} {where}"
                )
            except (ValueError, KeyError, TypeError):
                click.echo(f"     ?  (not an audit record: {raw[:60]!r})")


def register(group: click.Group) -> None:
    group.add_command(audit_app)
