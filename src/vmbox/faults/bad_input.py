"""Faults of the data path: odd datagrams, and an upstream that vanishes under load.

Registered in vmbox.faults. Both run one replica (limit 100/s per source)
with a steady load of two sources at 150/s each, so every window is full and
the upstream may receive at most 100 per source per second.

- odd datagrams: three more sources send empty, 65,507-byte (the largest IPv4
  UDP payload) and alternating datagrams at 150/s each; they must be limited
  like any others, come back intact from the echo, and leave normal traffic
  passing at the limit.
- upstream vanished: the echo server stops while datagrams keep arriving, then
  starts again on the same port; the replica must count the upstream errors,
  stay up, and relay again once the upstream is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.sampler import ReplicaSampler, finish
from vmbox.faults.service import LIMIT, fault_service, fault_spec, steady_load
from vmbox.faults.snapshot import read_state
from vmbox.faults.traffic import over_limit, received_between, socket_drops
from vmbox.tools.echo import EchoServer

NORMAL_SOURCES = 2  # the steady load's 127.0.0.2 and 127.0.0.3
HUGE = 65507  # the largest UDP payload over IPv4
ODD = {"127.0.5.1": "empty", "127.0.5.2": "huge", "127.0.5.3": "mixed"}
PASSING = 0.8  # a healthy replica passes at least this share of its limit


@dataclass
class OddTally:
    """What the odd sources sent and what came back (intact) through the service."""

    sent: dict[str, int] = field(default_factory=lambda: {"empty": 0, "huge": 0})
    back: dict[str, int] = field(default_factory=lambda: {"empty": 0, "huge": 0})
    mangled: int = 0  # replies that were neither empty nor the huge payload


def _odd_socket(source: str, target: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)  # room for huge replies
    sock.bind((source, 0))
    sock.connect(target)
    sock.setblocking(False)
    return sock


def send_odd(target: tuple[str, int], rate: float, duration: float) -> OddTally:
    """Each odd source sends `rate` datagrams/s for `duration` s (a thread; bounded by both)."""
    tally, payload = OddTally(), bytes(range(256)) * (HUGE // 256) + bytes(HUGE % 256)
    socks = {source: _odd_socket(source, target) for source in ODD}
    start = time.monotonic()
    due = {source: 0 for source in ODD}
    try:
        while (elapsed := time.monotonic() - start) < duration + 0.5:
            for source, kind in ODD.items():
                while elapsed < duration and due[source] <= elapsed * rate:
                    k, due[source] = due[source], due[source] + 1
                    huge = kind == "huge" or (kind == "mixed" and k % 2 == 1)
                    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                        socks[source].send(payload if huge else b"")
                        tally.sent["huge" if huge else "empty"] += 1
            for sock in socks.values():
                _collect(sock, payload, tally)
            time.sleep(0.005)
    finally:
        for sock in socks.values():
            sock.close()
    return tally


def _collect(sock: socket.socket, payload: bytes, tally: OddTally) -> None:
    for _ in range(1000):  # bounded; the buffer holds far fewer
        try:
            data = sock.recv(HUGE + 1)
        except (BlockingIOError, ConnectionRefusedError):
            return
        if data == b"":
            tally.back["empty"] += 1
        elif data == payload:
            tally.back["huge"] += 1
        else:
            tally.mangled += 1


async def odd_datagrams(scale: Scale, say: Say) -> FaultResult:
    """Empty and 65,507-byte datagrams among normal traffic."""
    duration = 10.0 if scale == "full" else 5.0
    result = FaultResult("odd datagrams")
    async with fault_service(lambda: fault_spec("odd", 1)) as service:
        listen = service.spec.relay.listen
        before = await read_state(service.store, service.spec.service)
        drops = socket_drops(listen)
        async with ReplicaSampler(service) as sampler:
            say(
                f"odd datagrams: empty and {HUGE:,}-byte datagrams from {len(ODD)} sources "
                f"beside normal load, {duration:.0f} s"
            )
            started = int(time.time())
            load, tally = await asyncio.gather(
                steady_load(listen, NORMAL_SOURCES, duration),
                asyncio.to_thread(send_odd, listen, 1.5 * LIMIT, duration),
            )
            ended = int(time.time())
        drops = socket_drops(listen) - drops
        after = await read_state(service.store, service.spec.service)
        history = list(service.echo.history)
    result.injected = sum(tally.sent.values())
    cap = LIMIT * (NORMAL_SOURCES + len(ODD))
    result.over_limit = over_limit(history, lambda s: cap if started <= s <= ended else None)
    # The load's own seconds straddle two windows each; their mean is the rate that passed.
    middle = [second.received for second in load.seconds[1:-1]] or [0]
    normal = sum(middle) / len(middle) / (NORMAL_SOURCES * LIMIT)
    windows = duration - 1  # the first window is partial
    result.survived = normal >= PASSING
    result.check(result.survived, f"normal traffic passed {normal:.0%} of its limit")
    # The empty source and half the mixed one send empty datagrams: 1.5 sources' worth.
    for kind in ("empty", "huge"):
        share = tally.back[kind] / (1.5 * LIMIT * windows)
        result.check(share >= PASSING, f"{kind} datagrams came back at {share:.0%} of the limit")
    result.check(tally.mangled == 0, f"{tally.mangled} replies came back mangled")
    result.notes += [
        f"sent {tally.sent['empty']:,} empty, {tally.sent['huge']:,} huge; back "
        f"{tally.back['empty']:,} and {tally.back['huge']:,} intact",
        f"normal traffic at {normal:.0%} of the limit; kernel drops {drops:,}",
    ]
    return finish(result, sampler, before, after)


async def upstream_vanished(scale: Scale, say: Say) -> FaultResult:
    """Stop the upstream under load, keep sending, start it again: the replica carries on."""
    cycles, lead, gone, back = (3 if scale == "full" else 1), 2.0, 2.0, 3.0
    result = FaultResult("upstream vanished")
    async with fault_service(lambda: fault_spec("vanish", 1)) as service:
        listen = service.spec.relay.listen
        before = await read_state(service.store, service.spec.service)
        echoes = [service.echo]
        outages: list[tuple[float, float]] = []
        async with ReplicaSampler(service) as sampler:
            say(f"upstream vanished: {cycles} outage(s) of {gone:.0f} s under load")
            started = int(time.time())
            load = asyncio.create_task(
                steady_load(listen, NORMAL_SOURCES, lead + cycles * (gone + back))
            )
            try:
                await asyncio.sleep(lead)
                for _ in range(cycles):
                    await echoes[-1].close()
                    went = time.time()
                    await asyncio.sleep(gone)
                    echoes.append(EchoServer(service.spec.relay.upstream))
                    await echoes[-1].start()
                    outages.append((went, time.time()))
                    await asyncio.sleep(back)
                await load
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
                for echo in echoes[1:]:
                    await echo.close()
            ended = int(time.time())
        after = await read_state(service.store, service.spec.service)
    counts: dict[int, int] = {}
    for echo in echoes:
        for second, received in echo.history:
            counts[second] = counts.get(second, 0) + received
    cap = LIMIT * NORMAL_SOURCES
    result.injected = len(outages)
    result.over_limit = over_limit(counts.items(), lambda s: cap if started <= s <= ended else None)
    _judge_vanished(result, sampler, counts, outages, back)
    return finish(result, sampler, before, after)


def _judge_vanished(
    result: FaultResult,
    sampler: ReplicaSampler,
    counts: dict[int, int],
    outages: list[tuple[float, float]],
    back: float,
) -> None:
    errors = sampler.total("vmbox_upstream_errors_total")
    result.check(errors > 0, "the replica counted no upstream errors while the upstream was gone")
    # The whole seconds after each return, but the first (the socket may have returned mid-way).
    resumed = [
        received_between(counts.items(), int(up) + 1, int(up + back) - 1) for _, up in outages
    ]
    worst = min((min(seconds) for seconds in resumed if seconds), default=0)
    share = worst / (LIMIT * NORMAL_SOURCES)
    result.survived = share >= PASSING
    result.check(result.survived, f"after the upstream came back, only {share:.0%} of the limit")
    result.notes += [
        f"{errors:,.0f} upstream errors counted; {len(outages)} outage(s) of "
        f"{outages[0][1] - outages[0][0]:.1f} s"
        if outages
        else "no outage happened",
        f"after each return: {worst:,} of {LIMIT * NORMAL_SOURCES:,} per second at the worst",
    ]
