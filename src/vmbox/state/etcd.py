"""EtcdStore: the Store protocol over etcd v3, and `connect()`.

The only module that imports the etcd client (etcd3aio) or grpc. Replicas, the
controller and the CLI call `connect()` and then talk to the returned store
through the Store protocol of vmbox.state.store. Every call carries a timeout
and every client error becomes StoreUnavailable (etcd unreachable, timed out,
or without quorum) or StoreError (anything else), each with one readable line;
a TLS handshake that fails (wrong CA, no client certificate) fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

# gRPC's C core logs each failed TLS handshake to stderr, three lines several
# times a second; vmbox says what failed in one line instead. It reads this
# when first imported, so it is set before; an operator's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

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

from vmbox.state.store import KeyValue, LeaseLost, StoreError, StoreUnavailable, WatchEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 3.0
WATCH_REOPEN = 3.0  # seconds of silence after which a watch stream is reopened


class _ReconnectCount(logging.Filter):
    """Counts etcd3aio's own watch reconnects (it logs one warning per reconnect).

    etcd3aio resumes a broken watch stream by itself, from the revision after
    the last response, so those resumes never reach watch_prefix; its log line
    is the only sign. One count per process: a replica has one store.
    """

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("watch: transient error"):
            _ReconnectCount.count += 1
        return True


logging.getLogger("etcd3aio.watch").addFilter(_ReconnectCount())
# gRPC's default reconnect backoff grows to two minutes; a restarted etcd must
# be found again within a second or so, or views stay stale for no reason.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def normalize_endpoint(endpoint: str) -> str:
    """'http://127.0.0.1:2379/' -> '127.0.0.1:2379' (the client wants host:port)."""
    for scheme in ("http://", "https://"):
        endpoint = endpoint.removeprefix(scheme)
    return endpoint.rstrip("/")


# What gRPC says when a TLS handshake fails, and what it means. These do not
# heal by retrying, so connect() reports them at once.
_TLS_FAILURES = (
    ("hostname verification", "TLS: etcd's certificate does not name this host; set "
     "store.server_name to a name it has"),
    ("certificate_verify_failed", "TLS: etcd's certificate is not signed by store.ca_cert"),
    ("tls handshake failed", "TLS handshake failed: check store.ca_cert"),
    ("unwrap failed", "TLS: etcd refused the client certificate (none given, or signed by "
     "a CA it does not trust): check store.cert and store.key"),
    # Not TLS's fault for sure (an etcd shutting down does it too): retried.
    ("handshake read failed", "closed during the TLS handshake: does etcd serve TLS?"),
)  # fmt: skip


def _reason(exc: BaseException, tls: bool = False) -> str:
    """A few words on why a call failed, e.g. 'connection refused'."""
    rpc = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    detail = str(exc)
    if isinstance(rpc, grpc.aio.AioRpcError):
        detail = rpc.details() or rpc.code().name
    lowered = detail.lower()
    for needle, words in (
        *_TLS_FAILURES,
        ("connection refused", "connection refused"),
        ("no leader", "no leader: quorum lost?"),
        ("request timed out", "request timed out: quorum lost?"),
        ("deadline", "timed out"),
    ):
        if needle in lowered:
            return words
    if "socket closed" in lowered and not tls:
        return "connection closed: does etcd want TLS? (set store.ca_cert)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    detail = detail.removeprefix("connections to all backends failing; last error: ")
    return detail.splitlines()[0][:160] if detail else type(exc).__name__


class Unreachable(StoreUnavailable):
    """StoreUnavailable that keeps its short reason, for connect()'s message."""

    def __init__(self, where: str, what: str, reason: str) -> None:
        super().__init__(f"etcd at {where} unavailable for {what} ({reason})")
        self.reason = reason

    @property
    def tls_failure(self) -> bool:
        return self.reason.startswith("TLS")


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
    ) -> None:
        self._client = client
        self.endpoints = tuple(endpoints)
        self._resumes = 0
        self.op_timeout = op_timeout
        self._credentials = credentials
        self.tls = tls

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
                raise StoreError(f"etcd at {self.where} refused {what}: {_reason(exc)}") from None
            except EtcdPermissionDeniedError:
                raise StoreError(self._denied(what)) from None
            except (TimeoutError, EtcdConnectionError, EtcdTransientError) as exc:
                raise Unreachable(self.where, what, _reason(exc, self.tls)) from None
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
        if exc.code() in _UNAVAILABLE_CODES:
            return Unreachable(self.where, what, _reason(exc, self.tls))
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
        try:
            answer = await auth.authenticate(user, password, timeout=limit or self.op_timeout)
        except (TimeoutError, EtcdConnectionError, EtcdTransientError) as exc:
            raise Unreachable(self.where, "login", _reason(exc, self.tls)) from None
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            reason = _reason(exc).removeprefix("etcdserver: ")
            if "authentication is not enabled" in reason:
                # Nothing to log in to; the settings may be ahead of the cluster.
                log.warning("etcd at %s has auth off; user %r is not used", self.where, user)
                self._credentials = None
                return
            raise StoreError(f"etcd at {self.where} rejected user {user!r}: {reason}") from None
        self._client.set_token(answer.token)

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        kv = self._kv()
        answer = await self._call(f"get {key}", lambda t: kv.get(key, timeout=t), timeout)
        return _key_value(answer.kvs[0]) if answer.kvs else None

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

    async def watch_prefix(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events under `prefix`, resuming after the last one seen when a stream breaks.

        A stream that yields nothing for WATCH_REOPEN seconds is reopened: after
        an etcd restart a stream can stay open and silent for good, and nothing
        on the client tells it from a quiet prefix.

        If etcd compacted the history the watch must resume from, the events in
        between are lost: this raises StoreError, and the caller re-reads the
        prefix and watches again from the revision of that read.
        """
        next_revision = start_revision
        backoff = 0.1
        while True:
            if self._client.watch is None:
                raise StoreError(f"etcd store for {self.where} is closed")
            stream: Any = self._client.watch.watch(
                prefix, prefix_range_end(prefix), start_revision=next_revision
            )
            silent = False
            try:
                async with contextlib.aclosing(stream):
                    while True:
                        try:
                            # A stream that went silent after an etcd restart looks
                            # exactly like a quiet prefix: reopen it every so often
                            # (from the next revision, so nothing is lost).
                            # Not wait_for: on Python 3.11 it swallows a cancellation
                            # that lands as a response arrives, and a busy prefix
                            # (demand reports) then keeps its task alive for good.
                            async with asyncio.timeout(WATCH_REOPEN):
                                answer = await anext(stream)
                        except TimeoutError:
                            silent = True
                            break
                        except StopAsyncIteration:
                            break
                        _check_compaction(prefix, next_revision, answer)
                        if answer.canceled:
                            log.warning("etcd cancelled the watch of %s: %s", prefix,
                                        answer.cancel_reason)
                            break
                        if next_revision == 0:
                            # Fix "now" so a restarted stream misses nothing.
                            next_revision = int(answer.header.revision) + 1
                        for event in answer.events:
                            next_revision = int(event.kv.mod_revision) + 1
                            yield _watch_event(event)
                        backoff = 0.1
            except StoreError:
                raise
            except Exception as exc:
                # Whatever broke the stream (gRPC, the client), resuming loses nothing.
                log.debug("watch of %s broke (%r); resuming at %d", prefix, exc, next_revision)
            if silent:
                continue  # reopen at once: a quiet prefix is no error to back off from
            self._resumes += 1
            # The stream ended (server closed it, or an error): reopen it.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    @property
    def watch_resumes(self) -> int:
        """Broken watch streams resumed: by watch_prefix, or inside etcd3aio (per process)."""
        return self._resumes + _ReconnectCount.count

    async def close(self) -> None:
        await self._client.close()


def _check_compaction(prefix: str, wanted: int, answer: Any) -> None:
    if int(answer.compact_revision) > 0:
        raise StoreError(
            f"watch of {prefix} cannot resume at revision {wanted}: etcd compacted history "
            f"up to {answer.compact_revision}; re-read and watch again"
        )


def _key_value(item: Any) -> KeyValue:
    return KeyValue(
        key=bytes(item.key).decode(),
        value=bytes(item.value),
        mod_revision=int(item.mod_revision),
        lease=int(item.lease),
    )


def _watch_event(event: Any) -> WatchEvent:
    return WatchEvent(
        kind="delete" if int(event.type) == 1 else "put",
        key=bytes(event.kv.key).decode(),
        value=bytes(event.kv.value),
        revision=int(event.kv.mod_revision),
    )


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read the {what} {path}: {exc.strerror}") from None


async def connect(
    endpoints: Sequence[str],
    *,
    timeout: float = 5.0,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
    ca_cert: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    tls_server_name: str | None = None,
    user: str | None = None,
    password: str | None = None,
) -> EtcdStore:
    """A connected store, after one successful read; StoreUnavailable within `timeout`.

    `ca_cert` turns TLS on; `cert` and `key` add a client certificate. vmbox's
    callers pass these through vmbox.state.access.connect_kwargs.
    """
    names = [normalize_endpoint(endpoint) for endpoint in endpoints]
    if not names:
        raise StoreError("no etcd endpoint given")
    if (cert is None) != (key is None) or (cert is not None and ca_cert is None):
        raise StoreError("a client certificate needs its key and a CA certificate")
    client = Etcd3Client(
        names, watch_reconnect_backoff_seconds=0.1, watch_max_reconnect_backoff_seconds=1.0,
        tls_server_name=tls_server_name, ca_cert=_read(ca_cert, "CA certificate"),
        cert_key=_read(key, "client key"), cert_chain=_read(cert, "client certificate"),
    )  # fmt: skip
    # No public knob for channel options: extend the manager's before the channel exists.
    client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
    await client.connect()
    creds = (user, password or "") if user else None
    tls = ca_cert is not None
    store = EtcdStore(client, names, op_timeout=op_timeout, credentials=creds, tls=tls)
    try:
        await _first_read(store, timeout)
    except BaseException:
        await client.close()
        raise
    return store


async def _first_read(store: EtcdStore, patience: float) -> None:
    """Retry a read for `patience` seconds: an etcd that is still starting is not an error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        left = deadline - loop.time()
        try:
            await store.authenticate(max(left, 0.1))
            await store.get("/vmbox/", timeout=max(min(left, store.op_timeout), 0.1))
            return
        except Unreachable as exc:
            if exc.tls_failure:
                raise StoreUnavailable(f"cannot use etcd at {store.where}: {exc.reason}") from None
            if loop.time() + 0.2 >= deadline:
                reason = exc.reason
                raise StoreUnavailable(
                    f"cannot reach etcd at {store.where} ({reason}): start it, "
                    "or use `store: managed`"
                ) from None
        await asyncio.sleep(0.2)
