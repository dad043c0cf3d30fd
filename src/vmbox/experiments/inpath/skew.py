"""`vmbox experiment skew --dataplane nfqueue`: skewed sources in the packet path, even vs demand.

The relay experiment's cases with the service in a lab's gateway and its
sources as the lab's own client addresses (hping3 from each, UDP): HMARK
spreads flows over the 4 replicas' queues, so a source that is one flow
reaches one replica. one flow: a source at 300/s over one flow (under `even`
held to a quarter of the limit, under `demand` to the limit); mixed: that
source beside spread sources at 150/s over 4 flows each. What each
source got through is what tcpdump at the server counted from its address.
Writes skew_nfqueue.csv.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from rich.console import Console

from vmbox.experiments.inpath.setup import experiment_lab
from vmbox.experiments.results import ExperimentResult, ReportRow, Scale, new_progress, write_csv
from vmbox.lab import LabPlan
from vmbox.labclients import Flood, ServerCount
from vmbox.testbed import inpath_spec, private_store, running_service, until_second
from vmbox.tools.capture import full_seconds, per_second

NAME = "skew-nfqueue"
LIMIT = 100
REPLICAS = 4
SPLITS = ("even", "demand")
CASES = ("one flow", "mixed")
HEAVY_RATE, SPREAD_RATE = 300.0, 150.0
SPREAD_FLOWS = 4  # per spread source, one hping3 each (a flow per packet starves `demand`)
SPREAD = {"full": 20, "small": 6}  # spread sources
SECONDS = {"full": 12.0, "small": 6.0}
SKIP = 2  # whole seconds at the start of each case left out (demand reports converge)
SETTLE = 2.5  # a fresh group holds no share until the resize guard lifts at a boundary


async def run_case(lab: LabPlan, case: str, spread: int, seconds: float) -> dict[str, list[int]]:
    """Each source's per-second counts at the server over the whole seconds of the case."""
    heavy, *others = lab.client_addresses
    sources = {"heavy": heavy} | (
        {f"spread-{i + 1}": a for i, a in enumerate(others[:spread])} if case == "mixed" else {}
    )
    with ServerCount(lab, list(sources.values())) as count:
        start = await until_second(0.05)
        floods = [Flood(lab, "udp", heavy, HEAVY_RATE, seconds, flows=1)]
        floods += [
            Flood(lab, "udp", a, SPREAD_RATE / SPREAD_FLOWS, seconds, sport=30_000 + f)
            for a in list(sources.values())[1:]
            for f in range(SPREAD_FLOWS)
        ]
        try:
            for flood in floods:
                flood.__enter__()
            await asyncio.sleep(max(0.0, start + seconds - time.time()))
        finally:
            for flood in floods:
                flood.stop()
    return {
        label: full_seconds(per_second(count.packets, a), start, start + seconds)
        for label, a in sources.items()
    }


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    spread, seconds = SPREAD[scale], SECONDS[scale]
    got: dict[tuple[str, str], dict[str, list[int]]] = {}
    with experiment_lab("skew", clients=1 + spread) as lab, new_progress(console) as progress:
        bar = progress.add_task("skew", total=len(SPLITS) * len(CASES))
        async with private_store() as store:
            for split in SPLITS:
                spec = inpath_spec(f"skew{split}", lab, REPLICAS, split=split)
                async with running_service(store, spec):
                    await asyncio.sleep(SETTLE)
                    for case in CASES:
                        progress.update(bar, description=f"{split}: {case}")
                        got[(split, case)] = await run_case(lab, case, spread, seconds)
                        progress.advance(bar)
                        await asyncio.sleep(1.5)  # the last case's reports age out
    csv_path = write_csv(
        out_dir / "skew_nfqueue.csv",
        ("case", "split", "source", "second", "received"),
        (
            (case, split, src, i, n)
            for (split, case), by in got.items()
            for src, counts in by.items()
            for i, n in enumerate(counts)
        ),
    )
    note = (
        f"In the packet path, {REPLICAS} replicas, limit {LIMIT}/s per source; one flow: a "
        f"source at {HEAVY_RATE:.0f}/s over one flow (hping3 -k); mixed: that source and "
        f"{spread} sources at {SPREAD_RATE:.0f}/s over {SPREAD_FLOWS} flows, each from its "
        f"own client address. Counted by tcpdump at the server; the first {SKIP} s left out."
    )
    return ExperimentResult(NAME, [csv_path], [], report_rows(got), [note])


def means(by: dict[str, list[int]]) -> dict[str, float]:
    return {src: statistics.fmean(counts[SKIP:] or [0]) for src, counts in by.items()}


def report_rows(got: dict[tuple[str, str], dict[str, list[int]]]) -> list[ReportRow]:
    even_one = means(got[("even", "one flow")])["heavy"]
    demand_one = means(got[("demand", "one flow")])["heavy"]
    rows = [
        ReportRow(
            "one source, one flow, 4 replicas, even split",
            "limit / n = 25/s (the flaw)",
            f"{even_one:.1f}/s",
            abs(even_one - LIMIT / REPLICAS) <= 0.2 * LIMIT / REPLICAS,
        ),
        ReportRow(
            "one source, one flow, 4 replicas, demand split",
            "the limit, 100/s",
            f"{demand_one:.1f}/s",
            abs(demand_one - LIMIT) <= 0.05 * LIMIT,
        ),
    ]
    for split in SPLITS:
        m = means(got[(split, "mixed")])
        worst = max(m.values(), key=lambda v: abs(v - LIMIT))
        rows.append(
            ReportRow(
                f"mixed: heavy one-flow source + {len(m) - 1} spread sources, {split} split",
                "every source at its limit" if split == "demand" else "not published",
                f"heavy {m['heavy']:.1f}/s, all {min(m.values()):.1f}-{max(m.values()):.1f}/s, "
                f"worst {abs(worst - LIMIT) / LIMIT:.0%} off",
                all(abs(v - LIMIT) <= 0.1 * LIMIT for v in m.values())
                if split == "demand"
                else None,
            )
        )
    return rows
