"""A client - node - server triple of namespaces for the `enforce: kernel` tests.

Its own small topology (not vmbox.lab's), so the kernel enforcement tests do
not depend on the lab's shape: three namespaces `<p>c`, `<p>g`, `<p>s`, two
veth pairs made inside them, addresses from 198.18.0.0/15 only (client
198.18.0.10, node .1 on both sides, server 198.19.0.2), forwarding and
rp_filter=0 set inside the node only (spoofed sources from 198.18.0.0/15 pass
it, as sources behind a router would). Nothing in the host's namespace
changes but the names under /run/netns, and `triple()` removes them whatever
happens. `Receiver` counts the UDP datagrams the server gets per second and per
source; `send()` paces datagrams from the client; `flood()` sends one datagram
from each of many spoofed sources (a raw socket in the client).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.integration.labs import require_lab
from vmbox import netns

CLIENT, NODE_C, NODE_S, SERVER = "198.18.0.10", "198.18.0.1", "198.19.0.1", "198.19.0.2"
PORT = 9000
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; also its SCM_ type
_serial = itertools.count()


@dataclass(frozen=True)
class Triple:
    client: str
    node: str
    server: str


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=20)


@contextmanager
def triple() -> Iterator[Triple]:
    """Three fresh namespaces in a line; deleted afterwards whatever happened."""
    require_lab()
    prefix = f"vk{os.getpid()}x{next(_serial)}"
    names = Triple(prefix + "c", prefix + "g", prefix + "s")
    made: list[str] = []
    try:
        for name in (names.client, names.node, names.server):
            _ip("netns", "add", name)
            made.append(name)
        c, g, s = names.client, names.node, names.server
        _ip("-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "g-c", "netns", g)
        _ip("-n", g, "link", "add", "g-s", "type", "veth", "peer", "name", "s0", "netns", s)
        subprocess.run(
            netns.exec_argv(
                g,
                [
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.g-c.rp_filter=0",
                ],
            ),
            check=True,
            capture_output=True,
            timeout=20,
        )
        for ns, dev, addr in (
            (c, "c0", CLIENT),
            (g, "g-c", NODE_C),
            (g, "g-s", NODE_S),
            (s, "s0", SERVER),
        ):
            prefixlen = "24"
            _ip("-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", c, "route", "add", "198.19.0.0/24", "via", NODE_C)
        _ip("-n", s, "route", "add", "198.18.0.0/15", "via", NODE_S)
        _ip("-n", g, "route", "add", "198.18.0.0/16", "via", CLIENT)  # spoofed sources' way back
        yield names
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def in_ns(name: str, kind: int, proto: int = 0) -> socket.socket:
    with netns.entered(name):
        return socket.socket(socket.AF_INET, kind, proto)


@dataclass
class Receiver:
    """Counts datagrams at the server: per whole second since `start` and per source."""

    ns: str
    start: float = field(default_factory=time.monotonic)
    seconds: Counter[int] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _wall_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def __enter__(self) -> Receiver:
        sock = in_ns(self.ns, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        # The kernel's arrival time (wall clock), so a receiver starved of CPU on a busy
        # machine does not move datagrams into the next second.
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(("0.0.0.0", PORT))
        sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def _run(self, sock: socket.socket) -> None:
        with sock:
            while not self._stop.is_set():
                try:
                    _, ancillary, _, (src, _) = sock.recvmsg(2048, 64)
                except TimeoutError:
                    continue
                arrived = time.monotonic()
                for level, kind, data in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                        sec, nsec = struct.unpack("@ll", data[: struct.calcsize("@ll")])
                        arrived = sec + nsec / 1e9 - self._wall_offset
                self.seconds[int(arrived - self.start)] += 1
                self.sources[src] += 1

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def per_second(self, first: int, last: int) -> list[int]:
        return [self.seconds[s] for s in range(first, last)]


def send(ns: str, rate: float, seconds: float, start: float, flows: int = 16) -> int:
    """`rate` datagrams/s from the client for `seconds` over `flows` ports; how many were sent."""
    socks = [in_ns(ns, socket.SOCK_DGRAM) for _ in range(flows)]
    sent = 0
    try:
        for sock in socks:
            sock.setblocking(False)
        gap = 1.0 / rate
        total = int(rate * seconds)
        for i in range(total):
            due = start + i * gap
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                socks[i % flows].sendto(b"x" * 32, (SERVER, PORT))
                sent += 1
            except BlockingIOError:
                pass
    finally:
        for sock in socks:
            sock.close()
    return sent


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(src: str, dst: str = SERVER, payload: bytes = b"x" * 16) -> bytes:
    """An IPv4 UDP datagram from `src` (no UDP checksum)."""
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def sources(count: int) -> list[str]:
    """`count` distinct addresses of 198.18.0.0/15 outside the two /24s in use (<= 130,000)."""
    used = (ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("198.19.0.0/24"))
    hosts = (
        h for h in ipaddress.ip_network("198.18.0.0/15").hosts() if not any(h in n for n in used)
    )
    return [str(h) for h, _ in zip(hosts, range(count), strict=False)]


def flood(ns: str, addresses: Sequence[str], rate: float = 20000.0) -> int:
    """One datagram from each address (a raw socket in the client), paced at `rate`/s."""
    sock = in_ns(ns, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    start = time.monotonic()
    try:
        for i, src in enumerate(addresses):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                sock.sendto(datagram(src), (SERVER, 0))
                sent += 1
            except OSError:
                time.sleep(0.001)  # the veth's queue is full: go on, the count says so
    finally:
        sock.close()
    return sent
