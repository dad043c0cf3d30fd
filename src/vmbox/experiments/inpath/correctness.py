"""`vmbox experiment correctness --dataplane nfqueue`: the limit holds in the packet path.

The relay experiment's figure with the service in a lab's gateway: two
clients, one sending UDP datagrams and one TCP SYNs (hping3, a new flow per
packet), step their offered rate up to 300 packets/s through a limit of 100
packets/s per source, with 1, 2 and 4 replicas (a fresh service for each).
What the server received from each client in each whole second is counted by
tcpdump in the server's namespace. Writes correctness_nfqueue.csv and .png.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vmbox.experiments import plots
from vmbox.experiments.inpath.setup import experiment_lab
from vmbox.experiments.results import ExperimentResult, ReportRow, Scale, new_progress, write_csv
from vmbox.lab import LabPlan
from vmbox.labclients import Flood, ServerCount
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import READY_TIMEOUT, inpath_spec, private_store, running_service, until_second
from vmbox.tools.capture import full_seconds, per_second

NAME = "correctness-nfqueue"
LIMIT = 100
COUNTS = (1, 2, 4)
PROTOS = ("udp", "tcp")
PLATEAU = 1.2  # a second is on the plateau when its offered rate is >= PLATEAU * LIMIT
TOLERANCE = 0.05
COLUMNS = ("replicas", "proto", "second", "offered", "received")
STEPS: dict[str, tuple[tuple[float, ...], float]] = {  # offered rates, seconds at each
    "full": ((25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 250.0, 300.0), 5.0),
    "small": ((50.0, 150.0, 300.0), 4.0),
}


@dataclass(frozen=True)
class Second:
    replicas: int
    proto: str
    second: int  # epoch second
    offered: float
    received: int  # by the server from that protocol's client


async def measure(store: EtcdStore, lab: LabPlan, replicas: int, scale: Scale) -> list[Second]:
    """One fresh service with `replicas` replicas; both clients step through the offers."""
    rates, step = STEPS[scale]
    sources = dict(zip(PROTOS, lab.client_addresses, strict=False))
    spec = inpath_spec(f"correct{replicas}", lab, replicas, split="even")  # the reference's
    out: list[Second] = []
    async with running_service(store, spec):
        await asyncio.sleep(0.5)  # every replica has seen the others
        with ServerCount(lab, list(sources.values())) as count:
            spans = []
            for rate in rates:
                start = await until_second(0.05)
                with (
                    Flood(lab, "udp", sources["udp"], rate, step),
                    Flood(lab, "tcp", sources["tcp"], rate, step),
                ):
                    await asyncio.sleep(max(0.0, start + step - time.time()))
                spans.append((rate, float(start), float(start) + step))
            await asyncio.sleep(0.3)
        for proto, source in sources.items():
            counts = per_second(count.packets, source)
            for rate, begin, end in spans:
                seconds = range(int(begin) + 1, int(end))
                got = full_seconds(counts, begin, end)
                out += [
                    Second(replicas, proto, s, rate, n) for s, n in zip(seconds, got, strict=True)
                ]
    return out


def plateau(seconds: Sequence[Second]) -> list[Second]:
    return [s for s in seconds if s.offered >= PLATEAU * LIMIT]


def report_rows(seconds: Sequence[Second]) -> list[ReportRow]:
    rows = []
    for n in COUNTS:
        for proto in PROTOS:
            top = plateau([s for s in seconds if s.replicas == n and s.proto == proto])
            if not top:
                rows.append(
                    ReportRow(f"{proto}, {n} replica(s)", f"{LIMIT}/s", "no seconds", False)
                )
                continue
            got = [s.received for s in top]
            mean = statistics.fmean(got)
            error = abs(mean - LIMIT) / LIMIT
            rows.append(
                ReportRow(
                    f"server received on the plateau, {proto}, {n} replica{'s' if n > 1 else ''}",
                    f"{LIMIT}/s (the limit)",
                    f"{mean:.1f}/s (min {min(got)}, max {max(got)}, {len(got)} s)",
                    error <= TOLERANCE,
                )
            )
    return rows


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    """Step through the offers with 1, 2 and 4 replicas; correctness_nfqueue.csv and .png."""
    rates, step = STEPS[scale]
    seconds: list[Second] = []
    with experiment_lab("correctness", clients=2) as lab, new_progress(console) as progress:
        tasks = {n: progress.add_task(f"{n} replica(s): waiting", total=1) for n in COUNTS}
        async with private_store() as store:
            for n in COUNTS:
                progress.update(tasks[n], description=f"{n} replica(s): stepping up the offer")
                async with asyncio.timeout(len(rates) * (step + 1) + READY_TIMEOUT + 20):
                    seconds += await measure(store, lab, n, scale)
                progress.update(tasks[n], description=f"{n} replica(s): done", completed=1)
    csv_path = write_csv(
        out_dir / "correctness_nfqueue.csv",
        COLUMNS,
        ((s.replicas, s.proto, s.second, s.offered, s.received) for s in seconds),
    )
    png = correctness_png(seconds, out_dir / "correctness_nfqueue.png")
    return ExperimentResult(NAME, [csv_path], [png], report_rows(seconds), notes(rates, step))


def notes(rates: Sequence[float], step: float) -> list[str]:
    offers = ", ".join(f"{r:.0f}" for r in rates)
    return [
        f"In the packet path (dataplane nfqueue, flows spread by HMARK over the replicas' "
        f"queues): a UDP client and a TCP client (hping3 SYNs), each from its own address "
        f"with a new source port per packet, offered {offers} packets/s, {step:.0f} s each; "
        f"limit {LIMIT}/s per source, consistency `watch`, `split: even` (the reference "
        f"design's).",
        f"Received = what tcpdump at the server counted from that client in each whole "
        f"second of a step. Plateau: offers of at least {PLATEAU:g} x the limit; ok when "
        f"the mean is within {TOLERANCE:.0%} of the limit.",
    ]


def correctness_png(seconds: Sequence[Second], path: Path) -> Path:
    """Received against offered, one line per replica count and protocol, with the ideal."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = max((s.offered for s in seconds), default=3 * LIMIT)
    ax.plot([0, LIMIT, top], [0, LIMIT, LIMIT], color="0.6", ls="--", lw=1.5, label="ideal")
    markers = {1: "o", 2: "s", 4: "^"}
    for n in COUNTS:
        for proto, dash in (("udp", "-"), ("tcp", ":")):
            rows = [s for s in seconds if s.replicas == n and s.proto == proto]
            offers = sorted({s.offered for s in rows})
            means = [statistics.fmean(s.received for s in rows if s.offered == o) for o in offers]
            ax.plot(offers, means, marker=markers[n], ls=dash, label=f"{proto}, {n} replica(s)")
    ax.set_xlabel("offered by one client address (packets/s)")
    ax.set_ylabel("received by the server (packets/s, tcpdump)")
    ax.set_title(f"In the packet path: {LIMIT} packets/s per source at every replica count")
    ax.set_xlim(0, top * 1.03)
    ax.set_ylim(0, LIMIT * 1.6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    return plots.save(plt, fig, path)
