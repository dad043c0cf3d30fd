"""`vmbox experiment skew --dataplane nfqueue`: skewed sources in the packet path, even vs demand.

The relay experiment's cases with the service in a lab's gateway and its
sources as the lab's own client addresses (hping3 from each, UDP): HMARK
spreads flows over the 4 replicas' queues, so a source that is one flow
reaches one replica. one flow: a source at 300/s over one flow (under `even`
held to a quarter of the limit, under `demand` to the limit); mixed: that
source beside spread sources at 150/s over 4 flows each. What each
source got through is what tcpdump at the server counted from its address.
Each split has a lab and a service of its own, side by side (the one-flow
cases at once, the mixed ones in turn). Writes skew_nfqueue.csv.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TaskID

from vmbox.experiments.inpath.setup import experiment_lab
from vmbox.experiments.results import (
    ExperimentResult,
    ReportRow,
    Scale,
    new_progress,
    side_by_side,
    write_csv,
)
from vmbox.lab import LabPlan
from vmbox.labclients import Flood, ServerCount
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import inpath_spec, private_store, running_service, until_second
from vmbox.tools.capture import full_seconds, per_second

NAME = "skew-nfqueue"
LIMIT = 100
REPLICAS = 4
SPLITS = ("even", "demand")
CASES_ALL = ("one flow", "mixed")
HEAVY_RATE, SPREAD_RATE = 300.0, 150.0
SPREAD_FLOWS = 4  # per spread source, one hping3 each (a flow per packet starves `demand`)
SPREAD = {"full": 20, "small": 6}  # spread sources
SECONDS = {"full": 12.0, "small": 6.0}
SKIP = 2  # whole seconds at the start of each case left out (demand reports converge)
SETTLE = 2.5  # a fresh group holds no share until the resize guard lifts at a boundary
AGE_OUT = 1.5  # between two cases on one service: the last case's reports age out
# The cases each split runs ("one flow" first: the splits run it at once). As the relay
# experiment's (vmbox.experiments.skew.CASES), the small run leaves out the mixed case
# under `even`, which no verdict reads.
CASES: dict[str, dict[str, tuple[str, ...]]] = {
    "full": {"even": CASES_ALL, "demand": CASES_ALL},
    "small": {"even": ("one flow",), "demand": CASES_ALL},
}


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
    """Each split in a lab of its own, side by side: the one-flow cases (a source at 300/s
    each) at once, the mixed cases one after the other (as the relay experiment's)."""
    spread, seconds, cases = SPREAD[scale], SECONDS[scale], CASES[scale]
    got: dict[tuple[str, str], dict[str, list[int]]] = {}
    together = asyncio.Barrier(sum("one flow" in cases[split] for split in SPLITS))
    alone = asyncio.Lock()

    async def split_run(
        store: EtcdStore, lab: LabPlan, split: str, progress: Progress, bar: TaskID
    ) -> None:
        spec = inpath_spec(f"skew{split}", lab, REPLICAS, split=split)
        async with running_service(store, spec):
            await asyncio.sleep(SETTLE)
            for i, case in enumerate(cases[split]):
                if i:
                    await asyncio.sleep(AGE_OUT)
                if case == "one flow":
                    await together.wait()
                async with alone if case == "mixed" else contextlib.nullcontext():
                    progress.update(bar, description=f"{split}: {case}")
                    got[(split, case)] = await run_case(lab, case, spread, seconds)
                progress.advance(bar)

    with contextlib.ExitStack() as labs, new_progress(console) as progress:
        lab_of = {
            split: labs.enter_context(experiment_lab("skew", 1 + spread, tag=split[0]))
            for split in SPLITS
        }
        bar = progress.add_task("skew", total=sum(len(cases[split]) for split in SPLITS))
        async with private_store() as store:
            await side_by_side(
                *(split_run(store, lab_of[split], split, progress, bar) for split in SPLITS)
            )
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
        if (split, "mixed") not in got:  # left out of the small run (CASES)
            continue
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
