"""A UDP echo server that counts what it receives, second by second.

It stands in for the upstream of a service in experiments and tests: every
datagram goes back to its sender, and the number received in each wall-clock
second (epoch-aligned, so it lines up with the rate limiter's windows) is kept
in `history` and optionally appended to a CSV as each second completes.
Datagrams of vmbox.tools.newflows (they begin with its MARK) are echoed but
counted only in `new_flows`, so `history` shows what a rate limit let through
while a load of new flows grows the replicas' memory.
`vmbox echo` (vmbox.cli) calls `echo_main`; tests and experiments use
`EchoServer` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TextIO, cast

from vmbox.dataplane.sockets import Address, bind_udp, bound_address, format_address, write_backlog
from vmbox.tools.newflows import MARK

# Replies buffered in user space beyond this are dropped, like a full NIC queue.
WRITE_LIMIT = 4 * 1024 * 1024

Report = Callable[[int, int], None]


class _EchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: EchoServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Selector and uvloop datagram transports do not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if data.startswith(MARK):
            self.server.new_flows += 1
        else:
            self.server._count(int(time.time()))
        transport = self.transport
        if not data:
            # asyncio's transports silently skip empty datagrams; UDP allows them.
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)
        elif transport is not None and write_backlog(transport) < WRITE_LIMIT:
            transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # a sender that went away; nothing to do for an echo


def _open_csv(path: str) -> TextIO:
    """Open for appending (a local file, once per run), writing the header if new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    stream = open(path, "a", newline="")  # noqa: SIM115 - EchoServer.close() closes it
    if new:
        csv.writer(stream).writerow(["second", "received"])
    return stream


class EchoServer:
    """Echo datagrams on `listen`; count them per epoch second."""

    def __init__(self, listen: Address, csv_path: str | None = None) -> None:
        self.listen = listen
        self.csv_path = csv_path
        self.history: list[tuple[int, int]] = []
        self.total = 0
        self.new_flows = 0  # datagrams of vmbox.tools.newflows: echoed, not in history
        # Called with (second, received) as each second completes.
        self.on_second: Report | None = None
        self._second = -1
        self._count_now = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._csv: TextIO | None = None

    @property
    def local_address(self) -> Address:
        """The address actually bound (the real port when `listen` asked for 0)."""
        return bound_address(self._transport, "echo server")

    async def start(self) -> None:
        """Bind and start counting; raises BindError (one line) if the port is taken."""
        loop = asyncio.get_running_loop()
        sock = await bind_udp(self.listen, "listen")
        if self.csv_path is not None:
            self._csv = _open_csv(self.csv_path)
        self._second = int(time.time())
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _EchoProtocol(self, sock), sock=sock
        )
        self._ticker = loop.create_task(self._tick(), name="echo-ticker")

    async def close(self) -> None:
        """Stop the ticker, record the last (partial) second, close the socket and CSV."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._complete(self._second, self._count_now)
        if self._csv is not None:
            self._csv.close()
            self._csv = None

    def _count(self, second: int) -> None:
        if second != self._second:
            self._roll(second)
        self._count_now += 1
        self.total += 1

    def _roll(self, second: int) -> None:
        """Close every second before `second`, including silent ones."""
        if second <= self._second:
            return
        self._complete(self._second, self._count_now)
        # Bounded: a long stall records at most an hour of empty seconds.
        for empty in range(max(self._second + 1, second - 3600), second):
            self._complete(empty, 0)
        self._second = second
        self._count_now = 0

    def _complete(self, second: int, received: int) -> None:
        self.history.append((second, received))
        if self._csv is not None:
            csv.writer(self._csv).writerow([second, received])
            self._csv.flush()
        if self.on_second is not None:
            self.on_second(second, received)

    async def _tick(self) -> None:
        # Seconds without traffic must still be recorded (as zero), so a timer
        # closes each second just after its wall-clock boundary.
        while True:
            now = time.time()
            await asyncio.sleep(math.floor(now) + 1.0 - now + 0.005)
            self._roll(int(time.time()))

    def rate_between(self, t0: float, t1: float) -> float:
        """Mean datagrams/s over the recorded whole seconds s with t0 <= s and s + 1 <= t1."""
        counts = [n for s, n in self.history if s >= t0 and s + 1 <= t1]
        return sum(counts) / len(counts) if counts else 0.0


async def run_echo(
    listen: Address,
    csv_path: str | None,
    duration: float | None,
    report: Report | None = None,
) -> EchoServer:
    """Serve for `duration` seconds (None: until cancelled); returns the closed server."""
    server = EchoServer(listen, csv_path)
    server.on_second = report
    await server.start()
    try:
        if duration is None:
            await asyncio.Event().wait()  # until cancelled
        else:
            await asyncio.sleep(duration)
    finally:
        await server.close()
    return server


async def echo_main(address: Address, csv: str | None, duration: float | None) -> int:
    """`vmbox echo`: print one line per second; returns the total received."""

    def report(second: int, received: int) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(second))
        print(f"{stamp}  received {received:>7}/s", flush=True)

    print(f"echo on {format_address(address)}; one line per second", flush=True)
    server = await run_echo(address, csv, duration, report)
    print(f"total received: {server.total}", flush=True)
    return server.total
