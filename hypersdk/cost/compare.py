"""Every priced class side by side for the same workloads: pandas frames, sorted, the cheapest
of each scenario marked, as a markdown table and a chart of cumulative cost per class."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from hypersdk.cost.model import CATEGORIES, Estimate, Workload, estimate
from hypersdk.cost.pricing import PriceBook


def estimates(
    book: PriceBook,
    workload: Workload,
    providers: Iterable[str] | None = None,
    regions: Iterable[str] | None = None,
) -> list[Estimate]:
    """The workload priced in every class of the book (narrowed to providers/regions)."""
    classes = book.classes()
    if providers:
        classes = classes[classes["provider"].isin([p.lower() for p in providers])]
    if regions:
        classes = classes[classes["region"].isin(list(regions))]
    return [
        estimate(book.prices(r["provider"], r["region"], r["class"], r["redundancy"]), workload)
        for r in classes.to_dict("records")
    ]


def compare(
    book: PriceBook,
    scenarios: Mapping[str, Workload],
    providers: Iterable[str] | None = None,
    regions: Iterable[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, series): one summary row per scenario and class (breakdown, total, cheapest),
    sorted by scenario then total; the month-by-month cumulative cost of every row."""
    rows, series = [], []
    for name, workload in scenarios.items():
        for e in estimates(book, workload, providers, regions):
            p = e.prices
            rows.append(
                {
                    "scenario": name,
                    "provider": p.provider,
                    "region": p.region,
                    "class": p.storage_class,
                    "redundancy": p.redundancy,
                    **e.breakdown,
                    "total": e.total,
                }
            )
            s = e.monthly[["month", "cumulative"]].copy()
            s["scenario"], s["label"] = name, p.label
            series.append(s)
    summary = pd.DataFrame(rows)
    if summary.empty:
        from hypersdk.errors import InvalidParameterError

        raise InvalidParameterError("no priced class matches the given providers and regions")
    summary = summary.sort_values(["scenario", "total", "provider", "region", "class"])
    summary = summary.reset_index(drop=True)
    cheapest = summary.groupby("scenario")["total"].transform("min")
    summary["cheapest"] = summary["total"] <= cheapest + 1e-12
    return summary, pd.concat(series, ignore_index=True)


def markdown_table(summary: pd.DataFrame, limit: int | None = None) -> str:
    """The summary as a markdown table (USD, cents), the cheapest of each scenario in bold; the
    scenario column only when there are several (one is the table's heading)."""
    several = summary["scenario"].nunique() > 1
    head = [*(["scenario"] if several else []), "class", *CATEGORIES, "total"]
    text_columns = len(head) - len(CATEGORIES) - 1
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |"]
    lines.append("|" + "---|" * text_columns + "---:|" * (len(head) - text_columns))
    rows = summary if limit is None else summary.groupby("scenario").head(limit)
    for r in rows.to_dict("records"):
        red = "" if r["redundancy"] in ("-", "*") else f" {r['redundancy']}"
        label = f"{r['provider']} {r['region']} {r['class']}{red}"
        cells = [f"{r[c]:,.2f}" for c in (*CATEGORIES, "total")]
        if r["cheapest"]:
            label, cells[-1] = f"**{label}** (cheapest)", f"**{cells[-1]}**"
        lines.append(
            "| " + " | ".join([*([r["scenario"]] if several else []), label, *cells]) + " |"
        )
    return "\n".join(lines) + "\n"


def chart(series: pd.DataFrame, out: str | Path, title: str = "Cumulative cost") -> Path:
    """A PNG of cumulative cost over the months, one line per class (and scenario)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    several = series["scenario"].nunique() > 1
    groups = list(series.groupby(["scenario", "label"], sort=False))
    groups.sort(key=lambda g: -g[1]["cumulative"].iloc[-1])  # legend in the lines' end order
    colours = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    fig, ax = plt.subplots(figsize=(11, 6), dpi=100)
    try:
        for i, ((scenario, label), s) in enumerate(groups):
            name = f"{scenario}: {label}" if several else label
            months = [0, *s["month"]]
            cost = [0.0, *s["cumulative"]]
            colour, style = colours[i % len(colours)], styles[(i // len(colours)) % len(styles)]
            ax.plot(months, cost, label=name, color=colour, linestyle=style, linewidth=1.4)
        ax.set_xlabel("month (30 days)")
        ax.set_ylabel("cumulative cost, USD")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
