"""The UDP data-plane driver: an asyncio relay between clients and one upstream.

vmbox.replica runs one UdpRelay per replica (on uvloop). Every replica of a
service binds the service address with SO_REUSEPORT, so the kernel spreads
client flows across them. Each datagram becomes a `Packet`; `decide` (the
middlebox) returns a `Verdict`; passed datagrams go upstream through a
connected socket per client, so upstream replies find their way back to
exactly that client. In the `strong` consistency mode a `barrier` (a store
read) must complete, having started after a packet arrived, before the packet
is decided; packets that arrive while one read is pending share the next.
vmbox.dataplane.drain takes a relay out of its group with `leave_group` when it ends.

Nothing a client or the upstream sends can stop the relay: errors are counted
in `Counters` and logged at most once per second.

Two injected clocks: `clock` (wall time, default `time.time`) is the `now` the
middlebox decides with, since its windows are aligned to the epoch across
replicas; `monotonic` (default `time.monotonic`) times everything else, the
flow table (vmbox.dataplane.flows, pure), the idle sweep, the rate-limited log
and a drain's flows in flight, so none of it follows a step of the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

from vmbox.dataplane.counters import Counters
from vmbox.dataplane.flows import Flow, FlowTable, Peer
from vmbox.dataplane.sockets import (
    Address,
    AddressInUse,
    BindError,
    bind_udp,
    bound_address,
    resolve,
    write_backlog,
)
from vmbox.packet import UDP, Packet, Verdict

__all__ = ["AddressInUse", "BindError", "Peer", "UdpRelay"]

log = logging.getLogger(__name__)

Decide = Callable[[Packet, float], Verdict]
Barrier = Callable[[], Awaitable[None]]

# Datagrams queued for a client whose upstream socket is still being created.
FLOW_QUEUE = 256
# Packets waiting for a strong-mode barrier; beyond it new arrivals are dropped
# so a stalled store cannot grow memory without bound.
MAX_PENDING = 65536
# Bytes a transport may buffer in user space before we drop instead of queueing.
WRITE_LIMIT = 4 * 1024 * 1024
# Leaving the group relays what is queued in the listen socket: at most this many
# datagrams (a 4 MiB receive buffer holds fewer), each read whole.
QUEUE_MAX = 65536
RECV_MAX = 65536


class _RateLimitedLog:
    """Log each kind of trouble at most once per `interval` seconds."""

    def __init__(self, clock: Callable[[], float], interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self.last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = self.clock()
        if now - self.last.get(key, -self.interval) >= self.interval:
            self.last[key] = now
            log.warning(message, *args, exc_info=exc_info)


class _Flow(Flow, asyncio.DatagramProtocol):
    """One client's connected upstream socket and its pending queue (its activity: Flow)."""

    def __init__(self, relay: UdpRelay, addr: Peer, now: float) -> None:
        super().__init__(addr, now)
        self.relay = relay
        self.queue: deque[bytes] = deque()
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None

    def datagram_received(self, data: bytes, addr: Peer) -> None:
        self.relay._on_reply(self, data)

    def error_received(self, exc: Exception) -> None:
        # Typically ConnectionRefused: the upstream port has no listener.
        self.relay.counters.upstream_errors += 1
        self.relay._trouble.warning("upstream", "relay: upstream error: %s", exc)


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Peer) -> None:
        self.relay.receive(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a reply we sent to a client that has gone away.
        self.relay._trouble.warning("client", "relay: error sending to a client: %s", exc)


class UdpRelay:
    """Relay datagrams from `listen` to `upstream` as `decide` allows."""

    def __init__(
        self,
        listen: Address,
        upstream: Address,
        decide: Decide,
        *,
        barrier: Barrier | None = None,
        counters: Counters | None = None,
        idle_timeout: float = 30.0,
        max_flows: int = 65536,
        reuse_port: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_timeout <= 0 or max_flows < 1:
            raise ValueError("idle_timeout must be positive and max_flows at least 1")
        self.listen = listen
        self.upstream = upstream
        self.decide = decide
        self.barrier = barrier
        self.counters = counters if counters is not None else Counters()
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.reuse_port = reuse_port
        self.clock = clock  # the middlebox's now: wall time
        self.monotonic = monotonic  # flows, the sweep, the log and drains
        self._flows: FlowTable[_Flow] = FlowTable(idle_timeout, max_flows)
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._upstream_addr: tuple[socket.AddressFamily, Address] | None = None
        self._listen_addr: tuple[socket.AddressFamily, Address] | None = None
        self._dst = ("", 0)  # what a middlebox sees as a packet's destination: the upstream
        self._pending: list[tuple[bytes, Peer]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._trouble = _RateLimitedLog(monotonic)

    @property
    def listening(self) -> bool:
        """The listen socket is open (from start() until close(), even after leave_group)."""
        return self._transport is not None

    @property
    def local_address(self) -> Address:
        """The address actually bound (the real port when `listen` asked for 0)."""
        return bound_address(self._transport, "relay")

    async def prepare(self) -> None:
        """Resolve the listen and upstream addresses ahead of start(), which then binds
        at once (a joiner binds at a window boundary: vmbox.replica)."""
        if self._upstream_addr is None:
            self._upstream_addr = await resolve(self.upstream)
            self._dst = (str(self._upstream_addr[1][0]), int(self._upstream_addr[1][1]))
        if self._listen_addr is None:
            self._listen_addr = await resolve(self.listen)

    async def start(self) -> None:
        """Bind the listen address and start the owned background tasks."""
        loop = asyncio.get_running_loop()
        await self.prepare()
        sock = self._sock = await bind_udp(
            self.listen, "listen", reuse_port=self.reuse_port, resolved=self._listen_addr
        )
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), sock=sock
        )
        self._tasks.append(loop.create_task(self._sweep_loop(), name="relay-sweep"))
        if self.barrier is not None:
            self._tasks.append(loop.create_task(self._barrier_loop(), name="relay-barrier"))

    def leave_group(self) -> None:
        """Take no more datagrams: the SO_REUSEPORT siblings get every flow (see drain.py).

        A connected socket is out of the group's hash, so the listen socket
        connects to its own address, which sends it nothing; what was queued in
        it is relayed now (closing would drop it), and replies still leave from
        it (Linux lets a connected UDP socket sendto another address).
        """
        sock = self._sock
        if sock is None or self._transport is None:
            return
        try:
            sock.connect(sock.getsockname())
        except OSError as exc:  # unexpected; closing also leaves the group, losing the queue
            log.warning("relay: cannot leave the group gently (%s); closing the listener", exc)
            self._transport.close()
            self._transport = None
            return
        with contextlib.suppress(OSError):  # BlockingIOError: the queue is empty
            for _ in range(QUEUE_MAX):
                data, addr = sock.recvfrom(RECV_MAX)
                self.receive(data, addr)

    def recent_clients(self, within: float) -> list[tuple[Peer, float]]:
        """Clients whose flow was active in the last `within` s, newest first, with when."""
        return self._flows.recent(self.monotonic(), within)

    async def close(self) -> None:
        """Cancel the owned tasks and close every socket."""
        tasks = self._tasks + [f.task for f in self._flows.flows() if f.task is not None]
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for flow in self._flows.flows():
            self._remove_flow(flow)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- the packet path -------------------------------------------------

    def receive(self, data: bytes, addr: Peer) -> None:
        """One client datagram from the listen socket."""
        counters = self.counters
        counters.received += 1
        counters.bytes_received += len(data)
        if self.barrier is None:
            self._decide_and_forward(data, addr)
        elif len(self._pending) < MAX_PENDING:
            self._pending.append((data, addr))
            self._wake.set()
        else:
            counters.queue_drops += 1

    def _decide_and_forward(self, data: bytes, addr: Peer) -> None:
        counters = self.counters
        try:
            packet = Packet(addr[0], addr[1], len(data), UDP, self._dst[0], self._dst[1])
            verdict = self.decide(packet, self.clock())
        except Exception:
            # A middlebox bug must not kill the relay: treat it as a drop.
            self._trouble.warning("decide", "relay: decide() failed", exc_info=True)
            verdict = Verdict.DROP
        if verdict is Verdict.PASS:
            counters.passed += 1
            counters.bytes_passed += len(data)
            self._forward(data, addr)
        else:
            counters.dropped += 1

    def _forward(self, data: bytes, addr: Peer) -> None:
        flow = self._flows.get(addr)
        if flow is None:
            flow = self._open_flow(addr)
        else:
            self._flows.touch(flow, self.monotonic())
        transport = flow.transport
        if transport is None:
            if len(flow.queue) < FLOW_QUEUE:
                flow.queue.append(data)
            else:
                self.counters.queue_drops += 1
        else:
            self._send(transport, flow.sock, data)

    def _send(
        self, transport: asyncio.DatagramTransport, sock: socket.socket | None, data: bytes
    ) -> None:
        """Send a client's datagram upstream on its flow's connected socket."""
        if data and write_backlog(transport) < WRITE_LIMIT:
            transport.sendto(data)
        elif data:
            self.counters.queue_drops += 1
        elif sock is not None:
            # asyncio's transports silently skip empty datagrams; UDP allows them.
            try:
                sock.send(data)
            except OSError:
                self.counters.upstream_errors += 1

    def _on_reply(self, flow: _Flow, data: bytes) -> None:
        if not self._flows.holds(flow) or self._transport is None:
            return  # the flow was evicted; its client gets no late replies
        self._flows.touch(flow, self.monotonic())
        self.counters.replies += 1
        self.counters.bytes_replied += len(data)
        self._reply(data, flow.addr)

    def _reply(self, data: bytes, addr: Peer) -> None:
        """Send an upstream reply to its client straight from the listen socket.

        Not through `transport.sendto(data, addr)`: uvloop checks each new
        destination once and keeps the answer in an LRU cache, thousands of
        small entries made while flows come and go; each pins a heap page
        long after its flow idled out, and a replica's memory never fell back
        (vmbox.allocator; DESIGN.md "Memory that returns"). A full send buffer
        drops the reply, as UDP may.
        """
        assert self._sock is not None
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            self.counters.queue_drops += 1
        except OSError as exc:  # the client has gone: not ours to count
            self._trouble.warning("client", "relay: error sending to a client: %s", exc)

    # -- flows -------------------------------------------------------------

    def _open_flow(self, addr: Peer) -> _Flow:
        flow = _Flow(self, addr, self.monotonic())
        for oldest in self._flows.add(flow):
            self._drop_flow(oldest)
            self.counters.flows_evicted += 1
        self.counters.flows = len(self._flows)
        flow.task = asyncio.get_running_loop().create_task(self._connect(flow))
        return flow

    async def _connect(self, flow: _Flow) -> None:
        """Create the flow's connected upstream socket, then send what queued meanwhile."""
        assert self._upstream_addr is not None
        family, upstream = self._upstream_addr
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(upstream)
                transport, _ = await loop.create_datagram_endpoint(lambda: flow, sock=sock)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            flow.task = None  # finishing now; nothing left to cancel
            self.counters.upstream_errors += 1
            self._trouble.warning("connect", "relay: cannot open upstream socket: %s", exc)
            self.counters.queue_drops += len(flow.queue)
            self._remove_flow(flow)
            return
        flow.task = None
        if not self._flows.holds(flow):
            transport.close()  # evicted or closed while connecting
            return
        flow.transport, flow.sock = transport, sock
        while flow.queue:
            self._send(transport, sock, flow.queue.popleft())

    def _remove_flow(self, flow: _Flow) -> None:
        self._flows.remove(flow)
        self._drop_flow(flow)

    def _drop_flow(self, flow: _Flow) -> None:
        """Release the sockets of a flow already taken out of the table."""
        if flow.task is not None:
            flow.task.cancel()  # its own except/cleanup closes the socket
            flow.task = None
        if flow.transport is not None:
            flow.transport.close()
            flow.transport = flow.sock = None
        flow.queue.clear()
        self.counters.flows = len(self._flows)

    def expire_idle(self, now: float | None = None) -> int:
        """Close flows idle for `idle_timeout` seconds (monotonic time); returns how many."""
        expired = self._flows.expire(self.monotonic() if now is None else now)
        for flow in expired:
            self._drop_flow(flow)
        self.counters.flows_expired += len(expired)
        return len(expired)

    async def _sweep_loop(self) -> None:
        interval = min(1.0, max(0.02, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self.expire_idle()

    # -- strong consistency --------------------------------------------------

    async def _barrier_loop(self) -> None:
        """Decide each batch of packets only after a barrier that began after they arrived."""
        assert self.barrier is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self.barrier()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Fail-static: the middlebox keeps its last known state.
                self.counters.barrier_errors += 1
                self._trouble.warning(
                    "barrier", "relay: store read failed, deciding on last state: %s", exc
                )
            for data, addr in batch:
                self._decide_and_forward(data, addr)
