"""The scaling figure: per-replica metric over time with the scale events marked.

Called by vmbox.experiments.scaling.summary. One panel per phase, like the
published figure (memory of each replica against time, a new replica at each
crossing), plus the replica count on a second axis and, in the packet-rate
phase, the rate the protected server received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmbox.experiments.scaling.phases import LIMIT, MEMORY_DOWN, MEMORY_UP, PPS_DOWN, PPS_UP
from vmbox.experiments.scaling.record import PhaseRun

FIELD = {"memory": "memory_percent", "pps": "pps_in"}
LABEL = {
    "memory": "working set (% of the memory limit)",
    "pps": "packets received per second",
}
THRESHOLDS = {"memory": (MEMORY_UP, MEMORY_DOWN), "pps": (PPS_UP, PPS_DOWN)}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax: Any, run: PhaseRun) -> None:
    kind = run.plan.kind
    replicas = sorted({rid for _, rid, _ in run.samples}, key=lambda r: int(r.rsplit("-", 1)[1]))
    for rid in replicas:
        points = [(t, s.get(FIELD[kind])) for t, r, s in run.samples if r == rid]
        points = [(t, v) for t, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1.4, label=rid)
    up, down = THRESHOLDS[kind]
    ax.axhline(up, color="tab:red", ls="--", lw=1, label=f"scale up at {up:g}")
    ax.axhline(down, color="tab:blue", ls=":", lw=1, label=f"scale down at {down:g}")
    if kind == "pps":
        seconds = sorted((s - run.t0, c) for s, c in run.server.items() if s >= run.t0)
        if seconds:
            ax.step(
                *zip(*seconds, strict=True),
                where="post",
                color="black",
                lw=1.2,
                label=f"server received/s (limit {LIMIT})",
            )
    for decision in run.decisions:
        t = decision.time - run.t0
        up_event = decision.kind == "scale-up"
        ax.axvline(t, color="tab:green" if up_event else "tab:purple", alpha=0.6, lw=1.2)
        ax.annotate(
            f"{decision.data.get('old')}->{decision.data.get('new')}",
            (t, 0.02),
            xycoords=ax.get_xaxis_transform(),
            xytext=(2, 0),
            textcoords="offset points",
            fontsize=8,
        )
    start, stop = (t - run.t0 for t in run.load_window)
    ax.axvspan(start, stop, color="0.92", zorder=0, label="load on")
    ax.set_ylabel(LABEL[kind])
    twin = ax.twinx()
    if run.counts:
        twin.step(*zip(*run.counts, strict=True), where="post", color="0.4", lw=2, alpha=0.5)
    twin.set_ylabel("replicas", color="0.4")
    twin.set_ylim(0, run.spec.replicas.max + 0.5)
    ax.set_title(
        f"{kind}: autoscaled on {run.spec.autoscale.metric if run.spec.autoscale else '-'}"
        f" ({run.memory_source if kind == 'memory' else 'one source, 64 flows'})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def scaling_png(runs: list[PhaseRun], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 4.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        _panel(ax, run)
    axes[-1, 0].set_xlabel("seconds since the service started")
    fig.suptitle("Autoscaling: a new replica at each crossing, drained away when the load ends")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
