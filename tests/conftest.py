"""Shared pytest fixtures: a real etcd (one member or three), a connected store, an event loop.

There is no pytest-asyncio: a test takes the `aio` fixture and calls
`aio.run(main())`, which runs the coroutine on the same loop the `store` fixture
connected on (gRPC channels are bound to one loop) and bounds it with a timeout.
`until` and `retry` are the bounded waits async tests share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from vmbox import testbed
from vmbox.etcdserver import EtcdCluster, EtcdServer
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.store import StoreUnavailable

T = TypeVar("T")


async def until(predicate: Callable[[], bool], within: float, step: float = 0.005) -> float:
    """Wait until `predicate()` holds (AssertionError after `within` s); returns the wait."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def retry(make: Callable[[], Awaitable[T]], within: float = 8.0) -> T:
    """Call until the store answers again (calls fail fast while etcd is down)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await make()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Aio:
    """One event loop for the whole test; `run` bounds each coroutine by `timeout` seconds."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return self._runner.run(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self._runner.close()


@pytest.fixture
def aio() -> Iterator[Aio]:
    runner = Aio()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One private etcd for the whole session; tests must not stop it (use `own_etcd`)."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A private etcd for one test that stops, kills or restarts it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """Three members on loopback, for failover tests."""
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
def store(etcd: EtcdServer, aio: Aio) -> Iterator[EtcdStore]:
    """A store connected to the session etcd; everything under /vmbox/ is removed afterwards."""
    connected = aio.run(connect(etcd.endpoints, timeout=10))
    yield connected
    aio.run(connected.delete_prefix("/vmbox/"))
    aio.run(connected.close())


@pytest.fixture(scope="session")
def etcdctl() -> Callable[..., Awaitable[str]]:
    """`await etcdctl(endpoints, "put", key, value)`: the real command-line client."""
    return testbed.etcdctl
