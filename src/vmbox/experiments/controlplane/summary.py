"""The control-plane experiment's summary: a line per point, a table per series, the outputs.

Called by run.py: `point_line` once per point as it ends, `summarise` once
all have (it writes the CSVs and the PNG through csvs.py and plot.py and
takes the report rows from verdicts.py). The tables show each cost
(costs.py) of each point, with its order (fit.py) in an `order` row under
each mode's points.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmbox.experiments.controlplane.costs import COST, fits
from vmbox.experiments.controlplane.csvs import write_all
from vmbox.experiments.controlplane.plot import controlplane_png
from vmbox.experiments.controlplane.points import NAME, Size
from vmbox.experiments.controlplane.record import PointResult
from vmbox.experiments.controlplane.verdicts import notes, report_rows
from vmbox.experiments.results import ExperimentResult

KINDS = {"LeaseKeepAlive": "KeepAlive", "DeleteRange": "Delete"}  # shorter in a line
SHOWN = ("writes_per_s", "watch_events_per_s", "requests_per_s", "etcd_cpu", "sent_kib_per_s",
         "etcd_rss_mib", "worker_cpu")  # fmt: skip


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def _figure(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def point_line(r: PointResult) -> str:
    """One line for the console as a point ends."""
    p = r.point
    head = f"  {p.label} ({p.total} replicas, {r.workers} workers, {r.seconds:.0f} s)"
    if r.rates is None:
        return f"{head}: {r.status}: {r.reason}"
    acc = r.accuracy
    heavy = f"heavy max {acc.heavy_max:.2f} mean {acc.heavy_mean:.2f}" if acc else "no heavy"
    status = "" if r.status == "ok" else f" [{r.status}: {r.reason}]"
    kinds = ", ".join(
        f"{KINDS.get(m, m)} {v:.0f}" for m, v in sorted(r.rates.requests.items()) if v >= 0.5
    )
    return (
        f"{head}: {r.rates.writes:.0f} writes/s, {r.rates.events:.0f} watch events/s, "
        f"{r.rates.total:.0f} requests/s ({kinds}), etcd {r.rates.cpu:.2f} cores "
        f"{r.rates.rss_mib:.0f} MiB, workers {r.worker_cpu:.2f} cores "
        f"({r.cpu_per_replica_ms:.1f} ms/s a replica); limit reach {_ms(r.limit_reach)} ms, "
        f"settle {_ms(r.settle)} ms; {heavy}{status}"
    )


def table(results: Sequence[PointResult], series: str, modes: Sequence[str]) -> Table:
    """A series' points, each cost with its order (an `order` row under each mode)."""
    var = "N" if series == "N" else "S"
    out = Table(title=f"{NAME}: etcd's cost against {var}", title_justify="left")
    for name in ("mode", var, *(COST[k].label for k in SHOWN), "limit ms", "settle ms",
                 "heavy max/mean", "status"):  # fmt: skip
        out.add_column(name, justify="right" if name not in ("mode", "status") else "left")
    for mode in modes:
        for r in (r for r in results if r.point.series == series and r.point.mode == mode):
            acc = r.accuracy
            heavy = f"{acc.heavy_max:.2f}/{acc.heavy_mean:.2f}" if acc else "-"
            figures = [_figure(COST[k].get(r)) if r.measured else "-" for k in SHOWN]
            status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
            out.add_row(mode, str(r.point.x), *figures, _ms(r.limit_reach), _ms(r.settle), heavy,
                        status)  # fmt: skip
        found = fits(results, series, mode)
        out.add_row(f"{mode} order", "", *(found[k].shown() for k in SHOWN), "", "", "", "",
                    end_section=True)  # fmt: skip
    return out


def summarise(
    results: list[PointResult], size: Size, out_dir: Path, console: Console
) -> ExperimentResult:
    """The CSVs, the PNG, the tables on the console and the report's rows."""
    console.print(table(results, "N", size.n_modes))
    console.print(table(results, "S", size.s_modes))
    csvs = write_all(out_dir, results)
    png = controlplane_png(results, out_dir / f"{NAME}.png")
    return ExperimentResult(NAME, csvs, [png], report_rows(results), notes(results, size))
