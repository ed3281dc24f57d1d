"""``hyperctl webhooks deliver|list``: send what the outbox still holds (a receiver that was
down, a run that ended before its events went out), and show what is pending or given up."""

from __future__ import annotations

import json
import time

import click

from hypersdk.cli.common import Group

KEEP_DELIVERED = 7 * 86400.0  # delivered rows kept this long (hyperctl webhooks list)

webhooks_app = Group(
    "webhooks", help="Job event webhooks: the outbox and its delivery.", no_args_is_help=True
)


@webhooks_app.command(
    "deliver",
    help="Deliver the outbox's due events (in order per job, with retries) until it is empty "
    "or TIMEOUT seconds passed; with --forever, keep delivering (a service or a deployment).",
)
@click.option("--timeout", default=60.0, help="Seconds to keep trying in this run")
@click.option("--forever", is_flag=True, help="Never stop (poll every second)")
def deliver(timeout: float, forever: bool) -> None:
    from hypersdk.webhooks import Outbox, Sender, load_endpoints

    endpoints = load_endpoints()
    outbox = Outbox()
    sender = Sender(outbox, endpoints)
    try:
        while True:
            left = sender.drain(timeout if not forever else 60.0, poll=1.0)
            if not forever:
                break
            if not left:
                time.sleep(1.0)
    finally:
        sender.close()
    outbox.purge(KEEP_DELIVERED)
    click.echo(f"{sender.delivered} delivered, {left} pending")


@webhooks_app.command("list", help="Pending (or given-up, or delivered) deliveries.")
@click.option("--state", type=click.Choice(["pending", "dead", "delivered"]), default="pending")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
def list_(state: str, as_json: bool) -> None:
    from hypersdk.webhooks import Outbox

    rows = Outbox().rows(state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{len(rows)} {state}")
    for r in rows:
        click.echo(
            f"{r['event_id']}  {r['endpoint']:<12} {r['event']:<14} job {r['job']}  "
            f"attempts {r['attempts']}  {r['last_error'] or ''}"
        )


def register(group: click.Group) -> None:
    group.add_command(webhooks_app)
