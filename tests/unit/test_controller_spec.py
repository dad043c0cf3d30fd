"""The controller follows a spec written to etcd (`vmbox apply`), on the memory store.

A fake runtime records starts and stops; members are registered by hand with
the template they run. The controller takes a controller field at once,
ignores (with an event) a stored spec that changes what cannot change live,
and answers a change the replicas read at start with a rollout: one replica
more, with the new template, before any old one is drained.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vmbox.control import events
from vmbox.control.controller import Controller
from vmbox.runtime.base import Exited, ReplicaState, Usage
from vmbox.spec import Spec, parse_spec
from vmbox.spec.changes import template_of
from vmbox.state import keys
from vmbox.state.memory import MemoryStore


class FakeRuntime:
    def __init__(self) -> None:
        self.procs: dict[str, int] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []

    def start(self, replica_id: str, standby: bool = False) -> ReplicaState:
        self.procs[replica_id] = 1000 + len(self.started)
        self.started.append(replica_id)
        return ReplicaState(replica_id, self.procs[replica_id], running=True)

    def stop(self, replica_id: str, timeout: float = 5.0) -> None:
        self.procs.pop(replica_id, None)
        self.stopped.append(replica_id)

    def adopt(self, replica_id: str, pid: int) -> bool:
        return False

    def reap(self) -> list[Exited]:
        return []

    def running(self) -> dict[str, ReplicaState]:
        return {r: ReplicaState(r, pid, running=True) for r, pid in self.procs.items()}

    def usage(self, replica_id: str) -> Usage | None:
        return None

    def stop_all(self, timeout: float = 5.0) -> None:
        self.procs.clear()


def spec(**middlebox: Any) -> Spec:
    return parse_spec(
        {
            "service": "web",
            "listen": "127.0.0.1:9000",
            "upstream": "127.0.0.1:9100",
            "middlebox": {"function": "ratelimit", "limit": 100, **middlebox},
            "replicas": {"count": 2, "min": 1, "max": 4},
        }
    )


async def register(store: MemoryStore, runtime: FakeRuntime, template: str) -> None:
    for rid, pid in runtime.procs.items():
        info = {"pid": pid, "metrics": "127.0.0.1:1", "template": template}
        await store.put(keys.member_key("web", rid), json.dumps(info).encode())


async def kinds(store: MemoryStore) -> list[str]:
    return [e.message for e in await events.recent(store, "web", 20) if e.kind == "apply"]


def test_the_controller_follows_an_applied_spec() -> None:
    async def scenario() -> None:
        store, runtime = MemoryStore(), FakeRuntime()
        first = spec()
        controller = Controller(first, store, runtime, metrics_port=None)
        await controller.setup()
        await controller.reconcile()
        assert sorted(runtime.procs) == ["web-1", "web-2"]
        await register(store, runtime, template_of(first))

        # A controller field: followed at once, no replica touched.
        wider = first.model_copy(update={"replicas": first.replicas.model_copy(update={"max": 6})})
        await store.put(keys.spec_key("web"), wider.to_json().encode())
        await controller.reconcile()
        assert controller.spec.replicas.max == 6 and runtime.started == ["web-1", "web-2"]

        # What cannot change live: ignored, with an event saying so.
        moved = wider.model_copy(update={"listen": ("127.0.0.1", 9001)})
        await store.put(keys.spec_key("web"), moved.to_json().encode())
        await controller.reconcile()
        assert controller.spec.listen == ("127.0.0.1", 9000)
        assert any("ignored" in m and "listen" in m for m in await kinds(store))

        # A rollout: one more replica with the new spec; no old one drained before it is in.
        fenced = wider.model_copy(
            update={"middlebox": (wider.limiter.model_copy(update={"consistency": "fenced"}),)}
        )
        await store.put(keys.spec_key("web"), fenced.to_json().encode())
        await controller.reconcile()
        assert runtime.started == ["web-1", "web-2", "web-3"] and controller.draining == {}
        await controller.reconcile()  # web-3 not registered yet: wait
        assert controller.draining == {}
        info = {"pid": runtime.procs["web-3"], "template": template_of(fenced)}
        await store.put(keys.member_key("web", "web-3"), json.dumps(info).encode())
        await controller.reconcile()
        assert set(controller.draining) <= {"web-1", "web-2"} and len(controller.draining) == 1
        await asyncio.gather(*controller.draining.values())
        assert any("rolling out" in m for m in await kinds(store))

    asyncio.run(scenario())
