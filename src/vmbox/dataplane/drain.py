"""Draining a UDP relay before its replica stops: finish the flows in flight, then leave.

vmbox.replica drains its relay on SIGTERM, while it is still a member (so it
still holds its share and the limit holds), and leaves the membership after;
tests call `Drain.begin` and `Drain.finish` themselves.

It rests on how Linux spreads a SO_REUSEPORT UDP group: each datagram's
4-tuple hash is scaled onto the group's unconnected sockets, so a change in
their number re-hashes every flow of the group, the siblings' as well (and a
socket that connect()s leaves the hash: Linux 5.3 and later). A drain
therefore changes nothing until it ends. `begin` notes the flows in flight
(active in the last `recent` seconds); `finish` keeps the listener in the
group and relays what comes, every packet decided by the middlebox under
this replica's share, until each of those flows has been idle for `idle`
seconds or `timeout` has passed, and, while traffic still arrives, on until
just before a window boundary (`until_boundary`); then
`UdpRelay.leave_group` takes the listener out of the hash and relays what was
queued in it. The caller then leaves the membership, so the drain's one
re-hash and the siblings' larger shares come at the same window boundary.

The first design left the hash when the drain began and kept the flows in
flight with a connected socket per client ("pins"). The re-hash then came
at the start while the shares stayed, and the pinned flows were the top of
the hash range that one sibling's new range covered: that sibling was
offered the rest of its range only (from 4 replicas to 3, a twelfth of the
flows instead of a third), under its even share, and the limit at the server
fell to 85-98 of 100 for a second in about half the scaling experiment's
runs. Flows that start during a drain now move once, when it ends, as every
flow still busy at the timeout did before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass

from vmbox.dataplane.udp import Peer, UdpRelay

log = logging.getLogger(__name__)

IDLE = 0.5  # a flow in flight this long without a datagram either way is finished
RECENT = 5.0  # flows active this recently are in flight when the drain begins
# A drain whose relay still carries traffic ends this long before a window boundary.
LEAVE_LEAD = 0.25


def until_boundary(now: float, window: float, lead: float = LEAVE_LEAD) -> float:
    """Seconds until `lead` before the next window boundary (epoch time), 0 if inside it.

    A drain whose relay still carries traffic ends there: the listener leaves
    the hash (its flows go to the siblings) and the replica leaves while the
    window it held a share of is ending, so that share is used to the end,
    and the siblings' larger shares start with the next window. Ending early
    in a window left the rest of its share unused (a second at 94 of 100 in
    the scaling experiment).

    Closer to the boundary than half the lead, it ends before the next one
    instead: the siblings must see it leave (and ack) before the boundary, or
    they hold their old shares through the next window while its flows come
    to them (a second at 67 of 100 when a decision landed 0.05 s before one).
    The lead is that margin: 0.1 s left a clean full test run with a second at
    50 of 100 (2 -> 1, the survivor's ack late); 0.25 s. Leaving that early costs
    the leaver's unused share only when its sources offer barely more than it
    (at 3x the limit a share is spent in the first third of a window).
    """
    boundary = math.ceil(now / window) * window
    if boundary - now < lead / 2:
        boundary += window
    return max(0.0, boundary - lead - now)


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain did, for the replica's log line and for tests."""

    flows: int = 0  # flows in flight when the drain began
    idle: int = 0  # of those, the ones that had gone idle when the drain ended
    active: int = 0  # and the ones still active at the timeout (or when cut short)
    seconds: float = 0.0
    packets: int = 0  # client datagrams received (and decided) during the drain
    replies: int = 0  # upstream replies relayed back during the drain
    skipped: str = ""  # why there was no drain, e.g. "only member"
    cut_short: bool = False

    def line(self) -> str:
        """One line: the controller shows a replica's last log line."""
        if self.skipped:
            return f"drain skipped ({self.skipped})"
        end = "cut short" if self.cut_short else "timed out" if self.active else "done"
        return (
            f"drain {end} in {self.seconds:.2f}s: {self.flows} flows in flight, "
            f"{self.idle} went idle, {self.active} still active; "
            f"{self.packets} packets, {self.replies} replies relayed"
        )


def next_check(
    last_active: Collection[float], now: float, deadline: float, idle: float
) -> float | None:
    """When to look again (monotonic), or None once every flow has idled `idle` s or time is up."""
    if now >= deadline or not last_active:
        return None
    latest = max(last_active)
    if now - latest >= idle:
        return None
    return min(deadline, latest + idle)


def count_idle(last_active: Collection[float], now: float, idle: float) -> int:
    """How many flows have been quiet for at least `idle` s."""
    return sum(1 for when in last_active if now - when >= idle)


class Drain:
    """One drain of one relay: `begin` (note the flows in flight), then `finish` (wait, leave)."""

    def __init__(
        self,
        relay: UdpRelay,
        *,
        idle: float = IDLE,
        timeout: float = 2.0,
        recent: float = RECENT,
        window: float | None = None,
    ) -> None:
        if idle <= 0 or timeout < 0 or recent < 0:
            raise ValueError("idle must be positive, timeout and recent not negative")
        self.relay = relay
        self.idle = idle
        self.timeout = timeout
        self.recent = recent
        self.window = window  # the limiter's window: a busy drain ends just before its boundary
        self.in_flight: dict[Peer, float] = {}  # client -> its flow's last datagram (monotonic)
        self.started = relay.monotonic()  # the relay's clock: its flows' times are compared
        self._received = relay.counters.received
        self._replies = relay.counters.replies
        self._stop = asyncio.Event()

    async def begin(self) -> int:
        """Note the flows in flight; returns how many. The relay goes on as before."""
        relay = self.relay
        self.started = relay.monotonic()
        self._received, self._replies = relay.counters.received, relay.counters.replies
        self.in_flight = dict(relay.recent_clients(self.recent))
        return len(self.in_flight)

    def cut_short(self) -> None:
        """End `finish` now (SIGINT during a drain)."""
        self._stop.set()

    async def finish(self) -> DrainResult:
        """Relay until the flows in flight are idle or the timeout has passed; leave the hash."""
        deadline = self.started + self.timeout
        try:
            while not self._stop.is_set():
                now = self.relay.monotonic()
                wake = next_check(self._activity().values(), now, deadline, self.idle)
                if wake is None:
                    break
                with contextlib.suppress(TimeoutError):  # not wait_for: see controller.run
                    async with asyncio.timeout(wake - now):
                        await self._stop.wait()
            busy = bool(self.relay.recent_clients(self.idle))  # new flows count here too
            if self.window and busy and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(until_boundary(self.relay.clock(), self.window)):
                        await self._stop.wait()
            return self._result(self.relay.monotonic())
        finally:
            self.relay.leave_group()

    def _activity(self) -> dict[Peer, float]:
        """Each flow in flight's last datagram, either way (the relay's flow table)."""
        seen = self.in_flight
        for addr, when in self.relay.recent_clients(self.idle):
            if addr in seen:
                seen[addr] = max(seen[addr], when)
        return seen

    def _result(self, now: float) -> DrainResult:
        activity = self._activity().values()
        idle = count_idle(activity, now, self.idle)
        counters = self.relay.counters
        return DrainResult(
            flows=len(activity),
            idle=idle,
            active=len(activity) - idle,
            seconds=now - self.started,
            packets=counters.received - self._received,
            replies=counters.replies - self._replies,
            cut_short=self._stop.is_set(),
        )
