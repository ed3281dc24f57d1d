"""Run commands: ``hyperctl migrate``, ``hyperctl backup``, ``hyperctl demo``, ``hyperctl vms
list``. These run the Prefect flows in-process (ephemeral API unless PREFECT_API_URL points at
a server). (``hyperctl verify`` lives with the repository's commands, in backups.py.)"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from hypersdk.cli.common import Group, key_reference, parse_options, progress_bar

if TYPE_CHECKING:  # pydantic-backed modules load when a command runs, not at CLI start-up
    from hypersdk.summary import MigrationResult

vms_app = Group("vms", help="Inventory of a source.", no_args_is_help=True)

source_opt = click.option("--source", "-s", help="Source URL (default: local demo VMs)")
target_opt = click.option("--target", "-t", help="Target URL (default: local exports)")
key_file_opt = click.option("--key-file", help="Encrypt with a 32-byte key file")
pass_file_opt = click.option("--passphrase-file", help="Encrypt with the passphrase in this file")
pass_env_opt = click.option("--passphrase-env", help="Encrypt with the passphrase in this env var")
gpg_opt = click.option("--gpg-recipient", help="Encrypt with GPG to this recipient")
json_opt = click.option(
    "--json", "as_json", is_flag=True, help="One JSON object on stdout, no progress bars"
)


def encryption_ref(
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
) -> dict[str, Any] | None:
    """A key *reference* for the flow parameters: where the key is, never the key itself."""
    return key_reference(key_file, passphrase_file, passphrase_env, gpg_recipient or None)


@contextlib.contextmanager
def live_progress(enabled: bool) -> Iterator[None]:
    """Draw one bar per pipeline stage from the in-process progress bus."""
    if not enabled:
        yield
        return
    from hypersdk import progress

    with progress_bar(enabled) as bar:
        tasks: dict[str, Any] = {}

        def listener(event: str, stage: str, n: int, total: int | None) -> None:
            if event == "start":
                tasks[stage] = bar.add_task(stage, total=total or None)
            elif event == "advance" and stage in tasks:
                bar.advance(tasks[stage], n)
            elif event == "end" and stage in tasks:
                bar.update(tasks[stage], total=bar.tasks[tasks[stage]].completed)

        unsubscribe = progress.subscribe(listener)
        try:
            yield
        finally:
            unsubscribe()


def _show(result: MigrationResult, as_json: bool = False) -> None:
    if as_json:  # for scripts: the run as one JSON object, nothing else on stdout
        import json

        from hypersdk.summary import render_json

        click.echo(json.dumps(render_json(result), indent=2, ensure_ascii=False))
        return
    from hypersdk.summary import render_text

    click.echo(render_text(result))


def _missing_vm(source: str | None) -> None:
    """A bare ``hyperctl migrate`` names no VM: say which ones the source holds."""
    from hypersdk import config
    from hypersdk.errors import InvalidParameterError
    from providers import open_source

    with open_source(source or config.default_source_url()) as src:
        names = [v.name for v in src.list_vms()]
    held = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "no VMs"
    raise InvalidParameterError(f"name the VM to export (the source holds: {held})")


def run_flow(flow_name: str, params: dict[str, Any], progress: bool = True) -> MigrationResult:
    """Check everything a run can check without side effects, in this process and before
    Prefect loads (a mistake answers in well under a second and creates no flow run), then
    run the flow against the local Prefect API."""
    if not params.get("vm"):
        _missing_vm(params.get("source"))
    from hypersdk.requests import validate_request
    from providers.preflight import preflight

    preflight(validate_request(**params))
    _use_prefect_api()
    _warnings_to_stderr()
    from prefect import Flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if flow_name == "backup-vm":
        from flows.backup import backup_vm as flow
    else:
        from flows.migrate import migrate_vm as flow
    with (
        live_progress(progress and sys.stderr.isatty()),
        # Heartbeats let a server automation mark a vanished run as crashed; none is set up
        # for runs made in this process, and Prefect's heartbeat thread holds the exit for up
        # to a second (it sleeps in 1 s steps): a quarter of a short run.
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        # checked above: skip ExportFlow's own pre-run check (a second vSphere login)
        return Flow.__call__(flow, **params)


def _use_prefect_api() -> None:
    """Point the run at the local Prefect server (started on first use), see docs/prefect-local.md."""
    from hypersdk.localapi import ensure_api

    ensure_api(echo=lambda line: click.echo(line, err=True))


def _warnings_to_stderr() -> None:
    """Engine and provider warnings as one line each on the terminal (Prefect's console is
    quiet unless HYPERSDK_VERBOSE=1; the run's logs keep everything)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    for name in ("hypersdk", "providers"):
        logging.getLogger(name).addHandler(handler)


@click.command(
    help="Export a VM: snapshot, CBT diff, download, convert, encrypt, upload, manifest, verify."
)
@click.argument("vm", required=False, help="VM name or id on the source")
@source_opt
@target_opt
@click.option("-O", "--format", "output_format", default="qcow2", help="Disk format of the export")
@click.option("-o", "--option", multiple=True, help="Format option key=value")
@click.option("--full", is_flag=True, help="Full export even if a previous one exists")
@click.option("--no-verify", is_flag=True, help="Skip re-reading the export")
@key_file_opt
@pass_file_opt
@pass_env_opt
@gpg_opt
@json_opt
@click.option("--estimate", is_flag=True, help="Show the storage cost first and ask (docs/cost.md)")
@click.option("--yes", "-y", is_flag=True, help="With --estimate: do not ask")
def migrate(
    vm: str | None,
    source: str | None,
    target: str | None,
    output_format: str,
    option: tuple[str, ...],
    full: bool,
    no_verify: bool,
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
    as_json: bool,
    estimate: bool = False,
    yes: bool = False,
) -> None:
    if estimate:
        from hypersdk.cli.cost import confirm_migrate_cost

        confirm_migrate_cost(vm, source, target, output_format, yes)
    params = dict(
        source=source,
        target=target,
        vm=vm,
        format=output_format,
        format_options=parse_options(option),
        incremental=not full,
        encryption=encryption_ref(key_file, passphrase_file, passphrase_env, gpg_recipient),
        verify=not no_verify,
    )
    _show(run_flow("migrate-vm", params, progress=not as_json), as_json)


@click.command(help="Incremental backup (what the nightly deployment runs).")
@click.argument("vm", required=False, help="VM name")
@source_opt
@target_opt
@click.option("--full-every", default=7, help="Force a full export after this many deltas")
@key_file_opt
@pass_file_opt
@pass_env_opt
@gpg_opt
@json_opt
def backup(
    vm: str | None,
    source: str | None,
    target: str | None,
    full_every: int,
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
    as_json: bool,
) -> None:
    params = dict(
        vm=vm,
        source=source,
        target=target,
        full_every=full_every,
        encryption=encryption_ref(key_file, passphrase_file, passphrase_env, gpg_recipient),
    )
    _show(run_flow("backup-vm", params, progress=not as_json), as_json)


@click.command(
    help="The main job on the embedded demo VM: create it (first run) or change some of its blocks "
    "(later runs), then export it with the migrate-vm flow (incremental after the first run)."
)
@target_opt
@click.option("-O", "--format", "output_format", default="qcow2")
@click.pass_context
def demo(ctx: click.Context, target: str | None, output_format: str) -> None:
    from hypersdk import config
    from hypersdk.demo import ensure_demo_vm
    from hypersdk.units import human

    state = ensure_demo_vm()
    if state.created:
        click.echo(f"Created demo VM at {state.vm_dir} (sparse {human(384 << 20)} disk)")
    else:
        click.echo(
            f"Demo VM {state.vm_dir}: {state.changed_blocks} blocks changed since the last run"
        )
    ctx.invoke(  # the other options keep their defaults
        migrate,
        vm="demo-vm",
        source=f"local://{state.vm_dir.parent}",
        target=target or config.default_target_url(),
        output_format=output_format,
    )


@vms_app.command("list", help="List the VMs of a source.")
@source_opt
@click.option("--json", "as_json", is_flag=True)
def vms_list(source: str | None, as_json: bool) -> None:
    import json

    from hypersdk import config
    from hypersdk.units import human
    from providers import open_source

    with open_source(source or config.default_source_url()) as src:
        vms = src.list_vms()
    if as_json:
        data = [v.model_dump(mode="json") for v in vms]
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "power", "type", "cpus", "memory", "disks", "CBT")
    for v in vms:
        table.add_row(
            v.name,
            v.power_state,
            v.machine_type or "-",
            str(v.cpus),
            f"{v.memory_mib} MiB",
            ", ".join(f"{d.name} {human(d.capacity)}" for d in v.disks),
            {True: "on", False: "off", None: "-"}[v.cbt_enabled],
        )
    Console(soft_wrap=True).print(table)


def register(group: click.Group) -> None:
    for cmd in (migrate, backup, demo):
        group.add_command(cmd)
    group.add_command(vms_app)
