"""EtcdStore: the Store protocol over one etcd3aio client: reads, writes, leases, logins.

Built by connect() (vmbox.state.etcd.connection); its users (replicas, the
controller, the CLI) reach it through vmbox.state.etcd and talk to it through
the Store protocol of vmbox.state.store. Every call carries a timeout and every
client error becomes StoreUnavailable or StoreError, each with one readable
line (the words come from vmbox.state.etcd.errors). Watches are
vmbox.state.etcd.watch's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio import Etcd3Client
from etcd3aio.errors import (
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio.kv import KVService, prefix_range_end

from vmbox.state.etcd import watch
from vmbox.state.etcd.blocking import BlockingChannel, OpenChannel
from vmbox.state.etcd.errors import UNAVAILABLE_CODES, Unreachable, failure_reason
from vmbox.state.store import (
    KeyValue,
    LeaseLost,
    Put,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    transactions,
)

# The package's name, as before the package was split: operators' log lines keep it.
log = logging.getLogger("vmbox.state.etcd")
T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 3.0


class EtcdStore:
    """The Store protocol over one etcd3aio client (one gRPC channel)."""

    def __init__(
        self,
        client: Etcd3Client,
        endpoints: Sequence[str],
        *,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        credentials: tuple[str, str] | None = None,
        tls: bool = False,
        blocking: OpenChannel | None = None,
    ) -> None:
        self._client = client
        self.endpoints = tuple(endpoints)
        self._resumes = 0
        self.op_timeout = op_timeout
        self._credentials = credentials
        self.tls = tls
        self._token: str | None = None
        self._blocking = (
            None
            if blocking is None
            else BlockingChannel(
                blocking,
                self.where,
                token=lambda: self._token,
                credentials=lambda: self._credentials,
                denied=self._denied,
                tls=tls,
            )
        )

    @property
    def where(self) -> str:
        return ", ".join(self.endpoints)

    def _kv(self) -> KVService:
        if self._client.kv is None:
            raise StoreError(f"etcd store for {self.where} is closed")
        return self._client.kv

    async def _call(
        self, what: str, call: Callable[[float], Awaitable[T]], limit: float | None = None
    ) -> T:
        """Run one client call with a time limit, mapping every failure to a StoreError."""
        limit = self.op_timeout if limit is None else limit
        for attempt in (1, 2):
            try:
                return await call(limit)
            except EtcdUnauthenticatedError as exc:
                # Auth tokens expire (5 min by default): log in again once.
                if attempt == 1 and self._credentials is not None:
                    await self.authenticate(limit)
                    continue
                raise StoreError(
                    f"etcd at {self.where} refused {what}: {failure_reason(exc)}"
                ) from None
            except EtcdPermissionDeniedError:
                raise StoreError(self._denied(what)) from None
            except (TimeoutError, EtcdConnectionError, EtcdTransientError) as exc:
                raise Unreachable(self.where, what, failure_reason(exc, self.tls)) from None
            except grpc.aio.AioRpcError as exc:
                raise self._map_rpc(what, exc) from None
            except EtcdError as exc:
                raise self._failed(what, str(exc)) from None
        raise AssertionError("unreachable")

    def _denied(self, what: str) -> str:
        if self._credentials is None:
            who = "a client without a user (etcd took its certificate's name, if any)"
        else:
            who = f"user {self._credentials[0]!r}"
        return (
            f"etcd at {self.where} denied {what} to {who}: vmbox needs readwrite on "
            "the /vmbox/ prefix"
        )

    def _map_rpc(self, what: str, exc: grpc.aio.AioRpcError) -> StoreError:
        detail = exc.details() or exc.code().name
        if "lease not found" in detail:
            return LeaseLost(f"{what}: the lease is gone ({detail})")
        if exc.code() in UNAVAILABLE_CODES:
            return Unreachable(self.where, what, failure_reason(exc, self.tls))
        return self._failed(what, detail)

    def _failed(self, what: str, detail: str) -> StoreError:
        if "user name is empty" in detail:
            return StoreError(
                f"etcd at {self.where} wants a user (its auth is on): set store.username "
                "and store.password_file"
            )
        return StoreError(f"etcd {what} failed: {detail}")

    async def authenticate(self, limit: float | None = None) -> None:
        """Log in with the stored user and password and use the token from now on."""
        if self._credentials is None or self._client.auth is None:
            return
        user, password = self._credentials
        auth = self._client.auth
        # Without the old token: etcd checks a request's token before its method,
        # and a member that restarted has forgotten the tokens it issued (simple
        # tokens live in its memory), so a login carrying one was refused with
        # "invalid auth token" for as long as the token was kept (the `etcd member
        # loss` fault, after quorum came back).
        auth.set_token(None)
        try:
            answer = await auth.authenticate(user, password, timeout=limit or self.op_timeout)
        except (TimeoutError, EtcdConnectionError, EtcdTransientError) as exc:
            raise Unreachable(self.where, "login", failure_reason(exc, self.tls)) from None
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            reason = failure_reason(exc).removeprefix("etcdserver: ")
            if "authentication is not enabled" in reason:
                # Nothing to log in to; the settings may be ahead of the cluster.
                log.warning("etcd at %s has auth off; user %r is not used", self.where, user)
                self._credentials = None
                return
            raise StoreError(f"etcd at {self.where} rejected user {user!r}: {reason}") from None
        self._client.set_token(answer.token)
        self._token = str(answer.token)

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        kv = self._kv()
        answer = await self._call(f"get {key}", lambda t: kv.get(key, timeout=t), timeout)
        return _key_value(answer.kvs[0]) if answer.kvs else None

    def blocking_get(self, key: str, *, timeout: float) -> KeyValue | None:
        """A linearizable read from a thread off the loop (vmbox.state.store.BlockingReads)."""
        if self._blocking is None:
            raise StoreError(f"etcd store for {self.where} has no blocking channel")
        return self._blocking.get(key, timeout)

    def blocking_refresh_lease(self, lease: int, *, timeout: float) -> int:
        """One keep-alive from a thread off the loop (vmbox.state.store.BlockingReads)."""
        if self._blocking is None:
            raise StoreError(f"etcd store for {self.where} has no blocking channel")
        return self._blocking.keep_alive(lease, timeout)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        kv = self._kv()
        end = prefix_range_end(prefix)
        answer = await self._call(f"get {prefix}*", lambda t: kv.get(prefix, end, timeout=t))
        return [_key_value(item) for item in answer.kvs], int(answer.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        kv = self._kv()
        answer = await self._call(f"put {key}", lambda t: kv.put(key, value, lease, timeout=t))
        return int(answer.header.revision)

    async def delete(self, key: str) -> bool:
        kv = self._kv()
        answer = await self._call(f"delete {key}", lambda t: kv.delete(key, timeout=t))
        return int(answer.deleted) > 0

    async def delete_prefix(self, prefix: str) -> int:
        kv = self._kv()
        end = prefix_range_end(prefix)
        answer = await self._call(f"delete {prefix}*", lambda t: kv.delete(prefix, end, timeout=t))
        return int(answer.deleted)

    async def compare_and_swap(
        self, key: str, expected: bytes | None, value: bytes, *, lease: int = 0
    ) -> bool:
        kv = self._kv()
        compare = (
            KVService.txn_compare_create_revision(key, 0)
            if expected is None
            else KVService.txn_compare_value(key, expected)
        )
        success = [KVService.txn_op_put(key, value, lease=lease)]
        answer = await self._call(f"cas {key}", lambda t: kv.txn([compare], success, timeout=t))
        return bool(answer.succeeded)

    async def apply(self, puts: Sequence[Put], deletes: Sequence[str] = ()) -> int:
        """One etcd txn (no compares) per `transactions(puts, deletes)`: see Store.apply.

        At most MAX_TXN_OPS operations each, as etcd's default --max-txn-ops
        allows (an etcd set lower refuses them: one StoreError line naming it).
        Entries are small: 128 of them stay far below etcd's --max-request-bytes
        (1.5 MiB). A put on a lease that is gone fails its whole txn with
        "requested lease not found": LeaseLost (_map_rpc).
        """
        revision = 0
        for txn_puts, txn_deletes in transactions(puts, deletes):
            ops = [KVService.txn_op_put(put.key, put.value, lease=put.lease) for put in txn_puts]
            ops += [KVService.txn_op_delete(key) for key in txn_deletes]
            revision = await self._txn(_what(txn_puts, txn_deletes), ops)
        return revision

    async def _txn(self, what: str, ops: list[Any]) -> int:
        kv = self._kv()
        answer = await self._call(what, lambda t: kv.txn([], ops, timeout=t))
        return int(answer.header.revision)

    async def grant_lease(self, ttl: int) -> int:
        lease = self._lease()
        answer = await self._call("lease grant", lambda t: lease.grant(ttl, timeout=t))
        return int(answer.ID)

    async def refresh_lease(self, lease: int) -> int:
        service = self._lease()

        async def once(limit: float) -> Any:
            stream = service.keep_alive(lease)
            try:
                async with asyncio.timeout(limit):
                    return await stream.read()
            finally:
                stream.cancel()

        answer = await self._call(f"keep-alive of lease {lease:x}", once)
        if answer is grpc.aio.EOF:
            raise StoreUnavailable(f"etcd at {self.where} closed the keep-alive of lease {lease:x}")
        if int(answer.TTL) <= 0:
            raise LeaseLost(f"lease {lease:x} expired or was revoked")
        return int(answer.TTL)

    async def revoke_lease(self, lease: int) -> None:
        service = self._lease()
        # Revoking a lease that already expired is the outcome the caller wanted.
        with contextlib.suppress(LeaseLost):
            await self._call(f"revoke lease {lease:x}", lambda t: service.revoke(lease, timeout=t))

    def _lease(self) -> Any:
        if self._client.lease is None:
            raise StoreError(f"etcd store for {self.where} is closed")
        return self._client.lease

    def watch_prefix(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events under `prefix`, resuming after the last one seen when a stream breaks.

        See vmbox.state.etcd.watch.watch_prefix: silent streams are reopened, and
        a resume that etcd's compaction makes impossible raises StoreError.
        """
        return watch.watch_prefix(
            self._client, self.where, prefix, start_revision, self._resumed, self._relogin
        )

    async def _relogin(self) -> None:
        """Log in again for a watch that etcd cancelled for its token (best effort: a
        failure is the next call's to report)."""
        if self._credentials is None:
            return
        with contextlib.suppress(StoreError):
            await self.authenticate()

    def _resumed(self) -> None:
        self._resumes += 1

    @property
    def watch_resumes(self) -> int:
        """Broken watch streams resumed: by watch_prefix, or inside etcd3aio (per process)."""
        return self._resumes + watch.client_resumes()

    async def close(self) -> None:
        if self._blocking is not None:
            self._blocking.close()
        await self._client.close()


def _what(puts: Sequence[Put], deletes: Sequence[str]) -> str:
    """A txn of apply in an error line: its size and its first key."""
    first = puts[0].key if puts else (deletes[0] if deletes else "")
    return f"apply of {len(puts)} puts and {len(deletes)} deletes ({first}...)"


def _key_value(item: Any) -> KeyValue:
    return KeyValue(
        key=bytes(item.key).decode(),
        value=bytes(item.value),
        mod_revision=int(item.mod_revision),
        lease=int(item.lease),
    )
