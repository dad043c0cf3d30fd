"""The control-plane experiment's CSV files.

Called by summary.py once every point has run.

- controlplane.csv: one row per point and mode (skipped and broken points
  too, with why): etcd's requests/s by kind, writes/s, watch events/s, CPU,
  RSS and bytes, the workers' CPU and loop lag, the limit change's reach,
  the resize's settle time, the accuracy, and each cost's order in that
  series and mode beside it (`<cost>_order`);
- controlplane_fits.csv: one row per series, mode and cost: the log-log
  slope, the order it names, and the points it was fitted over.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmbox.experiments.controlplane.costs import COSTS, fits
from vmbox.experiments.controlplane.points import NAME
from vmbox.experiments.controlplane.record import PointResult
from vmbox.experiments.results import write_csv

METHODS = ("Put", "Range", "Txn", "DeleteRange", "LeaseGrant", "LeaseRevoke", "LeaseKeepAlive",
           "Watch")  # fmt: skip
COLUMNS = (
    "series", "mode", "x", "services", "replicas_per_service", "replicas", "workers",
    "etcd_members", "limit", "offered_pps", "status", "reason", "seconds", "ready_s",
    *(c.key for c in COSTS), *(f"{c.key}_order" for c in COSTS),
    *(f"{m.lower()}_per_s" for m in METHODS), "watch_streams_per_s", "keepalive_streams_per_s",
    "proposals_per_s", "watchers", "db_mib", "worker_cpu_max", "cpu_ms_per_replica",
    "lag_p95_ms", "machine_busy", "limit_reach_s", "limit_reach_median_s", "limit_missed",
    "settle_s", "unsettled", "heavy_max", "heavy_mean", "one_flow_mean", "all_max", "windows",
    "errors",
)  # fmt: skip
FIT_COLUMNS = ("series", "mode", "cost", "slope", "order", "points")


def _opt(value: float | None) -> object:
    return "" if value is None else value


def point_row(r: PointResult, orders: dict[str, str]) -> list[object]:
    p, rates, acc = r.point, r.rates, r.accuracy
    row: list[object] = [
        p.series, p.mode, p.x, p.services, p.replicas, p.total, r.workers, r.members,
        p.model.limit, round(p.offered, 1), r.status, r.reason, round(r.seconds, 1),
        _opt(r.ready),
    ]  # fmt: skip
    row += [c.get(r) if rates is not None else "" for c in COSTS]
    row += [orders.get(c.key, "") if rates is not None else "" for c in COSTS]
    if rates is None:
        row += [""] * (len(METHODS) + 5)
    else:
        row += [rates.request(m) for m in METHODS]
        row += [rates.streams.get("Watch", 0.0), rates.streams.get("LeaseKeepAlive", 0.0)]
        row += [rates.proposals, rates.watchers, rates.db_mib]
    row += [r.worker_cpu_max, r.cpu_per_replica_ms, _opt(r.lag_p95 and 1000 * r.lag_p95)]
    row.append(_opt(r.machine))
    row += [_opt(r.limit_reach), _opt(r.limit_reach_median), r.limit_missed, _opt(r.settle)]
    row.append(r.unsettled)
    if acc is None:
        row += ["", "", "", "", ""]
    else:
        row += [acc.heavy_max, acc.heavy_mean, _opt(acc.one_flow_mean), acc.all_max, acc.windows]
    row.append("; ".join(r.errors))
    return row


def write_all(out_dir: Path, results: Sequence[PointResult]) -> list[Path]:
    rows, fit_rows = [], []
    for series in ("N", "S"):
        for mode in ("after", "before"):
            found = fits(results, series, mode)
            orders = {key: f.order for key, f in found.items()}
            for r in results:
                if r.point.series == series and r.point.mode == mode:
                    rows.append(point_row(r, orders))
            if any(f.points for f in found.values()):
                fit_rows += [
                    (series, mode, key, "" if f.slope is None else f.slope, f.order, f.points)
                    for key, f in found.items()
                ]
    return [
        write_csv(out_dir / f"{NAME}.csv", COLUMNS, rows),
        write_csv(out_dir / f"{NAME}_fits.csv", FIT_COLUMNS, fit_rows),
    ]
