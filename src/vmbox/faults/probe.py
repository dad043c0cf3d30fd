"""A forwarding probe: how long the service stopped passing traffic, to a few ms.

Used by the faults that hit the control plane (vmbox.faults.etcd_members): while
etcd loses its leader or its quorum, the data plane must keep forwarding, and
the probe measures the worst gap. `sources` sockets, each bound to its own
loopback address (127.0.0.200 and up, apart from the load tool's .2, .3, ...),
take turns sending one numbered datagram every `interval` seconds in all, so
each source stays far below the per-source limit and its flow hashes to some
replica of the group. The echo upstream sends each one back through the
service; `gap(start, end)` is the longest time without any reply in a span.

The probe's datagrams reach the upstream too: `sent_per_second` lets a fault
add them to what the upstream may receive (they are each far under the limit).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import socket
import time
from collections import Counter
from types import TracebackType
from typing import Self

FIRST_ADDRESS = 200  # 127.0.0.200: clear of the load tool's 127.0.0.2, .3, ...


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, probe: Prober) -> None:
        self.probe = probe

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.probe.replies.append(time.monotonic())

    def error_received(self, exc: Exception) -> None:
        pass  # nothing listens (the service is away): a gap, measured by the replies


class Prober:
    """`async with Prober(target) as probe:` sends until the block ends; then read gaps."""

    def __init__(self, target: tuple[str, int], sources: int = 8, interval: float = 0.005) -> None:
        self.target = target
        self.sources = sources
        self.interval = interval
        self.sent = 0
        self.replies: list[float] = []  # monotonic arrival times, in order
        self.sends: list[float] = []  # monotonic send times, in order
        self.sent_per_second: Counter[int] = Counter()  # epoch second -> datagrams sent
        self._transports: list[asyncio.DatagramTransport] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        try:
            for index in range(self.sources):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    sock.bind((f"127.0.0.{FIRST_ADDRESS + index}", 0))
                    sock.connect(self.target)
                except OSError:
                    sock.close()
                    raise
                transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(self), sock=sock)
                self._transports.append(transport)
        except BaseException:
            self._close()
            raise
        self._task = asyncio.create_task(self._send())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.sleep(0.05)  # the replies of the last few
        self._close()

    def _close(self) -> None:
        for transport in self._transports:
            transport.close()

    async def _send(self) -> None:
        started = time.monotonic()
        while True:
            transport = self._transports[self.sent % len(self._transports)]
            transport.sendto(self.sent.to_bytes(8, "big"))
            self.sent += 1
            self.sends.append(time.monotonic())
            self.sent_per_second[int(time.time())] += 1
            # On schedule, not interval after the last send: a late wake does
            # not stretch the gaps the probe is there to measure.
            await asyncio.sleep(max(0.0, started + self.sent * self.interval - time.monotonic()))

    def gap(self, start: float, end: float) -> float:
        """The longest time (s) without a reply between monotonic `start` and `end`."""
        return _longest_gap(self.replies, start, end)

    def send_gap(self, start: float, end: float) -> float:
        """The longest time (s) without a send: the probe's own event loop stalled.

        The echo and the probe share a loop, so a reply gap no longer than
        this one is the measuring side's stall, not the service's.
        """
        return _longest_gap(self.sends, start, end)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    first = bisect.bisect_left(times, start)
    last = bisect.bisect_right(times, end)
    span = [start, *times[first:last], end]
    return max(later - earlier for earlier, later in itertools.pairwise(span))
