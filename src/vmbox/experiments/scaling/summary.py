"""The scaling experiment's outputs: CSVs, the figure, the report rows and the printed summary.

Called by vmbox.experiments.scaling.run once both phases have run. The figure
follows the published one: each replica's metric over time, the threshold,
and a mark at every scale event; the replica count rides on a second axis.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmbox.experiments.results import ExperimentResult, ReportRow, write_csv
from vmbox.experiments.scaling.phases import (
    LIMIT,
    MEMORY_DOWN,
    MEMORY_UP,
    PPS_UP,
    PROBE_RATE,
)
from vmbox.experiments.scaling.plot import scaling_png
from vmbox.experiments.scaling.record import PhaseRun, server_seconds

# Seconds from the crossing sample to the new replica passing traffic, in the
# packet-rate phases (one sample a second ending 0.15 s before each window
# boundary, one sample over the line decides). Without a spare: the start of a
# Python process that imports vmbox and registers (about 1 s) misses that
# boundary, so the next one, about 1.15 s. With a warm spare: its promotion and
# registration (tens of ms) make the boundary itself. Kubernetes' autoscaler,
# the point of comparison, syncs every 15 s.
REACTION_COLD = 2.0
REACTION_WARM = 0.5
# Points of the memory limit a replica may keep once its flows idled out (issue 13's goal).
RETURN_POINTS = 2.0
# The limit at the server in every second of the memory phase: 100 +- 5 (issue
# 13). Drains no longer dip (vmbox.dataplane.drain), and a joiner is handed no
# flow before it may admit (Replica._bind): 5 runs in a row read 100 in every
# second, where a joiner bound at start once let 75 through (DESIGN.md,
# Autoscaling).
MEMORY_LIMIT_TOLERANCE = 0.05
MEMORY_UNDER_TOLERANCE = 0.05


def write_files(runs: list[PhaseRun], out_dir: Path, result: ExperimentResult) -> None:
    sample_rows = [
        (
            r.plan.name,
            round(t, 3),
            rid,
            s["memory_bytes"] / 2**20,
            s.get("memory_percent"),
            s.get("cpu_percent"),
            s.get("pps_in"),
            s.get("pps_out"),
            s.get("bytes_in_per_s"),
            s.get("drops_per_s"),
            s.get("source"),
        )
        for r in runs
        for t, rid, s in r.samples
    ]
    result.csvs.append(
        write_csv(
            out_dir / "scaling_samples.csv",
            [
                "phase",
                "t",
                "replica",
                "memory_mib",
                "memory_percent",
                "cpu_percent",
                "pps_in",
                "pps_out",
                "bytes_in_per_s",
                "drops_per_s",
                "source",
            ],
            sample_rows,
        )
    )
    event_rows = []
    for r in runs:
        ups = {id(d): (rid, reaction) for d, rid, reaction in r.reactions()}
        for d in r.decisions:
            rid, reaction = ups.get(id(d), ("", None))
            event_rows.append(
                (
                    r.plan.name,
                    round(d.time - r.t0, 3),
                    d.kind,
                    d.data.get("old"),
                    d.data.get("new"),
                    d.data.get("value"),
                    rid,
                    "" if reaction is None else round(reaction, 3),
                    d.message,
                )
            )
    result.csvs.append(
        write_csv(
            out_dir / "scaling_events.csv",
            [
                "phase",
                "t",
                "kind",
                "old",
                "new",
                "value",
                "replica_started",
                "reaction_s",
                "message",
            ],
            event_rows,
        )
    )
    server_rows = [
        (r.plan.name, second - int(r.t0), count)
        for r in runs
        for second, count in sorted(r.server.items())
        if second >= int(r.t0)
    ]
    result.csvs.append(
        write_csv(out_dir / "scaling_server.csv", ["phase", "t", "received"], server_rows)
    )


def memory_rows(run: PhaseRun) -> tuple[list[ReportRow], list[str]]:
    ups = [d for d in run.decisions if d.kind == "scale-up"]
    downs = [d for d in run.decisions if d.kind == "scale-down"]
    peak = max((int(d.data.get("new") or 0) for d in ups), default=run.spec.replicas.count)
    final = int(downs[-1].data.get("new") or 0) if downs else peak
    start, stop = (t - run.t0 for t in run.load_window)
    percent = [(t, s.get("memory_percent") or 0.0) for t, _, s in run.samples]
    idle = [p for t, p in percent if t < start]
    at_peak = max((p for t, p in percent if start <= t <= stop), default=0.0)
    # Once every flow has idled out, by replica.
    by_replica: dict[str, list[float]] = {}
    for t, rid, s in run.samples:
        if stop + run.plan.flow_idle + 2 <= t:
            by_replica.setdefault(rid, []).append(s.get("memory_percent") or 0.0)
    after = [p for values in by_replica.values() for p in values]
    worst = max((_mean(v) for v in by_replica.values()), default=0.0)
    crossing = ", ".join(f"{d.data.get('value', 0):.0f}%" for d in ups) or "none"
    falling = ", ".join(f"{d.data.get('value', 0):.0f}%" for d in downs) or "none"
    limit_mib = (run.spec.replicas.memory_limit or 0) >> 20
    back_to = max(_mean(idle) + RETURN_POINTS, MEMORY_DOWN)
    seconds = server_seconds(run)
    under = sum(c < LIMIT * (1 - MEMORY_LIMIT_TOLERANCE) for c in seconds)
    rows = [
        ReportRow(
            f"memory trigger ({MEMORY_UP:.0f}% of {limit_mib} MiB)",
            "a new replica each time one reaches 60% of 70 MB (scale-up only)",
            f"{len(ups)} scale-ups (mean memory at each: {crossing}), {peak} replicas at most",
            len(ups) >= 1,
        ),
        ReportRow(
            "memory after the load stopped (flows idled out)",
            "not reported (the reference design never scaled down)",
            f"idle {_mean(idle):.1f}%, peak {at_peak:.0f}%, then {_mean(after):.1f}% "
            f"(worst replica {worst:.1f}%; goal for the mean the autoscaler sees: within "
            f"{RETURN_POINTS:.0f} points of idle or under the {MEMORY_DOWN:.0f}% line)",
            bool(after) and _mean(after) <= back_to,
        ),
        ReportRow(
            f"scale-down on memory (under {MEMORY_DOWN:.0f}%)",
            "never worked in the reference design",
            f"{len(downs)} scale-downs (mean memory at each: {falling}), "
            f"{peak} -> {final} replicas, drained",
            bool(downs) and final == run.spec.replicas.min,
        ),
        ReportRow(
            "limit at the server during the memory phase",
            "100/s held at 1, 2, 4 replicas",
            f"one source at {PROBE_RATE:.0f}/s beside the new flows: mean "
            f"{statistics.fmean(seconds):.1f}/s, most {max(seconds)}, least {min(seconds)} "
            f"over {len(seconds)} s with {len(ups) + len(downs)} resizes; {under} s under "
            f"{LIMIT * (1 - MEMORY_LIMIT_TOLERANCE):.0f} (verdict: never over "
            f"{LIMIT * (1 + MEMORY_LIMIT_TOLERANCE):.0f}, never under "
            f"{LIMIT * (1 - MEMORY_UNDER_TOLERANCE):.0f})"
            if seconds
            else "no seconds recorded",
            bool(seconds)
            and max(seconds) <= LIMIT * (1 + MEMORY_LIMIT_TOLERANCE)
            and min(seconds) >= LIMIT * (1 - MEMORY_UNDER_TOLERANCE),
        ),
    ]
    return rows, [f"memory phase: {run.memory_source}"]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def pps_rows(run: PhaseRun, seconds: list[int]) -> list[ReportRow]:
    steps = [(d.data.get("old"), d.data.get("new")) for d in run.decisions]
    path = " -> ".join(str(s[0]) for s in steps[:1]) + "".join(f" -> {s[1]}" for s in steps)
    reached = max((int(new or 0) for _, new in steps), default=1)
    back = bool(steps) and steps[-1][1] == run.spec.replicas.min
    off = [abs(c - LIMIT) / LIMIT for c in seconds if c]
    spares = f", {run.plan.warm} warm spare" if run.plan.warm else ""
    return [
        ReportRow(
            f"packet-rate trigger ({PPS_UP:.0f}/s per replica), up and down{spares}",
            "not in the reference design",
            f"replicas {path or 'unchanged'}",
            reached >= 3 and back,
        ),
        # Judged: never over the limit by more than 10%, and the mean within 5%. A second
        # under it is shown, not judged: a cold joiner's first second can dip (the elders
        # hold the smaller share from when they see it until it binds; DESIGN.md
        # "Autoscaling"), which admits less, never more. One in six cold joins read 83.
        ReportRow(
            f"limit at the server during the {run.plan.name} phase",
            "100/s held at 1, 2, 4 replicas",
            f"mean {statistics.fmean(seconds):.1f}/s, worst {max(off):.0%} off (busiest "
            f"second {max(seconds)}, least {min(c for c in seconds if c)}), over "
            f"{len(seconds)} s with {len(steps)} resizes"
            if off
            else "no seconds recorded",
            bool(off)
            and max(seconds) <= LIMIT * 1.10
            and abs(statistics.fmean(seconds) - LIMIT) <= 0.05 * LIMIT,
        ),
    ]


def reaction_rows(
    runs: list[PhaseRun],
) -> tuple[list[ReportRow], list[tuple[str, str, float | None]]]:
    """Reaction times without and with a warm spare, from the two packet-rate phases."""
    reactions = [(r.plan, r.reactions()) for r in runs]
    found = [(plan.name, rid, x) for plan, rs in reactions for _, rid, x in rs]
    rows = []
    for warm, goal, label in (
        (0, REACTION_COLD, "without a spare"),
        (1, REACTION_WARM, "with a warm spare"),
    ):
        times = [
            x
            for plan, rs in reactions
            if plan.kind == "pps" and plan.warm == warm
            for _, _, x in rs
            if x is not None
        ]
        shown = (
            f"median {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)}"
            if times
            else "no scale-up"
        )
        rows.append(
            ReportRow(
                f"reaction {label}: first sample over the threshold -> new replica passing traffic",
                "Kubernetes HPA syncs every 15 s and waits 5 min to scale down",
                f"{shown} (goal: median under {goal:g} s)",
                len(times) >= 5 and statistics.median(times) < goal,
            )
        )
    return rows, found


def print_summary(console: Console, result: ExperimentResult, found: list[Any]) -> None:
    table = Table(title="scaling: vmbox against the published figure", title_justify="left")
    for column in ("metric", "published", "vmbox", "ok"):
        table.add_column(column)
    for row in result.rows:
        ok = "-" if row.ok is None else ("yes" if row.ok else "NO")
        table.add_row(row.metric, row.published, row.vmbox, ok)
    console.print(table)
    for phase, rid, reaction in found:
        shown = "never passed traffic" if reaction is None else f"{reaction:.2f} s"
        console.print(f"  reaction ({phase}): {rid or '?'} {shown}")
    for note in result.notes:
        console.print(f"  note: {note}")


def summarise(
    runs: list[PhaseRun], out_dir: Path, result: ExperimentResult, console: Console
) -> None:
    """Write the CSVs and the PNG, fill the report rows and notes, print the summary."""

    write_files(runs, out_dir, result)
    for run in runs:
        if run.plan.kind == "memory":
            rows, notes = memory_rows(run)
            result.rows += rows
            result.notes += notes
        else:
            result.rows += pps_rows(run, server_seconds(run))
    rows, found = reaction_rows(runs)
    result.rows += rows
    result.pngs.append(scaling_png(runs, out_dir / "scaling.png"))
    print_summary(console, result, found)
