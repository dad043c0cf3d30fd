"""The in-path data-plane driver: one netfilter queue, a verdict per packet.

A replica of a `dataplane: nfqueue` service runs one NfqueueDriver. The
driver opens its netlink socket inside the gateway namespace
(`vmbox.netns.entered`), binds queue `queue` in copy-packet mode with a copy
range of COPY_RANGE bytes (headers only: the verdict needs no payload, the size
comes from the IP header), and reads it on the event loop: `loop.add_reader`
on the socket, at most `batch` packets per wakeup so a flood cannot starve the
loop's other work (the store, metrics). Each packet is parsed by
vmbox.dataplane.headers; `decide(packet, now)` (the middlebox) returns PASS or
DROP, applied in the kernel as ACCEPT or DROP: no packet is ever modified. A
packet that does not parse is counted as malformed and dropped.

The binding is `netfilterqueue` (docs/nfqueue.md: why, with the figures):
its `run_socket` loop reads our non-blocking socket and calls back once per
packet. What it lacks the driver sends itself on its socket: the queue flag
NFQA_CFG_F_GSO (GSO packets whole, counted as their segments) and one batch
verdict per wakeup accepting the packets passed (drops go at once). `now`
is read once per wakeup from `clock` (wall time, as the middlebox's windows
are epoch-aligned); `monotonic` times drain.

In the `strong` consistency mode `barrier` (a store read) must complete,
having started after a packet arrived, before the packet is decided: packets
are held (the kernel keeps them queued) and decided in batches after each
barrier, as the UDP relay does. Without a barrier a packet costs one
`is None` test for it.

A chain with keyed state (vmbox.keyed: a firewall's connections) may answer
a future instead of a verdict: that packet alone stays queued in the kernel
while its state is read or written, and gets its verdict when the future is
done; the packets behind it are decided meanwhile (passed ones accepted one
by one while any is held, since a batch verdict would accept the held ones).

Errors the operator can cause (missing namespace, no permission, a queue held
by another process) become an OSError whose str() is one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import struct
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from netfilterqueue import COPY_PACKET, NetfilterQueue

from vmbox import netns
from vmbox.dataplane.counters import Counters
from vmbox.dataplane.headers import MTU, parse
from vmbox.packet import Packet, Verdict

__all__ = ["COPY_RANGE", "NfqueueDriver", "QueueError"]

log = logging.getLogger(__name__)

# A verdict now, or (a middlebox waiting for its state: vmbox.keyed) one to come.
Decide = Callable[[Packet, float], "Verdict | asyncio.Future[Verdict]"]
Barrier = Callable[[], Awaitable[None]]

# Bytes of each packet copied to us: enough for an IPv4 header with options
# (60) or an IPv6 header and a few extension headers, then the ports.
COPY_RANGE = 128
# Packets the kernel holds for us before it drops (or, with --queue-bypass
# and no listener, passes); a wakeup's batch and a barrier's wait fit in it.
MAX_LEN = 8192
# The netlink socket's receive buffer: MAX_LEN messages of ~COPY_RANGE + 100 bytes.
RCVBUF = 4 * 1024 * 1024
# Packets read per wakeup before the loop gets to run its other callbacks.
BATCH = 256
PROC_QUEUES = "/proc/thread-self/net/netfilter/nfnetlink_queue"
# Netlink, for the one message netfilterqueue cannot send: the queue's flags.
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (the queue number, big-endian)
_NLA_U32 = struct.Struct("=HH")  # attribute length, type; then a big-endian u32
_U32 = struct.Struct("!I")
_ERRNO = struct.Struct("=i")
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 3, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1
_VERDICT = struct.Struct("!II")  # verdict, packet id
# Hand GSO packets over whole (one verdict for up to 64 KB), not segmented in software.
NFQA_CFG_F_GSO = 1 << 2
_CONFIG_SEQ = 0x766D6278  # ours, so the ack is told from anything else on the socket


def config_flags_message(queue: int, flags: int, mask: int, seq: int = _CONFIG_SEQ) -> bytes:
    """NFQNL_MSG_CONFIG setting `flags` (under `mask`) on `queue`, asking for an ack."""
    attrs = b"".join(
        _NLA_U32.pack(8, kind) + _U32.pack(value)
        for kind, value in ((NFQA_CFG_MASK, mask), (NFQA_CFG_FLAGS, flags))
    )
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def verdict_batch_message(queue: int, verdict: int, last_id: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: `verdict` for each packet of `queue` queued up to `last_id`."""
    attr = _NLA_U32.pack(4 + _VERDICT.size, NFQA_VERDICT_HDR) + _VERDICT.pack(verdict, last_id)
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attr
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST, 0, 0) + body


def ack_errno(datagram: bytes, seq: int = _CONFIG_SEQ) -> int | None:
    """The errno (0: done) of the ack for `seq` in this datagram, or None if it holds none."""
    offset = 0
    while offset + _NLMSG.size <= len(datagram):
        length, kind, _flags, got, _port = _NLMSG.unpack_from(datagram, offset)
        if length < _NLMSG.size:
            return None
        if kind == NLMSG_ERROR and got == seq and offset + _NLMSG.size + 4 <= len(datagram):
            return -int(_ERRNO.unpack_from(datagram, offset + _NLMSG.size)[0])
        offset += (length + 3) & ~3
    return None


class QueueError(OSError):
    """The queue cannot be opened or bound; str() is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "netfilter queue error"


class _BoundedSocket:
    """What `run_socket` reads: at most `budget` datagrams of `sock`, then EAGAIN.

    `recv` is next() on a chain of `sock.recv` mapped over `budget` sizes and
    then the recv of an always-empty socket, which raises EAGAIN: that ends
    netfilterqueue's loop as an empty socket would, the fd stays readable and
    the loop calls us again after its other callbacks. All of it runs in C:
    no Python frame per packet. (A full socket buffer, ENOBUFS, is skipped by
    netfilterqueue; the kernel counts it: `kernel_socket_drops`.)
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._empty, self._other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._empty.setblocking(False)
        self.recv: Callable[[int], bytes] = self._empty.recv

    def refill(self, budget: int) -> None:
        reads = map(self.sock.recv, itertools.repeat(65536, budget))
        done = map(self._empty.recv, itertools.repeat(1))
        self.recv = functools.partial(next, itertools.chain(reads, done))

    def close(self) -> None:
        self._empty.close()
        self._other.close()


class _Replay:
    """What `run_socket` reads to hand over datagrams that came before the flags' ack."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = datagrams

    def recv(self, size: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "replayed")
        return self.datagrams.pop(0)


class NfqueueDriver:
    """Decide every packet of netfilter queue `queue` in `namespace` (None: this one)."""

    def __init__(
        self,
        namespace: str | None,
        queue: int,
        decide: Decide,
        *,
        counters: Counters | None = None,
        barrier: Barrier | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        batch: int = BATCH,
        max_len: int = MAX_LEN,
        copy_range: int = COPY_RANGE,
        mtu: int = MTU,
    ) -> None:
        self.namespace = namespace
        self.queue = queue
        self.decide = decide
        self.counters = counters if counters is not None else Counters()
        self.barrier = barrier
        self.clock = clock
        self.monotonic = monotonic
        self.batch = batch
        self.max_len = max_len
        self.copy_range = copy_range
        self.mtu = mtu  # the egress MTU: how many packets a GSO packet becomes
        self.last_packet = monotonic()
        self._now = 0.0
        self._nfq: NetfilterQueue | None = None
        self._sock: socket.socket | None = None
        self._reader: _BoundedSocket | None = None
        self._proc_fd: int | None = None
        self._pending: list[tuple[Any, Packet]] = []
        self._accept_upto = -1  # the last passed packet's id, until _flush accepts them
        self._held = 0  # packets whose verdict is to come (a future from decide)
        self.held_total = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def where(self) -> str:
        return f"netfilter queue {self.queue}" + (
            f" in namespace {self.namespace!r}" if self.namespace else ""
        )

    async def start(self) -> None:
        """Open the socket in the namespace, bind the queue and start reading."""
        if self._nfq is not None:
            return
        with self._inside():
            nfq = self._open()
            # The proc file follows the namespace it was opened in; re-read with pread.
            with contextlib.suppress(OSError):
                self._proc_fd = os.open(PROC_QUEUES, os.O_RDONLY | os.O_CLOEXEC)
        self._nfq = nfq
        self._sock = socket.socket(fileno=os.dup(nfq.get_fd()))
        early = self._set_flags(self._sock, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
        self._sock.setblocking(False)
        self._reader = _BoundedSocket(self._sock)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if early:
            # Packets queued while we waited for the ack: decide them now, in order.
            self._now = self.clock()
            nfq.run_socket(_Replay(early))  # type: ignore[arg-type]  # it only calls recv()
            self._flush()
        if self.barrier is not None:
            self._tasks.append(self._loop.create_task(self._barrier_loop(), name="nfq-barrier"))
        log.info("nfqueue: bound %s", self.where)

    def _set_flags(self, sock: socket.socket, flags: int, mask: int) -> list[bytes]:
        """Set the queue's flags (netfilterqueue has no call for it); what came before the ack.

        The kernel takes the message only from the socket that bound the queue,
        and packets may already be queued to it: every datagram read before the
        ack is returned, for the caller to hand to netfilterqueue. A kernel that
        refuses the flags (or no ack within a second) leaves the queue working
        without them, with a warning.
        """
        early: list[bytes] = []
        sock.settimeout(1.0)
        try:
            sock.sendto(config_flags_message(self.queue, flags, mask), (0, 0))
            while True:
                datagram = sock.recv(65536)
                error = ack_errno(datagram)
                if error is None:
                    early.append(datagram)
                    continue
                if error:
                    log.warning(
                        "nfqueue: %s: flags %#x refused: %s", self.where, flags, os.strerror(error)
                    )
                return early
        except OSError as exc:
            log.warning("nfqueue: %s: cannot set flags %#x: %s", self.where, flags, exc)
            return early

    def _inside(self) -> contextlib.AbstractContextManager[None]:
        if self.namespace is None:
            return contextlib.nullcontext()
        return netns.entered(self.namespace)

    def _open(self) -> NetfilterQueue:
        try:
            nfq = NetfilterQueue()
        except OSError as exc:
            raise QueueError(f"{self.where}: cannot open netlink ({_cause(exc)})") from None
        try:
            with warnings.catch_warnings():
                # It warns when the kernel caps the receive buffer; the cap is fine.
                warnings.simplefilter("ignore", RuntimeWarning)
                nfq.bind(
                    self.queue,
                    self._on_packet,
                    max_len=self.max_len,
                    mode=COPY_PACKET,
                    range=self.copy_range,
                    sock_len=RCVBUF,
                )
        except OSError:
            nfq.unbind()
            held = os.geteuid() == 0
            why = (
                "another process has bound it (one listener per queue)"
                if held
                else "permission denied (needs root or CAP_NET_ADMIN)"
            )
            raise QueueError(f"{self.where}: cannot bind: {why}") from None
        return nfq

    def _on_readable(self) -> None:
        nfq, reader = self._nfq, self._reader
        if nfq is None or reader is None:
            return
        self._now = self.clock()
        reader.refill(self.batch)
        try:
            nfq.run_socket(reader)  # type: ignore[arg-type]  # it only calls recv()
        except OSError as exc:
            self.counters.socket_errors += 1
            log.warning("nfqueue: %s: read failed: %s", self.where, exc)
        self._flush()
        self.last_packet = self.monotonic()

    def _flush(self) -> None:
        """Accept every packet passed since the last flush: one batch verdict for them all.

        Dropped packets got their verdict at once and left the queue, so the
        batch (every queued packet with an id up to the last passed one)
        covers exactly the passed ones. Held packets (strong mode) are
        verdicted one by one instead, as a batch would sweep them up too.
        """
        last = self._accept_upto
        if last < 0 or self._sock is None:
            return
        self._accept_upto = -1
        try:
            self._sock.send(verdict_batch_message(self.queue, NF_ACCEPT, last))
        except OSError as exc:
            self.counters.socket_errors += 1
            log.warning("nfqueue: %s: batch verdict failed: %s", self.where, exc)

    def _on_packet(self, pkt: Any) -> None:
        counters = self.counters
        counters.received += 1
        packet = parse(pkt.get_payload(), self.mtu)
        if packet is None:
            counters.malformed += 1
            counters.dropped += 1
            pkt.drop()
            return
        counters.bytes_received += packet.size
        if self.barrier is not None:
            self._pending.append((pkt, packet))
            self._wake.set()
            return
        try:
            verdict = self.decide(packet, self._now)
        except Exception:
            log.exception("nfqueue: decide failed; dropping")
            verdict = Verdict.DROP
        if verdict is Verdict.PASS:
            counters.passed += 1
            counters.bytes_passed += packet.size
            if self._held:
                pkt.accept()  # a batch verdict would sweep up the held packets before it
            else:
                self._accept_upto = pkt.id  # accepted by the wakeup's batch verdict (_flush)
        elif verdict is Verdict.DROP:
            counters.dropped += 1
            pkt.drop()
        else:
            self._hold(pkt, packet, verdict)

    def _hold(self, pkt: Any, packet: Packet, later: asyncio.Future[Verdict]) -> None:
        """Keep `pkt` queued in the kernel until its verdict comes; the others go on.

        While any packet is held, passed packets are accepted one by one: a
        batch verdict accepts every queued packet up to an id, held ones too.
        """
        self._flush()  # the packets passed before it, by id, before it is held
        self._held += 1
        self.held_total += 1

        def done(future: asyncio.Future[Verdict]) -> None:
            self._held -= 1
            if self._nfq is None:
                return  # unbound: the kernel dropped what we held
            verdict = Verdict.DROP
            if not future.cancelled() and future.exception() is None:
                verdict = future.result()
            elif not future.cancelled():
                log.warning("nfqueue: a held packet's decision failed: %s", future.exception())
            self._apply(pkt, packet, verdict)

        later.add_done_callback(done)

    def _apply(self, pkt: Any, packet: Packet, verdict: Verdict) -> None:
        """Give one packet its verdict now, on its own (not by the wakeup's batch)."""
        if verdict is Verdict.PASS:
            self.counters.passed += 1
            self.counters.bytes_passed += packet.size
            pkt.accept()
        else:
            self.counters.dropped += 1
            pkt.drop()

    def _verdict(self, pkt: Any, packet: Packet, now: float) -> None:
        try:
            verdict = self.decide(packet, now)
        except Exception:
            # One bad decision never stops the driver; a firewall that fails drops.
            log.exception("nfqueue: decide failed; dropping")
            verdict = Verdict.DROP
        if isinstance(verdict, Verdict):
            self._apply(pkt, packet, verdict)
        else:
            self._hold(pkt, packet, verdict)

    async def _barrier_loop(self) -> None:
        """Decide each held batch only after a barrier that began after it arrived."""
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
                # Leaving: the kernel drops what we still hold when the queue unbinds.
                self._pending[:0] = batch
                raise
            except Exception as exc:
                # Fail-static: the middlebox keeps its last known state.
                self.counters.barrier_errors += 1
                log.warning("nfqueue: store read failed, deciding on last state: %s", exc)
            now = self.clock()
            for pkt, packet in batch:
                self._verdict(pkt, packet, now)

    def read_kernel_counters(self) -> None:
        """Copy the kernel's drop counts for this queue into `counters` (for metrics)."""
        if self._proc_fd is None:
            return
        try:
            text = os.pread(self._proc_fd, 65536, 0).decode()
        except OSError:
            return
        for line in text.splitlines():
            # queue peer_portid waiting copy_mode copy_range queue_dropped user_dropped id 1
            fields = line.split()
            if len(fields) >= 7 and fields[0] == str(self.queue):
                self.counters.queue_waiting = int(fields[2])
                self.counters.kernel_queue_drops = int(fields[5])
                self.counters.kernel_socket_drops = int(fields[6])
                return

    async def drain(self, idle: float, timeout: float) -> None:
        """Return once no packet came for `idle` seconds, or after `timeout`."""
        deadline = self.monotonic() + timeout
        while True:
            now = self.monotonic()
            quiet = now - self.last_packet
            if (quiet >= idle and not self._pending and not self._held) or now >= deadline:
                return
            await asyncio.sleep(max(0.01, min(idle - quiet, deadline - now, idle / 4)))

    async def close(self) -> None:
        """Stop reading and unbind the queue; safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        nfq, self._nfq = self._nfq, None
        if nfq is None:
            return
        self.read_kernel_counters()
        if self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        # Held packets get no verdict from us; unbinding makes the kernel drop them.
        self._pending = []
        nfq.unbind()
        del nfq  # its netlink socket closes with it (the callback cycle is broken by unbind)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._proc_fd is not None:
            os.close(self._proc_fd)
            self._proc_fd = None
        log.info("nfqueue: unbound %s", self.where)


def _cause(exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES) or os.geteuid() != 0:
        return "permission denied: needs root or CAP_NET_ADMIN"
    return exc.strerror or str(exc)
