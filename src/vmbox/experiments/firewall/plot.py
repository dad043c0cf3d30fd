"""firewall.png: the stream's throughput at the server around a kill and over a resize.

Called by run.py once the parts are over. Left: Mbit/s per 0.1 s from one
second before the kill of the stream's replica to three after, `state:
shared` (each kill) against `state: local`. Right: the same over the 1 -> 4
-> 1 resize, a dotted line at each step's scale command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmbox.experiments import plots
from vmbox.experiments.firewall.failover import Failover
from vmbox.experiments.firewall.resize import Resize
from vmbox.experiments.firewall.witness import BIN

COLOURS = {"shared": "tab:blue", "local": "tab:red"}
ZORDER = {"shared": 3, "local": 2}  # shared on top: before the kill both carry the same
TOP = 120.0  # Mbit/s shown: the stream runs at 50; a backlog resent at once goes past it


def _mbps(points: Sequence[tuple[float, int]]) -> tuple[list[float], list[float]]:
    return [t for t, _ in points], [8 * n / BIN / 1e6 for _, n in points]


def firewall_png(kills: Sequence[Failover], resizes: Sequence[Resize], path: Path) -> Path:
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k in kills:
        xs, ys = _mbps(k.timeline())
        label = f"{k.run.state}" + (f" (kill {k.round})" if k.run.state == "shared" else "")
        alpha = 1.0 if k.round == 1 else 0.5
        shown = {"color": COLOURS[k.run.state], "alpha": alpha, "zorder": ZORDER[k.run.state]}
        left.step(xs, ys, where="post", label=label, **shown)
    left.axvline(0.0, color="0.3", ls="--", lw=1, label="kill -9")
    left.set_xlabel("s from the kill of the stream's replica (3 replicas)")
    left.set_ylabel(f"Mbit/s at the server per 0.1 s (clipped at {TOP:.0f})")
    left.set_title("failover")
    for r in resizes:
        xs, ys = _mbps(r.timeline())
        shown = {"color": COLOURS[r.run.state], "zorder": ZORDER[r.run.state]}
        right.step(xs, ys, where="post", label=r.run.state, **shown)
        for step in r.steps:
            at = step.began - r.run.began
            right.axvline(at, color=COLOURS[r.run.state], ls=":", lw=1)
            if r.run.state == "shared":
                right.annotate(
                    step.change,
                    (at, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -12),
                    textcoords="offset points",
                )
    right.set_xlabel("s from the stream's start")
    right.set_title("1 -> 4 -> 1 replicas")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        ax.set_ylim(0, TOP)
    fig.tight_layout()
    return plots.save(plt, fig, path)
