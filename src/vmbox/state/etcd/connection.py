"""connect(): endpoints and TLS files to a connected EtcdStore, after one successful read.

Called through vmbox.state.etcd (which re-exports `connect` and
`normalize_endpoint`) by replicas, `vmbox up`, the CLI, the experiments, the
faults and the tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
from etcd3aio import Etcd3Client

from vmbox.state.etcd.blocking import OpenChannel
from vmbox.state.etcd.errors import Unreachable
from vmbox.state.etcd.etcdstore import DEFAULT_OP_TIMEOUT, EtcdStore
from vmbox.state.store import StoreError, StoreUnavailable

# gRPC's default reconnect backoff grows to two minutes; a restarted etcd must
# be found again within a second or so, or views stay stale for no reason.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def normalize_endpoint(endpoint: str) -> str:
    """'http://127.0.0.1:2379/' -> '127.0.0.1:2379' (the client wants host:port)."""
    for scheme in ("http://", "https://"):
        endpoint = endpoint.removeprefix(scheme)
    return endpoint.rstrip("/")


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
    files = (
        _read(ca_cert, "CA certificate"),
        _read(key, "client key"),
        _read(cert, "client certificate"),
    )
    client = Etcd3Client(
        names,
        watch_reconnect_backoff_seconds=0.1,
        watch_max_reconnect_backoff_seconds=1.0,
        tls_server_name=tls_server_name,
        ca_cert=files[0],
        cert_key=files[1],
        cert_chain=files[2],
    )
    # No public knob for channel options: extend the manager's before the channel exists.
    client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
    await client.connect()
    creds = (user, password or "") if user else None
    tls = ca_cert is not None
    blocking = _blocking_channel(client, files, tls_server_name)
    store = EtcdStore(
        client, names, op_timeout=op_timeout, credentials=creds, tls=tls, blocking=blocking
    )
    try:
        await _first_read(store, timeout)
    except BaseException:
        await client.close()
        raise
    return store


def _blocking_channel(
    client: Etcd3Client,
    files: tuple[bytes | None, bytes | None, bytes | None],
    tls_server_name: str | None,
) -> OpenChannel:
    """How to open a blocking channel like the client's asyncio one (same target,
    options and TLS files), for reads from threads off the loop (blocking.py)."""
    target = client._manager.target
    options = list(client._manager.grpc_options)
    ca_cert, cert_key, cert_chain = files

    def open_channel() -> grpc.Channel:
        if ca_cert is None:
            return grpc.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_cert, private_key=cert_key, certificate_chain=cert_chain
        )
        named = options
        if tls_server_name is not None:
            named = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
        return grpc.secure_channel(target, credentials, options=named)

    return open_channel


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
