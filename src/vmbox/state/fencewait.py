"""A writer's wait on a `fenced` item: until every live member acked a revision, or lost its lease.

`vmbox set` (vmbox.cli.setitem) calls `write_fenced`: one put of the new
value, then `wait_fenced` follows the member keys and the item's acks
(fence/<item>/<replica>) with one watch each and feeds every change to the pure
`FenceWait` (vmbox.state.fence, where the argument for why this wait is
enough lives). The cost of a fence is one watch event per replica for the
write and one small ack put per replica; nothing on any packet path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from vmbox.state import keys
from vmbox.state.fence import FenceWait, parse_ack
from vmbox.state.store import Store, WatchEvent


@dataclass(frozen=True, slots=True)
class FenceResult:
    """What a fenced write saw: its revision, how long the wait took, and who did what."""

    revision: int
    seconds: float
    acked: frozenset[str]
    fenced_out: frozenset[str]
    waiting: frozenset[str]  # neither acked nor gone when the wait ended (a timeout)
    done: bool  # every member acked or lost its lease within the timeout


async def wait_fenced(store: Store, service: str, item: str, wait: FenceWait) -> None:
    """Return once `wait` is done (the caller bounds it in time); `wait` holds the progress."""
    members_prefix, acks_prefix = keys.members_prefix(service), keys.fence_prefix(service, item)
    member_kvs, member_rev = await store.get_prefix(members_prefix)
    ack_kvs, ack_rev = await store.get_prefix(acks_prefix)
    members = {keys.last_segment(kv.key) for kv in member_kvs}
    acks = {keys.last_segment(kv.key): parse_ack(kv.value) or 0 for kv in ack_kvs}
    if wait.see(members, acks):
        return
    changes: asyncio.Queue[tuple[str, WatchEvent]] = asyncio.Queue()

    async def follow(kind: str, events: AsyncIterator[WatchEvent]) -> None:
        async for event in events:
            changes.put_nowait((kind, event))

    async with asyncio.TaskGroup() as group:
        followers = [
            group.create_task(follow("member", store.watch_prefix(members_prefix, member_rev + 1))),
            group.create_task(follow("ack", store.watch_prefix(acks_prefix, ack_rev + 1))),
        ]
        try:
            while True:
                kind, event = await changes.get()
                name = keys.last_segment(event.key)
                if kind == "member":
                    if event.kind == "put":
                        members.add(name)
                    else:
                        members.discard(name)
                elif event.kind == "put":
                    acks[name] = parse_ack(event.value) or 0
                if wait.see(members, acks):
                    return
        finally:
            for task in followers:
                task.cancel()


async def write_fenced(
    store: Store,
    service: str,
    item: str,
    value: bytes,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FenceResult:
    """Put `value` at state/<item>, then wait up to `timeout` s for the fence."""
    revision = await store.put(keys.state_key(service, item), value)
    started = clock()
    wait, done = FenceWait(revision), False
    try:
        async with asyncio.timeout(timeout):
            await wait_fenced(store, service, item, wait)
        done = True
    except TimeoutError:
        pass
    took = clock() - started
    return FenceResult(
        revision,
        took,
        frozenset(wait.acked),
        frozenset(wait.fenced_out),
        frozenset(wait.waiting),
        done,
    )
