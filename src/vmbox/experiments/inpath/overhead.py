"""`vmbox experiment overhead --dataplane nfqueue`: what a firewall in the path costs a ping.

What the reference design measured: the round trip through the firewall with
no firewall at all, and with it at none / poll / per-packet consistency. Here
ping runs from the lab's client namespace to its server every few
milliseconds: `none` is the lab with no service (the gateway only forwards);
`local`, `poll` (every 100 ms) and `strong` (a linearizable etcd read per
packet, or per batch of packets that arrive while one is pending) are a
one-replica in-path service whose limit (1,000,000/s) never binds, under
`split: even` (no demand reports beside the mode's own cost). Only the
echo requests cross the queue (the service steers what arrives from the
client side). Rounds alternate the order of the variants, each round a fresh
service. Writes overhead_nfqueue.csv, overhead_nfqueue_rtts.csv and the PNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vmbox.experiments import plots
from vmbox.experiments.inpath.setup import experiment_lab
from vmbox.experiments.results import (
    POLL_SHARE,
    ExperimentError,
    ExperimentResult,
    ReportRow,
    Scale,
    new_progress,
    percentile,
    poll_about_free,
    write_csv,
)
from vmbox.lab import LabPlan
from vmbox.labclients import ping_rtts
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import inpath_spec, private_store, running_service, until_second

NAME = "overhead-nfqueue"
NO_LIMIT = 1_000_000
INTERVAL = 0.005  # s between pings: 200/s, a modest rate
WARMUP = 20  # pings through each fresh service first, not counted
VARIANTS = ("none", "local", "poll", "strong")
SIZES: dict[str, tuple[int, int]] = {"full": (2_000, 4), "small": (300, 2)}  # pings, rounds
COLUMNS: tuple[str, ...] = ("variant", "sent", "received", "min_ms", "mean_ms", "p50_ms")
COLUMNS += ("p99_ms", "max_ms", "p50_vs_none", "p99_vs_none", "mean_vs_none")


@dataclass(frozen=True)
class Stats:
    sent: int
    received: int
    min: float
    mean: float
    p50: float
    p99: float
    max: float


def summarize(rtts: Sequence[float], sent: int) -> Stats:
    if not rtts:
        raise ExperimentError("no ping came back through the lab")
    o = sorted(rtts)
    return Stats(
        sent, len(o), o[0], statistics.fmean(o), percentile(o, 0.5), percentile(o, 0.99), o[-1]
    )


@contextlib.asynccontextmanager
async def firewall(store: EtcdStore, lab: LabPlan, variant: str, r: int) -> AsyncIterator[None]:
    """The variant's service in the lab's gateway for the block (none: no service)."""
    if variant == "none":
        yield
        return
    # split: even: each variant's cost alone (demand, the default, would add its reports).
    spec = inpath_spec(
        f"over{variant}{r}",
        lab,
        1,
        limit=NO_LIMIT,
        consistency=variant,
        poll_interval=0.1,
        split="even",
    )
    async with running_service(store, spec):
        await until_second(0.1)  # a replica admits nothing in the window it joined in
        await asyncio.to_thread(ping_rtts, lab, WARMUP, INTERVAL)
        yield


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    pings, rounds = SIZES[scale]
    per_round = pings // rounds
    rtts: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with experiment_lab("overhead", clients=1) as lab, new_progress(console) as progress:
        bar = progress.add_task("overhead", total=rounds * len(VARIANTS))
        async with private_store() as store:
            for r in range(rounds):
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    progress.update(bar, description=f"round {r + 1}: {variant}")
                    async with asyncio.timeout(per_round * INTERVAL + 60):
                        async with firewall(store, lab, variant, r):
                            got = await asyncio.to_thread(ping_rtts, lab, per_round, INTERVAL)
                    rtts[variant] += got
                    progress.advance(bar)
    stats = {v: summarize(rtts[v], per_round * rounds) for v in VARIANTS}
    return write_outputs(out_dir, stats, rtts, pings, rounds)


def write_outputs(
    out_dir: Path, stats: dict[str, Stats], rtts: dict[str, list[float]], pings: int, rounds: int
) -> ExperimentResult:
    none = stats["none"]
    summary = write_csv(
        out_dir / "overhead_nfqueue.csv",
        COLUMNS,
        (
            (v, s.sent, s.received, s.min, s.mean, s.p50, s.p99, s.max, *ratios(s, none))
            for v, s in stats.items()
        ),
    )
    samples = write_csv(
        out_dir / "overhead_nfqueue_rtts.csv",
        ("variant", "rtt_ms"),
        ((v, x) for v, xs in rtts.items() for x in xs),
    )
    png = overhead_png(stats, out_dir / "overhead_nfqueue.png")
    notes = [
        f"{pings:,} pings per variant every {INTERVAL * 1000:g} ms from the lab's client to its "
        f"server, in {rounds} rounds of alternating order, each round a fresh one-replica "
        f"service after {WARMUP} uncounted pings; limit {NO_LIMIT:,}/s, so nothing is dropped.",
        "none: the lab with no service (the gateway forwards in the kernel); local: the "
        "in-path replica without shared state; poll: the limit read every 100 ms; strong: "
        "a linearizable read per packet (ping's packets come one at a time).",
        "Ratios are against none: what putting the firewall in the path costs a round trip. "
        f"poll is ok when its p50 exceeds local's by at most {POLL_SHARE:.0%} of what "
        "strong adds to local; strong is ok when slower than local and poll.",
    ]
    return ExperimentResult(NAME, [summary, samples], [png], report_rows(stats), notes)


def ratios(s: Stats, none: Stats) -> tuple[float, float, float]:
    return s.p50 / none.p50, s.p99 / none.p99, s.mean / none.mean


PUBLISHED = {"local": "not published", "poll": "≈ 1x base", "strong": "≈ 3x base"}


def report_rows(stats: dict[str, Stats]) -> list[ReportRow]:
    none, local, poll = stats["none"], stats["local"], stats["poll"]
    rows = [
        ReportRow(
            "ping round trip, no firewall (the lab forwarding)",
            "not published",
            f"p50 {none.p50:.3f} ms, p99 {none.p99:.3f} ms (mean {none.mean:.3f})",
        )
    ]
    for v in VARIANTS[1:]:
        s = stats[v]
        ok: bool | None = None
        if v == "poll":
            ok = poll_about_free(local.p50, poll.p50, stats["strong"].p50)
        elif v == "strong":
            ok = s.p50 > max(poll.p50, local.p50)
        rows.append(
            ReportRow(
                f"ping round trip through the in-path firewall, {v}",
                PUBLISHED[v] + (" (base: local)" if v != "local" else ""),
                f"p50 {s.p50:.3f} ms ({s.p50 / none.p50:.2f}x none, {s.p50 / local.p50:.2f}x "
                f"local), p99 {s.p99:.3f} ms ({s.p99 / none.p99:.2f}x none), "
                f"{s.received}/{s.sent} back",
                ok,
            )
        )
    return rows


def overhead_png(stats: dict[str, Stats], path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(stats)
    for j, field in enumerate(("p50", "mean", "p99")):
        xs = [i + (j - 1) * 0.25 for i in range(len(names))]
        ax.bar(xs, [getattr(stats[n], field) for n in names], 0.25, label=field)
    none = stats["none"].p50
    for i, n in enumerate(names):
        s = stats[n]
        ax.annotate(
            f"p50 {s.p50 / none:.2f}x",
            (i, s.p99),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ping round trip (ms)")
    ax.set_title("Round trip through the in-path firewall, by consistency mode")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(plt, fig, path)
