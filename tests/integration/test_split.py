"""The limit holds whatever the spread of a source's flows, with either algorithm.

Real etcd (the session fixture), real replica processes, real UDP on loopback.
One source on ONE flow reaches one replica of four: `even` holds it to that
replica's quarter (documenting why `demand` exists), `demand` to the limit
within a report interval or two. A heavy one-flow source beside 20 spread ones:
each gets its limit. The token bucket holds the rate under both splits and lets
at most `burst` through at once after idling. Timing bounds are generous: other
tests may share the two cores.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aio, until
from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer
from vmbox.state.demandsync import DemandReporter, watch_demand
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import Membership
from vmbox.testbed import Service
from vmbox.tools.load import LoadPlan, LoadResult, run_load

LIMIT = 100
REPORT_INTERVAL = 0.1


async def settled(svc: Service) -> None:
    """Wait until every replica holds a share.

    A fresh group holds none until the resize guard lifts, at a window boundary
    after every member acknowledged the group.
    """
    deadline = time.monotonic() + 5.0
    count = svc.spec.replicas.count
    while time.monotonic() < deadline:
        gauges = await svc.gauges()
        if len(gauges) == count and all(g.get("vmbox_share", 0) > 0 for g in gauges.values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"replicas hold no share after 5 s: {gauges}")


def per_second(history: list[tuple[int, int]], first: int, seconds: int) -> list[int]:
    """The echo server's counts for the epoch seconds first .. first + seconds - 1."""
    counts = dict(history)
    return [counts.get(s, 0) for s in range(first, first + seconds)]


def test_reports_are_on_the_member_lease_and_watched(store: EtcdStore, aio: Aio) -> None:
    """A report is one key per replica, seen by the watch, gone with the replica's lease."""

    async def scenario() -> list[dict[str, dict[str, int]]]:
        member = Membership(store, "t", "r1", {}, ttl=2)
        running = asyncio.create_task(member.run())
        seen: list[dict[str, dict[str, int]]] = []

        async def follow() -> None:
            async for reports in watch_demand(store, "t"):
                seen.append(reports)

        watching = asyncio.create_task(follow())
        try:
            await asyncio.wait_for(member.registered.wait(), 5)
            offered = {"10.0.0.1": 30, "10.0.0.2": 4}
            reporter = DemandReporter(
                store, "t", "r1", lambda: offered, lambda: member.lease, max_sources=1
            )
            assert await reporter.report()
            await until(lambda: seen[-1] == {"r1": {"10.0.0.1": 30}}, 2.0)
            await member.leave()  # the lease goes, and the report with it
            await until(lambda: seen[-1] == {}, 2.0)
            return seen
        finally:
            for task in (running, watching):
                task.cancel()
            await asyncio.gather(running, watching, return_exceptions=True)

    seen = aio.run(scenario())
    assert seen[0] == {} and {"r1": {"10.0.0.1": 30}} in seen


class _Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.times: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.times.append(time.time())


async def one_flow(
    target: tuple[str, int], rate: float, duration: float
) -> tuple[float, list[float]]:
    """Send `rate`/s from one socket (one flow); return the start time and each reply's time."""
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(
        _Replies, local_addr=("127.0.0.2", 0), remote_addr=target
    )
    try:
        start, sent = time.time(), 0
        while (elapsed := time.time() - start) < duration:
            while sent < int(elapsed * rate) + 1:
                transport.sendto(b"%16d" % sent)
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)  # the last replies
    finally:
        transport.close()
    return start, replies.times


@pytest.mark.parametrize("split", ["even", "demand"])
def test_one_flow_on_four_replicas(etcd: EtcdServer, tmp_path: Path, split: str) -> None:
    """even: the one replica that gets the flow passes its quarter; demand: the whole limit."""

    async def scenario() -> tuple[float, list[float], list[int]]:
        spec = make_spec(f"oneflow-{split}", 4, split=split)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            # Start just after a window begins, so the first 0.3 s lie in one window.
            await asyncio.sleep(1.02 - time.time() % 1.0)
            started, replies = await one_flow(spec.relay.listen, 300, 4.3)
            await asyncio.sleep(1.0)
            return started, replies, per_second(svc.echo.history, int(started), 4)

    started, replies, seconds = asyncio.run(scenario())
    # Past the even share (25) means the demand share has arrived.
    past_even = replies[25] - started if len(replies) > 25 else float("inf")
    print(
        f"one flow, 4 replicas, {split}: server received/s {seconds}; "
        f"reply 26 came {past_even * 1000:.0f} ms after the start"
    )
    if split == "even":
        assert all(20 <= c <= 30 for c in seconds), seconds  # the flaw: 100 / 4
    else:
        # Within 2 report intervals of the start, and the limit from the first second on.
        assert past_even <= 2 * REPORT_INTERVAL + 0.05, past_even
        assert all(95 <= c <= 105 for c in seconds), seconds


def test_mixed_heavy_and_spread_sources_each_get_the_limit(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """One source at 300/s on one flow plus 20 at 150/s over 4 flows each: each gets ~100/s."""

    async def scenario() -> list[list[int]]:
        spec = make_spec("mixed", 4, split="demand")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            plans = [LoadPlan(spec.relay.listen, rate=300, sources=1, flows=1, duration=6.0)]
            plans += [
                LoadPlan(
                    spec.relay.listen, rate=150, sources=1, flows=4, duration=6.0, source_offset=i
                )
                for i in range(1, 21)
            ]
            results: list[LoadResult] = await asyncio.gather(*(run_load(p) for p in plans))
            return [[s.received for s in r.seconds] for r in results]

    received = asyncio.run(scenario())
    means = [statistics.fmean(r[2:6]) for r in received]
    print(
        f"mixed: heavy source {received[0]}; per-source means over seconds 2-5: "
        f"{[round(m, 1) for m in means]}"
    )
    assert all(abs(m - LIMIT) <= 0.1 * LIMIT for m in means), means


def blast(target: tuple[str, int], count: int, source: str = "127.0.0.2") -> None:
    """`count` datagrams at once, each from its own flow (a fresh source port)."""
    socks = []
    try:
        for _ in range(min(count, 64)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            socks.append(sock)
        for i in range(count):
            socks[i % len(socks)].sendto(b"x" * 16, target)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("replicas", "split"), [(1, "even"), (1, "demand"), (4, "even"), (4, "demand")]
)
def test_token_bucket_holds_the_limit_and_the_burst(
    etcd: EtcdServer, tmp_path: Path, replicas: int, split: str
) -> None:
    """300/s over 64 flows: 100 ± 5 per second; after idling, a blast passes at most `burst`."""
    burst = 50

    async def scenario() -> tuple[list[int], int, list[float]]:
        spec = make_spec(
            f"tb{replicas}-{split}", replicas, algorithm="token_bucket", burst=burst, split=split
        )
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            plan = LoadPlan(spec.relay.listen, rate=300, sources=1, flows=64, duration=5.0)
            started = time.time()
            await run_load(plan)
            # Idle long enough for every bucket to fill (0.5 s), then blast as a second begins.
            idle = 1.0 - time.time() % 1.0
            await asyncio.sleep(idle if idle >= 0.7 else idle + 1.0)
            caps = [g.get("vmbox_burst_share", 0.0) for g in (await svc.gauges()).values()]
            blasted = int(time.time())
            blast(spec.relay.listen, 4 * burst)
            await asyncio.sleep(1.15 - time.time() % 1.0)  # the echo server closed that second
            return (
                per_second(svc.echo.history, int(started) + 1, 3),
                per_second(svc.echo.history, blasted, 1)[0],
                caps,
            )

    seconds, passed, caps = asyncio.run(scenario())
    print(
        f"token bucket, {replicas} replicas, {split}: server received/s {seconds}; "
        f"after idling, a blast of {4 * burst} passed {passed} (burst {burst}, caps {caps})"
    )
    assert abs(statistics.fmean(seconds) - LIMIT) <= 5, seconds
    assert all(abs(c - LIMIT) <= 15 for c in seconds), seconds
    # + what refills while the blast is relayed: the replicas take it in within
    # milliseconds on a quiet machine (+2), up to 50 ms when the full suite loads both
    # cores (55 seen with 4 replicas); a bucket that ignored its burst would pass 200.
    assert passed <= burst + LIMIT // 10, passed
    assert passed >= burst * 0.6, passed  # the buckets were full: a burst does pass
