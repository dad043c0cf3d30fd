"""The UDP relay's flow table, pure: which client flows exist and when each was last active.

vmbox.dataplane.udp keeps one `Flow` per client address (its own subclass
carries the flow's upstream socket); vmbox.dataplane.drain asks which clients
were active lately. This module decides which flows idled out, which one goes
when the table is full, and which are recent. No sockets, no asyncio, no clock
reads: `now` comes from the caller (the relay's injected clock; a number in
tests/unit/test_flows.py).

Invariants:

1. The table holds at most `max_flows` flows, at most one per address, and
   `flow.addr` is the key it is held under.
2. It is in least-recently-active order: a flow moves to the end when it is
   added or touched, so every flow's `last_seen` is at most the next one's
   (as long as `now` never goes back, which a monotonic clock ensures).
3. A flow idle for `idle_timeout` seconds or more (`last_seen <=
   now - idle_timeout`) is expired by the next `expire(now)`; a younger one is
   not. Thanks to 2 the scan stops at the first live flow: its cost is the
   number of flows expired.
4. Adding to a full table evicts the least recently active flows first, just
   enough to make room.
5. What leaves the table (evicted, expired or removed) is returned to the
   caller, once, to release what it holds.
6. Once expiry leaves the table at a quarter of its size since it was last
   built or fewer (and it had held `COMPACT_FROM` flows or more), the dict is
   rebuilt at its present size: a Python dict never shrinks by deletion, and
   20,000 flows' worth of slots would otherwise outlive the flows
   (vmbox.allocator). Order and contents are unchanged by it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

COMPACT_FROM = 1024  # smaller tables are not worth rebuilding

# What the kernel reports as a peer: (host, port) for IPv4, 4 items for IPv6.
Peer = tuple[str | Any, int]


class Flow:
    """One client's flow as the table sees it: its address and when it was last active."""

    def __init__(self, addr: Peer, now: float) -> None:
        self.addr = addr
        self.last_seen = now


F = TypeVar("F", bound=Flow)


class FlowTable(Generic[F]):
    """At most `max_flows` flows by client address, in least-recently-active order."""

    def __init__(self, idle_timeout: float, max_flows: int) -> None:
        if idle_timeout <= 0 or max_flows < 1:
            raise ValueError("idle_timeout must be positive and max_flows at least 1")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._flows: OrderedDict[Peer, F] = OrderedDict()
        self._built_for = 0  # the most flows held since the dict was last built

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, addr: Peer) -> F | None:
        return self._flows.get(addr)

    def holds(self, flow: F) -> bool:
        """True while `flow` itself (not a later one for its address) is in the table."""
        return self._flows.get(flow.addr) is flow

    def flows(self) -> list[F]:
        """Every flow, least recently active first."""
        return list(self._flows.values())

    def add(self, flow: F) -> list[F]:
        """Hold `flow` (a new address; active at its `last_seen`); returns the flows evicted."""
        evicted = []
        while len(self._flows) >= self.max_flows:
            evicted.append(self._flows.popitem(last=False)[1])
        self._flows[flow.addr] = flow
        self._built_for = max(self._built_for, len(self._flows))
        return evicted

    def touch(self, flow: F, now: float) -> None:
        """`flow` (held) was active at `now`."""
        flow.last_seen = now
        self._flows.move_to_end(flow.addr)

    def remove(self, flow: F) -> bool:
        """Drop `flow` if the table holds it; returns whether it did."""
        if self._flows.get(flow.addr) is not flow:
            return False
        del self._flows[flow.addr]
        return True

    def expire(self, now: float) -> list[F]:
        """Remove and return the flows idle for `idle_timeout` seconds or more."""
        cutoff = now - self.idle_timeout
        expired = []
        while self._flows:
            flow = next(iter(self._flows.values()))
            if flow.last_seen > cutoff:
                break
            del self._flows[flow.addr]
            expired.append(flow)
        if self._built_for >= COMPACT_FROM and 4 * len(self._flows) <= self._built_for:
            self._flows = OrderedDict(self._flows)
            self._built_for = len(self._flows)
        return expired

    def recent(self, now: float, within: float) -> list[tuple[Peer, float]]:
        """Clients whose flow was active in the last `within` s, newest first, with when."""
        cutoff = now - within
        recent = []
        for addr, flow in reversed(self._flows.items()):
            if flow.last_seen < cutoff:
                break
            recent.append((addr, flow.last_seen))
        return recent
