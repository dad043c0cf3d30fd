"""A controller that starts again adopts the replicas running on its etcd.

`vmbox up` killed with kill -9 leaves its replicas running (with an external
etcd they are in sessions of their own); the next controller must take them
over as they are: the same processes, the desired count `vmbox scale` set, and
no scale or start event. The whole command under load, killed and started
again, is the "controller restart" fault (vmbox.faults.controller_restart).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil

from tests.conftest import Aio
from tests.integration.harness import make_spec
from vmbox.control import events
from vmbox.control.controller import Controller
from vmbox.etcdserver import EtcdServer
from vmbox.metrics import scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import list_members


def controller(
    spec: Spec, store: EtcdStore, endpoints: list[str], logs: Path, tick: float = 0.2
) -> Controller:
    runtime = LocalRuntime(spec.service, endpoints, logs, adoptable=True)
    return Controller(spec, store, runtime, tick=tick, metrics_port=None)


async def members(store: EtcdStore, service: str, count: int, within: float) -> dict[str, int]:
    deadline = time.monotonic() + within
    while len(found := await list_members(store, service)) != count:
        assert time.monotonic() < deadline, f"wanted {count} members, have {sorted(found)}"
        await asyncio.sleep(0.05)
    return {rid: int(member.info["pid"]) for rid, member in found.items()}


def test_a_new_controller_adopts_the_replicas_and_keeps_the_scaled_count(
    etcd: EtcdServer, store: EtcdStore, aio: Aio, tmp_path: Path
) -> None:
    spec = make_spec("adopt", 2)
    endpoints = list(etcd.endpoints)

    async def main() -> None:
        first = controller(spec, store, endpoints, tmp_path / "first")
        second = controller(spec, store, endpoints, tmp_path / "second")
        try:
            await first.setup()
            run = asyncio.create_task(first.run())
            await store.put(keys.desired_key(spec.service), b"3")  # `vmbox scale adopt 3`
            pids = await members(store, spec.service, 3, within=20)
            run.cancel()  # gone without stopping its replicas, as after kill -9
            await asyncio.gather(run, return_exceptions=True)
            since = time.time()
            await second.setup()
            assert second.desired == 3  # not the spec's 2
            await second.reconcile()
            await second.reconcile()
            news = [e for e in await events.recent(store, spec.service, 50) if e.time >= since]
            assert [e.kind for e in news] == ["adopt"] * 3, news  # no "scale 2 -> 3", no start
            assert {rid: s.pid for rid, s in second.runtime.running().items()} == pids
            assert all(s.adopted for s in second.runtime.running().values())
        finally:
            await second.shutdown()
            await asyncio.to_thread(first.runtime.stop_all)
        assert await list_members(store, spec.service) == {}

    aio.run(main(), timeout=60)


async def keep_sending(target: tuple[str, int], stop: asyncio.Event, clients: int = 6) -> None:
    """`clients` UDP flows, one datagram each every 10 ms, until `stop` (at most 30 s)."""
    loop = asyncio.get_running_loop()
    transports = [
        (await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=target))[0]
        for _ in range(clients)
    ]
    try:
        for _ in range(3000):
            if stop.is_set():
                break
            for transport in transports:
                transport.sendto(b"x")
            await asyncio.sleep(0.01)
    finally:
        for transport in transports:
            transport.close()


def test_a_replica_draining_when_its_controller_died_is_left_to_finish(
    etcd: EtcdServer, store: EtcdStore, aio: Aio, tmp_path: Path
) -> None:
    # Flows that never idle keep a drain going for drain_timeout (3 s here).
    spec = make_spec("adopt-drain", 2, limit=100_000)
    spec = spec.model_copy(
        update={"replicas": spec.replicas.model_copy(update={"drain_timeout": 3.0})}
    )
    endpoints = list(etcd.endpoints)

    async def main() -> None:
        first = controller(spec, store, endpoints, tmp_path / "first")
        second = controller(spec, store, endpoints, tmp_path / "second")
        stop = asyncio.Event()
        sending: asyncio.Task[None] | None = None
        try:
            await first.setup()
            run = asyncio.create_task(first.run())
            pids = await members(store, spec.service, 2, within=20)
            await asyncio.sleep(1.1)  # a replica admits nothing in the window it starts in
            sending = asyncio.create_task(keep_sending(spec.relay.listen, stop))
            run.cancel()  # the controller dies...
            await asyncio.gather(run, return_exceptions=True)
            # ... just as it had told the replica with the most flows to drain.
            found = await list_members(store, spec.service)
            deadline = time.monotonic() + 5
            while True:
                flows = {
                    rid: (await scrape(str(m.info["metrics"]))).get("vmbox_flows", 0.0)
                    for rid, m in found.items()
                }
                victim = max(flows, key=lambda rid: flows[rid])
                if flows[victim] > 0:
                    break
                assert time.monotonic() < deadline, flows
                await asyncio.sleep(0.1)
            os.kill(pids[victim], signal.SIGTERM)
            deadline = time.monotonic() + 2
            while not (await list_members(store, spec.service))[victim].info.get("draining"):
                assert time.monotonic() < deadline, "the draining replica did not say so"
                await asyncio.sleep(0.02)
            since = time.time()
            await second.setup()
            assert set(second.draining) == {victim}
            deadline = time.monotonic() + 10
            while psutil.pid_exists(pids[victim]) and time.monotonic() < deadline:
                await second.reconcile()
                await asyncio.sleep(0.1)
            for _ in range(3):
                await second.reconcile()
                await asyncio.sleep(0.1)
            news = [
                (e.kind, e.data.get("replica"))
                for e in await events.recent(store, spec.service, 50)
                if e.time >= since
            ]
            assert ("crash", victim) not in news, news  # its exit was the drain's end
            assert ("stop", victim) in news, news
            assert sum(kind == "start" for kind, _ in news) == 1, news  # one to replace it
            assert len(second.runtime.running()) == 2
        finally:
            stop.set()
            if sending is not None:
                await sending
            await second.shutdown()
            await asyncio.to_thread(first.runtime.stop_all)

    aio.run(main(), timeout=60)


def test_a_crashed_replica_is_restarted_after_its_backoff_not_at_the_next_tick(
    etcd: EtcdServer, store: EtcdStore, aio: Aio, tmp_path: Path
) -> None:
    """kill -9 of an adopted replica, then of the one that replaced it: each comes back
    its backoff (0.2 s, then 0.4 s) after its crash, though the adopting controller's
    tick is 3 s: a pass returns when the next restart is due (vmbox.control.plan)."""
    spec = make_spec("adopt-crash", 1)
    endpoints = list(etcd.endpoints)
    tick = 3.0

    async def main() -> list[float]:
        first = controller(spec, store, endpoints, tmp_path / "first")
        second = controller(spec, store, endpoints, tmp_path / "second", tick=tick)
        reconciling: asyncio.Task[None] | None = None
        gaps = []
        try:
            await first.setup()
            run = asyncio.create_task(first.run())
            pids = await members(store, spec.service, 1, within=20)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await second.setup()
            assert set(second.runtime.running()) == set(pids)  # adopted
            reconciling = asyncio.create_task(second.run())
            for backoff in (0.2, 0.4):
                [(rid, pid)] = pids.items()
                since = time.time()
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 2 * tick + 5
                while True:
                    news = [
                        e for e in await events.recent(store, spec.service, 20) if e.time >= since
                    ]
                    crash = [e for e in news if e.kind == "crash"]
                    start = [e for e in news if e.kind == "start"]
                    if crash and start:
                        break
                    assert time.monotonic() < deadline, news
                    await asyncio.sleep(0.02)
                assert f"restarting in {backoff:.1f}s" in crash[0].message, crash
                assert start[0].data["replica"] == rid
                gaps.append(start[0].time - crash[0].time)
                while (pids := await members(store, spec.service, 1, within=20))[rid] == pid:
                    await asyncio.sleep(0.05)  # the old key is revoked, the new one not yet up
        finally:
            if reconciling is not None:
                reconciling.cancel()
                await asyncio.gather(reconciling, return_exceptions=True)
            await second.shutdown()
            await asyncio.to_thread(first.runtime.stop_all)
        return gaps

    gaps = aio.run(main(), timeout=60)
    print(f"crash -> start: {', '.join(f'{g:.3f}s' for g in gaps)} (tick {tick:.0f}s)")
    # Not before the backoff; well before the tick (it was the tick before: 3 s).
    assert 0.2 - 0.05 <= gaps[0] < 0.2 + 1.2, gaps
    assert 0.4 - 0.05 <= gaps[1] < 0.4 + 1.2, gaps
