"""The watch check of the etcd member loss fault, over the in-memory store.

A put whose answer was lost may be committed all the same, and the etcd client
retries a put that failed with UNAVAILABLE, so one number can be committed
twice: the check must take both for what they are, and still catch a watch
that misses, repeats, reorders or changes what was acknowledged.
"""

from __future__ import annotations

import asyncio
from typing import cast

from vmbox.faults.revisions import RevisionCheck
from vmbox.state.memory import MemoryStore
from vmbox.state.store import Store, StoreUnavailable

KEY = "/vmbox/svc/fault/watched"


class LossyWriter:
    """Puts through `store`; number 3's answer is lost after it committed, number 5
    is committed twice (the client retried after a lost answer)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        revision = await self.store.put(key, value, lease=lease)
        if value == b"3":
            raise StoreUnavailable("put: etcdserver: request timed out")
        if value == b"5":
            revision = await self.store.put(key, value, lease=lease)
        return revision


async def _run(writer: object, store: MemoryStore, puts: int) -> tuple[RevisionCheck, list[str]]:
    check = RevisionCheck(store, cast(Store, writer), KEY, every=0.001)
    async with check:
        async with asyncio.timeout(5):
            while len(check.acked) + check.failed < puts:
                await asyncio.sleep(0.001)
        problems = await check.verify(within=2)
    return check, problems


def test_a_clean_run_sees_every_acknowledged_revision_once_in_order() -> None:
    store = MemoryStore()
    check, problems = asyncio.run(_run(store, store, 8))
    assert problems == []
    assert check.seen == check.acked
    assert check.unacknowledged() == []


def test_lost_answers_and_retried_puts_are_no_problem_but_are_counted() -> None:
    store = MemoryStore()
    check, problems = asyncio.run(_run(LossyWriter(store), store, 8))
    assert problems == []
    assert check.failed == 1
    late = [check.values[r] for r in check.unacknowledged()]
    assert late == [3, 5]  # number 3 committed unacknowledged; 5's first commit
    numbers = [check.values[r] for r in check.seen]
    assert numbers[:7] == [0, 1, 2, 3, 4, 5, 5]  # the watch really carried 5 twice


def _check(acked: dict[int, int], seen: list[tuple[int, int]], attempted: int) -> list[str]:
    store = MemoryStore()
    check = RevisionCheck(store, store, KEY)
    check.acked = list(acked)
    check.written = dict(acked)
    check.attempted = attempted
    check.seen = [revision for revision, _ in seen]
    check.values = dict(seen)
    return check.problems()


def test_a_watch_that_fails_is_caught() -> None:
    acked = {10: 0, 11: 1, 13: 3}
    good = [(10, 0), (11, 1), (12, 2), (13, 3)]  # 12: number 2, put failed, committed
    assert _check(acked, good, 4) == []
    assert "missed 1 of 3" in _check(acked, [(10, 0), (13, 3)], 4)[0]
    assert "out of order" in _check(acked, [(11, 1), (10, 0), (13, 3)], 4)[0]
    assert "twice" in _check(acked, [(10, 0), (11, 1), (11, 1), (13, 3)], 4)[0]
    assert "other than the one put" in _check(acked, [(10, 0), (11, 2), (13, 3)], 4)[0]
    assert "no number ever put" in _check(acked, [*good, (14, 9)], 4)[0]
