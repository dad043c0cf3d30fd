"""Draining a UDP relay before its replica stops: finish the flows in flight, take no new ones.

vmbox.replica drains its relay on SIGTERM, while it is still a member (so it
still holds its share and the limit holds), and leaves the membership after;
tests call `Drain.begin` and `Drain.finish` themselves.

It rests on how Linux (5.3 and later) spreads a SO_REUSEPORT UDP group: a
socket bound to the service address and connect()ed to one client gets that
client's datagrams, ahead of the group, and the group's hash skips connected
sockets. So `begin` pins each client the relay served in the last `recent`
seconds (a connected socket of its own on the service address, handing what
it receives to the relay like the listener does), then takes the listener out
of the hash (`UdpRelay.leave_group`): new clients reach the siblings only.
`finish` keeps relaying, every packet still decided by the middlebox, until
each pinned flow has been idle for `idle` seconds or `timeout` has passed,
then closes the pins, each after relaying what was queued in it (`_Pin.unpin`).
Replies keep leaving from the listen socket, which the
caller closes with the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Collection
from dataclasses import dataclass

from vmbox.dataplane.sockets import Address, format_address
from vmbox.dataplane.udp import Peer, UdpRelay

log = logging.getLogger(__name__)

IDLE = 0.5  # a pinned flow this long without a datagram either way is finished
RECENT = 5.0  # flows active this recently are pinned; older ones may go to the siblings
# After the group changed, how long the kernel may still be moving flows (a
# leaving sibling closes its socket after it has left the membership).
REGROUP_SETTLE = 0.3
LEAST_RECENT = 0.1  # however recent the change, flows seen this recently are pinned
# A drain whose flows are still busy ends this long before a window boundary.
LEAVE_LEAD = 0.1


def until_boundary(now: float, window: float, lead: float = LEAVE_LEAD) -> float:
    """Seconds until `lead` before the next window boundary (epoch time), 0 if inside it.

    A drain cut off by its timeout while its flows still carry traffic ends
    there: the pins close (their flows go to the siblings) and the replica
    leaves while the window it held a share of is ending, so that share is
    used to the end, and the siblings' larger shares start with the next
    window. Ending early in a window left the rest of its share unused (a
    second at 94 of 100 in the scaling experiment).
    """
    boundary = math.ceil(now / window) * window
    return max(0.0, boundary - lead - now)


def pin_window(now: float, regrouped_at: float | None) -> float:
    """How recent a client must be to be pinned: RECENT, or less after a regroup.

    Each change of the SO_REUSEPORT group (a sibling joining or leaving)
    re-hashes flows, some of them away from this replica. A flow that went to
    a sibling was last seen here before the change; pinning it would take it
    back from the sibling, whose even share then goes unused while this
    replica drops what its own share cannot hold (a scale-down under load
    passed 77 of 100/s for two seconds that way). So only clients seen since
    the change has settled are pinned, and at least those of the last
    LEAST_RECENT seconds.
    """
    if regrouped_at is None:
        return RECENT
    since = now - (regrouped_at + REGROUP_SETTLE)
    return min(RECENT, max(LEAST_RECENT, since))


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain did, for the replica's log line and for tests."""

    pinned: int = 0  # flows kept on this replica
    idle: int = 0  # pinned flows that had gone idle when the drain ended
    active: int = 0  # pinned flows still active at the timeout (or when cut short)
    seconds: float = 0.0
    packets: int = 0  # client datagrams received (and decided) during the drain
    replies: int = 0  # upstream replies relayed back during the drain
    skipped: str = ""  # why nothing was pinned, e.g. "only member"
    cut_short: bool = False

    def line(self) -> str:
        """One line: the controller shows a replica's last log line."""
        if self.skipped:
            return f"drain skipped ({self.skipped})"
        end = "cut short" if self.cut_short else "timed out" if self.active else "done"
        return (
            f"drain {end} in {self.seconds:.2f}s: {self.pinned} flows pinned, "
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


class _Pin(asyncio.DatagramProtocol):
    """One client's connected socket on the service address: its datagrams keep coming here."""

    def __init__(self, relay: UdpRelay, addr: Peer, last_seen: float, sock: socket.socket) -> None:
        self.relay = relay
        self.addr = addr
        self.last_seen = last_seen
        self.sock = sock
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Peer | None) -> None:
        self.last_seen = self.relay.monotonic()
        # Between bind and connect a pin is an ordinary member of the group, so a
        # stray datagram of another client may land here: trust the sender's address.
        self.relay.receive(data, addr or self.addr)

    def error_received(self, exc: Exception) -> None:
        pass  # nothing is sent from a pin; replies leave from the listen socket

    def unpin(self) -> None:
        """Hand the client to the siblings without losing what is queued here, then close.

        Closing a socket drops the datagrams waiting in it. So the pin first
        connects to its own address, which sends nothing: from then on the
        client's datagrams find no connected socket and go to the group. Then
        it relays what had been queued before it closes.
        """
        with contextlib.suppress(OSError):
            self.sock.connect(self.sock.getsockname())
            while True:
                self.relay.receive(self.sock.recv(65536), self.addr)
        if self.transport is not None:
            self.transport.close()


def _pin_socket(service: Address, client: Peer) -> socket.socket | None:
    """A socket on the service address that receives `client`'s datagrams only (None: failed)."""
    family = socket.AF_INET6 if ":" in service[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(service)
        sock.connect(client)
    except OSError as exc:
        sock.close()
        where = format_address((str(client[0]), int(client[1])))
        log.warning("drain: cannot pin %s (%s); it and older flows go to the siblings", where, exc)
        return None
    return sock


class Drain:
    """One drain of one relay: `begin` (pin, leave the group), then `finish` (wait, unpin)."""

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
        self.pins: dict[Peer, _Pin] = {}
        self.started = relay.monotonic()  # the relay's clock: its flows' times are compared
        self._received = relay.counters.received
        self._replies = relay.counters.replies
        self._stop = asyncio.Event()

    async def begin(self) -> int:
        """Pin the recent clients, then take no new ones; returns how many were pinned."""
        relay = self.relay
        self.started = relay.monotonic()
        self._received, self._replies = relay.counters.received, relay.counters.replies
        socks: list[tuple[_Pin, socket.socket]] = []
        if relay.listening:
            service = relay.local_address
            # Each pin joins the group and so changes which member the hash picks
            # for everyone else; no awaits here keeps that window to microseconds.
            # Newest first: if sockets run out, the busiest flows are the ones kept.
            for addr, last_seen in relay.recent_clients(self.recent)[: relay.max_flows]:
                sock = _pin_socket(service, addr)
                if sock is None:
                    break
                socks.append((_Pin(relay, addr, last_seen, sock), sock))
        relay.leave_group()
        loop = asyncio.get_running_loop()
        for index, (pin, sock) in enumerate(socks):
            try:  # what arrives meanwhile waits in the pin's socket
                await loop.create_datagram_endpoint(lambda p=pin: p, sock=sock)  # type: ignore[misc]
            except OSError:
                sock.close()
                continue
            except BaseException:
                for _, unused in socks[index:]:
                    unused.close()
                raise
            self.pins[pin.addr] = pin
        return len(self.pins)

    def cut_short(self) -> None:
        """End `finish` now (SIGINT during a drain)."""
        self._stop.set()

    async def finish(self) -> DrainResult:
        """Relay the pinned flows until all are idle or the timeout has passed; close the pins."""
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
            now = self.relay.monotonic()
            busy = count_idle(self._activity().values(), now, self.idle) < len(self.pins)
            if self.window and busy and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(until_boundary(self.relay.clock(), self.window)):
                        await self._stop.wait()
            return self._result(self.relay.monotonic())
        finally:
            self.close()

    def _activity(self) -> dict[Peer, float]:
        """Each pinned flow's last datagram: from its client (the pin) or either way (the relay)."""
        seen = {addr: pin.last_seen for addr, pin in self.pins.items()}
        for addr, when in self.relay.recent_clients(self.idle):
            if addr in seen:
                seen[addr] = max(seen[addr], when)
        return seen

    def _result(self, now: float) -> DrainResult:
        activity = self._activity().values()
        idle = count_idle(activity, now, self.idle)
        counters = self.relay.counters
        return DrainResult(
            pinned=len(self.pins),
            idle=idle,
            active=len(activity) - idle,
            seconds=now - self.started,
            packets=counters.received - self._received,
            replies=counters.replies - self._replies,
            cut_short=self._stop.is_set(),
        )

    def close(self) -> None:
        """Close every pin: their clients reach the siblings from now on."""
        for pin in self.pins.values():
            pin.unpin()
