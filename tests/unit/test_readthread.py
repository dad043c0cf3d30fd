"""ReadThread: reads on a thread of their own, only changes handed to the loop, in order."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from tests.conftest import until
from vmbox.middlebox import StateItem, encode_int, parse_positive_int
from vmbox.state.readthread import Outcome, ReadThread
from vmbox.state.store import KeyValue, StoreUnavailable
from vmbox.state.views import PollView

KEY = "/vmbox/t/state/limit"


class Script:
    """A blocking read that returns the revisions it is given, one per call (thread-safe)."""

    def __init__(self, steps: list[int | Exception]) -> None:
        self.steps = list(steps)
        self.calls = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self) -> KeyValue | None:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.get_ident())
            step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        return None if step == 0 else KeyValue(KEY, str(step).encode(), step)


async def collect(
    script: Script, until_seen: Callable[[list[Outcome]], bool], max_backoff: float = 2.0
) -> tuple[list[Outcome], ReadThread]:
    seen: list[Outcome] = []
    loop = asyncio.get_running_loop()
    thread = ReadThread(script, 0.001, seen.append, loop, max_backoff=max_backoff)
    thread.start()
    try:
        await until(lambda: until_seen(seen), 5)
    finally:
        assert thread.stop(5)
    return seen, thread


def test_only_changes_reach_the_loop_in_order_and_the_newest_last() -> None:
    script = Script([1, 1, 1, 2, 2, 3, 3, 3, 5, 5])

    async def main() -> tuple[list[Outcome], ReadThread, int]:
        seen, thread = await collect(script, lambda s: bool(s) and s[-1].revision == 5)
        return seen, thread, threading.get_ident()

    seen, thread, loop_thread = asyncio.run(main())
    assert [o.revision for o in seen] == [1, 2, 3, 5]  # no repeat, no loss, no reorder
    assert loop_thread not in script.threads  # every read ran off the loop's thread
    assert thread.reads == script.calls and thread.quiet == thread.reads - len(seen)


def test_a_lost_store_is_told_once_and_its_return_again() -> None:
    down = StoreUnavailable("etcd at x unavailable for get (timed out)")
    script = Script([4, down, down, down, 4, 0])

    async def main() -> list[Outcome]:
        seen, _ = await collect(script, lambda s: len(s) >= 4, max_backoff=0.004)
        return seen

    seen = asyncio.run(main())
    assert [(o.revision, o.error) for o in seen] == [(4, None), (0, down), (4, None), (0, None)]


def test_stop_joins_the_thread_and_nothing_is_handed_after() -> None:
    script = Script([1, 2, 3, 4, 5, 6, 7, 8])

    async def main() -> int:
        seen: list[Outcome] = []
        thread = ReadThread(script, 0.001, seen.append, asyncio.get_running_loop())
        thread.start()
        await until(lambda: bool(seen), 5)
        assert thread.stop(5) and not thread.alive
        handed = thread.handed
        await asyncio.sleep(0.05)  # callbacks queued before the stop have run by now
        assert len(seen) == handed
        return script.calls

    calls = asyncio.run(main())
    assert script.calls == calls  # no read after stop() returned


def test_a_closed_loop_ends_the_thread() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    thread = ReadThread(Script([1]), 0.001, lambda o: None, loop)
    thread.start()
    assert thread.stop(5) and thread.handed == 0


class BlockingStore:
    """Just enough of a store for a poll view: blocking reads of a script (and the
    keep-alive a fenced view's probe uses, which makes it a BlockingReads)."""

    endpoints = ("memory",)

    def __init__(self, script: Script) -> None:
        self.script = script

    def blocking_get(self, key: str, *, timeout: float) -> KeyValue | None:
        return self.script()

    def blocking_refresh_lease(self, lease: int, *, timeout: float) -> int:
        return 3  # a poll view keeps no lease alive


def test_a_poll_view_on_a_blocking_store_reads_off_the_loop_and_joins_when_cancelled() -> None:
    item = StateItem("limit", "limit", parse_positive_int, encode_int)
    script = Script([7, 7, 7, 9])
    changes: list[int] = []

    async def main() -> PollView:
        view = PollView(
            BlockingStore(script),
            KEY,
            item,
            100,
            interval=0.001,
            on_change=changes.append,
        )
        assert view.off_loop
        task = asyncio.create_task(view.run())
        await until(lambda: view.value == 9 and view.reads > 3, 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not any(t.alive for t in view._threads)
        return view

    view = asyncio.run(main())
    assert changes == [7, 9] and view.updates == 2 and not view.stale
