"""BlockingChannel (the poll views' reads off the loop): tokens, a login of its own, errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from vmbox.state.etcd.blocking import BlockingChannel
from vmbox.state.etcd.errors import Unreachable
from vmbox.state.store import KeyValue, StoreError


class Failed(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeEtcd:
    """A blocking channel to an etcd whose valid token is `valid`; records each call."""

    def __init__(self, valid: str, fail: Failed | None = None) -> None:
        self.valid = valid
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    def unary_unary(self, method: str, **_: Any) -> Any:
        def call(request: Any, timeout: float, metadata: Any = None) -> Any:
            name = method.rsplit("/", 1)[1]
            self.calls.append((name, metadata))
            if name == "Authenticate":
                self.valid = f"token-of-{request.name}"
                return _Answer(token=self.valid)
            if self.fail is not None:
                raise self.fail
            if metadata != (("token", self.valid),):
                raise Failed(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
            kv = _Answer(key=request.key, value=b"42", mod_revision=7, lease=0)
            return _Answer(kvs=[kv])

        return call

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self.unary_unary("/x/" + name)  # streams: unused here

    def close(self) -> None:
        self.closed = True


class _Answer:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def channel(etcd: FakeEtcd, token: str | None, creds: tuple[str, str] | None) -> BlockingChannel:
    return BlockingChannel(
        lambda: etcd,
        "127.0.0.1:2379",
        token=lambda: token,
        credentials=lambda: creds,
        denied=lambda what: f"denied {what}",
    )


def test_reads_with_the_stores_token() -> None:
    etcd = FakeEtcd("t1")
    got = channel(etcd, "t1", ("vmbox", "pw")).get("/vmbox/t/state/limit", 1.0)
    assert got == KeyValue("/vmbox/t/state/limit", b"42", 7, 0)
    assert etcd.calls == [("Range", (("token", "t1"),))]


def test_an_expired_token_logs_in_once_and_reads() -> None:
    etcd = FakeEtcd("new")
    blocking = channel(etcd, "old", ("vmbox", "pw"))
    assert blocking.get("/vmbox/k", 1.0) is not None
    assert [name for name, _ in etcd.calls] == ["Range", "Authenticate", "Range"]
    assert blocking.get("/vmbox/k", 1.0) is not None  # its own token from now on
    assert etcd.calls[-1] == ("Range", (("token", "token-of-vmbox"),))


def test_without_credentials_an_expired_token_is_one_line() -> None:
    with pytest.raises(StoreError, match="get /vmbox/k failed: etcdserver: invalid auth token"):
        channel(FakeEtcd("new"), "old", None).get("/vmbox/k", 1.0)


def test_errors_map_as_the_asyncio_clients_do() -> None:
    down = FakeEtcd("t", Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    with pytest.raises(Unreachable, match="unavailable for get /vmbox/k"):
        channel(down, "t", None).get("/vmbox/k", 1.0)
    late = FakeEtcd("t", Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    with pytest.raises(Unreachable, match=r"\(timed out\)"):
        channel(late, "t", None).get("/vmbox/k", 1.0)
    denied = FakeEtcd("t", Failed(grpc.StatusCode.PERMISSION_DENIED, "permission denied"))
    with pytest.raises(StoreError, match=r"^denied get /elsewhere$"):
        channel(denied, "t", None).get("/elsewhere", 1.0)


def test_closed_channel_refuses_and_closes_once() -> None:
    etcd = FakeEtcd("t")
    blocking = channel(etcd, "t", None)
    blocking.get("/vmbox/k", 1.0)
    blocking.close()
    assert etcd.closed
    with pytest.raises(StoreError, match="is closed"):
        blocking.get("/vmbox/k", 1.0)
