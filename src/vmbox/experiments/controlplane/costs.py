"""What the control-plane experiment fits: etcd's costs per point, and their growth (pure).

Called by summary.py (the console table), csvs.py, plot.py and verdicts.py.
COSTS names each cost a point measured and how to read it from a
PointResult; `fits` fits each (fit.py) against the series' axis over the
series' measured points of one mode (saturated points too: etcd's counters
are real whatever the simulation's state; broken ones are left out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmbox.experiments.controlplane.etcdmetrics import Rates
from vmbox.experiments.controlplane.fit import FROM_N, FROM_S, Fit, fit
from vmbox.experiments.controlplane.record import PointResult


@dataclass(frozen=True)
class Cost:
    key: str  # its CSV column and fit name
    label: str
    get: Callable[[PointResult], float]


def _rate(pick: Callable[[Rates], float]) -> Callable[[PointResult], float]:
    return lambda r: pick(r.rates) if r.rates is not None else 0.0


COSTS = (
    Cost("writes_per_s", "writes/s", _rate(lambda x: x.writes)),
    Cost("watch_events_per_s", "watch events/s", _rate(lambda x: x.events)),
    Cost("requests_per_s", "requests/s", _rate(lambda x: x.total)),
    Cost("etcd_cpu", "etcd CPU (cores)", _rate(lambda x: x.cpu)),
    Cost("sent_kib_per_s", "etcd sent KiB/s", _rate(lambda x: x.sent_bytes / 1024)),
    Cost("received_kib_per_s", "etcd received KiB/s", _rate(lambda x: x.received_bytes / 1024)),
    Cost("etcd_rss_mib", "etcd RSS MiB", _rate(lambda x: x.rss_mib)),
    Cost("worker_cpu", "workers CPU (cores)", lambda r: r.worker_cpu),
)
COST = {cost.key: cost for cost in COSTS}


def measured(results: Sequence[PointResult], series: str, mode: str) -> list[PointResult]:
    """A series' points of one mode that were measured (saturated ones too), smallest first."""
    return [
        r
        for r in results
        if r.point.series == series and r.point.mode == mode and r.measured and r.status != "broke"
    ]


def fits(results: Sequence[PointResult], series: str, mode: str) -> dict[str, Fit]:
    """Every cost's fit against the series' axis, over its measured points of `mode`."""
    points = measured(results, series, mode)
    xs = [float(r.point.x) for r in points]
    start = FROM_N if series == "N" else FROM_S
    return {c.key: fit(xs, [c.get(r) for r in points], from_x=start, var=series) for c in COSTS}
