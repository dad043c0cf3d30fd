"""A bounded UDP load generator that measures what comes back.

`vmbox load` (vmbox.cli, through `load_main`), the demo and the experiments
use it to offer a service a known rate, constant or ramped, from several
source addresses (127.0.0.2, .3, ...) so a per-source policy sees distinct
sources, over several flows (UDP sockets) so SO_REUSEPORT spreads them across
replicas. Each packet carries a sequence number and its send time; replies
(from an echo upstream, through the service) give per-second received counts
and round-trip latencies.

Everything is bounded: the run ends at `duration` plus a short grace for late
replies, packets are capped at ceil(max rate * duration) + slack, and the
latency sample is a fixed-size reservoir. The schedule is pure (`Schedule`),
so its math is tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmbox.dataplane.sockets import Address, format_address, resolve
from vmbox.tools.loadplan import HEADER, LoadPlan, Schedule, flow_sources

__all__ = ["LatencySummary", "LoadPlan", "LoadResult", "SecondReport", "load_main", "run_load"]

GRACE = 0.5  # seconds to wait for late replies after the last send
MAX_RTTS = 100_000  # latency reservoir size
TICK = 0.05  # longest sleep, so per-second reports stay timely at low rates
WRITE_LIMIT = 1024 * 1024  # bytes a flow may buffer before sends are skipped


@dataclass(frozen=True)
class SecondReport:
    second: int
    offered: float
    sent: int
    received: int


@dataclass(frozen=True)
class LatencySummary:
    count: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class LoadResult:
    sent: int
    received: int
    seconds: list[SecondReport]
    latency: LatencySummary | None
    rtts_ms: list[float] = field(default_factory=list)  # a uniform sample, at most MAX_RTTS
    errors: int = 0  # ICMP errors (e.g. nothing listens on the target)
    skipped: int = 0  # packets not sent because the sender fell too far behind


class _Latency:
    """Exact min/mean/max plus a fixed-size reservoir for percentiles."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0
        self.sample: list[float] = []
        self._rng = random.Random(0)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)
        if len(self.sample) < MAX_RTTS:
            self.sample.append(ms)
        else:
            j = self._rng.randrange(self.count)
            if j < MAX_RTTS:
                self.sample[j] = ms

    def summary(self) -> LatencySummary | None:
        if not self.count:
            return None
        ordered = sorted(self.sample)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]

        mean = self.total / self.count
        return LatencySummary(self.count, self.min, mean, pct(0.5), pct(0.99), self.max)


class _Flow(asyncio.DatagramProtocol):
    def __init__(self, run: _Run) -> None:
        self.run = run

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.run.on_reply(data)

    def error_received(self, exc: Exception) -> None:
        self.run.errors += 1


class _Run:
    """The state of one run: the flows, the schedule and what came back."""

    def __init__(self, plan: LoadPlan, on_second: Callable[[SecondReport], None] | None) -> None:
        self.plan = plan
        self.schedule = Schedule(plan)
        self.on_second = on_second
        self.transports: list[asyncio.DatagramTransport] = []
        n_seconds = len(self.schedule.rates)
        self.sent = [0] * n_seconds
        self.received = [0] * n_seconds
        self.seen = bytearray(self.schedule.cap)  # one byte per sequence number
        self.latency = _Latency()
        self.reports: list[SecondReport] = []
        self.errors = self.skipped = self.n = 0
        self.start = time.perf_counter()
        self.sending = True
        self.all_back = asyncio.Event()
        self.padding = bytes(plan.payload - HEADER.size)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def on_reply(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            return
        seq, sent_ns = HEADER.unpack_from(data)
        if seq >= len(self.seen) or self.seen[seq]:
            return  # not ours, or a duplicate
        self.seen[seq] = 1
        self.latency.add((time.perf_counter_ns() - sent_ns) / 1e6)
        self.received[min(int(self.elapsed()), len(self.received) - 1)] += 1
        if not self.sending and self.latency.count >= sum(self.sent):
            self.all_back.set()

    async def open_flows(self) -> None:
        loop = asyncio.get_running_loop()
        _, target = await resolve(self.plan.target)
        if ipaddress.ip_address(target[0]).is_loopback:
            binds = flow_sources(self.plan.sources, self.plan.flows, self.plan.source_offset)
        elif self.plan.sources == 1 and not self.plan.source_offset:
            binds = ["0.0.0.0"] * self.plan.flows
        else:
            where = format_address(self.plan.target)
            raise ValueError(f"several sources need a loopback target, not {where}")
        for source in binds:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Flow(self), local_addr=(source, 0), remote_addr=target
            )
            self.transports.append(transport)

    def send_due(self) -> None:
        """Send every packet whose time has come, skipping any far-behind backlog."""
        due = self.schedule.due(self.elapsed())
        second = min(int(self.elapsed()), len(self.sent) - 1)
        # Catching up after a stall is bounded to ~20 ms of traffic, so a
        # pause never turns into a burst the service would not otherwise see.
        burst = max(len(self.transports), math.ceil(self.schedule.rates[second] * 0.02), 8)
        if due - self.n > burst:
            self.skipped += due - self.n - burst
            self.n = due - burst
        flows = self.transports
        for seq in range(self.n, due):
            transport = flows[seq % len(flows)]
            if transport.get_write_buffer_size() > WRITE_LIMIT:  # type: ignore[attr-defined]
                self.skipped += 1
                continue
            transport.sendto(HEADER.pack(seq, time.perf_counter_ns()) + self.padding)
            self.sent[second] += 1
        self.n = max(self.n, due)

    def report_until(self, second: int) -> None:
        """Emit reports for every second before `second` not yet reported."""
        while len(self.reports) < min(second, len(self.sent)):
            s = len(self.reports)
            report = SecondReport(s, self.schedule.rates[s], self.sent[s], self.received[s])
            self.reports.append(report)
            if self.on_second is not None:
                self.on_second(report)

    async def send_all(self) -> None:
        self.start = time.perf_counter()
        while self.elapsed() < self.plan.duration:
            self.send_due()
            self.report_until(int(self.elapsed()))
            wait = self.schedule.time_of(self.n) - self.elapsed()
            await asyncio.sleep(min(max(wait, 0.0), TICK, self.plan.duration - self.elapsed()))
        self.send_due()  # packets due in the last sleep before the end

    async def drain(self) -> None:
        """Wait for late replies: until all are back or GRACE passes."""
        self.sending = False
        if self.latency.count < sum(self.sent):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_back.wait(), GRACE)
        self.report_until(len(self.sent))

    def result(self) -> LoadResult:
        return LoadResult(
            sent=sum(self.sent),
            received=self.latency.count,
            seconds=list(self.reports),
            latency=self.latency.summary(),
            rtts_ms=list(self.latency.sample),
            errors=self.errors,
            skipped=self.skipped,
        )


async def run_load(
    plan: LoadPlan, on_second: Callable[[SecondReport], None] | None = None
) -> LoadResult:
    """Send `plan` and return what was sent and received; `on_second` sees each second."""
    run = _Run(plan, on_second)
    try:
        await run.open_flows()
        await run.send_all()
        await run.drain()
    finally:
        for transport in run.transports:
            transport.close()
    return run.result()


def format_second(report: SecondReport) -> str:
    return f"{report.second:>5} {report.offered:>10.0f} {report.sent:>9} {report.received:>9}"


def latency_table(result: LoadResult) -> Any:
    """A rich Table summarizing the run (imported lazily: rich is only for the CLI)."""
    from rich.table import Table

    table = Table(title="load summary", title_justify="left")
    for column in ("sent", "received", "loss", "min ms", "mean ms", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    loss = 1 - result.received / result.sent if result.sent else 0.0
    lat = result.latency
    times = (
        [f"{v:.3f}" for v in (lat.min_ms, lat.mean_ms, lat.p50_ms, lat.p99_ms, lat.max_ms)]
        if lat
        else ["-"] * 5
    )
    table.add_row(str(result.sent), str(result.received), f"{loss:.1%}", *times)
    return table


async def load_main(
    target: Address,
    rate: float | None,
    ramp: tuple[float, float, float] | None,
    sources: int,
    flows: int,
    duration: float,
) -> LoadResult:
    """`vmbox load`: per-second lines, then a latency table. ValueError/OSError are one line."""
    from rich.console import Console

    plan = LoadPlan(target, rate, ramp, sources, flows, duration)
    console = Console()
    console.print(f"load -> {format_address(plan.target)}: {sources} sources, {flows} flows")
    console.print(f"{'t':>5} {'offered/s':>10} {'sent':>9} {'received':>9}", highlight=False)
    result = await run_load(plan, lambda r: console.print(format_second(r), highlight=False))
    console.print(latency_table(result))
    if result.errors:
        console.print(f"{result.errors} ICMP errors: is anything listening on the target?")
    return result
