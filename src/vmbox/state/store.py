"""The Store protocol every state module talks to, its values and its errors.

Implemented by vmbox.state.etcd (the only package that imports an etcd client).
Membership, views, the controller and the CLI depend on this protocol only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


class StoreError(Exception):
    """Any failure of the store; str() is one line an operator can act on."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (no endpoint answered, or quorum is lost)."""


class LeaseLost(StoreError):
    """A lease expired or was revoked; keys attached to it are gone."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Put:
    """One write of Store.apply: `value` at `key`, on `lease` (0: on none)."""

    key: str
    value: bytes
    lease: int = 0


# etcd refuses a transaction of more operations than its --max-txn-ops, 128
# unless configured otherwise ("too many operations in txn request"), so
# Store.apply writes a larger batch as several transactions of at most this many.
MAX_TXN_OPS = 128


def transactions(
    puts: Sequence[Put], deletes: Iterable[str]
) -> list[tuple[Sequence[Put], Sequence[str]]]:
    """The transactions Store.apply writes a batch in: (puts, deletes), puts first.

    Both stores split here, so their revisions and watch events agree. An empty
    batch is one empty transaction (it reads the revision). A key may be put once
    per batch or deleted (repeats count once), not both and not put twice: etcd
    refuses a transaction naming a key twice ("duplicate key given in txn
    request"), and across transactions the split would decide which one wins.
    Refused here, before anything is written.
    """
    unique = list(dict.fromkeys(deletes))
    seen: set[str] = set()
    for key in [put.key for put in puts] + unique:
        if not key:
            raise StoreError("apply failed: key is not provided")  # as etcd says
        if key in seen:
            raise StoreError(f"apply names {key} twice: put or delete a key once per batch")
        seen.add(key)
    count = len(puts)
    return [
        (
            puts[start : start + MAX_TXN_OPS],
            unique[max(start - count, 0) : max(start - count + MAX_TXN_OPS, 0)],
        )
        for start in range(0, max(count + len(unique), 1), MAX_TXN_OPS)
    ]


class Store(Protocol):
    """What vmbox needs from etcd. Reads are linearizable unless said otherwise."""

    endpoints: tuple[str, ...]

    # Watch streams that broke (a member died, a leader changed) and were
    # resumed from the revision after the last event delivered.
    @property
    def watch_resumes(self) -> int: ...

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None: ...

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """The keys under `prefix` and the store revision they were read at."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write; returns the new revision."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def compare_and_swap(
        self, key: str, expected: bytes | None, value: bytes, *, lease: int = 0
    ) -> bool:
        """Write `value` only if the key holds `expected` (None: only if absent)."""
        ...

    async def apply(self, puts: Sequence[Put], deletes: Sequence[str] = ()) -> int:
        """Many puts (each on its own lease) and deletes; returns the revision after them.

        For writers of many small keys behind the packet path (a keyed table's
        entries). Written as `transactions(puts, deletes)`, each atomic and one
        revision if it changed anything; a batch of more than MAX_TXN_OPS is not
        atomic as a whole: a failure leaves the transactions before it written and
        writes none after it. Every operation is idempotent, so the caller retries
        the whole batch. LeaseLost: a put's lease is gone (etcd does not say which
        of the transaction's leases), and nothing of that transaction was written.
        """
        ...

    async def grant_lease(self, ttl: int) -> int: ...

    async def refresh_lease(self, lease: int) -> int:
        """One keep-alive; returns the remaining TTL, raises LeaseLost if it is gone."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...

    def watch_prefix(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` from `start_revision` on; survives reconnects."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BlockingReads(Protocol):
    """A store that can also read from a thread of its own, without any event loop.

    EtcdStore does, through a blocking gRPC channel beside its asyncio one; poll
    views read through it on a vmbox.state.readthread.ReadThread, so the packet
    loop hears only of changes, and fenced views probe through it (a keep-alive
    and a read in an executor thread). The memory store does not (its views
    poll and probe on the loop).
    """

    def blocking_get(self, key: str, *, timeout: float) -> KeyValue | None:
        """A linearizable read that blocks the calling thread (never the event loop's)."""
        ...

    def blocking_refresh_lease(self, lease: int, *, timeout: float) -> int:
        """One keep-alive that blocks the calling thread; the TTL left (LeaseLost: gone)."""
        ...
