"""Replica registration on leases, and reading or following who is registered.

A replica (vmbox.replica) runs one `Membership`: its key
/vmbox/<service>/members/<replica> holds JSON info (pid, metrics address) and
lives on a lease the replica keeps alive, so a replica that dies disappears
within the lease TTL, and one that leaves (or is revoked by the controller)
disappears at once. The controller and `vmbox status` call `list_members`;
replicas follow the group with `watch_members` to re-divide shared budgets
(`watch_snapshots` is the same following for any prefix, e.g. the resize
guard's acks in vmbox.state.epochsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmbox.state import keys
from vmbox.state.store import KeyValue, LeaseLost, Store, StoreError

log = logging.getLogger(__name__)

_MAX_BACKOFF = 2.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One registered replica as read from its member key."""

    replica: str
    info: dict[str, Any] = field(default_factory=dict)
    lease: int = 0
    mod_revision: int = 0


def _member(kv: KeyValue) -> MemberInfo:
    try:
        info = json.loads(kv.value)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        # Someone wrote a non-JSON value by hand: the replica is still a member.
        info = {"raw": kv.value.decode(errors="replace")}
    return MemberInfo(keys.last_segment(kv.key), info, kv.lease, kv.mod_revision)


async def list_members(store: Store, service: str) -> dict[str, MemberInfo]:
    """The replicas registered right now, by replica id (a linearizable read)."""
    kvs, _ = await store.get_prefix(keys.members_prefix(service))
    return {member.replica: member for member in map(_member, kvs)}


async def watch_members(
    store: Store, service: str, *, retry: float = 0.5
) -> AsyncIterator[dict[str, MemberInfo]]:
    """A full snapshot first, then a new snapshot after each change, forever.

    Store errors never end the iteration: it re-lists (yielding only if the
    group changed meanwhile) and watches again from the listing's revision.
    """
    prefix = keys.members_prefix(service)
    async for _, members in watch_snapshots(store, prefix, _member, retry=retry):
        yield members


async def watch_snapshots(
    store: Store, prefix: str, parse: Callable[[KeyValue], T | None], *, retry: float = 0.5
) -> AsyncIterator[tuple[int, dict[str, T]]]:
    """(revision, {last key segment: parsed value}) for `prefix`, after each change, forever.

    The revision is the store's at the listing or at the latest event. Keys
    whose value `parse` rejects (None) count as absent. Store errors never end
    the iteration: it re-lists (yielding only if the snapshot changed
    meanwhile) and watches again from the listing's revision.
    """
    last: dict[str, T] | None = None
    while True:
        try:
            kvs, revision = await store.get_prefix(prefix)
            snapshot = {keys.last_segment(kv.key): parse(kv) for kv in kvs}
            values = {name: value for name, value in snapshot.items() if value is not None}
            if values != last:
                last = dict(values)
                yield revision, dict(values)
            async for event in store.watch_prefix(prefix, revision + 1):
                name = keys.last_segment(event.key)
                value = None
                if event.kind != "delete":
                    value = parse(KeyValue(event.key, event.value, event.revision))
                if value is None:
                    values.pop(name, None)
                else:
                    values[name] = value
                last = dict(values)
                yield event.revision, dict(values)
        except StoreError as exc:
            log.debug("watch of %s interrupted: %s", prefix, exc)
        await asyncio.sleep(retry)


async def latest_only(source: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The items of `source`, but only the newest of those that came while the
    consumer was busy (its loop body awaiting): for snapshots, where each one
    replaces the one before, so a slow consumer catches up in one step instead
    of working through every snapshot in between (the aggregator, at a join of
    hundreds of replicas, sees an ack event per replica per member change).

    `source` is read by a task of its own; its end or error ends this one.
    Close it (contextlib.aclosing) to stop that task when the consumer stops.
    """
    newest: list[T] = []
    fresh = asyncio.Event()

    async def pump() -> None:
        async for item in source:
            newest[:] = [item]
            fresh.set()

    reader = asyncio.create_task(pump())
    waiter: asyncio.Task[Any] | None = None
    try:
        while True:
            if not fresh.is_set():
                waiter = asyncio.create_task(fresh.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    reader.result()  # its error, or its end
                    return
            fresh.clear()
            yield newest.pop()
    finally:
        running = [task for task in (waiter, reader) if task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


class Membership:
    """Keeps one replica registered until cancelled or `leave()` is called."""

    def __init__(
        self,
        store: Store,
        service: str,
        replica_id: str,
        info: dict[str, Any],
        ttl: int = 3,
        *,
        key: str | None = None,
        lease: int = 0,
        on_registered_again: Callable[[int], None] | None = None,
        before_register: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.replica_id = replica_id
        self.info = dict(info)
        self.ttl = ttl
        # Another key than members/<id>: a warm spare's standby/<id> (vmbox.state.standby).
        self.key = key or keys.member_key(service, replica_id)
        self.lease = 0
        self._given = lease  # a live lease to register on first (a promoted spare's own)
        # Called with the new lease when the key is put again after the lease was
        # lost, before anything else can see that lease (the replica's resize guard).
        self.on_registered_again = on_registered_again
        # Awaited with a lease in hand, just before each put of the key: a replica
        # picks the moment its join lands (vmbox.state.epoch.registration_delay).
        self.before_register = before_register
        self.registered = asyncio.Event()  # set at the first registration, stays set
        self.registrations = 0
        self.last_error: str | None = None
        self._left = False
        # Registration, set_info and leave must not interleave: a leave() in the
        # middle of a re-registration would otherwise leave a fresh key behind.
        self._lock = asyncio.Lock()

    def _value(self) -> bytes:
        return json.dumps(self.info, sort_keys=True).encode()

    async def run(self) -> None:
        """Register, keep alive, re-register when the lease is lost; never raises StoreError."""
        delay = 0.1
        while not self._left:
            try:
                await self._register()
                delay = 0.1
                await self._keep_alive()
            except LeaseLost as exc:
                log.warning(
                    "replica %s lost its membership lease (%s); registering again",
                    self.replica_id,
                    exc,
                )
            except StoreError as exc:
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    def _failed(self, exc: StoreError) -> None:
        if self.last_error is None:
            log.warning("replica %s cannot register: %s (retrying)", self.replica_id, exc)
        self.last_error = str(exc)

    async def _register(self) -> None:
        async with self._lock:
            if self._left:
                return
            lease, self._given = self._given or await self.store.grant_lease(self.ttl), 0
            try:
                if self.before_register is not None:
                    await self.before_register()
                await self.store.put(self.key, self._value(), lease=lease)
            except StoreError:
                # Do not let an orphan lease wait out its TTL if we can help it.
                await _quietly(self.store.revoke_lease(lease))
                raise
            self.lease = lease
            self.registrations += 1
            if self.registrations > 1 and self.on_registered_again is not None:
                self.on_registered_again(lease)
            if self.last_error is not None:
                log.info("replica %s registered again", self.replica_id)
            self.last_error = None
            self.registered.set()

    async def _keep_alive(self) -> None:
        """Refresh every ttl/3 s; returns after leave(), raises LeaseLost when the lease is gone."""
        interval = max(self.ttl / 3, 0.1)
        while not self._left:
            await asyncio.sleep(interval)
            lease = self.lease
            if self._left or not lease:
                return
            try:
                await self.store.refresh_lease(lease)
            except LeaseLost:
                raise
            except StoreError as exc:
                # Keep the same lease: if etcd comes back before the TTL runs
                # out, nothing changed for the others. If not, LeaseLost follows.
                self._failed(exc)
                continue
            if self.last_error is not None:
                log.info("replica %s reaches the store again", self.replica_id)
                self.last_error = None

    async def set_info(self, info: dict[str, Any]) -> None:
        """Replace the registered info, on the same lease (the next registration uses it too)."""
        async with self._lock:
            self.info = dict(info)
            if self.lease and not self._left:
                # On LeaseLost run() re-registers soon, with the new info.
                with contextlib.suppress(LeaseLost):
                    await self.store.put(self.key, self._value(), lease=self.lease)

    def release(self) -> int:
        """Stop keeping the lease alive, without revoking it, and hand it over: run()
        returns. A promoted spare registers its member key on it (vmbox.state.standby)."""
        self._left = True
        lease, self.lease = self.lease, 0
        return lease

    async def leave(self) -> None:
        """Revoke the lease so the member key disappears now; run() then returns."""
        async with self._lock:
            self._left = True
            lease, self.lease = self.lease, 0
            if lease:
                await self.store.revoke_lease(lease)


async def _quietly(call: Awaitable[None]) -> None:
    try:
        await call
    except StoreError as exc:
        log.debug("ignored: %s", exc)
