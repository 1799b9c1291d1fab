"""The comparison report: losses per method and task, multipliers, and a plot.

Input is the long table of evaluation results, one row per (method, budget, seed, task)
with the loss. Output: a summary (mean and sd over seeds), each method's compute multiplier
against the random curve, a wide method x task table for people, and a PNG.
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl

from dsdm.evaluation import compute_multiplier

RANDOM = "random"


def summarise(results: pl.DataFrame) -> pl.DataFrame:
    """Mean and sd (over seeds) of the loss per method, budget and task."""
    return (
        results.group_by("method", "budget", "task")
        .agg(pl.col("loss").mean().alias("loss"), pl.col("loss").std(ddof=0).alias("sd"),
             pl.len().alias("seeds"))
        .sort("task", "method", "budget")
    )


def multipliers(summary: pl.DataFrame) -> pl.DataFrame:
    """Each non-random method's multiplier per task against the random curve at 1x, 2x, ..."""
    curve = summary.filter(pl.col("method") == RANDOM).sort("budget")
    rows = []
    for row in summary.filter((pl.col("method") != RANDOM) & (pl.col("budget") == 1.0)).iter_rows(named=True):
        points = curve.filter(pl.col("task") == row["task"])
        if points.height < 2:
            raise ValueError(f"task {row['task']!r}: the random curve needs at least two budgets")
        found = compute_multiplier(points["budget"].to_list(), points["loss"].to_list(), row["loss"])
        rows.append({"method": row["method"], "task": row["task"], "multiplier": found.value,
                     "extrapolated": found.extrapolated})
    return pl.DataFrame(rows, schema={"method": pl.String, "task": pl.String,
                                      "multiplier": pl.Float64, "extrapolated": pl.Boolean})


def wide_table(summary: pl.DataFrame, mults: pl.DataFrame) -> pl.DataFrame:
    """One row per method@budget: 'loss +- sd' per task, then the multiplier per task."""
    cells = summary.with_columns(
        pl.when(pl.col("budget") == 1.0).then(pl.col("method"))
        .otherwise(pl.col("method") + "@" + pl.col("budget").map_elements(_fmt_budget, pl.String))
        .alias("selection"),
        pl.format("{} ± {}", pl.col("loss").round(4), pl.col("sd").fill_null(0).round(4)).alias("cell"),
    )
    table = cells.pivot(on="task", index="selection", values="cell", sort_columns=True)
    if mults.height:
        factor = mults.with_columns(pl.format(
            "{}{}", pl.col("multiplier").round(2),
            pl.when(pl.col("extrapolated")).then(pl.lit(" (extrap.)")).otherwise(pl.lit(""))))
        factor = factor.pivot(on="task", index="method", values="multiplier", sort_columns=True)
        factor = factor.rename({c: f"x {c}" for c in factor.columns if c != "method"})
        table = table.join(factor.rename({"method": "selection"}), on="selection", how="left")
    return table.sort("selection").fill_null("")


def _fmt_budget(budget: float) -> str:
    return f"{budget:g}x"


def plot_png(summary: pl.DataFrame, title: str = "") -> bytes:
    """Per task: the random curve (loss vs budget, log x) and every method at 1x, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(set(summary["task"].to_list()))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    methods = sorted(set(summary["method"].to_list()) - {RANDOM})
    colours = plt.get_cmap("tab10")
    for ax, task in zip(axes[0], tasks, strict=True):
        part = summary.filter(pl.col("task") == task)
        curve = part.filter(pl.col("method") == RANDOM).sort("budget")
        ax.errorbar(curve["budget"].to_numpy(), curve["loss"].to_numpy(),
                    yerr=curve["sd"].fill_null(0).to_numpy(), color="black", marker="o",
                    label="random", capsize=3)
        for k, method in enumerate(methods):
            point = part.filter((pl.col("method") == method) & (pl.col("budget") == 1.0))
            if point.height:
                ax.errorbar([1.0], point["loss"].to_numpy(), yerr=point["sd"].fill_null(0).to_numpy(),
                            marker="s", linestyle="none", color=colours(k), label=method, capsize=3,
                            alpha=0.85)
        ax.set_xscale("log", base=2)
        ticks = np.unique(curve["budget"].to_numpy()) if curve.height else [1.0]
        ax.set_xticks(ticks, [_fmt_budget(t) for t in ticks])
        ax.set_title(task)
        ax.set_xlabel("training budget (x selection)")
        ax.set_ylabel("eval loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
