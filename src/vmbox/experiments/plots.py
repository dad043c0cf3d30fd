"""The experiments' pictures, as PNG files drawn with matplotlib's Agg backend.

Called by correctness.py, overhead.py and skew.py once their runs are over. matplotlib
is imported inside each function (and never with a display), so importing the
experiments, and `vmbox --help`, stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vmbox.experiments.correctness import Second
    from vmbox.experiments.overhead import Stats
    from vmbox.experiments.skew import CaseRun


class _Figure(Protocol):
    def savefig(self, fname: Path, **kwargs: Any) -> None: ...


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: _Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def correctness_png(seconds: Sequence[Second], limit: int, path: Path) -> Path:
    """Received rate against offered rate, one line per replica count, with the ideal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    counts = sorted({s.replicas for s in seconds})
    top = max((s.sent for s in seconds), default=3 * limit)
    ax.plot(
        [0, limit, top],
        [0, limit, limit],
        color="0.6",
        ls="--",
        lw=1.5,
        label=f"ideal: min(offered, {limit})",
    )
    # Lines that coincide must all stay visible: shrinking markers, differing dashes.
    styles = [("o", 7, "-"), ("s", 5, "--"), ("^", 4, ":"), ("D", 3, "-."), ("v", 3, "-")]
    for i, n in enumerate(counts):
        rows = sorted((s for s in seconds if s.replicas == n), key=lambda s: s.sent)
        marker, size, dash = styles[i % len(styles)]
        ax.plot(
            [s.sent for s in rows],
            [s.received for s in rows],
            marker=marker,
            ms=size,
            ls=dash,
            lw=1.4,
            label=f"{n} replica{'s' if n > 1 else ''}",
        )
    ax.set_xlabel("offered rate: packets the client sent that second (packets/s)")
    ax.set_ylabel("received by the server (packets/s)")
    ax.set_title(f"Rate limit {limit} packets/s holds at every replica count")
    ax.set_xlim(0, top * 1.03)
    ax.set_ylim(0, limit * 1.6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(plt, fig, path)


STAT_FIELDS = (("min", "min"), ("p50", "p50"), ("mean", "mean"), ("p99", "p99"), ("max", "max"))


def overhead_png(stats: Mapping[str, Stats], path: Path) -> Path:
    """Grouped bars (min, p50, mean, p99, max) per variant on a log scale; mean vs base above."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    names = list(stats)
    width = 0.16
    colors = ["#9ecae1", "#6baed6", "#08519c", "#fd8d3c", "#d94801"]
    for j, (label, attr) in enumerate(STAT_FIELDS):
        xs = [i + (j - 2) * width for i in range(len(names))]
        ax.bar(xs, [getattr(stats[n], attr) for n in names], width, label=label, color=colors[j])
    base = stats[names[0]].round_median
    for i, n in enumerate(names):
        s = stats[n]
        ax.annotate(
            f"mean {s.mean:.3f} ms\n{s.round_median / base:.2f}x base",
            (i, s.max),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("round-trip latency (ms, log scale)")
    ax.set_title("Round-trip latency per packet through one replica at 1,000 packets/s")
    ax.set_ylim(min(s.min for s in stats.values()) * 0.5, max(s.max for s in stats.values()) * 6)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(ncol=5, loc="upper left", fontsize=8)
    note = "x base: the median of a variant's round means over base's (rounds alternate)"
    fig.text(0.01, -0.02, note, fontsize=8)
    return _save(plt, fig, path)


def skew_png(runs: Sequence[CaseRun], limit: int, path: Path) -> Path:
    """Left: the one-flow source per second under each split. Right: every source's mean, mixed."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1, 2]})
    colors = {"even": "tab:orange", "demand": "tab:blue"}
    for run in (r for r in runs if r.case == "one flow"):
        counts = run.received["heavy"]
        left.plot(
            range(len(counts)),
            counts,
            marker="o",
            color=colors[run.split],
            label=f"{run.split} split",
        )
    left.axhline(limit, color="0.5", ls="--", lw=1, label=f"limit {limit}/s")
    left.set_title("one source, one flow, 4 replicas", fontsize=10)
    left.set_xlabel("second of the run")
    left.set_ylabel("packets/s through (the source's replies)")
    left.set_ylim(0, limit * 1.4)
    left.legend(fontsize=8)
    mixed = [r for r in runs if r.case == "mixed"]
    for i, run in enumerate(mixed):
        means = run.means()
        xs = [j + (i - 0.5) * 0.4 for j in range(len(means))]
        color = colors[run.split]
        right.bar(xs, list(means.values()), 0.4, color=color, label=f"{run.split} split")
    labels = list(mixed[0].means()) if mixed else []
    right.set_xticks(
        range(len(labels)), [s.replace("spread-", "s") for s in labels], rotation=90, fontsize=7
    )
    right.axhline(limit, color="0.5", ls="--", lw=1)
    right.axhspan(limit * 0.9, limit * 1.1, color="0.9", zorder=0, label="limit ± 10%")
    right.set_title("mixed: a heavy one-flow source and 20 sources over 4 flows each", fontsize=10)
    right.set_ylabel("mean packets/s through")
    right.set_ylim(0, limit * 1.4)
    right.legend(fontsize=8, loc="upper right")
    fig.suptitle("Skewed traffic: the demand split holds every source at its limit")
    fig.tight_layout()
    return _save(plt, fig, path)
