"""The Store protocol every state module talks to, its values and its errors.

Implemented by vmbox.state.etcd (the only package that imports an etcd client).
Membership, views, the controller and the CLI depend on this protocol only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
