"""Why an etcd call failed, in a few words, and Unreachable (a StoreUnavailable).

Called by EtcdStore (vmbox.state.etcd.etcdstore), which turns every client error
into a StoreError with one of these reasons, and by connect()
(vmbox.state.etcd.connection), which fails at once on a TLS failure.
"""

from __future__ import annotations

import grpc
import grpc.aio

from vmbox.state.store import StoreUnavailable

# gRPC codes that mean etcd did not answer (down, or without quorum), not that it refused.
UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

# What gRPC says when a TLS handshake fails, and what it means. These do not
# heal by retrying, so connect() reports them at once.
_TLS_FAILURES = (
    (
        "hostname verification",
        "TLS: etcd's certificate does not name this host; set store.server_name to a name it has",
    ),
    ("certificate_verify_failed", "TLS: etcd's certificate is not signed by store.ca_cert"),
    ("tls handshake failed", "TLS handshake failed: check store.ca_cert"),
    (
        "unwrap failed",
        "TLS: etcd refused the client certificate (none given, or signed by "
        "a CA it does not trust): check store.cert and store.key",
    ),
    # Not TLS's fault for sure (an etcd shutting down does it too): retried.
    ("handshake read failed", "closed during the TLS handshake: does etcd serve TLS?"),
)


def failure_reason(exc: BaseException, tls: bool = False) -> str:
    """A few words on why a call failed, e.g. 'connection refused'."""
    # AioRpcError (the asyncio client) and the blocking client's errors are both RpcErrors
    # with details() and code() (vmbox.state.etcd.blocking).
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    detail = str(exc)
    if isinstance(rpc, grpc.RpcError) and callable(getattr(rpc, "details", None)):
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
