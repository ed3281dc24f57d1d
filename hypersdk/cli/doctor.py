"""``hyperctl doctor``: one line per check of what runs and fleet operations need (the Prefect
API, work pool and workers, concurrency limits, credentials, free space, tool versions); exit 0
when nothing failed, 1 when a check failed, 2 for bad usage. hypersdk.doctor does the work."""

from __future__ import annotations

import json

import click

MARKS = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
COLOURS = {"ok": "green", "warn": "yellow", "fail": "red", "skip": None}


@click.command(
    "doctor",
    help="Check the Prefect API, work pool, workers, concurrency limits, the credentials of "
    "each source and target (never shown), free space and tool versions. Exit 1 if any "
    "check fails.",
)
@click.option("--source", "sources", multiple=True, metavar="URL", help="Also check this source")
@click.option("--target", "targets", multiple=True, metavar="URL", help="Also check this target")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 600),
    default=15.0,
    help="Seconds before a check that does not answer counts as failed",
)
@click.option(
    "--min-free",
    type=click.FloatRange(0, None),
    default=10.0,
    metavar="GIB",
    help="Warn when a place runs write to has less free space (GiB)",
)
def doctor(
    sources: tuple[str, ...],
    targets: tuple[str, ...],
    as_json: bool,
    timeout: float,
    min_free: float,
) -> None:
    from hypersdk.doctor import Options, diagnose, worst

    results = diagnose(Options(list(sources), list(targets), timeout, min_free, export_api=True))
    verdict = worst(results)
    if as_json:
        counts = {s: sum(r.status == s for r in results) for s in MARKS}
        click.echo(
            json.dumps(
                {"status": verdict, "counts": counts, "checks": [r.as_dict() for r in results]},
                indent=2,
            )
        )
    else:
        width = min(44, max(len(r.name) for r in results))
        for r in results:
            mark = click.style(
                f"{MARKS[r.status]:<4}", fg=COLOURS[r.status], bold=r.status == "fail"
            )
            line = f"{mark}  {r.name:<{width}}  {r.detail}"
            if r.hint and r.status in ("warn", "fail"):
                line += f"  -> {r.hint}"
            click.echo(line)
        failed = sum(r.status == "fail" for r in results)
        warned = sum(r.status == "warn" for r in results)
        click.echo(f"{len(results)} checks: {failed} failed, {warned} warnings")
    if verdict == "fail":
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(doctor)
