"""The `firewall` function: a stateful firewall whose connection table lives in etcd (pure).

`allow` says who may open connections (each entry a match: proto, src, dst,
dport, as a ratelimit rule's); a packet that opens a connection (a TCP SYN,
the first UDP datagram or ICMP echo request of a flow) passes only if an
entry matches it, and its connection is tracked (vmbox.functions.conntrack).
Packets of a tracked connection pass in both directions; everything else is
dropped: a reply nobody asked for, a connection opened from a side no entry
allows, an ACK of a connection that was never opened.

Where each piece of state lives, and why (DESIGN.md "Stateful firewall"):

- Half-open TCP (SYN_SENT, SYN_RECV) and unreplied UDP/ICMP flows stay in
  this replica's memory, bounded: at most `max_half_open` (the oldest is
  evicted first, as conntrack's early drop does) and at most
  `max_half_open_per_source` SYNs of one source. A handshake's packets all
  reach one replica (the steering's hash is symmetric), and a flood of SYNs
  from spoofed sources never completes a handshake, so it never writes the
  store.
- An established connection is written to the keyed table `conns`
  (vmbox.keyed) *durably* before the ACK that completed the handshake passes:
  any replica that later sees a packet of it (after a resize, or the death of
  the replica that carried it) finds it with one read, and that packet waits
  for the read alone.
- Later changes (FIN, the timeout renewed, an assured UDP flow) are written
  behind the packet path: losing one with the replica only shortens or
  lengthens a timeout; an RST deletes the entry the same way.
- A replica creates at most `max_connections / n` (n replicas) live entries,
  so the table in the store holds at most about `max_connections`; past its
  share, a handshake does not complete (its ACK is dropped, the client
  retries).
- Per-packet counters stay local (metrics).

`state: local` keeps the same table in this replica's memory only: the same
code, and connections break when their packets move to another replica
(the reference design's analysis); it exists to show that.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from vmbox.functions.conntrack import (
    ASSURED,
    DEFAULT_TIMEOUTS,
    ESTABLISHED,
    FIN_WAIT,
    SYN_RECV,
    SYN_SENT,
    TIME_WAIT,
    UNREPLIED,
    Conn,
    conn_key,
    encode_conn,
    parse_conn,
    timeout_of,
)
from vmbox.functions.rules import PROTOCOLS, address_of, covers, network_of, parse_ports
from vmbox.group import Group
from vmbox.keyed import FETCH_BURST, FETCH_RATE, MAX_ENTRIES, KeyedItem, KeyedTable, Wait
from vmbox.middlebox import Function, Middlebox
from vmbox.packet import (
    ACK,
    ECHO_REPLY,
    ECHO_REQUEST,
    FIN,
    ICMP,
    ICMPV6,
    RST,
    SYN,
    TCP,
    UDP,
    Packet,
    Verdict,
)

PASS, DROP = Verdict.PASS, Verdict.DROP
CONNS = KeyedItem("conns", parse=parse_conn, encode=encode_conn)
MAX_HALF_OPEN = 4096
MAX_HALF_OPEN_PER_SOURCE = 64
MAX_CONNECTIONS = 65536
# Drop reasons, as metrics name them.
REASONS = ("not_allowed", "no_connection", "half_open_full", "table_full", "invalid")


class Opener:
    """One `allow` entry: which packets may open a connection."""

    __slots__ = ("dst", "high", "low", "protos", "src")

    def __init__(self, match: Mapping[str, Any]) -> None:
        proto = match.get("proto", "any")
        self.protos = None if proto == "any" else PROTOCOLS[proto]
        self.src = network_of(match.get("src"))
        self.dst = network_of(match.get("dst"))
        self.low, self.high = parse_ports(match.get("dport"))

    def allows(self, packet: Packet) -> bool:
        if self.protos is not None and packet.proto not in self.protos:
            return False
        ported = self.protos is not None and packet.proto in (TCP, UDP)
        if ported and not self.low <= packet.dport <= self.high:
            return False
        return covers(self.src, address_of(packet.src)) and covers(self.dst, address_of(packet.dst))


class Firewall(Middlebox):
    """Track connections; pass what belongs to one an `allow` entry let open."""

    def __init__(self, config: Mapping[str, Any], group: Group) -> None:
        super().__init__(config, group, ())
        self.openers = [Opener(m) for m in config.get("allow") or ()]
        self.timeouts = {**DEFAULT_TIMEOUTS, **(config.get("timeouts") or {})}
        self.shared = config.get("state", "shared") == "shared"
        self.max_half_open = int(config.get("max_half_open", MAX_HALF_OPEN))
        self.max_per_source = int(config.get("max_half_open_per_source", MAX_HALF_OPEN_PER_SOURCE))
        self.max_connections = int(config.get("max_connections", MAX_CONNECTIONS))
        self.conns = KeyedTable(
            CONNS,
            shared=self.shared,
            max_entries=int(config.get("max_entries", MAX_ENTRIES)),
            fetch_rate=float(config.get("fetch_rate", FETCH_RATE)),
            fetch_burst=int(config.get("fetch_burst", FETCH_BURST)),
        )
        self.tables = {CONNS.name: self.conns}
        # Half-open and unreplied connections, oldest first, and SYNs in flight per source.
        self.embryos: OrderedDict[str, tuple[int, Conn, str]] = OrderedDict()
        self.half_open: dict[str, int] = {}
        # Connections this replica stored and that have not ended: key -> expires.
        self.opened: dict[str, float] = {}
        self.dropped = dict.fromkeys(REASONS, 0)
        self.evicted = 0
        self._members = group.members

    # -- the packet path -------------------------------------------------------------------

    def process(self, packet: Packet, now: float) -> Verdict | Wait:
        key, side = conn_key(packet)
        embryo = self.embryos.get(key)
        if embryo is not None:
            return self._embryonic(key, embryo[1], packet, side, now)
        if key not in self.conns and self._may_open(packet):
            # A packet that opens a connection needs nothing from the store: a SYN
            # floods no reads, and a UDP flow that moved here restarts as unreplied.
            return self._new(key, packet, side, now)
        conn = self.conns.get(key, now)
        if isinstance(conn, Wait):
            return conn
        if conn is not None and conn.expires <= now:
            self.conns.forget(key)
            self.opened.pop(key, None)
            conn = None
        if conn is not None:
            return self._tracked(key, conn, packet, side, now)
        return self._new(key, packet, side, now)

    def _may_open(self, packet: Packet) -> bool:
        """Could `packet` open a connection (a SYN, an echo request, a UDP datagram
        an `allow` entry matches)? Anything else must belong to one."""
        proto = packet.proto
        if proto == TCP:
            return packet.flags & (SYN | ACK | RST | FIN) == SYN
        if proto in (ICMP, ICMPV6):
            return packet.flags == ECHO_REQUEST[proto]
        return any(opener.allows(packet) for opener in self.openers)

    def _new(self, key: str, packet: Packet, side: int, now: float) -> Verdict:
        proto, flags = packet.proto, packet.flags
        if proto == TCP:
            if flags & (SYN | ACK | RST | FIN) != SYN:
                return self._drop("no_connection")
            state = SYN_SENT
        elif proto in (ICMP, ICMPV6):
            if flags != ECHO_REQUEST[proto]:
                return self._drop("no_connection" if flags == ECHO_REPLY[proto] else "invalid")
            state = UNREPLIED
        else:
            state = UNREPLIED
        if not any(opener.allows(packet) for opener in self.openers):
            return self._drop("not_allowed")
        if proto == TCP:
            if self.half_open.get(packet.src, 0) >= self.max_per_source:
                return self._drop("half_open_full")
            self.half_open[packet.src] = self.half_open.get(packet.src, 0) + 1
        while len(self.embryos) >= self.max_half_open:
            self._evict_oldest()
        expires = now + timeout_of(proto, state, self.timeouts)
        self.embryos[key] = (proto, Conn(side, state, expires), packet.src)
        return PASS

    def _embryonic(
        self, key: str, conn: Conn, packet: Packet, side: int, now: float
    ) -> Verdict | Wait:
        proto, flags = packet.proto, packet.flags
        if conn.expires <= now:
            self._forget_embryo(key)
            return self._new(key, packet, side, now)
        if proto != TCP:
            if side == conn.orig:
                self._refresh_embryo(key, conn, now)
                return PASS
            # The first reply: the flow is assured, and stored behind the packet path.
            if len(self.opened) >= self._share_of_connections():
                return self._drop("table_full")
            self._forget_embryo(key)
            return self._store(key, conn, ASSURED, proto, now, durable=False)
        if flags & RST:
            self._forget_embryo(key)
            return PASS
        forward = side == conn.orig
        if conn.state == SYN_SENT:
            if forward and flags & (SYN | ACK) == SYN:
                self._refresh_embryo(key, conn, now)
                return PASS  # the SYN again
            if not forward and flags & (SYN | ACK) == SYN | ACK:
                self._refresh_embryo(key, conn.moved(SYN_RECV, conn.expires), now)
                return PASS
            return self._drop("invalid")
        # SYN_RECV
        if not forward and flags & (SYN | ACK) == SYN | ACK:
            return PASS  # the SYN-ACK again
        if forward and flags & SYN:
            return PASS  # the SYN again: its SYN-ACK may have been lost
        if forward and flags & ACK:
            if len(self.opened) >= self._share_of_connections():
                return self._drop("table_full")
            self._forget_embryo(key)
            return self._store(key, conn, ESTABLISHED, proto, now, durable=True)
        return self._drop("invalid")

    def _tracked(
        self, key: str, conn: Conn, packet: Packet, side: int, now: float
    ) -> Verdict | Wait:
        proto, flags = packet.proto, packet.flags
        if proto == TCP:
            if flags & RST:
                self._end(key, now)
                return PASS
            if flags & SYN and not flags & ACK:
                if conn.state == TIME_WAIT and side == conn.orig:
                    self._end(key, now)  # the port is used again: a new connection
                    return self._new(key, packet, side, now)
                return self._drop("invalid")
            if flags & FIN and not conn.fin & (1 << side):
                fin = conn.fin | (1 << side)
                state = TIME_WAIT if fin == 3 else FIN_WAIT
                return self._store(key, conn.moved(state, conn.expires, fin), state, proto, now)
            return self._renew(key, conn, proto, now)
        return self._renew(key, conn, proto, now)

    # -- state changes ---------------------------------------------------------------------

    def _store(
        self, key: str, conn: Conn, state: str, proto: int, now: float, durable: bool = False
    ) -> Verdict | Wait:
        expires = now + timeout_of(proto, state, self.timeouts)
        self.opened[key] = expires
        wait = self.conns.put(key, conn.moved(state, expires), expires, durable=durable)
        return PASS if wait is None else wait

    def _renew(self, key: str, conn: Conn, proto: int, now: float) -> Verdict:
        """Pass; write a later expiry once the stored one has fallen half a timeout behind."""
        timeout = timeout_of(proto, conn.state, self.timeouts)
        if now + timeout - conn.expires > timeout / 2:
            expires = now + timeout
            self.conns.put(key, conn.moved(conn.state, expires), expires)
            if key in self.opened:
                self.opened[key] = expires
        return PASS

    def _end(self, key: str, now: float) -> None:
        self.conns.delete(key, now + self.timeouts["tcp_established"])
        self.opened.pop(key, None)

    def _refresh_embryo(self, key: str, conn: Conn, now: float) -> None:
        proto, _, source = self.embryos[key]
        self.embryos[key] = (
            proto,
            conn.moved(conn.state, now + timeout_of(proto, conn.state, self.timeouts)),
            source,
        )

    def _forget_embryo(self, key: str) -> None:
        proto, _, source = self.embryos.pop(key)
        if proto == TCP:
            left = self.half_open.get(source, 0) - 1
            if left > 0:
                self.half_open[source] = left
            else:
                self.half_open.pop(source, None)

    def _evict_oldest(self) -> None:
        self._forget_embryo(next(iter(self.embryos)))
        self.evicted += 1

    def _share_of_connections(self) -> int:
        return max(1, math.ceil(self.max_connections / max(1, self.group.size)))

    def _drop(self, reason: str) -> Verdict:
        self.dropped[reason] += 1
        return DROP

    # -- off the packet path ---------------------------------------------------------------

    def recompute(self) -> None:
        if self.group.members != self._members:
            # Flows may have moved: what another replica changed meanwhile is read again.
            self._members = self.group.members
            self.conns.invalidate()

    def idle(self, now: float) -> None:
        for key, (_, conn, _) in list(self.embryos.items()):
            if conn.expires <= now:
                self._forget_embryo(key)
        for key, conn in self.conns.items():
            if conn.expires <= now:
                self.conns.forget(key)
        for key, expires in list(self.opened.items()):
            if expires <= now:
                del self.opened[key]

    def gauges(self) -> dict[str, float]:
        counts = self.conns.counts
        values: dict[str, float] = {
            "firewall_connections": len(self.conns),
            "firewall_half_open": len(self.embryos),
            "firewall_opened": len(self.opened),
            "firewall_evicted_half_open": self.evicted,
            "firewall_fetches": counts.fetches,
            "firewall_fetch_refused": counts.fetch_refused,
            "firewall_fetch_failed": counts.fetch_failed,
            "firewall_writes": counts.writes,
            "firewall_write_failures": counts.write_failures,
            "firewall_writes_queued": self.conns.queued,
        }
        for reason, count in self.dropped.items():
            values[f"firewall_dropped_{reason}"] = count
        return values


def build(config: Mapping[str, Any], group: Group) -> Middlebox:
    return Firewall(config, group)


FUNCTION = Function(name="firewall", state=(), build=build)
