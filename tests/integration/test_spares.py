"""Warm spares end to end (replicas.warm): real etcd, real replica processes, real datagrams.

A spare is started, connected and standing by (standby/<id>), takes no traffic,
and is promoted by a scale-up: the same process becomes a member and a new
spare starts behind it, while the limit holds at the upstream echo. Spares
never exceed max - desired, a killed spare comes back as a spare, and a
restarted controller adopts its spares. The reaction test prints the time
from the desired-count write to the new replica's first passed datagram, with
and without a spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import make_spec, running_service
from vmbox.control import events
from vmbox.control.controller import Controller
from vmbox.etcdserver import EtcdServer
from vmbox.metrics import scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import list_members
from vmbox.state.standby import list_standby
from vmbox.testbed import Service, connected, echo_seconds, until_second
from vmbox.tools.load import LoadPlan, run_load

LIMIT = 100


def spare_spec(name: str, warm: int, count: int = 1, most: int = 4) -> Spec:
    spec = make_spec(name, count)
    replicas = spec.replicas.model_copy(update={"warm": warm, "max": most})
    return spec.model_copy(update={"replicas": replicas})


async def until(check: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
    """Poll `check` every 20 ms until it returns something truthy; that value."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


async def spares(store: EtcdStore, service: str) -> dict[str, int]:
    """The registered spares' pids."""
    return {rid: int(i["pid"]) for rid, i in (await list_standby(store, service)).items()}


async def n_spares(svc: Service, count: int, within: float = 20.0) -> dict[str, int]:
    async def check() -> dict[str, int] | None:
        found = await spares(svc.store, svc.spec.service)
        return found if len(found) == count and found else None

    if count == 0:
        await asyncio.sleep(0.5)  # a spare being stopped leaves its key within that
        found = await spares(svc.store, svc.spec.service)
        assert found == {}, found
        return found
    return dict(await until(check, within, f"{count} spares of {svc.spec.service}"))


async def spare_metrics(svc: Service, rid: str) -> dict[str, float]:
    info = (await list_standby(svc.store, svc.spec.service))[rid]
    return await scrape(str(info["metrics"]))


def test_a_scale_up_promotes_the_spare_while_the_limit_holds(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async def main() -> None:
        spec = spare_spec("spare-up", warm=1)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            (spare, pid), *_ = (await n_spares(svc, 1)).items()
            plan = LoadPlan(spec.relay.listen, rate=300, sources=1, flows=64, duration=8.0)
            load = asyncio.create_task(run_load(plan))
            began = time.time()
            await asyncio.sleep(2.5)
            standing = await spare_metrics(svc, spare)
            assert standing["vmbox_standby"] == 1.0 and standing["vmbox_ready"] == 0.0
            await svc.scale(2)
            members = await svc.wait_ready(2)
            assert int(members[spare].info["pid"]) == pid  # the same process, now a member
            behind = await n_spares(svc, 1)
            assert spare not in behind and pid not in behind.values()
            await load
            ended = time.time()
            counts = await echo_seconds(svc.echo, int(ended) - 1)
            # Every whole second of the load, the first one (ramping up) aside.
            sent = [counts.get(s, 0) for s in range(int(began) + 2, int(ended))]
            gauges = (await svc.gauges())[spare]
            recorded = await events.recent(svc.store, spec.service, 30)
        # Nothing reached the spare while it stood by (all 300/s went to web-1).
        assert standing["vmbox_packets_received_total"] == 0.0, standing
        assert gauges["vmbox_standby"] == 0.0 and gauges["vmbox_packets_passed_total"] > 0
        print(f"per second at the echo across the promotion: {sent}")
        assert sent and max(sent) <= LIMIT, sent
        assert min(sent) >= LIMIT // 2, sent
        promotes = [e for e in recorded if e.kind == "promote"]
        assert [e.data["replica"] for e in promotes] == [spare], recorded
        took = promotes[0].data["seconds"]
        assert isinstance(took, float) and 0 < took < 2.0, promotes

    asyncio.run(main())


def test_spares_stay_within_max_and_a_killed_spare_comes_back_as_one(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async def main() -> None:
        spec = spare_spec("spare-max", warm=2, count=2, most=4)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            first = await n_spares(svc, 2)
            victim = min(first)
            os.kill(first[victim], signal.SIGKILL)

            async def back() -> bool:
                now = await spares(svc.store, spec.service)
                return victim in now and now[victim] != first[victim]

            await until(back, 20.0, f"{victim} back as a spare")
            assert victim in svc.controller.spares
            exported = await controller_metrics(svc)
            assert exported["vmbox_controller_spares"] == 2
            assert exported["vmbox_controller_replicas"] == 2
            assert not set(await svc.members()) & set(first)  # spares are never members
            await svc.scale(3)  # max - desired = 1: one spare promoted, the other kept
            await svc.wait_ready(3)
            kept = await n_spares(svc, 1)
            assert len(svc.controller.spares) == 1 and set(kept) == svc.controller.spares
            await svc.scale(4)  # max - desired = 0: no spare
            await svc.wait_ready(4)
            await until(lambda: _none(svc), 10.0, "the last spare promoted, none started behind it")
            assert len(svc.runtime.running()) == 4
            await svc.scale(2)  # room again: a drain, and spares back up to warm
            await svc.wait_ready(2)
            again = await n_spares(svc, 2)
            assert not set(again) & set(await svc.members())

    asyncio.run(main())


async def controller_metrics(svc: Service) -> dict[str, float]:
    kv = await svc.store.get(keys.controller_key(svc.spec.service))
    assert kv is not None
    return await scrape(str(json.loads(kv.value)["metrics"]))


async def _none(svc: Service) -> bool:
    return not await spares(svc.store, svc.spec.service) and not svc.controller.spares


def test_a_restarted_controller_adopts_its_spares(etcd: EtcdServer, tmp_path: Path) -> None:
    spec = spare_spec("spare-adopt", warm=1)
    endpoints = list(etcd.endpoints)

    def controller(own: EtcdStore, logs: Path) -> Controller:
        runtime = LocalRuntime(spec.service, endpoints, logs, adoptable=True)
        return Controller(spec, own, runtime, tick=0.2, metrics_port=None)

    async def main() -> None:
        async with connected(endpoints) as own:
            first = controller(own, tmp_path / "first")
            second = controller(own, tmp_path / "second")
            try:
                await first.setup()
                run = asyncio.create_task(first.run())

                async def spare() -> dict[str, int]:
                    return await spares(own, spec.service)

                found = await until(spare, 20.0, "a spare")
                # The member too: a replica not yet registered is not adopted.
                await until(lambda: _members_with(own, spec.service, set()), 20.0, "a member")
                run.cancel()  # gone without stopping anything, as after kill -9
                await asyncio.gather(run, return_exceptions=True)
                since = time.time()
                await second.setup()
                await second.reconcile()
                await second.reconcile()
                news = [e for e in await events.recent(own, spec.service, 50) if e.time >= since]
                assert [e.kind for e in news] == ["adopt", "adopt"], news  # no start
                assert second.spares == set(found)
                adopted = second.runtime.running()
                assert {rid: adopted[rid].pid for rid in found} == found
                await own.put(keys.desired_key(spec.service), b"2")
                await second.reconcile()
                members = await until(
                    lambda: _members_with(own, spec.service, set(found)), 20.0, "promoted"
                )
                assert {rid: int(m.info["pid"]) for rid, m in members.items() if rid in found} == (
                    found
                )
            finally:
                with contextlib.suppress(Exception):
                    await second.shutdown()
                await asyncio.to_thread(first.runtime.stop_all)
                await own.delete_prefix(keys.service_prefix(spec.service))

    asyncio.run(main())


async def _members_with(store: EtcdStore, service: str, wanted: set[str]) -> Any:
    """The members once they include `wanted` (and there is at least one)."""
    members = await list_members(store, service)
    return members if members and wanted <= set(members) else None


# -- reaction time -------------------------------------------------------------------


async def first_pass(svc: Service, old: set[str], within: float = 15.0) -> tuple[str, float]:
    """The new member (not in `old`) and the wall time its first passed datagram was seen."""

    async def check() -> tuple[str, float] | None:
        for rid, member in (await svc.members()).items():
            if rid in old:
                continue
            with contextlib.suppress(Exception):
                metrics = await scrape(str(member.info["metrics"]), timeout=0.5)
                if metrics.get("vmbox_packets_passed_total", 0.0) > 0:
                    return rid, time.time()
        return None

    return tuple(await until(check, within, "a new replica passing traffic"))


async def reactions(
    endpoints: list[str], tmp_path: Path, warm: int, times: int
) -> tuple[list[float], list[float]]:
    """Seconds from each desired-count write (1 -> 2) to the new replica's first passed
    datagram, and the promote events' seconds from decision to registration."""
    spec = spare_spec(f"react{warm}", warm=warm)
    out: list[float] = []
    rng = random.Random(7)  # the same points of the window with and without a spare
    async with running_service(endpoints, spec, tmp_path / f"warm{warm}") as svc:
        plan = LoadPlan(spec.relay.listen, rate=300, sources=1, flows=64, duration=120.0)
        load = asyncio.create_task(run_load(plan))
        try:
            for _ in range(times):
                if warm:
                    await n_spares(svc, warm)
                # At a random point of the window (a joiner waits for the next one).
                await asyncio.sleep(0.5)
                await until_second(rng.random())
                old = set(await svc.members())
                asked = time.time()
                await svc.scale(2)
                _, passed = await first_pass(svc, old)
                out.append(passed - asked)
                await svc.wait_ready(2)
                await svc.scale(1)
                await until(lambda: _drained(svc), 20.0, "back to one replica, its drain finished")
            recorded = await events.recent(svc.store, spec.service, 200)
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
    registered = [float(e.data["seconds"]) for e in recorded if e.kind == "promote"]
    return out, registered


async def _drained(svc: Service) -> bool:
    return len(await svc.members()) == 1 and not svc.controller.draining


# Slow (38 s): the default suite times reactions with and without a spare in the scaling
# experiment's small run (6 scale-ups each, judged against the goals there:
# tests/integration/test_experiment_scaling.py); this one times manual desired writes.
@pytest.mark.slow
def test_reaction_time_with_and_without_a_warm_spare(etcd: EtcdServer, tmp_path: Path) -> None:
    async def main() -> tuple[list[float], list[float], list[float]]:
        cold, none = await reactions(etcd.endpoints, tmp_path, warm=0, times=5)
        assert none == []  # no spare, no promotion
        warm, registered = await reactions(etcd.endpoints, tmp_path, warm=1, times=5)
        return cold, warm, registered

    cold, warm, registered = asyncio.run(main())
    for name, figures in (("without a spare", cold), ("with a warm spare", warm)):
        print(
            f"desired write -> first passed datagram {name}: min {min(figures):.3f} s, "
            f"median {statistics.median(figures):.3f} s, max {max(figures):.3f} s "
            f"({', '.join(f'{f:.3f}' for f in figures)})"
        )
    print(f"promotion decided -> member registered: {', '.join(f'{r:.3f}' for r in registered)} s")
    # Scale-ups at the same points of the window: a spare is never later (the next
    # boundary after an earlier join), and joins within one window and a little.
    assert statistics.median(warm) < statistics.median(cold), (warm, cold)
    assert max(warm) < 1.3 and max(cold) < 4.0, (warm, cold)
    assert len(registered) == 5 and max(registered) < 0.5, registered
