"""BlockingChannel: linearizable reads over a blocking gRPC channel, for threads off the loop.

EtcdStore.blocking_get (vmbox.state.etcd.etcdstore) calls it from the poll
views' read threads (vmbox.state.readthread): gRPC's synchronous API waits in
its C core with the GIL released and needs no event loop, where a read through
the asyncio client costs the replica's loop about 1 ms of CPU between packets
(DESIGN.md, "The store client off the packet path"). The channel is opened on
first use with the same target, options and TLS files as the store's asyncio
channel (connect() hands over how), logs in with the store's token, and logs
in again by itself once when that token has expired. Errors become the same
StoreErrors as EtcdStore's, with the same one-line reasons. Thread-safe: gRPC
channels are, and the lazy open is under a lock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from etcd3aio._protobuf import (
    AuthenticateRequest,
    AuthStub,
    KVStub,
    LeaseKeepAliveRequest,
    LeaseStub,
    RangeRequest,
)

from vmbox.state.etcd.errors import UNAVAILABLE_CODES, Unreachable, failure_reason
from vmbox.state.store import KeyValue, LeaseLost, StoreError, StoreUnavailable

OpenChannel = Callable[[], grpc.Channel]
T = TypeVar("T")


class BlockingChannel:
    """Blocking reads for one EtcdStore: `where` names its endpoints in errors."""

    def __init__(
        self,
        open_channel: OpenChannel,
        where: str,
        *,
        token: Callable[[], str | None],
        credentials: Callable[[], tuple[str, str] | None],
        denied: Callable[[str], str],
        tls: bool = False,
    ) -> None:
        self._open = open_channel
        self.where = where
        self._store_token = token  # the asyncio client's, while it is current
        self._credentials = credentials
        self._denied = denied
        self.tls = tls
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._kv: Any = None
        self._auth: Any = None
        self._lease: Any = None
        self._token: str | None = None  # our own, after a login of our own
        self._closed = False
        self._keeping: _KeepAliveStream | None = None  # opened at the first keep-alive
        self._keep_lock = threading.Lock()  # one keep-alive on the stream at a time

    def _stubs(self) -> tuple[Any, Any, Any]:
        """The KV, auth and lease stubs, on a channel opened at first use."""
        with self._lock:
            if self._closed:
                raise StoreError(f"etcd store for {self.where} is closed")
            if self._channel is None:
                self._channel = self._open()
                # etcd3aio's generated stubs work on a blocking channel as well.
                self._kv = KVStub(self._channel)
                self._auth = AuthStub(self._channel)
                self._lease = LeaseStub(self._channel)
            return self._kv, self._auth, self._lease

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        token = self._token or self._store_token()
        return (("token", token),) if token else None

    def _call(self, what: str, rpc: Callable[[Any], T], timeout: float) -> T:
        """`rpc(metadata)`, logging in again once when etcd says the token has expired;
        every gRPC failure becomes a StoreError."""
        for attempt in (1, 2):
            try:
                return rpc(self._metadata())
            except grpc.RpcError as exc:
                code = _code(exc)
                expired = code == grpc.StatusCode.UNAUTHENTICATED and attempt == 1
                if expired and self._login(timeout):  # tokens expire: log in again once
                    continue
                raise self._error(what, exc, code) from None
        raise AssertionError("unreachable")

    def get(self, key: str, timeout: float) -> KeyValue | None:
        kv, _, _ = self._stubs()
        request = RangeRequest(key=key.encode())
        answer = self._call(
            f"get {key}",
            lambda metadata: kv.Range(request, timeout=timeout, metadata=metadata),
            timeout,
        )
        if not answer.kvs:
            return None
        item = answer.kvs[0]
        return KeyValue(
            bytes(item.key).decode(), bytes(item.value), int(item.mod_revision), int(item.lease)
        )

    def keep_alive(self, lease: int, timeout: float) -> int:
        """One keep-alive of `lease` (the fenced view's probe, vmbox.state.views); its TTL.

        Raises LeaseLost when etcd says the lease is gone, as EtcdStore.refresh_lease.
        """
        _, _, leases = self._stubs()
        what = f"keep-alive of lease {lease:x}"

        def once(metadata: Any) -> Any:
            # One stream for every keep-alive: a stream per keep-alive (a call, the
            # thread gRPC starts to feed it, its cancel) cost the replica about 1.7 ms
            # of CPU each, 4 times a second for a fenced item, beside the packet loop.
            with self._keep_lock:
                stream = self._keeping
                if stream is None or stream.broken:
                    stream = self._keeping = _KeepAliveStream(leases, metadata)
                try:
                    return stream.once(lease, timeout)
                except queue.Empty:
                    stream.close()
                    raise Unreachable(self.where, what, f"no answer in {timeout:g} s") from None

        answer = self._call(what, once, timeout)
        if answer is None:
            raise StoreUnavailable(f"etcd at {self.where} closed the {what}")
        if int(answer.TTL) <= 0:
            raise LeaseLost(f"lease {lease:x} expired or was revoked")
        return int(answer.TTL)

    def _login(self, timeout: float) -> bool:
        creds = self._credentials()
        if creds is None:
            return False
        _, auth, _ = self._stubs()
        request = AuthenticateRequest(name=creds[0], password=creds[1])
        try:
            answer = auth.Authenticate(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error("login", exc, _code(exc)) from None
        self._token = str(answer.token)
        return True

    def _error(self, what: str, exc: grpc.RpcError, code: grpc.StatusCode | None) -> StoreError:
        if code in UNAVAILABLE_CODES:
            return Unreachable(self.where, what, failure_reason(exc, self.tls))
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return StoreError(self._denied(what))
        return StoreError(f"etcd {what} failed: {failure_reason(exc, self.tls)}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
            stream, self._keeping = self._keeping, None
        if stream is not None:
            stream.close()
        if channel is not None:
            channel.close()


_END = object()  # ends a keep-alive stream's requests


class _KeepAliveStream:
    """One long-lived LeaseKeepAlive call: a keep-alive is one request and its answer.

    A thread of its own reads the answers into a queue, so a keep-alive waits
    for its answer with a timeout (a blocking stream's next() takes none). A
    stream that failed, ended or timed out is `broken`: the next keep-alive
    opens a new one (a late answer never meets a later request)."""

    def __init__(self, leases: Any, metadata: Any) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = leases.LeaseKeepAlive(iter(self._requests.get, _END), metadata=metadata)
        self.broken = False
        threading.Thread(target=self._read, name="vmbox-keep-alive", daemon=True).start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self._answers.put(answer)
        except grpc.RpcError as exc:
            self._answers.put(exc)
        else:
            self._answers.put(None)  # etcd ended the stream

    def once(self, lease: int, timeout: float) -> Any:
        """The answer to one keep-alive of `lease` (None: etcd closed the stream); raises
        queue.Empty after `timeout` seconds, and the RpcError the stream failed with."""
        self._requests.put(LeaseKeepAliveRequest(ID=lease))
        answer = self._answers.get(timeout=timeout)
        if answer is None or isinstance(answer, grpc.RpcError):
            self.broken = True
            if answer is not None:
                raise answer
        return answer

    def close(self) -> None:
        self.broken = True
        self._requests.put(_END)
        self._call.cancel()


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None
