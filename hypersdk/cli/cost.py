"""``hyperctl cost estimate|compare|project``: what storing an export or running a backup policy
costs, from typed sizes, a VM (sampled in the chosen format) or a backup chain (measured), in
every priced class. Engine: hypersdk.cost (docs/cost.md). Also the estimate ``hyperctl migrate
--estimate`` shows before it spends anything."""

from __future__ import annotations

import json
from typing import Any

import click

from hypersdk.cli.common import Group

cost_app = Group("cost", help="Estimate and compare storage costs.", no_args_is_help=True)

DEFAULT_REGION = {"aws": "us-east-1", "azure": "eastus", "gcp": "us-east1"}
DEFAULT_CLASS = {"aws": "STANDARD", "azure": "HOT", "gcp": "STANDARD"}
SCHEME_PROVIDER = {"s3": "aws", "az": "azure", "azure": "azure", "gs": "gcp", "gcs": "gcp"}


def _workload_options(fn):
    for opt in reversed(
        [
            click.option("--size-gb", type=float, help="Stored size in GB (2**30 bytes)"),
            click.option("--days", type=int, default=30, help="How long it is kept"),
            click.option("--delete-after-days", type=int, help="Deleted after this many days"),
            click.option("--objects", type=int, default=1, help="Objects the size is split in"),
            click.option("--restore-gb", type=float, default=0.0, help="GB read back once"),
            click.option("--restore-day", type=int, help="Day of the restore (default: last)"),
            click.option("--from-chain", "chain_target", help="Target URL of a backup chain"),
            click.option("--from-vm", "vm_source", help="Source URL of a VM to sample"),
            click.option("--vm", help="VM name (with --from-chain or --from-vm)"),
            click.option("-O", "--format", "fmt", default="qcow2", help="Format of --from-vm"),
            click.option(
                "--pricing", "pricing_file", help="CSV of your own prices, laid over ours"
            ),
            click.option("--json", "as_json", is_flag=True, help="JSON on stdout"),
            click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout"),
        ]
    ):
        fn = opt(fn)
    return fn


def _book(pricing_file: str | None):
    from hypersdk.cost.pricing import PriceBook

    return PriceBook.load(pricing_file)


def _workload(opts: dict[str, Any]):
    """The workload the options describe: typed, from a chain, or from a VM."""
    from hypersdk.cost.model import Restore, typed
    from hypersdk.errors import InvalidParameterError

    days = opts["days"]
    if days is None or days < 1:
        raise InvalidParameterError(f"--days must be >= 1, got {days}")
    given = [k for k in ("size_gb", "chain_target", "vm_source") if opts.get(k) is not None]
    if len(given) != 1:
        raise InvalidParameterError("give one of --size-gb, --from-chain or --from-vm")
    if opts.get("size_gb") is not None:
        return typed(
            opts["size_gb"],
            days,
            opts.get("delete_after_days"),
            opts.get("objects") or 1,
            opts.get("restore_gb") or 0.0,
            opts.get("restore_day"),
        )
    if not opts.get("vm"):
        raise InvalidParameterError("name the VM (--vm NAME)")
    if opts.get("chain_target"):
        from hypersdk.cost.measure import chain_workload
        from providers import open_target

        with open_target(opts["chain_target"]) as target:
            workload, _ = chain_workload(target, opts["vm"], days)
    else:
        from hypersdk.cost.measure import vm_facts, vm_workload
        from providers import open_source

        with open_source(opts["vm_source"]) as source:
            workload = vm_workload(vm_facts(source, opts["vm"], opts["fmt"]), days)
    if opts.get("restore_gb"):
        from hypersdk.cost.model import GiB

        day = days if opts.get("restore_day") is None else opts["restore_day"]
        workload.restores.append(Restore(day, opts["restore_gb"] * GiB))
        workload.__post_init__()
    return workload


def _emit_frame(frame, as_json: bool, as_csv: bool) -> None:
    if as_csv:
        click.echo(frame.to_csv(index=False), nl=False)
    elif as_json:
        click.echo(frame.to_json(orient="records", indent=2))
    else:
        click.echo(frame.to_string(index=False, float_format=lambda v: f"{v:,.4f}"))


def _show_estimate(est, as_json: bool, as_csv: bool) -> None:
    if as_json:
        click.echo(json.dumps(est.to_dict(), indent=2))
        return
    if as_csv:
        click.echo(est.monthly.to_csv(index=False), nl=False)
        return
    d = est.to_dict()
    click.echo(f"{est.prices.label}: {est.workload.label}")
    for k, v in d["breakdown"].items():
        click.echo(f"  {k.replace('_', ' '):<15} {v:>14,.4f} USD")
    click.echo(f"  {'total':<15} {d['total']:>14,.4f} USD")


@cost_app.command("estimate", help="Cost of one class: breakdown, total and months (USD).")
@click.option("--provider", required=True, help="aws, azure or gcp")
@click.option("--class", "storage_class", required=True, help="Storage class, e.g. STANDARD")
@click.option("--region", required=True, help="Region, e.g. us-east-1")
@click.option("--redundancy", help="Azure: LRS (default) or GRS")
@_workload_options
def estimate_cmd(
    provider: str, storage_class: str, region: str, redundancy: str | None, **opts: Any
) -> None:
    from hypersdk.cost.model import estimate

    workload = _workload(opts)
    prices = _book(opts["pricing_file"]).prices(provider, region, storage_class, redundancy)
    _show_estimate(estimate(prices, workload), opts["as_json"], opts["as_csv"])


@cost_app.command("compare", help="Every priced class side by side, cheapest first.")
@click.option("--provider", "providers", multiple=True, help="Only these providers")
@click.option("--region", "regions", multiple=True, help="Only these regions")
@click.option("--chart", "chart_file", help="Write a PNG of cumulative cost per class here")
@click.option("--markdown", is_flag=True, help="A markdown table on stdout")
@_workload_options
def compare_cmd(
    providers: tuple[str, ...],
    regions: tuple[str, ...],
    chart_file: str | None,
    markdown: bool,
    **opts: Any,
) -> None:
    from hypersdk.cost.compare import chart, compare, markdown_table

    workload = _workload(opts)
    summary, series = compare(
        _book(opts["pricing_file"]), {workload.label: workload}, providers, regions
    )
    if chart_file:
        chart(series, chart_file, f"Cumulative cost: {workload.label}")
    if markdown:
        click.echo(markdown_table(summary), nl=False)
        return
    _emit_frame(summary, opts["as_json"], opts["as_csv"])


@cost_app.command(
    "project", help="A backup policy simulated day by day: month-by-month cost of one class."
)
@click.option("--provider", required=True)
@click.option("--class", "storage_class", required=True)
@click.option("--region", required=True)
@click.option("--redundancy")
@click.option("--full-gb", type=float, help="Stored size of a full backup in GB")
@click.option("--change-rate", default="3%", help="Daily change, of a full's size: 3% or 0.03")
@click.option("--full-every", type=int, default=7, help="A full after this many deltas")
@click.option("--keep-last", type=int)
@click.option("--keep-daily", type=int)
@click.option("--keep-weekly", type=int)
@click.option("--keep-monthly", type=int)
@click.option("--days", type=int, default=365, help="Days simulated")
@click.option("--from-chain", "chain_target", help="Measure full size and change rate here")
@click.option("--vm", help="VM name (with --from-chain)")
@click.option("--chart", "chart_file", help="Write a PNG of the cumulative cost here")
@click.option("--pricing", "pricing_file")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
def project_cmd(**o: Any) -> None:
    from hypersdk.cost.model import GiB, estimate
    from hypersdk.cost.policy import simulate
    from hypersdk.errors import InvalidParameterError
    from hypersdk.repository.retention import RetentionPolicy

    if o["days"] is None or o["days"] < 1:
        raise InvalidParameterError(f"--days must be >= 1, got {o['days']}")
    prices = _book(o["pricing_file"]).prices(
        o["provider"], o["region"], o["storage_class"], o["redundancy"]
    )
    if o["chain_target"]:
        from hypersdk.cost.measure import chain_facts
        from providers import open_target

        if not o["vm"]:
            raise InvalidParameterError("name the VM (--vm NAME)")
        with open_target(o["chain_target"]) as target:
            facts = chain_facts(target, o["vm"])
        full, rate = facts.full_stored_bytes, facts.change_rate
    else:
        if o["full_gb"] is None or o["full_gb"] < 0:
            raise InvalidParameterError("give --full-gb (>= 0) or --from-chain")
        full, rate = o["full_gb"] * GiB, _rate(o["change_rate"])
    keeps = {k: o[k] for k in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")}
    policy = RetentionPolicy(**keeps) if any(v is not None for v in keeps.values()) else None
    label = f"daily backups, {rate:.2%} change, full every {o['full_every']}" + (
        f", {policy.describe()}" if policy else ", nothing forgotten"
    )
    workload = simulate(full, full * rate, o["days"], policy, o["full_every"], label=label)
    est = estimate(prices, workload)
    if o["chart_file"]:
        from hypersdk.cost.compare import chart

        series = est.monthly[["month", "cumulative"]].assign(scenario=label, label=prices.label)
        chart(series, o["chart_file"], label)
    if o["as_json"]:
        click.echo(json.dumps(est.to_dict(), indent=2))
    else:
        _emit_frame(est.monthly, False, o["as_csv"])


def _rate(text: str) -> float:
    from hypersdk.errors import InvalidParameterError

    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InvalidParameterError(f"--change-rate {text!r} is not 3% or 0.03") from None
    if not 0 <= value <= 1:
        raise InvalidParameterError(f"--change-rate {text!r} must be between 0 and 100%")
    return value


def target_class(target_url: str) -> tuple[str, str, str] | None:
    """(provider, region, class) a target URL stores into; None for a local target. The region
    and class come from the URL's query (?region=..., ?storage_class=...) or the defaults."""
    from providers import split_options

    scheme = target_url.split("://", 1)[0].lower() if "://" in target_url else "file"
    provider = SCHEME_PROVIDER.get(scheme)
    if provider is None:
        return None
    _, options = split_options(target_url)
    region = str(options.get("region") or DEFAULT_REGION[provider])
    cls = str(options.get("storage_class") or options.get("tier") or DEFAULT_CLASS[provider])
    return provider, region, cls


def confirm_migrate_cost(
    vm: str | None, source: str | None, target: str | None, fmt: str, yes: bool
) -> None:
    """``hyperctl migrate --estimate``: the VM sampled in ``fmt``, its first month in the
    target's class, then a question (``--yes`` skips it); a no ends the command, nothing spent."""
    from hypersdk import config
    from hypersdk.cost.measure import vm_facts, vm_workload
    from hypersdk.cost.model import GiB, estimate
    from hypersdk.errors import InvalidParameterError
    from providers import open_source

    if not vm:
        raise InvalidParameterError("name the VM to estimate (hyperctl migrate VM --estimate)")
    with open_source(source or config.default_source_url()) as src:
        facts = vm_facts(src, vm, fmt)
    where = target_class(target or config.default_target_url())
    gb = facts.estimated_stored_bytes / GiB
    click.echo(
        f"estimate: {vm} in {fmt}: {facts.allocated_bytes / GiB:,.3f} GB allocated, "
        f"about {gb:,.3f} GB stored (ratio {facts.stored_ratio:.3f} from "
        f"{facts.sampled_bytes / GiB:,.3f} GB sampled)",
        err=True,
    )
    if where is None:
        click.echo("estimate: local target: no cloud storage charges", err=True)
        return
    est = estimate(_book(None).prices(*where), vm_workload(facts, 30))
    b = est.breakdown
    click.echo(
        f"estimate: {est.prices.label}, first 30 days: {est.total:,.4f} USD "
        f"(storage {b['storage']:,.4f}, requests {b['requests']:,.4f})",
        err=True,
    )
    if not yes and not click.confirm("Go ahead and export?", default=False, err=True):
        raise click.exceptions.Abort()


def register(group: click.Group) -> None:
    group.add_command(cost_app)
