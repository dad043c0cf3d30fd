"""A relay replica joining a running one: the kernel hands it no flow before it may admit.

Two real replicas (vmbox.replica.Replica, their relays on loopback) share the
in-memory store in this process. A thread sends a steady load over many flows
(so SO_REUSEPORT spreads them over every socket in the group) under a limit it
never reaches. A joiner admits nothing until it is registered, its resize
guard is down and the window it started in is over; if it were in the group
before that, the flows hashed to it would be dropped there. Bound at that
moment instead (Replica._bind), it loses none of them, and it still takes its
part of the flows once bound.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

from vmbox.replica import Replica
from vmbox.spec import Spec, parse_spec
from vmbox.state.memory import MemoryStore
from vmbox.testbed import free_udp_port, upstream_echo

OPEN = 1_000_000  # a limit the load never reaches: every datagram dropped is a defect
FLOWS = 32
INTERVAL = 0.002  # 500 datagrams/s over all flows
WINDOW = 1.0


def join_spec() -> Spec:
    return parse_spec(
        {
            "service": "join",
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"function": "ratelimit", "limit": OPEN, "window": f"{WINDOW:g}s"},
            "replicas": {"count": 2, "min": 1, "max": 2},
            "lease_ttl": 2,
        }
    )


def _send(target: tuple[str, int], stop: threading.Event, sent: list[int], limit: float) -> None:
    socks = []
    try:
        for _ in range(FLOWS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            socks[sent[0] % FLOWS].sendto(b"x", target)
            sent[0] += 1
            time.sleep(INTERVAL)
    finally:
        for sock in socks:
            sock.close()


async def until(cond: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert cond(), f"not within {within}s"


def test_a_joiner_is_handed_no_flow_before_it_may_admit_and_loses_none() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        spec = join_spec()
        async with upstream_echo(spec.relay.upstream) as echo:
            first = Replica(spec, "join-1", store)
            one = asyncio.create_task(first.run())
            await until(lambda: first.ready, 10)
            stop, sent = threading.Event(), [0]
            target = spec.relay.listen
            sender = asyncio.create_task(
                asyncio.to_thread(_send, (str(target[0]), int(target[1])), stop, sent, 20)
            )
            joiner = Replica(spec, "join-2", store)
            two: asyncio.Task[None] | None = None
            try:
                await asyncio.sleep(0.3)
                started = time.time()
                two = asyncio.create_task(joiner.run())
                # Watch its socket from the moment it starts: when it is first in the
                # group, it must already be allowed to admit.
                while not joiner.relay_driver.listening and time.time() - started < 10:
                    await asyncio.sleep(0.001)
                bound = time.time()
                assert joiner.relay_driver.listening
                assert joiner.holding_share, "bound while still guarded or unregistered"
                assert int(bound / WINDOW) > int(started / WINDOW), "bound in its first window"
                await asyncio.sleep(1.0)  # the flows hashed to it now go to it
            finally:
                stop.set()
                await sender
            await asyncio.sleep(0.3)  # the last datagrams' flight
            try:
                assert joiner.counters.received > 0, "no flow was handed to the joiner"
                assert (first.counters.dropped, joiner.counters.dropped) == (0, 0)
                assert echo.total == sent[0], f"{sent[0] - echo.total} of {sent[0]} lost"
            finally:
                first.stop()
                joiner.stop()
                await asyncio.wait_for(asyncio.gather(one, *([two] if two else [])), 10)

    asyncio.run(asyncio.wait_for(scenario(), 60))
