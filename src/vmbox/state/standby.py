"""A warm spare's side of `replicas.warm`: standing by, and being promoted.

vmbox.replica runs one `Standby` when it was started with `--standby`. The
spare registers /vmbox/<service>/standby/<id> on a lease of its own (pid,
metrics address) and is not a member: it has no share, writes no demand
report and no resize-guard ack, and no member waits for it. It takes no
traffic because it has bound nothing (the relay's SO_REUSEPORT socket, an
in-path replica's queue) and is in no steering. The controller promotes it by
writing /vmbox/<service>/promote/<id> (`promote`; JSON with the wall-clock
time it decided), which the spare watches (`promoted`). The spare then
registers its member key on the same lease (`release` hands the lease over to
its Membership) and goes through the ordinary join path; once it is a
member, `retire` deletes its standby and promote keys. Writing the promote
key twice is harmless, and a restarted controller reads both prefixes to adopt
spares and promotions in flight (vmbox.control.controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from vmbox.state import keys
from vmbox.state.membership import Membership, watch_snapshots
from vmbox.state.store import KeyValue, Store, StoreError

log = logging.getLogger(__name__)


def _json_object(kv: KeyValue) -> dict[str, Any]:
    """A standby or promote key's value; one written by hand that is not a JSON object
    still counts, as {}."""
    try:
        value = json.loads(kv.value)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _listed(store: Store, prefix: str) -> dict[str, dict[str, Any]]:
    kvs, _ = await store.get_prefix(prefix)
    return {keys.last_segment(kv.key): _json_object(kv) for kv in kvs}


async def promote(store: Store, service: str, replica: str, decided: float) -> None:
    """The controller's order to a spare to join the group (idempotent)."""
    value = json.dumps({"decided": decided}).encode()
    await store.put(keys.promote_key(service, replica), value)


async def list_standby(store: Store, service: str) -> dict[str, dict[str, Any]]:
    """The spares registered right now (replica id -> their info)."""
    return await _listed(store, keys.standby_prefix(service))


async def list_promotions(store: Store, service: str) -> dict[str, dict[str, Any]]:
    """The promote orders not yet carried out (replica id -> the order)."""
    return await _listed(store, keys.promote_prefix(service))


class Standby:
    """One spare's standby registration and its wait for a promotion."""

    def __init__(
        self, store: Store, service: str, replica_id: str, info: dict[str, Any], ttl: int
    ) -> None:
        self.store = store
        self.service = service
        self.replica_id = replica_id
        key = keys.standby_key(service, replica_id)
        self.registration = Membership(store, service, replica_id, info, ttl=ttl, key=key)

    async def run(self) -> None:
        """Register under standby/<id> and keep the lease alive until released or left."""
        await self.registration.run()

    async def promoted(self) -> dict[str, Any]:
        """Wait for this spare's promote key; its order (`decided`: when the controller
        decided), with `promoted_at`, the wall-clock time it was seen."""
        prefix = keys.promote_prefix(self.service)
        async for _, orders in watch_snapshots(self.store, prefix, _json_object):
            order = orders.get(self.replica_id)
            if order is not None:
                return {"decided": order.get("decided"), "promoted_at": time.time()}
        raise AssertionError("watch_snapshots never ends")  # pragma: no cover

    def release(self) -> int:
        """Stop standing by; the lease, for the member key."""
        return self.registration.release()

    async def leave(self) -> None:
        """A spare that stops without being promoted: its standby key goes at once."""
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.registration.leave()

    async def retire(self, member: Membership) -> None:
        """Once a member, delete the standby and promote keys (retried until done)."""
        await member.registered.wait()
        delay = 0.1
        while True:
            try:
                await self.store.delete(keys.standby_key(self.service, self.replica_id))
                await self.store.delete(keys.promote_key(self.service, self.replica_id))
                return
            except StoreError as exc:
                log.debug("spare %s: keys not yet removed: %s", self.replica_id, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
