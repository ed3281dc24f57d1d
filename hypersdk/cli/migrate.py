"""Run commands: ``hyperctl migrate``, ``hyperctl backup``, ``hyperctl demo``, ``hyperctl verify``,
``hyperctl vms list``. These run the Prefect flows in-process (ephemeral API unless
PREFECT_API_URL points at a server)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hypersdk import config, progress
from hypersdk.cli.common import parse_options, progress_bar
from hypersdk.units import human

if TYPE_CHECKING:  # pydantic-backed modules load when a command runs, not at CLI start-up
    from hypersdk.summary import MigrationResult

out = Console(soft_wrap=True)
vms_app = typer.Typer(help="Inventory of a source.", no_args_is_help=True)

SourceOpt = Annotated[
    str | None, typer.Option("--source", "-s", help="Source URL (default: local demo VMs)")
]
TargetOpt = Annotated[
    str | None, typer.Option("--target", "-t", help="Target URL (default: local exports)")
]
KeyFileOpt = Annotated[
    str | None, typer.Option("--key-file", help="Encrypt with a 32-byte key file")
]
PassFileOpt = Annotated[
    str | None, typer.Option("--passphrase-file", help="Encrypt with the passphrase in this file")
]
PassEnvOpt = Annotated[
    str | None, typer.Option("--passphrase-env", help="Encrypt with the passphrase in this env var")
]
GpgOpt = Annotated[
    str | None, typer.Option("--gpg-recipient", help="Encrypt with GPG to this recipient")
]


def encryption_ref(
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
) -> dict[str, Any] | None:
    """A key *reference* for the flow parameters: where the key is, never the key itself."""
    from hypersdk.errors import InvalidParameterError

    given = [x for x in (key_file, passphrase_file, passphrase_env, gpg_recipient) if x]
    if len(given) > 1:
        raise InvalidParameterError(
            "choose one of --key-file, --passphrase-file, --passphrase-env, --gpg-recipient"
        )
    if key_file:
        return {"method": "keyfile", "ref": key_file}
    if passphrase_file:
        return {"method": "passphrase", "ref": passphrase_file}
    if passphrase_env:
        return {"method": "env", "ref": passphrase_env}
    if gpg_recipient:
        return {"method": "gpg", "ref": gpg_recipient}
    return None


@contextlib.contextmanager
def live_progress(enabled: bool) -> Iterator[None]:
    """Draw one bar per pipeline stage from the in-process progress bus."""
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


def _show(result: MigrationResult) -> None:
    from hypersdk.summary import render_text

    out.print(render_text(result), highlight=False, soft_wrap=True)


def migrate(
    vm: Annotated[
        str | None, typer.Argument(help="VM name (optional if the source holds one VM)")
    ] = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    output_format: Annotated[
        str, typer.Option("-O", "--format", help="Disk format of the export")
    ] = "qcow2",
    option: Annotated[
        list[str] | None, typer.Option("-o", "--option", help="Format option key=value")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Full export even if a previous one exists")
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip re-reading the export")
    ] = False,
    key_file: KeyFileOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = None,
    gpg_recipient: GpgOpt = None,
) -> None:
    """Export a VM: snapshot, CBT diff, download, convert, encrypt, upload, manifest, verify."""
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
    from hypersdk.requests import validate_request

    validate_request(**params)  # fail fast, before a flow run (and an API server) starts

    from flows.migrate import migrate_vm

    with live_progress(sys.stderr.isatty()):
        result = migrate_vm(**params)
    _show(result)


def backup(
    vm: Annotated[str | None, typer.Argument(help="VM name")] = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    full_every: Annotated[int, typer.Option(help="Force a full export after this many deltas")] = 7,
    key_file: KeyFileOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = None,
    gpg_recipient: GpgOpt = None,
) -> None:
    """Incremental backup (what the nightly deployment runs)."""
    params = dict(
        vm=vm,
        source=source,
        target=target,
        full_every=full_every,
        encryption=encryption_ref(key_file, passphrase_file, passphrase_env, gpg_recipient),
    )
    from hypersdk.requests import validate_request

    validate_request(**params)

    from flows.backup import backup_vm

    with live_progress(sys.stderr.isatty()):
        result = backup_vm(**params)
    _show(result)


def demo(
    target: TargetOpt = None,
    output_format: Annotated[str, typer.Option("-O", "--format")] = "qcow2",
) -> None:
    """The main job on the embedded demo VM: create it (first run) or change some of its blocks
    (later runs), then export it with the migrate-vm flow (incremental after the first run)."""
    from hypersdk.demo import ensure_demo_vm

    state = ensure_demo_vm()
    if state.created:
        out.print(
            f"Created demo VM at {state.vm_dir} (sparse {human(384 << 20)} disk)", highlight=False
        )
    else:
        out.print(
            f"Demo VM {state.vm_dir}: {state.changed_blocks} blocks changed since the last run",
            highlight=False,
        )
    migrate(
        vm="demo-vm",
        source=f"local://{state.vm_dir.parent}",
        target=target or config.default_target_url(),
        output_format=output_format,
    )


def verify(
    manifest: Annotated[
        str, typer.Argument(help="Manifest key on the target, e.g. VM/EXPORT_ID/manifest.json")
    ],
    target: TargetOpt = None,
    key_file: KeyFileOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Re-read an export and check every hash in its manifest."""
    from hypersdk.verify import verify_export
    from providers import open_target

    enc = encryption_ref(key_file, passphrase_file, passphrase_env, None)
    if enc is not None:
        from hypersdk.crypto import KeySpec

        enc = KeySpec.model_validate(enc)
    with open_target(target or config.default_target_url()) as t:
        verdicts = verify_export(t, manifest, enc)
    for v in verdicts:
        out.print(f"{v.key}: OK ({v.chunks_checked} chunks)", highlight=False)


@vms_app.command("list")
def vms_list(
    source: SourceOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the VMs of a source."""
    from providers import open_source

    with open_source(source or config.default_source_url()) as src:
        vms = src.list_vms()
    if as_json:
        out.print_json(data=[v.model_dump(mode="json") for v in vms])
        return
    table = Table("name", "power", "cpus", "memory", "disks", "CBT")
    for v in vms:
        table.add_row(
            v.name,
            v.power_state,
            str(v.cpus),
            f"{v.memory_mib} MiB",
            ", ".join(f"{d.name} {human(d.capacity)}" for d in v.disks),
            {True: "on", False: "off", None: "-"}[v.cbt_enabled],
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(migrate)
    app.command()(backup)
    app.command()(demo)
    app.command()(verify)
    app.add_typer(vms_app, name="vms")
