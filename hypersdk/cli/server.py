"""``hyperctl server status|start|stop``: the local Prefect server the run commands start on
first use (see hypersdk.localapi). ``stop`` only ever stops the server this tool started."""

from __future__ import annotations

import time

import click

from hypersdk.cli.common import Group

server_app = Group(
    "server",
    help="The local Prefect server (API + UI) that run commands start on first use.",
    no_args_is_help=True,
)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


@server_app.command("status", help="Show which Prefect API runs use, and the local server's state.")
def status() -> None:
    from hypersdk import localapi

    st = localapi.server_status()
    if st.state is not None:
        s = st.state
        health = "healthy" if st.healthy else "not answering /api/health (starting, or stuck)"
        click.echo(f"Local Prefect server started by hyperctl: running, {health}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started))
        started += f" by {s.started_by or '?'}"
        if s.ready_after is not None:
            started += f", ready in {s.ready_after:.1f} s"
        rows = [
            ("url", s.url),
            ("ui", s.ui_url),
            ("pid", f"{s.pid} (process group {s.pid})"),
            ("uptime", _duration(time.time() - s.started)),
            ("started", started),
            ("database", s.database),
            ("log", s.log),
            ("state", str(localapi.state_path())),
        ]
        for key, value in rows:
            click.echo(f"  {key:<10}{value}")
    else:
        click.echo("No local Prefect server started by hyperctl is running.")
    if st.configured is not None:
        url, where = st.configured
        click.echo(f"Runs use your Prefect API {url} (from {where}).")
    elif st.mode_off:
        click.echo(f"{localapi.MODE_VAR}=off: runs use Prefect's ephemeral mode.")
    elif st.existing is not None:
        click.echo(f"Runs use the Prefect server at {st.existing} (not started by hyperctl).")
    elif st.state is None:
        click.echo("The next run starts one (hyperctl server start does it now).")
    ok = st.configured is not None or st.existing is not None or st.healthy or st.mode_off
    if not ok:
        raise SystemExit(1)


@server_app.command("start", help="Start the local Prefect server now (run commands do it too).")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for a new server to answer [default: 300, or "
    "$HYPERSDK_PREFECT_START_TIMEOUT]",
)
def start(timeout: float | None) -> None:
    from hypersdk import localapi

    configured = localapi.configured_api()
    if configured is not None:
        url, where = configured
        click.echo(f"Runs use your Prefect API {url} (from {where}): nothing to start.")
        return
    started = time.monotonic()
    info = localapi.start_server(_echo_err, timeout)
    if info.how == "existing":
        click.echo(f"A Prefect server not started by hyperctl answers at {info.url}: runs use it.")
    elif info.started:
        click.echo(
            f"Started the local Prefect server: UI {info.ui_url}, API {info.url} "
            f"(pid {info.pid}, {time.monotonic() - started:.1f} s)"
        )
    else:
        click.echo(
            f"The local Prefect server is already running: UI {info.ui_url} (pid {info.pid})"
        )


@server_app.command("stop", help="Stop the local Prefect server this tool started (never another).")
@click.option("--timeout", type=float, default=30.0, help="Seconds before SIGKILL")
def stop(timeout: float) -> None:
    from hypersdk import localapi

    started = time.monotonic()
    state = localapi.stop_server(timeout)
    if state is None:
        click.echo("No local Prefect server started by hyperctl is running.")
        return
    click.echo(
        f"Stopped the local Prefect server (pid {state.pid}, {state.url}) "
        f"in {time.monotonic() - started:.1f} s"
    )


def register(group: click.Group) -> None:
    group.add_command(server_app)
