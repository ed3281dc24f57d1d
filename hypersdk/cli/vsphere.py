"""vSphere commands: ``hyperctl cbt enable VM --source URL``, ``hyperctl cbt status VM --source URL``,
``hyperctl export-ovf VM DIR --source URL`` (ExportVm/NFC, powered-off VMs),
``hyperctl export-ova VM FILE --source URL`` (from a snapshot, running VMs too).

Credentials come from the environment as govc documents it (GOVC_URL, GOVC_USERNAME,
GOVC_PASSWORD, GOVC_INSECURE) or ``--secret BLOCK`` (a Prefect Secret block); never from argv.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from hypersdk.errors import InvalidParameterError

out = Console(soft_wrap=True)
cbt_app = typer.Typer(help="Changed Block Tracking on vSphere VMs.", no_args_is_help=True)

SourceOpt = Annotated[
    str, typer.Option("--source", "-s", help="vsphere://host[:port][/Datacenter/vm/path]")
]
SecretOpt = Annotated[
    str | None, typer.Option("--secret", help="Prefect Secret block holding the login")
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="Skip TLS certificate verification (like GOVC_INSECURE=1)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _open(source: str, secret: str | None, insecure: bool):
    from providers import open_source

    if not source.startswith("vsphere://"):
        raise InvalidParameterError(f"CBT commands need a vsphere:// source, not {source!r}")
    options: dict = {"secret": secret} if secret else {}
    if insecure:
        options["insecure"] = True
    return open_source(source, **options)


@cbt_app.command("enable")
def cbt_enable(
    vm: Annotated[str, typer.Argument(help="VM name or moref (vm-42)")],
    source: SourceOpt,
    secret: SecretOpt = None,
    insecure: InsecureOpt = False,
    no_stun: Annotated[
        bool, typer.Option("--no-stun", help="Skip the snapshot create/remove that activates CBT")
    ] = False,
) -> None:
    """Enable CBT (ReconfigVM) and activate it with a snapshot create/remove (stun/unstun)."""
    with _open(source, secret, insecure) as src:
        changed = src.enable_cbt(vm, stun=not no_stun)
        state = src.cbt_status(vm)
    verb = "enabled" if changed else "already enabled"
    out.print(f"CBT {verb} on {state['vm']} ({state['moref']})", highlight=False)


@cbt_app.command("status")
def cbt_status(
    vm: Annotated[str, typer.Argument(help="VM name or moref (vm-42)")],
    source: SourceOpt,
    secret: SecretOpt = None,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show whether CBT is on and each disk's current change id."""
    with _open(source, secret, insecure) as src:
        state = src.cbt_status(vm)
    if as_json:
        out.print_json(json.dumps(state))
        return
    out.print(
        f"{state['vm']} ({state['moref']}): CBT {'enabled' if state['enabled'] else 'disabled'}",
        highlight=False,
    )
    for disk, change_id in state["disks"].items():
        out.print(f"  {disk}: change id {change_id or '-'}", highlight=False)


def export_ovf(
    vm: Annotated[str, typer.Argument(help="VM name or moref (must be powered off)")],
    dest: Annotated[str, typer.Argument(help="Directory for the .ovf, disks and .mf")],
    source: SourceOpt,
    secret: SecretOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Export a powered-off vSphere VM as OVF through ExportVm (NFC lease kept alive)."""
    with _open(source, secret, insecure) as src:
        written = src.export_ovf(vm, dest)
    out.print(f"OVF written: {written['ovf']}", highlight=False)


def export_ova(
    vm: Annotated[str, typer.Argument(help="VM name or moref (may be running)")],
    dest: Annotated[str, typer.Argument(help="Output .ova file")],
    source: SourceOpt,
    secret: SecretOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Export a vSphere VM as one OVA file from a snapshot (streamOptimized VMDK disks)."""
    with _open(source, secret, insecure) as src:
        written = src.export_ova(vm, dest)
    out.print(f"OVA written: {written['ova']} ({written['size']} bytes)", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cbt_app, name="cbt")
    app.command("export-ovf")(export_ovf)
    app.command("export-ova")(export_ova)
