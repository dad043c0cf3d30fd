"""A TCP proxy in front of etcd that a fault can blackhole: a partition without host rules.

Called by vmbox.faults.partition. One replica is given the proxy's endpoint
instead of etcd's; the others go to etcd directly. `cut()` stops forwarding in
both directions and `heal()` resumes it. While cut, every connection stays
open and nothing answers: bytes already read wait in the proxy, the rest in the
kernel's buffers, and a new connection is accepted but not passed on until the
heal. That is what a partition looks like to the client (its calls time out,
nothing is reset), unlike a closed port, which refuses at once. What was held
is delivered after the heal, as TCP retransmission would deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

CHUNK = 65536


class Blackhole:
    """Forwards 127.0.0.1:`port` to `target` (host, port) until cut; `async with` runs it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0  # the listening port, once entered
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted so far
        self.held = 0  # bytes that waited in the proxy for a heal

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return not self._open.is_set()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.create_task(self._connection(reader, writer))
        self._pipes.add(task)  # owned here, cancelled on exit
        task.add_done_callback(self._pipes.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # a connection made during a cut goes nowhere until the heal
            up_reader, upstream = await asyncio.open_connection(*self.target)
            async with asyncio.TaskGroup() as pipes:
                pipes.create_task(self._pipe(reader, upstream))
                pipes.create_task(self._pipe(up_reader, writer))
        except (OSError, ExceptionGroup):
            pass  # one side closed or reset: the other goes too
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            await self._open.wait()
            data = await source.read(CHUNK)
            if not data:
                break
            if not self._open.is_set():
                self.held += len(data)
                await self._open.wait()
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
