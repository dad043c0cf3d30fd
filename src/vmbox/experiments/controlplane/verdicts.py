"""The control-plane experiment's report rows (with their verdicts) and notes.

Called by summary.py once every point has run. The verdicts, on the `after`
mode (the protocol through the aggregator):

- etcd writes/s and watch events/s grow at most linearly in N and in S
  (log-log slope <= 1.3, fit.py says why that margin);
- a new limit reaches every replica of every service within 1 s;
- the per-source limit holds within 5% in every measured window of every
  measured point (passed <= 1.05 x limit, summed over the replicas as a
  server counts them);
- a heavy source on one flow gets close to its limit (>= 0.9 x; the demand
  floor alone costs it up to 5%: DESIGN.md, Rate limiting).

The `before` mode's figures (its watch events grow as N^2; at N=64 on two
shared cores its replicas fell so far behind the reports that a heavy
source got 1.24x its limit), the resize's settle time and where a series
stopped are reported without a verdict.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmbox.experiments.controlplane.costs import COST, fits, measured
from vmbox.experiments.controlplane.points import Size, new_limit
from vmbox.experiments.controlplane.record import PointResult
from vmbox.experiments.results import ReportRow

REACH_BOUND = 1.0  # s
LIMIT_SLACK = 1.05
ONE_FLOW_AT_LEAST = 0.9
GROWTH = ("writes_per_s", "watch_events_per_s")


def growth_rows(results: Sequence[PointResult], series: str) -> list[ReportRow]:
    rows = []
    for mode in ("after", "before"):
        points = measured(results, series, mode)
        if not points:
            continue
        found = fits(results, series, mode)
        for key in GROWTH:
            f, cost = found[key], COST[key]
            span = f"{cost.get(points[0]):,.0f} -> {cost.get(points[-1]):,.0f}/s at {series} = "
            span += f"{points[0].point.x}..{points[-1].point.x}"
            if mode == "after":
                published, ok = "at most linear (log-log slope <= 1.3)", f.at_most_linear
            else:
                published, ok = "quadratic for watch events (every replica watches every one)", None
            rows.append(ReportRow(f"etcd {cost.label} vs {series}, {mode}", published,
                                  f"{f.shown()}: {span}", ok))  # fmt: skip
    return rows


def contrast_row(results: Sequence[PointResult], series: str) -> ReportRow | None:
    """After against before at the largest size both modes measured."""
    after = {r.point.x: r for r in measured(results, series, "after")}
    before = {r.point.x: r for r in measured(results, series, "before")}
    both = sorted(set(after) & set(before))
    if not both:
        return None
    x = both[-1]
    parts = []
    for key in GROWTH:
        a, b = COST[key].get(after[x]), COST[key].get(before[x])
        ratio = f" ({a / b:.2f}x)" if b > 0 else ""
        parts.append(f"{COST[key].label} {a:,.0f} against {b:,.0f}{ratio}")
    return ReportRow(f"after against before at {series}={x}", "-", "; ".join(parts), None)


def reach_row(results: Sequence[PointResult], mode: str) -> ReportRow | None:
    points = [r for r in results if r.point.mode == mode and r.measured and r.status != "broke"]
    if not points:
        return None
    slowest = max(points, key=lambda r: r.limit_reach if r.limit_reach is not None else 1e9)
    missed = sum(r.limit_missed for r in points)
    reach = slowest.limit_reach
    shown = "never reached" if reach is None else f"slowest {1000 * reach:.0f} ms"
    shown += f" ({slowest.point.label}); {missed} replicas missed it" if missed else (
        f" ({slowest.point.label}), every replica of every point")  # fmt: skip
    ok = all(r.limit_reach is not None and r.limit_reach <= REACH_BOUND for r in points)
    return ReportRow(f"a new limit reaches every replica, {mode}", "within 1 s", shown,
                     (ok and not missed) if mode == "after" else None)  # fmt: skip


def accuracy_rows(results: Sequence[PointResult], mode: str) -> list[ReportRow]:
    judged = [r for r in results if r.point.mode == mode and r.accuracy and r.status != "broke"]
    if not judged:
        return []
    verdict = mode == "after"
    worst = max(judged, key=lambda r: r.accuracy.all_max if r.accuracy else 0.0)
    assert worst.accuracy is not None
    means = [r.accuracy.heavy_mean for r in judged if r.accuracy]
    held = all(r.accuracy.all_max <= LIMIT_SLACK for r in judged if r.accuracy)
    rows = [
        ReportRow(
            f"per-source limit in every measured window, summed over the replicas, {mode}",
            "passed <= 1.05 x limit",
            f"max {worst.accuracy.all_max:.3f} x ({worst.point.label}); heavy sources' mean "
            f"{min(means):.3f}-{max(means):.3f} x",
            held if verdict else None,
        )
    ]
    one = [r for r in judged if r.accuracy and r.accuracy.one_flow_mean is not None]
    calm = [r for r in one if r.status in ("ok", "crowded")]
    if one:
        lows = [r.accuracy.one_flow_mean or 0.0 for r in calm if r.accuracy] or [0.0]
        every = [f"{r.point.x}: {r.accuracy.one_flow_mean:.2f}" for r in one if r.accuracy]
        rows.append(ReportRow(
            f"a heavy source on one flow (3x the limit), split: demand, {mode}",
            "close to its limit (>= 0.9 x)",
            f"N {', '.join(every)} x limit",
            min(lows) >= ONE_FLOW_AT_LEAST if calm and verdict else None,
        ))  # fmt: skip
    return rows


def settle_row(results: Sequence[PointResult]) -> ReportRow | None:
    settled = [r for r in results if r.settle is not None]
    if not settled:
        return None
    quick, slow = min(settled, key=_settle), max(settled, key=_settle)
    never = [r.point.label for r in results if r.measured and r.settle is None]
    shown = f"{_settle(quick):.2f} s ({quick.point.label}) to {_settle(slow):.2f} s "
    shown += f"({slow.point.label})" + (f"; did not settle: {', '.join(never)}" if never else "")
    return ReportRow("one more replica: every replica holds its share", "-", shown, None)


def _settle(r: PointResult) -> float:
    return r.settle if r.settle is not None else 0.0


def stop_rows(results: Sequence[PointResult]) -> list[ReportRow]:
    rows = []
    seen = set()
    for r in results:
        key = (r.point.series, r.point.mode)
        if r.status == "skipped" and key not in seen:
            seen.add(key)
            skipped = [s.point.x for s in results if (s.point.series, s.point.mode) == key
                       and s.status == "skipped"]  # fmt: skip
            where = ", ".join(map(str, skipped))
            rows.append(ReportRow(f"{r.point.series} series, {r.point.mode}: not run at {where}",
                                  "-", r.reason, None))  # fmt: skip
    return rows


def report_rows(results: Sequence[PointResult]) -> list[ReportRow]:
    rows = growth_rows(results, "N") + growth_rows(results, "S")
    rows += [row for series in ("N", "S") if (row := contrast_row(results, series))]
    rows += [row for mode in ("after", "before") if (row := reach_row(results, mode))]
    rows += accuracy_rows(results, "after") + accuracy_rows(results, "before")
    rows += [row for row in (settle_row(results),) if row is not None]
    return rows + stop_rows(results)


def notes(results: Sequence[PointResult], size: Size) -> list[str]:
    first = results[0].point if results else None
    members = max((r.members for r in results if r.status != "skipped"), default=1)
    out = [
        f"Each point on a fresh private etcd ({members} member{'s' if members > 1 else ''}"
        f"{'' if members == size.members else f' on this machine, {size.members} from 4 cores'}"
        f", auth on); the replicas are vmbox.replica.Replica "
        "with headless=True (no sockets: membership, views, resize guard acks, demand "
        "reports and health probes as in production) in 1-4 worker processes at nice 10 "
        "(below the etcd they measure), sharing one "
        "etcd connection per 64 replicas of a worker. Spec: split: demand, window 1 s, "
        "consistency: watch, lease_ttl 3 s.",
        f"Measured over {size.measure:g} s of whole windows once every replica held its "
        "share and each source had been reported: etcd's /metrics before and after "
        "(requests by gRPC method from grpc_server_msg_received_total; writes = Put + Txn + "
        "DeleteRange; watch events from etcd_debugging_mvcc_events_total, the events sent to "
        "watchers), summed over members. Orders: the log-log slope over N >= 4 (S >= 1); "
        "'N' below 1.4, 'N^2' from 1.6.",
        "Traffic (seeded): per service, heavy sources at 2-3x the per-source limit (one on "
        "one flow), Zipf-like light ones, each source over a few flows pinned to a replica "
        "by a hash of the flow; the N series' service has 2N light sources (at least 40); "
        f"everything together offers at most {size.budget:,.0f} packets/s, so the S series' "
        "services get a lower limit as S grows (the CSV's limit and offered_pps).",
        "Then a new limit (x1.5) is written to every service and its reach timed to the "
        "last replica applying it; and one more replica is started in the first service, "
        "settled when every replica of it sees the new group and holds its share.",
        "A point is 'saturated' when the simulation, not etcd, was the bottleneck: a "
        "worker's loop ran >100 ms late (p95), a worker used >90% of its core, etcd and "
        "the workers >80% of the machine; 'crowded' when the machine was >90% busy, other "
        "jobs included (its figures stand, less sure). A before series stops at its first "
        "saturated point, both at a broken after point (before costs more at every size).",
    ]
    if first is not None:
        out.append(f"Limits: N series {first.model.limit}/s per source (new limit "
                   f"{new_limit(first)}); the S series' limits are in the CSV.")  # fmt: skip
    return out
