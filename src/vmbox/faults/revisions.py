"""Did a watch miss an update? Writes numbered values and checks every revision arrives.

Used by vmbox.faults.etcd_members while etcd members die around it. A writer
on a connection of its own puts 0, 1, 2, ... to one key every `every`
seconds, noting the revision etcd acknowledged for each; a watcher on the
service's own store (the client the controller and replicas use, whose watch
resumes from the revision after the last one it delivered) records what it
receives. `check()` then holds the watcher to every acknowledged revision,
in order, each once. A put that timed out on the client may still have been
committed (etcd had it, the answer was lost): the watcher may see it, and
that is no miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from types import TracebackType
from typing import Self

from vmbox.state.store import Store, StoreError


class RevisionCheck:
    """`async with RevisionCheck(watcher, writer, key) as check:` then `await check.verify()`."""

    def __init__(self, watcher: Store, writer: Store, key: str, every: float = 0.05) -> None:
        self.watcher = watcher
        self.writer = writer
        self.key = key
        self.every = every
        self.acked: list[int] = []  # revisions etcd acknowledged, in write order
        self.failed = 0  # puts that raised (no quorum, member gone): maybe committed
        self.seen: list[int] = []  # revisions the watch delivered, in arrival order
        self.values: list[int] = []  # and the numbers they carried
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        start = await self.writer.put(self.key, b"start")
        self._tasks = [
            asyncio.create_task(self._watch(start + 1)),
            asyncio.create_task(self._write()),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _write(self) -> None:
        number = 0
        while True:
            try:
                self.acked.append(await self.writer.put(self.key, str(number).encode()))
            except StoreError:
                self.failed += 1
            number += 1
            await asyncio.sleep(self.every)

    async def _watch(self, start: int) -> None:
        async for event in self.watcher.watch_prefix(self.key, start):
            if event.key == self.key and event.kind == "put":
                self.seen.append(event.revision)
                with contextlib.suppress(ValueError):
                    self.values.append(int(event.value))

    async def verify(self, within: float = 5.0) -> list[str]:
        """Stop writing, give the watch `within` s to catch up; the problems, one line each."""
        writer = self._tasks[1] if len(self._tasks) > 1 else None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        deadline = time.monotonic() + within
        while self.acked and (not self.seen or self.seen[-1] < self.acked[-1]):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await self._stop()
        return self.problems()

    def problems(self) -> list[str]:
        found = []
        missed = sorted(set(self.acked) - set(self.seen))
        if missed:
            found.append(
                f"the watch missed {len(missed)} of {len(self.acked)} revisions (first {missed[0]})"
            )
        if len(set(self.seen)) != len(self.seen):
            found.append(f"the watch delivered {len(self.seen) - len(set(self.seen))} twice")
        for name, numbers in (("revisions", self.seen), ("values", self.values)):
            if any(later <= earlier for earlier, later in itertools.pairwise(numbers)):
                found.append(f"the watch delivered {name} out of order")
        return found
