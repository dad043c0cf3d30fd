"""What one point measured (PointResult), and the figures drawn from the workers' results (pure).

Called by run.py, which fills a PointResult from etcd's rates (etcdmetrics.py)
and the workers' JSON results (worker.py), and by csvs.py, plot.py and
verdicts.py, which read it; the figure functions are unit-tested.

- accuracy: the workers' passed packets summed per source and window over
  every replica, as a server behind them would count what reached it; for
  the heavy sources (offered 2-3x the limit) the largest ratio passed/limit
  over the measured windows and the mean, the one-flow heavy source's mean,
  and the largest ratio of any source;
- limit reach: for each service, from the write of its new limit to the last
  of its replicas applying it (the replica started for the resize is left
  out: it reads the limit when it starts);
- settle: from the resize (a new replica started) to the last worker's
  replicas of that service all seeing the new group and holding their share.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vmbox.experiments.controlplane.etcdmetrics import Rates
from vmbox.experiments.controlplane.points import Point
from vmbox.experiments.controlplane.traffic import TrafficModel

# saturated: the simulation was its own bottleneck; crowded: other jobs kept the machine
# busy (the figures stand, less sure); broke: not measured; skipped: not run.
Status = Literal["ok", "saturated", "crowded", "broke", "skipped"]
# When the simulation, not etcd, is the bottleneck: its loop wakes this late (95th
# percentile of a 20 ms sleep), a worker uses this much of its one core (Python runs a
# process on one), or etcd and the workers use this share of the machine (at 84%, N=64
# before on 2 cores, the replicas applied the reports so late that a heavy source got
# 1.24x its limit in a window: shares computed from different reports). Crowded: the
# machine is this busy, whoever keeps it so (a shared machine runs other jobs too).
LAG_SATURATED = 0.1
WORKER_SATURATED = 0.9
MACHINE_SATURATED = 0.8
BUSY_SATURATED = 0.9


@dataclass(frozen=True)
class Accuracy:
    heavy_max: float  # the largest passed / limit of a heavy source in a measured window
    heavy_mean: float
    one_flow_mean: float | None  # the heavy source over one flow, if the model has one
    all_max: float  # the largest passed / limit of any source in a measured window
    windows: int


@dataclass
class PointResult:
    """One point's figures; `status` says whether they can be trusted as etcd's cost."""

    point: Point
    status: Status = "ok"
    reason: str = ""
    members: int = 1
    workers: int = 0
    seconds: float = 0.0  # the point's wall time, etcd's start to its stop
    ready: float | None = None  # s from the replicas' start until all held their shares
    rates: Rates | None = None
    worker_cpu: float = 0.0  # cores, all workers, over the measured windows
    worker_cpu_max: float = 0.0  # the busiest worker's share of its core
    lag_p95: float | None = None  # the slowest worker's
    machine: float | None = None  # the share of the machine's CPU busy (everyone's)
    accuracy: Accuracy | None = None
    limit_reach: float | None = None  # s, the slowest service
    limit_reach_median: float | None = None  # s, over services
    limit_missed: int = 0  # replicas that never applied the new limit
    settle: float | None = None
    unsettled: str = ""  # when it did not settle: the watched replicas as last seen
    errors: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.rates is not None

    @property
    def cpu_per_replica_ms(self) -> float:
        """The workers' CPU per replica, ms a second."""
        return 1000 * self.worker_cpu / self.point.total if self.point.total else 0.0


def merge_counts(results: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int, int], list[int]]:
    """(service, source, window) -> [offered, passed], over every worker."""
    out: dict[tuple[int, int, int], list[int]] = {}
    for result in results:
        for service, source, window, offered, passed in result.get("counts", ()):
            seen = out.setdefault((service, source, window), [0, 0])
            seen[0] += offered
            seen[1] += passed
    return out


def accuracy(
    counts: Mapping[tuple[int, int, int], Sequence[int]],
    model: TrafficModel,
    windows: range,
) -> Accuracy | None:
    """The limit as the sources' packets met it in `windows` (None if none was fed)."""
    sources = model.sources()
    heavy = {s.index for s in sources if s.heavy}
    one_flow = {s.index for s in sources if s.heavy and s.flows == 1}
    ratios: dict[str, list[float]] = {"heavy": [], "one": [], "all": []}
    for (_, source, window), (_, passed) in counts.items():
        if window not in windows:
            continue
        ratio = passed / model.limit
        ratios["all"].append(ratio)
        if source in heavy:
            ratios["heavy"].append(ratio)
        if source in one_flow:
            ratios["one"].append(ratio)
    if not ratios["heavy"]:
        return None
    return Accuracy(
        heavy_max=max(ratios["heavy"]),
        heavy_mean=statistics.fmean(ratios["heavy"]),
        one_flow_mean=statistics.fmean(ratios["one"]) if ratios["one"] else None,
        all_max=max(ratios["all"]),
        windows=len(windows),
    )


def limit_reach(
    results: Iterable[Mapping[str, Any]],
    written: Mapping[int, float],
    value: float,
    replicas: int,
) -> tuple[list[float], int]:
    """Per service whose new limit every replica applied: from its write to the last apply;
    and how many replicas (of the `replicas` first of each service) never applied it."""
    first: dict[tuple[int, int], float] = {}
    for result in results:
        for service, replica, at, applied in result.get("limits", ()):
            key = (int(service), int(replica))
            if applied == value and replica < replicas and at < first.get(key, float("inf")):
                first[key] = at
    reach, missed = [], 0
    for service, at in written.items():
        times = [first.get((service, r)) for r in range(replicas)]
        known = [t for t in times if t is not None]
        missed += len(times) - len(known)
        if len(known) == len(times):
            reach.append(max(0.0, max(known) - at))
    return reach, missed


def settle_time(results: Iterable[Mapping[str, Any]], resize_at: float) -> float | None:
    """From the resize to the last worker settling; None if one that watched never did."""
    watched = [r for r in results if r.get("watched")]
    if not watched or any(r.get("settled_at") is None for r in watched):
        return None
    return max(float(r["settled_at"]) for r in watched) - resize_at


def unsettled(results: Iterable[Mapping[str, Any]]) -> str:
    """The watched replicas of the workers that did not settle, as last seen."""
    seen = []
    for r in results:
        if r.get("watched") and r.get("settled_at") is None:
            for rid, (holding, members, guarded, acked) in sorted(
                r.get("settle_state", {}).items()
            ):
                share = "holds its share" if holding else "holds no share"
                guard = f", guarded ({acked} acks of its view)" if guarded else ""
                seen.append(f"{rid} {share}, sees {members}{guard}")
    return "; ".join(seen)


def saturation(result: PointResult, cores: int) -> str:
    """Why the point's simulation was the bottleneck ('' when it was not)."""
    etcd = result.rates.cpu if result.rates is not None else 0.0
    if result.lag_p95 is not None and result.lag_p95 > LAG_SATURATED:
        return f"a worker's loop ran {1000 * result.lag_p95:.0f} ms late (p95)"
    if result.worker_cpu_max > WORKER_SATURATED:
        return f"a worker used {result.worker_cpu_max:.0%} of its core"
    if etcd + result.worker_cpu > MACHINE_SATURATED * cores:
        return f"etcd and the workers used {etcd + result.worker_cpu:.1f} of {cores} cores"
    return ""


def crowding(result: PointResult, cores: int) -> str:
    """Why the machine, busy with other jobs too, may have slowed the point ('' if not)."""
    if result.machine is None or result.machine <= BUSY_SATURATED:
        return ""
    etcd = result.rates.cpu if result.rates is not None else 0.0
    others = max(0.0, result.machine * cores - etcd - result.worker_cpu)
    return f"the machine was {result.machine:.0%} busy ({others:.1f} cores for other jobs)"


def busy_share(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """The share of the machine's CPU time busy between two readings of its CPU times
    (psutil.cpu_times()._asdict(): user, system, idle, iowait, ... summed over CPUs)."""
    spent = {key: after[key] - before.get(key, 0.0) for key in after}
    total = sum(spent.values())
    idle = spent.get("idle", 0.0) + spent.get("iowait", 0.0)
    return (total - idle) / total if total > 0 else 0.0
