"""The flood fault: a million datagrams from 100,000 source addresses at one replica.

Registered in vmbox.faults. Sender processes (vmbox.faults.sender) send one
datagram per source per round, round after round, at a fixed total rate, so
every window sees more fresh sources than the limiter's table holds. The limit
is 1 packet/s per source here, which makes each window's bound exact and far
below the flood: the table's `max_sources` sources pass one packet each and the
overflow counter one more, so the upstream may receive at most max_sources + 1
per second. What is measured:

- the replica's RSS, sampled every 50 ms, against RSS_BOUND; then the flood is
  repeated over the same sources until the flow table is full (at most WARMUPS
  times), and once more, over which RSS may grow by at most LEAK_BOUND bytes per
  datagram (memory kept per datagram grows with the flood, which a flat bound
  only sees once it is large);
- the flow table (gauge vmbox_flows), which must never exceed the spec's max_flows;
- the limiter's table (gauge vmbox_sources), which must never exceed max_sources + 1;
- the kernel's drops at the service socket (/proc/net/udp), so that sent =
  received by the replica + dropped by the kernel accounts for every datagram;
- packets over the limit at the upstream, and the service's etcd state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.sampler import MIB, ReplicaSampler, finish
from vmbox.faults.service import fault_service, fault_spec, steady_load
from vmbox.faults.snapshot import read_state
from vmbox.faults.traffic import over_limit, socket_drops
from vmbox.spec import Spec

FLOOD_LIMIT = 1  # packets per second per source: makes each window's bound max_sources + 1
MAX_SOURCES = 10_000
# An idle replica's RSS is about 64 MiB (28 MiB of it shared libraries). The
# flood fills the flow table (16,384 upstream sockets by default, about 2 KiB of
# Python objects each, 32 MiB) and each window's source table (10,001 entries,
# about 1 MiB); the allocator keeps its high-water mark. 160 MiB leaves 60 MiB
# for that slack; memory that grew with the datagram count would pass it.
RSS_BOUND = 160 * MIB
# The flood once more over the same sources, RSS at its high-water mark: both
# tables full and reused. The first small flood leaves the flow table short of
# max_flows (about 14,900 of 16,384: flows open only for admitted datagrams),
# and each repeat that fills it grows RSS by 6 to 12 MiB (2 KiB a flow); so
# the flood is repeated until the table is full (at least once: a first flood
# that filled it was followed by 4.2 to 4.8 MiB of growth on the next repeat,
# 1.0 MiB on the one after), then once more to measure.
# Over that repeat a replica that keeps nothing per datagram grows by 0.01 to
# 1.3 MiB on a quiet machine (measured: 0.11, 0.26, 0.01 over three repeats in
# a row), once by 4.3 MiB with other test runs beside it, the allocator
# settling. Anything kept per datagram costs more than 64 bytes (a dict entry
# alone is about 100); the flat RSS_BOUND lets 500 bytes per datagram through
# at small scale.
REPEAT = {"full": 200_000, "small": 100_000}  # datagrams
WARMUPS = 3  # repeats at most until the flow table is full, before the measured one
LEAK_BOUND = 64  # bytes of RSS growth per datagram of the repeat
SETTLE = 10.0  # seconds at most for the replica to work through its socket's backlog


@dataclass(frozen=True)
class FloodPlan:
    datagrams: int
    sources: int
    senders: int
    rate: float  # all senders together, datagrams/s

    @property
    def seconds(self) -> float:
        return self.datagrams / self.rate


PLANS = {
    "full": FloodPlan(datagrams=1_000_000, sources=100_000, senders=4, rate=25_000),
    "small": FloodPlan(datagrams=100_000, sources=20_000, senders=2, rate=20_000),
}


@dataclass
class Sent:
    """What the senders report together."""

    sent: int
    planned: int
    seconds: dict[int, list[int]]  # epoch second -> [datagrams, distinct sources, most per source]


async def _one_sender(argv: list[str], timeout: float) -> dict[str, object]:
    # subprocess.run in a thread rather than the loop's subprocess support:
    # uvloop forks to spawn, and a fork beside gRPC's threads is what gRPC warns about.
    command = [sys.executable, "-m", "vmbox.faults.sender", *argv]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"a flood sender did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        raise RuntimeError(f"flood sender exited {done.returncode}: {lines[-1]}")
    report: dict[str, object] = json.loads(done.stdout)
    return report


async def send_flood(target: tuple[str, int], plan: FloodPlan) -> Sent:
    """Run the plan's sender processes side by side, starting together; their reports merged."""
    rounds = plan.datagrams // plan.sources
    deadline = plan.seconds * 2 + 10  # a sender that falls this far behind stops
    start_at = time.time() + 1.0  # the interpreters start meanwhile
    common = [
        "--target",
        f"{target[0]}:{target[1]}",
        "--sources",
        str(plan.sources),
        "--parts",
        str(plan.senders),
        "--rounds",
        str(rounds),
        "--rate",
        str(plan.rate / plan.senders),
        "--start-at",
        f"{start_at:.3f}",
        "--deadline",
        str(deadline),
    ]
    reports = await asyncio.gather(
        *(_one_sender([*common, "--part", str(i)], deadline + 15) for i in range(plan.senders))
    )
    merged = Sent(0, 0, {})
    for report in reports:
        merged.sent += int(str(report["sent"]))
        merged.planned += int(str(report["planned"]))
        seconds = report["seconds"]
        assert isinstance(seconds, dict)
        for second, (count, distinct, most) in seconds.items():
            row = merged.seconds.setdefault(int(second), [0, 0, 0])
            row[0] += count
            row[1] += distinct  # the senders' sources are disjoint
            row[2] = max(row[2], most)
    return merged


def _notes(result: FaultResult, sent: Sent, plan: FloodPlan) -> None:
    f = result.figures
    result.notes += [
        f"{plan.sources:,} sources, {f['flood_s']:.1f} s: the replica got "
        f"{f['received']:,.0f}, the kernel dropped {f['kernel_drops']:,.0f}",
        f"table <= {f['table_max']:,.0f} (bound {MAX_SOURCES + 1:,}); "
        f"{f['overflowed']:,.0f} overflowed; flows <= {f['flows_max']:,.0f}",
        f"RSS {f['idle_rss'] / MIB:.0f} -> {f['peak_rss'] / MIB:.0f} MiB "
        f"(bound {RSS_BOUND / MIB:.0f}); {f['repeat_growth'] / MIB:+.1f} MiB over a repeat of "
        f"{f['repeat_sent']:,.0f} datagrams ({f['repeat_bytes_per_datagram']:.1f} bytes each), "
        f"after {f['warmups']:.0f} warm-up repeat(s)",
    ]
    if f["late"]:
        result.notes.append(
            f"{f['late']:,.0f} admitted late in a window reached the upstream in the next"
        )


async def flood(scale: Scale, say: Say) -> FaultResult:
    """Flood one replica from many fresh sources; its memory and table must stay bounded."""
    plan = PLANS[scale]
    result = FaultResult("flood")

    def spec() -> Spec:
        return fault_spec("flood", 1, limit=FLOOD_LIMIT, max_sources=MAX_SOURCES)

    async with fault_service(spec) as service:
        listen = service.spec.relay.listen
        before = await read_state(service.store, service.spec.service)
        drops_before = socket_drops(listen)
        async with ReplicaSampler(service) as watch:
            say(
                f"flood: {plan.datagrams:,} datagrams from {plan.sources:,} sources "
                f"at {plan.rate:,.0f}/s by {plan.senders} senders"
            )
            started = time.monotonic()
            sent = await send_flood(listen, plan)
            result.figures["flood_s"] = time.monotonic() - started - 1.0
            # The replica works through what the kernel queued (longer on a busy machine).
            received = await watch.settled("vmbox_packets_received_total", SETTLE)
            result.figures["received"] = received
            result.figures["kernel_drops"] = socket_drops(listen) - drops_before
            again = await _repeat(
                listen, replace(plan, datagrams=REPEAT[scale]), watch, result, service.spec
            )
            probe = await steady_load(listen, sources=2, duration=2.0)
        after = await read_state(service.store, service.spec.service)
        history = list(service.echo.history)
    result.injected = sent.sent
    flooded = sorted({*sent.seconds, *(second for one in again for second in one.seconds)})
    bound = MAX_SOURCES * FLOOD_LIMIT + FLOOD_LIMIT

    def allowed(second: int) -> int | None:
        return bound if flooded and flooded[0] <= second <= flooded[-1] + 1 else None

    result.over_limit = over_limit(history, allowed)
    # For the record: the same count without the one-window carry (see over_limit).
    result.figures["late"] = over_limit(history, allowed, carry=False) - result.over_limit
    _judge(result, watch, sent, probe.received)
    _judge_leaks(result, service.spec.max_flows)
    _notes(result, sent, plan)
    return finish(result, watch, before, after)


async def _repeat(
    target: tuple[str, int], plan: FloodPlan, watch: ReplicaSampler, result: FaultResult, spec: Spec
) -> list[Sent]:
    """The flood again until the flow table is full, then once more: how much RSS grows by."""
    sent: list[Sent] = []

    async def once() -> None:
        sent.append(await send_flood(target, plan))
        await watch.settled("vmbox_packets_received_total", SETTLE)  # its queue worked through

    # At least once: the first repeat over sources the table has seen still settles the
    # allocator (4.2 to 4.8 MiB measured after a first flood that filled the table).
    while len(sent) < WARMUPS and (
        not sent or watch.highest.get("vmbox_flows", 0.0) < spec.max_flows
    ):
        await once()
    before = watch.peak_rss
    await once()
    growth = watch.peak_rss - before
    result.figures.update(
        warmups=len(sent) - 1,
        repeat_sent=sent[-1].sent,
        repeat_growth=growth,
        repeat_bytes_per_datagram=growth / max(1, sent[-1].sent),
    )
    return sent


def _judge_leaks(result: FaultResult, max_flows: int) -> None:
    """Memory that grows with the datagrams, and a flow table past its bound."""
    f = result.figures
    per_datagram = f["repeat_bytes_per_datagram"]
    result.check(
        per_datagram <= LEAK_BOUND,
        f"RSS grew {f['repeat_growth'] / MIB:.1f} MiB over a repeat of the flood, "
        f"{per_datagram:.0f} bytes per datagram (bound {LEAK_BOUND})",
    )
    f["max_flows"] = max_flows
    result.check(
        f["flows_max"] <= max_flows, f"flows reached {f['flows_max']:,.0f} > {max_flows:,}"
    )


def _judge(result: FaultResult, watch: ReplicaSampler, sent: Sent, probe_replies: int) -> None:
    f = result.figures
    f.update(
        sent=sent.sent,
        table_max=watch.highest.get("vmbox_sources", 0.0),
        flows_max=watch.highest.get("vmbox_flows", 0.0),
        overflowed=watch.total("vmbox_overflowed_sources"),
        idle_rss=watch.idle_rss,
        peak_rss=watch.peak_rss,
    )
    result.check(sent.sent == sent.planned, f"sent {sent.sent:,} of {sent.planned:,} planned")
    result.check(
        f["table_max"] <= MAX_SOURCES + 1,
        f"table reached {f['table_max']:,.0f} > {MAX_SOURCES + 1:,}",
    )
    result.check(f["overflowed"] > 0, "no source overflowed the table: the flood was too thin")
    peak = f"peak RSS {watch.peak_rss / MIB:.0f} MiB >= {RSS_BOUND / MIB:.0f} MiB"
    result.check(watch.peak_rss < RSS_BOUND, peak)
    unaccounted = sent.sent - f["received"] - f["kernel_drops"]
    f["unaccounted"] = unaccounted
    lost = f"{unaccounted:,.0f} datagrams neither received nor dropped by the kernel"
    result.check(abs(unaccounted) <= 0.001 * sent.sent, lost)
    # Surviving a flood: the replica still relays afterwards (the probe's sources pass
    # FLOOD_LIMIT packets per second each).
    result.survived = probe_replies >= 2
    result.check(result.survived, f"after the flood only {probe_replies} probe replies came back")
