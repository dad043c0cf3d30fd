"""UdpRelay over real loopback sockets: forwarding, dropping, binding, garbage, flows, barrier."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import pytest

from vmbox.dataplane.udp import AddressInUse, UdpRelay
from vmbox.packet import Packet, Verdict
from vmbox.tools.echo import EchoServer

LOOP = "127.0.0.1"


def run(coro: Coroutine[Any, Any, None], timeout: float = 15.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def passing(packet: Packet, now: float) -> Verdict:
    return Verdict.PASS


async def until(cond: Callable[[], bool], within: float = 2.0) -> None:
    for _ in range(int(within / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


class Client(asyncio.DatagramProtocol):
    """A UDP client on its own ephemeral port; replies land in a queue."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @classmethod
    async def open(cls, target: tuple[str, int]) -> Client:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(target)
        _, client = await loop.create_datagram_endpoint(cls, sock=sock)
        client.sock = sock
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Selector and uvloop datagram transports do not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if data:
            self.transport.sendto(data)
        else:  # asyncio's transports skip empty datagrams; send it on the socket
            self.sock.send(b"")

    async def recv(self, within: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.replies.get(), within)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


async def echo_and_relay(
    decide: Callable[[Packet, float], Verdict] = passing, **kwargs: Any
) -> tuple[EchoServer, UdpRelay]:
    echo = EchoServer((LOOP, 0))
    await echo.start()
    relay = UdpRelay((LOOP, 0), echo.local_address, decide, **kwargs)
    await relay.start()
    return echo, relay


def test_pass_forwards_and_replies_reach_the_right_client() -> None:
    async def main() -> None:
        echo, relay = await echo_and_relay()
        a, b = await Client.open(relay.local_address), await Client.open(relay.local_address)
        for i in range(3):
            a.send(b"a%d" % i)
            b.send(b"b%d" % i)
        assert [await a.recv() for _ in range(3)] == [b"a0", b"a1", b"a2"]
        assert [await b.recv() for _ in range(3)] == [b"b0", b"b1", b"b2"]
        c = relay.counters
        assert (c.received, c.passed, c.replies, c.flows) == (6, 6, 6, 2)
        assert echo.total == 6
        a.close()
        b.close()
        await relay.close()
        await echo.close()

    run(main())


def test_drop_discards() -> None:
    async def main() -> None:
        echo, relay = await echo_and_relay(lambda p, now: Verdict.DROP)
        client = await Client.open(relay.local_address)
        for _ in range(3):
            client.send(b"x")
        await until(lambda: relay.counters.dropped == 3)
        with pytest.raises(TimeoutError):
            await client.recv(within=0.2)
        assert echo.total == 0 and relay.counters.passed == 0 and relay.counters.flows == 0
        client.close()
        await relay.close()
        await echo.close()

    run(main())


def test_two_relays_share_an_address_with_reuse_port() -> None:
    async def main() -> None:
        first = UdpRelay((LOOP, 0), (LOOP, 9), passing)
        await first.start()
        second = UdpRelay(first.local_address, (LOOP, 9), passing)
        await second.start()
        assert second.local_address == first.local_address
        await first.close()
        await second.close()

    run(main())


def test_busy_port_is_one_clear_line() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
            holder.bind((LOOP, 0))  # no SO_REUSEPORT: nobody may share it
            port = holder.getsockname()[1]
            relay = UdpRelay((LOOP, port), (LOOP, 9), passing)
            with pytest.raises(AddressInUse) as info:
                await relay.start()
        assert str(info.value) == (
            f"127.0.0.1:{port} is already in use by another program: "
            "choose another `listen` port or stop it"
        )
        assert isinstance(info.value, OSError)

    run(main())


def test_empty_and_huge_datagrams_pass() -> None:
    async def main() -> None:
        echo, relay = await echo_and_relay()
        client = await Client.open(relay.local_address)
        client.send(b"")
        assert await client.recv() == b""
        big = bytes(range(256)) * 253 + b"x" * 232  # 65,000 bytes
        client.send(big)
        assert await client.recv() == big
        client.close()
        await relay.close()
        await echo.close()

    run(main())


def test_relay_survives_a_missing_upstream_and_recovers() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((LOOP, 0))
            gone = probe.getsockname()
        relay = UdpRelay((LOOP, 0), gone, passing)
        await relay.start()
        client = await Client.open(relay.local_address)
        for _ in range(5):
            client.send(b"ping")
            await asyncio.sleep(0.02)
        await until(lambda: relay.counters.upstream_errors >= 1)
        assert relay.counters.received == 5
        echo = EchoServer(gone)  # the upstream comes back on the same port
        await echo.start()
        client.send(b"again")
        assert await client.recv() == b"again"
        client.close()
        await relay.close()
        await echo.close()

    run(main())


def test_idle_flows_expire() -> None:
    async def main() -> None:
        echo, relay = await echo_and_relay(idle_timeout=0.2)
        client = await Client.open(relay.local_address)
        client.send(b"hi")
        assert await client.recv() == b"hi"
        assert relay.counters.flows == 1
        await until(lambda: relay.counters.flows == 0)
        assert relay.counters.flows_expired == 1
        client.send(b"back")  # a new flow is made on demand
        assert await client.recv() == b"back"
        client.close()
        await relay.close()
        await echo.close()

    run(main())


def test_max_flows_bounds_the_table() -> None:
    async def main() -> None:
        echo, relay = await echo_and_relay(max_flows=100)
        most, ports = 0, set()
        for _ in range(10):  # 10 x 200 distinct client ports, 200 sockets at a time
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
            for sock in socks:
                sock.bind((LOOP, 0))
                ports.add(sock.getsockname()[1])
                sock.sendto(b"x", relay.local_address)
            received = relay.counters.received
            await until(lambda r=received: relay.counters.received >= r + 190)  # type: ignore[misc]
            most = max(most, relay.counters.flows, len(relay._flows))
            for sock in socks:
                sock.close()
        await until(lambda: relay.counters.received >= 1990)
        assert most <= 100 and relay.counters.flows <= 100
        assert len(ports) > 1500  # the kernel may hand a closed port out again
        assert relay.counters.flows_evicted >= len(ports) - 100
        await relay.close()
        await echo.close()

    run(main())


class FakeBarrier:
    """A store read that completes only when the test releases it."""

    def __init__(self) -> None:
        self.started: list[asyncio.Event] = []
        self.completed = 0

    async def __call__(self) -> None:
        release = asyncio.Event()
        self.started.append(release)
        await release.wait()
        self.completed += 1


def test_barrier_batches_packets_behind_a_read_that_started_after_them() -> None:
    async def main() -> None:
        barrier = FakeBarrier()
        decided: list[tuple[int, int]] = []  # (packet size, barriers completed at decision)

        def decide(packet: Packet, now: float) -> Verdict:
            decided.append((packet.size, barrier.completed))
            return Verdict.PASS

        echo, relay = await echo_and_relay(decide, barrier=barrier)
        client = await Client.open(relay.local_address)
        client.send(b"1")
        await until(lambda: len(barrier.started) == 1)
        client.send(b"22")
        client.send(b"333")
        await until(lambda: relay.counters.received == 3)
        assert decided == []  # the first read is still pending
        barrier.started[0].set()
        await until(lambda: len(barrier.started) == 2)
        assert decided == [(1, 1)]  # the later two wait for a read that began after them
        barrier.started[1].set()
        await until(lambda: len(decided) == 3)
        assert decided == [(1, 1), (2, 2), (3, 2)]
        assert len(barrier.started) == 2  # packets that arrived together shared one read
        assert [await client.recv() for _ in range(3)] == [b"1", b"22", b"333"]
        client.close()
        await relay.close()
        await echo.close()

    run(main())


def test_barrier_failure_decides_fail_static() -> None:
    async def main() -> None:
        async def broken() -> None:
            raise ConnectionError("store down")

        barrier: Callable[[], Awaitable[None]] = broken
        echo, relay = await echo_and_relay(barrier=barrier)
        client = await Client.open(relay.local_address)
        client.send(b"still")
        assert await client.recv() == b"still"
        assert relay.counters.barrier_errors == 1
        client.close()
        await relay.close()
        await echo.close()

    run(main())
