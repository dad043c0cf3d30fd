"""Connection tracking for the stateful firewall: keys, states, timeouts (pure).

A connection is known by its *key*, the same for both directions: the
protocol and its two endpoints in a fixed order (the smaller (address, port)
first), so a reply finds the entry its request made. `Conn` is what the
firewall keeps per connection: which endpoint opened it (`orig`: 0 the first
in the key, 1 the second), its state, and when it expires (epoch seconds).

States, as conntrack names them, and where each lives:

| state | meaning | kept in | timeout (default) |
| --- | --- | --- | --- |
| `S` SYN_SENT | a TCP SYN passed | memory | tcp_syn (5 s) |
| `R` SYN_RECV | the SYN-ACK passed back | memory | tcp_syn (5 s) |
| `E` ESTABLISHED | the handshake is done | store, durable | tcp_established (600 s) |
| `F` FIN_WAIT | one side sent FIN (`fin`: which) | store | tcp_fin (30 s) |
| `T` TIME_WAIT | both sides sent FIN | store | tcp_time_wait (10 s) |
| `U` UNREPLIED | a UDP or ICMP echo from the opener | memory | udp (30 s), icmp (30 s) |
| `A` ASSURED | a reply passed | store | udp_stream (120 s), icmp (30 s) |

(memory: this replica's; store: the keyed table `conns` in etcd.)

An RST ends a TCP connection in any state (the entry is deleted). Half-open
and unreplied connections stay in one replica's memory: a handshake's
packets all go to one replica (the steering's hash is symmetric), a spoofed
flood never completes one, so it never reaches the store, and a handshake
cut by a resize or a crash is retried by TCP. See vmbox.functions.firewall
for what each packet does and DESIGN.md "Stateful firewall" for why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from vmbox.packet import ICMP, ICMPV6, TCP, UDP, Packet

SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, TIME_WAIT = "S", "R", "E", "F", "T"
UNREPLIED, ASSURED = "U", "A"
STORED = frozenset((ESTABLISHED, FIN_WAIT, TIME_WAIT, ASSURED))
EMBRYONIC = frozenset((SYN_SENT, SYN_RECV, UNREPLIED))

DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_syn": 5.0,
    "tcp_established": 600.0,
    "tcp_fin": 30.0,
    "tcp_time_wait": 10.0,
    "udp": 30.0,
    "udp_stream": 120.0,
    "icmp": 30.0,
}


@dataclass(frozen=True, slots=True)
class Conn:
    """One tracked connection: who opened it, its state, when it expires.

    `fin` is a bit per side that has sent FIN (bit 0: endpoint 0).
    """

    orig: int
    state: str
    expires: float
    fin: int = 0

    def encode(self) -> bytes:
        body = {"o": self.orig, "s": self.state, "x": round(self.expires, 3)}
        if self.fin:
            body["f"] = self.fin
        return json.dumps(body, separators=(",", ":")).encode()

    def moved(self, state: str, expires: float, fin: int | None = None) -> Conn:
        return replace(self, state=state, expires=expires, fin=self.fin if fin is None else fin)


def parse_conn(raw: bytes) -> Conn:
    """A stored Conn; ValueError for anything else (the entry then counts as absent)."""
    try:
        body: Any = json.loads(raw)
        orig, state, expires = body["o"], body["s"], body["x"]
        fin = body.get("f", 0)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a connection: {raw[:40]!r}") from exc
    if orig not in (0, 1) or state not in STORED or not isinstance(expires, int | float):
        raise ValueError(f"not a connection: {raw[:40]!r}")
    if fin not in (0, 1, 2, 3):
        raise ValueError(f"not a connection: {raw[:40]!r}")
    return Conn(orig, state, float(expires), fin)


def encode_conn(conn: Any) -> bytes:
    assert isinstance(conn, Conn)
    return conn.encode()


def conn_key(packet: Packet) -> tuple[str, int]:
    """The connection's key and which endpoint of it sent `packet` (0 or 1).

    Other protocols than TCP, UDP and ICMP echoes have ports 0: one
    pseudo-connection per address pair and protocol.
    """
    a, b = (packet.src, packet.sport), (packet.dst, packet.dport)
    proto = ICMP if packet.proto == ICMPV6 else packet.proto
    if a <= b:
        return f"{proto}-{a[0]}-{a[1]}-{b[0]}-{b[1]}", 0
    return f"{proto}-{b[0]}-{b[1]}-{a[0]}-{a[1]}", 1


def timeout_of(proto: int, state: str, timeouts: dict[str, float]) -> float:
    """How long a connection in `state` lives without a packet."""
    if proto == TCP:
        name = {
            SYN_SENT: "tcp_syn",
            SYN_RECV: "tcp_syn",
            ESTABLISHED: "tcp_established",
            FIN_WAIT: "tcp_fin",
            TIME_WAIT: "tcp_time_wait",
        }[state]
    elif proto == UDP:
        name = "udp_stream" if state == ASSURED else "udp"
    else:
        name = "icmp"
    return timeouts[name]
