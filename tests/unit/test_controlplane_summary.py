"""The control-plane experiment's outputs from made-up points: verdicts, CSVs, tables, PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console

from vmbox.experiments.controlplane.etcdmetrics import Rates
from vmbox.experiments.controlplane.points import SIZES, Mode, Series, point
from vmbox.experiments.controlplane.record import Accuracy, PointResult
from vmbox.experiments.controlplane.summary import point_line, summarise, table
from vmbox.experiments.controlplane.verdicts import report_rows


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def made(series: Series, mode: Mode, x: int, *, reach: float = 0.01) -> PointResult:
    n = x if series == "N" else 2 * x
    events = 20.0 * n if mode == "after" else 10.0 * n * n
    rates = Rates(
        seconds=8.0,
        requests={"Put": 10.0 * n, "Range": 2.0 * n, "LeaseKeepAlive": float(n)},
        streams={"Watch": n / 3},
        events=events,
        sent_bytes=100.0 * events,
        received_bytes=50.0 * n,
        cpu=0.01 * n,
        rss_mib=30.0,
        watchers=4.0 * n,
        proposals=10.0 * n,
        db_mib=1.0,
    )
    acc = Accuracy(1.0, 0.97, 0.96 if series == "N" else None, 1.0, 8)
    return PointResult(
        point(series, mode, x, 2500.0),
        rates=rates,
        worker_cpu=0.01 * n,
        worker_cpu_max=0.005 * n,
        lag_p95=0.002,
        accuracy=acc,
        limit_reach=reach,
        limit_reach_median=reach,
        settle=0.4,
        workers=2,
    )


def results() -> list[PointResult]:
    out = [made("N", mode, x) for x in (1, 4, 16, 64) for mode in ("after", "before")]
    out.append(PointResult(point("N", "after", 256, 2500.0), "broke", "0 of 256 held"))
    out.append(PointResult(point("N", "before", 256, 2500.0), "skipped", "stopped at N=256"))
    return out + [made("S", "after", x) for x in (1, 10, 100)]


def test_linear_after_passes_and_quadratic_before_is_shown_not_judged() -> None:
    rows = {row.metric: row for row in report_rows(results())}
    assert rows["etcd watch events/s vs N, after"].ok is True
    assert rows["etcd writes/s vs S, after"].ok is True
    before = rows["etcd watch events/s vs N, before"]
    assert before.ok is None and before.vmbox.startswith("N^2 (2.00)")
    assert rows["a new limit reaches every replica, after"].ok is True
    assert rows["per-source limit in every measured window, summed over the replicas, after"].ok
    assert "N series, before: not run at 256" in rows
    assert (
        "watch events/s 1,280 against 40,960 (0.03x)" in rows["after against before at N=64"].vmbox
    )


def test_a_slow_limit_change_or_an_over_limit_window_fails_its_verdict() -> None:
    slow = [*results(), made("S", "after", 1000, reach=1.5)]
    rows = {row.metric: row for row in report_rows(slow)}
    assert rows["a new limit reaches every replica, after"].ok is False
    over = results()
    over[0].accuracy = Accuracy(1.2, 1.0, 1.0, 1.2, 8)
    rows = {row.metric: row for row in report_rows(over)}
    assert (
        rows["per-source limit in every measured window, summed over the replicas, after"].ok
        is False
    )


def test_outputs_are_written_and_the_tables_carry_the_orders(tmp_path: Path) -> None:
    console = Console(record=True, width=250)
    result = summarise(results(), SIZES["full"], tmp_path, console)
    assert result.ok and [p.name for p in result.csvs] == [
        "controlplane.csv",
        "controlplane_fits.csv",
    ]
    rows = csv_rows(tmp_path / "controlplane.csv")
    assert len(rows) == 13
    n16 = next(r for r in rows if (r["series"], r["x"], r["mode"]) == ("N", "16", "before"))
    assert n16["watch_events_per_s_order"] == "N^2" and n16["writes_per_s_order"] == "N"
    assert float(n16["put_per_s"]) == 160.0 and n16["status"] == "ok"
    fits = csv_rows(tmp_path / "controlplane_fits.csv")
    assert {(f["series"], f["mode"]) for f in fits} == {
        ("N", "after"),
        ("N", "before"),
        ("S", "after"),
    }
    assert result.pngs[0].read_bytes()[:4] == b"\x89PNG"
    shown = console.export_text()
    assert "after order" in shown and "N^2 (2.00)" in shown
    console.print(table(results(), "S", ("after",)))
    line = point_line(results()[0])
    assert "writes/s" in line and "Put 10" in line and "KeepAlive 1" in line
