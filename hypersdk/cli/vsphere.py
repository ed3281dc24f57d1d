"""vSphere commands: ``hyperctl cbt enable VM --source URL``, ``hyperctl cbt status VM --source URL``,
``hyperctl export-ovf VM DIR --source URL`` (ExportVm/NFC, powered-off VMs),
``hyperctl export-ova VM FILE --source URL`` (from a snapshot, running VMs too).

Credentials come from the environment as govc documents it (GOVC_URL, GOVC_USERNAME,
GOVC_PASSWORD, GOVC_INSECURE) or ``--secret BLOCK`` (a Prefect Secret block); never from argv.
"""

from __future__ import annotations

import functools
import json

import click

from hypersdk.cli.common import Group

cbt_app = Group("cbt", help="Changed Block Tracking on vSphere VMs.", no_args_is_help=True)

json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output")


def vsphere_source(command):
    """The connection options every vSphere command takes (--source, --secret, --insecure),
    handed to ``command`` as one ``connect()`` that opens the source."""

    @functools.wraps(command)
    def run(source: str, secret: str | None, insecure: bool, **kwargs):
        return command(lambda: _open(source, secret, insecure), **kwargs)

    run = click.option(
        "--insecure", is_flag=True, help="Skip TLS certificate verification (like GOVC_INSECURE=1)"
    )(run)
    run = click.option("--secret", help="Prefect Secret block holding the login")(run)
    return click.option(
        "--source", "-s", required=True, help="vsphere://host[:port][/Datacenter/vm/path]"
    )(run)


def _open(source: str, secret: str | None, insecure: bool):
    from hypersdk.errors import InvalidParameterError
    from providers import open_source

    if not source.startswith("vsphere://"):
        raise InvalidParameterError(f"vSphere commands need a vsphere:// source, not {source!r}")
    options: dict = {"secret": secret} if secret else {}
    if insecure:
        options["insecure"] = True
    return open_source(source, **options)


@cbt_app.command(
    "enable",
    help="Enable CBT (ReconfigVM) and activate it with a snapshot create/remove (stun/unstun).",
)
@click.argument("vm", help="VM name or moref (vm-42)")
@vsphere_source
@click.option("--no-stun", is_flag=True, help="Skip the snapshot create/remove that activates CBT")
def cbt_enable(connect, vm: str, no_stun: bool) -> None:
    with connect() as src:
        changed = src.enable_cbt(vm, stun=not no_stun)
        state = src.cbt_status(vm)
    verb = "enabled" if changed else "already enabled"
    click.echo(f"CBT {verb} on {state['vm']} ({state['moref']})")


@cbt_app.command("status", help="Show whether CBT is on and each disk's current change id.")
@click.argument("vm", help="VM name or moref (vm-42)")
@vsphere_source
@json_opt
def cbt_status(connect, vm: str, as_json: bool) -> None:
    with connect() as src:
        state = src.cbt_status(vm)
    if as_json:
        click.echo(json.dumps(state, indent=2, ensure_ascii=False))
        return
    click.echo(
        f"{state['vm']} ({state['moref']}): CBT {'enabled' if state['enabled'] else 'disabled'}"
    )
    for disk, change_id in state["disks"].items():
        click.echo(f"  {disk}: change id {change_id or '-'}")


@click.command(
    "export-ovf",
    help="Export a powered-off vSphere VM as OVF through ExportVm (NFC lease kept alive).",
)
@click.argument("vm", help="VM name or moref (must be powered off)")
@click.argument("dest", help="Directory for the .ovf, disks and .mf")
@vsphere_source
def export_ovf(connect, vm: str, dest: str) -> None:
    with connect() as src:
        written = src.export_ovf(vm, dest)
    click.echo(f"OVF written: {written['ovf']}")


@click.command(
    "export-ova",
    help="Export a vSphere VM as one OVA file from a snapshot (streamOptimized VMDK disks).",
)
@click.argument("vm", help="VM name or moref (may be running)")
@click.argument("dest", help="Output .ova file")
@vsphere_source
def export_ova(connect, vm: str, dest: str) -> None:
    with connect() as src:
        written = src.export_ova(vm, dest)
    click.echo(f"OVA written: {written['ova']} ({written['size']} bytes)")


def register(group: click.Group) -> None:
    group.add_command(cbt_app)
    group.add_command(export_ovf)
    group.add_command(export_ova)
