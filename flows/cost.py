"""estimate_cost: a workload (typed, or measured from a backup chain) priced in every class,
published as a table artifact (one row per class, cheapest first) and a markdown artifact with
the comparison and the chart of cumulative cost inline (also a PNG under $HYPERSDK_HOME/cost).
The work is hypersdk.cost; this flow gives it the run's logs and the artifacts."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.logs import route_engine_logs
from hypersdk.errors import InvalidParameterError

SizeGb = Annotated[float | None, Field(ge=0, le=1e9)]
Days = Annotated[int, Field(ge=1, le=36500)]

route_engine_logs()


def _data_uri(png: Path) -> str:
    """The chart inline: the UI shows a markdown artifact's data-URI image (a file:// link to
    the worker's disk would open nothing in a browser)."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _chart_dir() -> Path:
    from hypersdk import config

    out = config.home() / "cost"
    out.mkdir(parents=True, exist_ok=True)
    return out


@flow(name="estimate-cost", log_prints=True, validate_parameters=True)
def estimate_cost(
    size_gb: SizeGb = None,
    days: Days = 365,
    restore_gb: SizeGb = 0.0,
    chain_target: str | None = None,
    vm: str | None = None,
    providers: list[str] | None = None,
    regions: list[str] | None = None,
    pricing_file: str | None = None,
) -> list[dict[str, Any]]:
    """Compare what a workload costs in every priced storage class.

    Args:
        size_gb: Stored size in GB (2**30 bytes), kept for ``days``; or use chain_target.
        days: How long the data is kept (months of 30 days).
        restore_gb: GB read back (and out of the cloud) once, on the last day.
        chain_target: Target URL of a backup repository: its actual stored objects are priced.
        vm: The VM whose chain to measure (with chain_target).
        providers: Only these providers (aws, azure, gcp).
        regions: Only these regions.
        pricing_file: A CSV of your own prices laid over the built-in ones (docs/cost.md).
    """
    from hypersdk.cost.compare import chart, compare, markdown_table
    from hypersdk.cost.model import GiB, Restore, typed
    from hypersdk.cost.pricing import PriceBook

    logger = get_run_logger()
    book = PriceBook.load(pricing_file)
    if chain_target:
        if not vm:
            raise InvalidParameterError("name the VM whose chain to measure (vm=NAME)")
        from hypersdk.cost.measure import chain_workload
        from providers import open_target

        with open_target(chain_target) as target:
            workload, facts = chain_workload(target, vm, days)
        logger.info(
            "chain of %s: %d objects, %d bytes stored, change rate %.4f/day",
            vm,
            facts.objects,
            facts.stored_bytes,
            facts.change_rate,
        )
        if restore_gb:
            workload.restores.append(Restore(days, restore_gb * GiB))
    elif size_gb is not None:
        workload = typed(size_gb, days, restore_gb=restore_gb or 0.0)
    else:
        raise InvalidParameterError("give size_gb or chain_target")
    summary, series = compare(book, {workload.label: workload}, providers, regions)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    png = chart(series, _chart_dir() / f"cost-{stamp}.png", f"Cumulative cost: {workload.label}")
    rows = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        for r in summary.to_dict("records")
    ]
    create_table_artifact(
        rows, key="cost-comparison", description=f"{workload.label}: every class, cheapest first"
    )
    best = summary[summary["cheapest"]].iloc[0]
    create_markdown_artifact(
        f"# Cost of {workload.label}\n\n"
        + markdown_table(summary)
        + f"\n![Cumulative cost per class]({_data_uri(png)})\n\n"
        + f"The chart is also at `{png}` on the worker.\n\n"
        "Prices: built-in price book (a source URL and date on every row"
        + (f", overridden by {pricing_file}" if pricing_file else "")
        + "); months of 30 days; see docs/cost.md.\n",
        key="cost-report",
        description=f"cheapest: {best['provider']} {best['region']} {best['class']}",
    )
    print(
        f"cheapest for {workload.label}: {best['provider']} {best['region']} {best['class']} "
        f"{best['total']:.2f} USD; chart {png}"
    )
    return rows
