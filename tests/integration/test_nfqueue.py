"""NfqueueDriver against the kernel: a namespace of our own, real sockets, curl, ping.

Each test makes a network namespace (loopback only, no route out), adds an
iptables NFQUEUE rule inside it, runs the driver on that queue from this
process (its socket opened inside with vmbox.netns.entered) and checks that
traffic arrives exactly as `decide` said. The namespace goes with the fixture,
and its rules with it. Needs root and iptables; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from vmbox import netns
from vmbox.dataplane.counters import Counters
from vmbox.dataplane.nfqueue import NfqueueDriver
from vmbox.packet import ICMP, ICMPV6, Packet, Verdict

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None or shutil.which("ip") is None,
    reason="needs root, ip and iptables",
)

_names = itertools.count()
T = TypeVar("T")


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on uvloop (as replicas do), bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        uvloop.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


def sh(ns: str, *argv: str) -> None:
    subprocess.run(netns.exec_argv(ns, argv), check=True, capture_output=True, timeout=10)


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"vmbox-nfqt-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def queue_rule(ns: str, queue: int, *match: str, v6: bool = False) -> None:
    tool = "ip6tables" if v6 else "iptables"
    sh(ns, tool, "-A", "INPUT", *match, "-j", "NFQUEUE", "--queue-num", str(queue),
       "--queue-bypass")  # fmt: skip


def udp_pair(ns: str, family: int, host: str) -> tuple[socket.socket, socket.socket, int]:
    with netns.entered(ns):
        rx = socket.socket(family, socket.SOCK_DGRAM)
        tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    rx.setblocking(False)
    return rx, tx, rx.getsockname()[1]


async def exchange(
    ns: str, family: int, host: str, queue: int, decide: Callable[[Packet, float], Verdict]
) -> tuple[list[int], Counters]:
    """Send one datagram from each of 20 source ports; which ports arrived."""
    rx, tx, port = udp_pair(ns, family, host)
    queue_rule(ns, queue, "-p", "udp", "--dport", str(port), v6=family == socket.AF_INET6)
    counters = Counters()
    driver = NfqueueDriver(ns, queue, decide, counters=counters)
    senders = []
    try:
        await driver.start()
        for i in range(20):
            with netns.entered(ns):
                s = socket.socket(family, socket.SOCK_DGRAM)
            senders.append(s)
            s.bind((host, 0))
            s.sendto(b"%d" % i, (host, port))
        await driver.drain(idle=0.3, timeout=5)
        got = []
        while True:
            try:
                _, addr = rx.recvfrom(100)
            except BlockingIOError:
                break
            got.append(addr[1])
        return sorted(got), counters
    finally:
        await driver.close()
        for s in (rx, tx, *senders):
            s.close()


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
@on_loop
async def test_udp_arrives_exactly_as_decided(ns: str, family: int, host: str) -> None:
    packets: list[Packet] = []

    def decide(packet: Packet, now: float) -> Verdict:
        packets.append(packet)
        return Verdict.PASS if packet.sport % 2 == 0 else Verdict.DROP

    got, counters = await exchange(ns, family, host, 3, decide)
    ip = 20 if family == socket.AF_INET else 40
    assert {(p.src, p.dst, p.proto) for p in packets} == {(host, host, 17)}
    assert sorted(p.size for p in packets) == [ip + 8 + 1] * 10 + [ip + 8 + 2] * 10
    seen = [p.sport for p in packets]
    assert len(seen) == 20
    assert got == sorted(p for p in seen if p % 2 == 0)
    assert counters.received == 20
    assert counters.passed == len(got)
    assert counters.dropped == 20 - len(got)
    assert counters.malformed == 0


HTTP_PORT = 8321


@pytest.fixture
def http_server(ns: str) -> Iterator[int]:
    argv = [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(HTTP_PORT)]
    server = subprocess.Popen(
        netns.exec_argv(ns, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield HTTP_PORT
    finally:
        server.kill()
        server.wait()


@on_loop
async def test_tcp_through_curl_passes_when_accepted(ns: str, http_server: int) -> None:
    port = http_server
    queue_rule(ns, 4, "-p", "tcp", "--dport", str(port))
    protos: set[int] = set()

    def decide(packet: Packet, now: float) -> Verdict:
        protos.add(packet.proto)
        return Verdict.PASS

    driver = NfqueueDriver(ns, 4, decide)
    try:
        await driver.start()
        for _ in range(50):  # the server's start
            curl = await asyncio.create_subprocess_exec(
                *netns.exec_argv(ns, ["curl", "-sf", "-m", "3", f"http://127.0.0.1:{port}/"]),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await curl.wait() == 0:
                break
            await asyncio.sleep(0.1)
        assert curl.returncode == 0
        assert protos == {6}
        assert driver.counters.passed >= 3  # SYN, ACK, request at least
    finally:
        await driver.close()


async def ping(ns: str, host: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        *netns.exec_argv(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", host]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


@pytest.mark.parametrize(("host", "proto"), [("127.0.0.1", ICMP), ("::1", ICMPV6)])
@on_loop
async def test_ping_passes_or_drops_as_decided(ns: str, host: str, proto: int) -> None:
    v6 = ":" in host
    queue_rule(ns, 5, "-p", "ipv6-icmp" if v6 else "icmp", v6=v6)
    verdict = Verdict.PASS
    protos: set[int] = set()

    def decide(packet: Packet, now: float) -> Verdict:
        protos.add(packet.proto)
        return verdict

    driver = NfqueueDriver(ns, 5, decide)
    try:
        await driver.start()
        assert await ping(ns, host) == 0
        verdict = Verdict.DROP
        assert await ping(ns, host) != 0
        assert driver.counters.dropped >= 2
        assert protos == {proto}
    finally:
        await driver.close()


@on_loop
async def test_a_second_driver_on_the_same_queue_fails_in_one_line(ns: str) -> None:
    first = NfqueueDriver(ns, 6, lambda p, now: Verdict.PASS)
    second = NfqueueDriver(ns, 6, lambda p, now: Verdict.PASS)
    try:
        await first.start()
        with pytest.raises(OSError, match="queue 6") as caught:
            await second.start()
        assert "\n" not in str(caught.value)
        assert "another process" in str(caught.value)
    finally:
        await second.close()
        await first.close()
        await first.close()  # idempotent


@on_loop
async def test_a_missing_namespace_fails_in_one_line() -> None:
    driver = NfqueueDriver("vmbox-no-such-ns", 1, lambda p, now: Verdict.PASS)
    with pytest.raises(OSError, match="does not exist") as caught:
        await driver.start()
    assert "\n" not in str(caught.value)


@on_loop
async def test_after_close_the_bypass_passes_traffic(ns: str) -> None:
    def drop_all(packet: Packet, now: float) -> Verdict:
        return Verdict.DROP

    got, counters = await exchange(ns, socket.AF_INET, "127.0.0.1", 8, drop_all)
    assert got == [] and counters.dropped == 20
    # exchange() closed its driver: with --queue-bypass and no listener, packets pass.
    rx, tx, port = udp_pair(ns, socket.AF_INET, "127.0.0.1")
    try:
        queue_rule(ns, 8, "-p", "udp", "--dport", str(port))
        tx.sendto(b"hello", ("127.0.0.1", port))
        await asyncio.sleep(0.1)
        assert rx.recv(100) == b"hello"
    finally:
        rx.close()
        tx.close()


@on_loop
async def test_kernel_counters_are_read_inside_the_namespace(ns: str) -> None:
    driver = NfqueueDriver(ns, 9, lambda p, now: Verdict.PASS)
    try:
        await driver.start()
        driver.read_kernel_counters()
        assert driver.counters.kernel_queue_drops == 0
        assert driver.counters.queue_waiting == 0
    finally:
        await driver.close()
