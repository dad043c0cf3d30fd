"""controlplane.png: etcd's cost against N and against S, before and after, on log-log axes.

Called by summary.py once every point has run. One row per series (N: one
service of N replicas; S: S services of 2), one column per cost (writes/s,
watch events/s, etcd CPU); `before` dashed, `after` solid, each labelled
with the order its fit names; dotted guides of slope 1 and 2 through the
first after point show what linear and quadratic look like. A saturated
or crowded point is drawn hollow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmbox.experiments import plots
from vmbox.experiments.controlplane.costs import COST, fits, measured
from vmbox.experiments.controlplane.fit import FROM_N, FROM_S
from vmbox.experiments.controlplane.record import PointResult

PANELS = ("writes_per_s", "watch_events_per_s", "etcd_cpu")
STYLE = {"after": {"color": "tab:blue", "ls": "-"}, "before": {"color": "tab:red", "ls": "--"}}


def controlplane_png(results: Sequence[PointResult], path: Path) -> Path:
    plt = plots.pyplot()
    fig, axes = plt.subplots(2, len(PANELS), figsize=(14, 8.5), squeeze=False)
    for row, series in enumerate(("N", "S")):
        for col, key in enumerate(PANELS):
            ax = axes[row][col]
            for mode in ("after", "before"):
                points = measured(results, series, mode)
                positive = [r for r in points if COST[key].get(r) > 0]
                if not positive:
                    continue
                found = fits(results, series, mode)[key]
                xs = [r.point.x for r in positive]
                ys = [COST[key].get(r) for r in positive]
                ax.plot(xs, ys, marker="o", label=f"{mode}: {found.shown()}", **STYLE[mode])
                hollow = [r for r in positive if r.status in ("saturated", "crowded")]
                edge = STYLE[mode]["color"]
                ax.scatter([r.point.x for r in hollow], [COST[key].get(r) for r in hollow],
                           s=90, facecolors="white", edgecolors=edge, zorder=3)  # fmt: skip
                if mode == "after":
                    _guides(ax, xs, ys, FROM_N if series == "N" else FROM_S)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("replicas of the one service (N)" if series == "N" else
                          "services of 2 replicas (S)")  # fmt: skip
            ax.set_title(f"{COST[key].label} vs {series}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("etcd's cost of the control plane: every replica watching every replica "
                 "(before) against the aggregator (after)")  # fmt: skip
    fig.tight_layout()
    return plots.save(plt, fig, path)


def _guides(ax: Any, xs: list[int], ys: list[float], start: float) -> None:
    """Slope 1 and slope 2 through the first point the fit starts at (or the first)."""
    at = next((i for i, x in enumerate(xs) if x >= start), 0)
    x0, y0 = xs[at], ys[at]
    span = [x0, max(xs)]
    if span[1] <= x0:
        return
    for power, label in ((1, "slope 1"), (2, "slope 2")):
        guide = [y0 * (x / x0) ** power for x in span]
        ax.plot(span, guide, color="0.6", ls=":", lw=1, label=label)
