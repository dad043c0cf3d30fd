"""vmbox.control.host on the memory store: a host follows its keys, one controller per service.

The controllers are fakes that record what the host asked of them, so these
tests show the host's own rules: it starts what its keys name, retires (drains,
then deletes the keys of) what they no longer name, lets a service added later
fail alone with its reason in `failed/`, and ends for a service named on the
command line that stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.conftest import until
from vmbox.control.controller import PermanentError
from vmbox.control.host import Host, hosted_services, live_hosts
from vmbox.spec import Spec, parse_spec
from vmbox.state import keys
from vmbox.state.memory import MemoryStore


def spec(name: str, port: int) -> Spec:
    return parse_spec(
        {
            "service": name,
            "listen": f"127.0.0.1:{port}",
            "upstream": "127.0.0.1:9",
            "middlebox": {"function": "ratelimit", "limit": 10},
        }
    )


class FakeController:
    def __init__(self, spec: Spec, log: list[str], fail_run: Exception | None = None) -> None:
        self.spec, self.log, self.fail_run = spec, log, fail_run

    async def setup(self) -> None:
        self.log.append(f"setup {self.spec.service}")

    async def run(self) -> None:
        if self.fail_run is not None:
            raise self.fail_run
        await asyncio.Event().wait()

    async def drain_all(self) -> None:
        self.log.append(f"drain {self.spec.service}")

    async def shutdown(self) -> None:
        self.log.append(f"shutdown {self.spec.service}")


def make_host(store: MemoryStore, log: list[str], failing: dict[str, Exception]) -> Host:
    async def prepare(given: Spec) -> FakeController:
        if given.service == "busy":
            raise OSError("127.0.0.1:1 is already in use by another program")
        return FakeController(given, log, failing.get(given.service))

    return Host(store, prepare, name="h1")


async def put_spec(store: MemoryStore, given: Spec) -> None:
    await store.put(keys.spec_key(given.service), given.to_json().encode())


@contextlib.asynccontextmanager
async def running(host: Host) -> Any:
    task = asyncio.create_task(host.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await host.shutdown()


def test_a_host_follows_its_keys() -> None:
    async def scenario() -> None:
        store, log = MemoryStore(), list[str]()
        host = make_host(store, log, {})
        a, b = spec("a", 1001), spec("b", 1002)
        await put_spec(store, a)
        await host.start([a])
        assert "h1" in await live_hosts(store)
        async with running(host):
            await put_spec(store, b)  # `vmbox apply` of a new service
            await store.put(keys.host_service_key("h1", "b"), b"")
            await until(lambda: host.services == ["a", "b"], 3)
            assert await hosted_services(store) == {"a": "h1", "b": "h1"}
            await store.put(keys.state_key("b", "limit"), b"10")
            await store.delete(keys.host_service_key("h1", "b"))  # `vmbox delete b`
            await until(lambda: host.services == ["a"], 3)
            assert log[-2:] == ["drain b", "shutdown b"]  # drained, then stopped
            kvs, _ = await store.get_prefix(keys.service_prefix("b"))
            assert kvs == []  # and its keys are gone
        assert await live_hosts(store) == {}  # the host's keys go with it
        assert log[-1] == "shutdown a"

    asyncio.run(scenario())


def test_a_service_added_later_fails_alone_and_says_why() -> None:
    async def scenario() -> None:
        store, log = MemoryStore(), list[str]()
        host = make_host(store, log, {"crashy": PermanentError("replica crashy-1 cannot run")})
        a = spec("a", 1001)
        await put_spec(store, a)
        await host.start([a])
        async with running(host) as task:
            for name, port in (("busy", 1003), ("crashy", 1004)):
                await put_spec(store, spec(name, port))
                await store.put(keys.host_service_key("h1", name), b"")
            failed = [keys.host_failed_key("h1", n) for n in ("busy", "crashy")]

            async def reasons() -> list[bytes | None]:
                found = [await store.get(k) for k in failed]
                return [kv.value if kv else None for kv in found]

            for _ in range(300):
                if all(await reasons()):
                    break
                await asyncio.sleep(0.01)
            busy, crashy = await reasons()
            assert busy is not None and b"already in use" in busy
            assert crashy is not None and b"cannot run" in crashy
            await until(lambda: host.services == ["a"], 3)
            assert not task.done()  # the host goes on with `a`
            assert await store.get(keys.host_service_key("h1", "busy")) is None

    asyncio.run(scenario())


def test_a_named_service_that_stops_ends_the_host() -> None:
    async def scenario() -> None:
        store, log = MemoryStore(), list[str]()
        host = make_host(store, log, {"a": PermanentError("127.0.0.1:1001 is already in use")})
        a = spec("a", 1001)
        await put_spec(store, a)
        await host.start([a])
        with pytest.raises(PermanentError, match="already in use"):
            await asyncio.wait_for(host.run(), 5)
        await host.shutdown()

    asyncio.run(scenario())
