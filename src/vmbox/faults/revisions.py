"""Did a watch miss an update? Writes numbered values and checks every revision arrives.

Used by vmbox.faults.etcd_members while etcd members die around it. A writer
on a connection of its own puts 0, 1, 2, ... to one key every `every`
seconds, noting the revision etcd acknowledged for each; a watcher on the
service's own store (the client the controller and replicas use, whose watch
resumes from the revision after the last one it delivered) records what it
receives. `verify()` then holds the watcher to every acknowledged revision,
in order, each once, each carrying the number written at it. A put that
failed on the client may still have been committed (etcd had it, the answer
was lost): the watcher may see it, and that is no miss. The etcd client
retries a put that failed with UNAVAILABLE (a leader change), so one number
can also be committed twice, at two revisions, or a timed-out one later than
the next: the numbers the watch delivers are in order only at the revisions
etcd acknowledged, and those are the ones held to order.
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
        self.written: dict[int, int] = {}  # acknowledged revision -> the number put there
        self.attempted = 0  # numbers 0 .. attempted - 1 were put, acknowledged or not
        self.failed = 0  # puts that raised (no quorum, member gone): maybe committed
        self.seen: list[int] = []  # revisions the watch delivered, in arrival order
        self.values: dict[int, int | None] = {}  # delivered revision -> the number it carried
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
            self.attempted = number + 1
            try:
                revision = await self.writer.put(self.key, str(number).encode())
            except StoreError:
                self.failed += 1
            else:
                self.acked.append(revision)
                self.written[revision] = number
            number += 1
            await asyncio.sleep(self.every)

    async def _watch(self, start: int) -> None:
        async for event in self.watcher.watch_prefix(self.key, start):
            if event.key == self.key and event.kind == "put":
                self.seen.append(event.revision)
                try:
                    self.values[event.revision] = int(event.value)
                except ValueError:
                    self.values[event.revision] = None

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
        if any(later <= earlier for earlier, later in itertools.pairwise(self.seen)):
            found.append("the watch delivered revisions out of order")
        wrong = [r for r in self.seen if r in self.written and self.values[r] != self.written[r]]
        if wrong:
            found.append(
                f"the watch delivered {len(wrong)} acknowledged revisions with a number other "
                f"than the one put there (first at {wrong[0]})"
            )
        stray = [r for r in self.unacknowledged() if not self._was_put(self.values[r])]
        if stray:
            found.append(
                f"the watch delivered {len(stray)} revisions carrying no number ever put "
                f"(first at {stray[0]})"
            )
        return found

    def _was_put(self, number: int | None) -> bool:
        return number is not None and 0 <= number < self.attempted

    def unacknowledged(self) -> list[int]:
        """Revisions delivered that no put was acknowledged at: failed or retried puts
        etcd committed all the same."""
        return [r for r in self.seen if r not in self.written]
