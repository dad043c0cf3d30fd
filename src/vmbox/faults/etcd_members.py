"""The etcd member loss fault: a three-member etcd loses its leader, a follower, its quorum.

Registered in vmbox.faults. Two replicas (watch mode, fail policy static,
limit 100/s per source) run against a three-member etcd on loopback, under a
steady load from two sources at 1.5x the limit and a forwarding probe
(vmbox.faults.probe) from eight more. Per cycle (one small, two full):

- kill -9 the leader; the cluster runs on two members for a while; restart it;
- kill -9 a follower; the same;
- stop two members (quorum lost) for longer than store_timeout, so the fail
  policy takes over; start them again.

Throughout, the probe measures the worst gap in forwarding. After each fault
the replicas' member leases must be the ones they had (not re-registered),
and a write of the limit (its own value again) must reach every replica's
watch: at the end each replica's watch must have delivered every such write,
once (vmbox_state_watch_events), and a client watch must have seen every
revision a writer got acknowledged throughout (vmbox.faults.revisions). Last,
control must have come back by itself: the desired count goes 2 -> 3 and a
third replica must start and become ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from vmbox.etcdserver import EtcdCluster
from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.probe import Prober
from vmbox.faults.revisions import RevisionCheck
from vmbox.faults.sampler import ReplicaSampler, finish
from vmbox.faults.service import LIMIT, fault_spec, steady_load
from vmbox.faults.snapshot import read_state
from vmbox.faults.traffic import over_limit, received_between
from vmbox.state import access, keys
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import list_members
from vmbox.testbed import Service, private_etcd, running_service, store_access

SOURCES = 2  # load sources at 1.5x the limit
HOLD = 2.0  # seconds the cluster runs a member short before it comes back
OUTAGE = {"small": 4.5, "full": 6.0}  # seconds without quorum (store_timeout is 3 s)
CYCLES = {"small": 1, "full": 2}
SEEN_WITHIN = 10.0  # seconds for a write to reach the replicas, a replica to be ready


async def _until(test: Callable[[], Awaitable[bool]], within: float) -> float | None:
    """Seconds until `test()` held, None if it did not within `within`."""
    started = time.monotonic()
    while not await test():
        if time.monotonic() - started > within:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class _Run:
    """One service on one cluster, and what the faults did to it."""

    def __init__(
        self,
        cluster: EtcdCluster,
        writer: EtcdStore,
        service: Service,
        sampler: ReplicaSampler,
        probe: Prober,
        result: FaultResult,
        say: Say,
    ) -> None:
        self.cluster = cluster
        self.writer = writer
        self.service = service
        self.sampler = sampler
        self.probe = probe
        self.result = result
        self.say = say
        self.name = service.spec.service
        self.leases: dict[str, int] = {}
        self.limit_writes = 0
        self.gaps: dict[str, float] = {}  # fault -> worst forwarding gap (s)
        self.stalls: dict[str, float] = {}  # fault -> the probe's own worst stall (s)

    async def members(self) -> dict[str, int]:
        return {rid: m.lease for rid, m in (await list_members(self.writer, self.name)).items()}

    async def leader(self) -> int | None:
        return await asyncio.to_thread(self.cluster.leader_index)

    async def write_limit(self, value: bytes) -> None:
        """Write the limit (its own value again); every replica's watch must deliver it."""
        revision = await self.writer.put(keys.state_key(self.name, "limit"), value)
        self.limit_writes += 1
        took = await self.sampler.until_every(
            lambda m: m.get("vmbox_state_watch_revision", 0.0) >= revision, SEEN_WITHIN
        )
        self.result.check(took is not None, f"a limit write (rev {revision}) missed a replica")

    async def kill(self, which: str, limit: bytes) -> None:
        """kill -9 the leader or a follower, run without it for HOLD s, restart it."""
        leader = await self.leader()
        if leader is None:
            self.result.problems.append(f"no leader before the {which} kill")
            return
        victim = leader if which == "leader" else (leader + 1) % 3
        started = time.monotonic()
        await asyncio.to_thread(self.cluster.kill_member, victim)
        self.result.injected += 1

        async def elected() -> bool:
            return await self.leader() not in (None, victim)

        took = await _until(elected, SEEN_WITHIN)
        self.result.check(took is not None, f"no new leader after the {which} kill")
        if which == "leader" and took is not None:
            self.result.figures["election_max"] = max(
                self.result.figures.get("election_max", 0.0), took
            )
        await asyncio.sleep(HOLD)
        await self.write_limit(limit)  # the watches work on two members
        await asyncio.to_thread(self.cluster.start_member, victim)
        self._gap(f"{which} kill", started)
        kept = await self.members() == self.leases
        self.result.check(kept, f"member leases changed over the {which} kill")
        leading = f"new leader in {took or 0:.2f} s" if which == "leader" else "leader stayed"
        self.say(f"{which} (m{victim}) killed: {leading}, {self.gap_line(which + ' kill')}")

    async def lose_quorum(self, outage: float, limit: bytes) -> None:
        """Stop the leader and a follower for `outage` s; then start both again."""
        leader = await self.leader() or 0
        stopped = [leader, (leader + 1) % 3]
        started = time.monotonic()
        for index in stopped:
            await asyncio.to_thread(self.cluster.stop_member, index, 5)
            self.result.injected += 1
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - started)))
        await self.sampler.scrape()
        applied = [m.get("vmbox_fail_policy_active", 0.0) for m in self.sampler.last.values()]
        self.result.check(all(applied), f"the fail policy was not applied by all: {applied}")
        back = time.monotonic()
        for index in stopped:
            await asyncio.to_thread(self.cluster.start_member, index)
        took = await self.sampler.until_every(
            lambda m: m.get("vmbox_store_down_seconds", 1.0) == 0.0, SEEN_WITHIN
        )
        self.result.check(took is not None, "the replicas did not see etcd back")
        self._gap("quorum loss", started)
        await self.write_limit(limit)
        kept = await self.members() == self.leases
        self.result.figures["leases_kept_quorum"] = float(kept)
        self.result.check(len(await self.members()) == 2, "a replica lost its membership")
        self.result.figures["recovered_max"] = max(
            self.result.figures.get("recovered_max", 0.0), time.monotonic() - back
        )
        self.say(
            f"quorum lost for {outage:.1f} s: etcd back and seen in {took or 0:.2f} s, "
            f"{self.gap_line('quorum loss')}, "
            f"leases {'kept' if kept else 'renewed'}"
        )

    def gap_line(self, fault: str) -> str:
        gap, stall = self.gaps.get(fault, 0.0), self.stalls.get(fault, 0.0)
        return f"worst forwarding gap {gap * 1000:.0f} ms (probe's own stall {stall * 1000:.0f} ms)"

    def _gap(self, fault: str, started: float) -> None:
        now = time.monotonic()
        self.gaps[fault] = max(self.gaps.get(fault, 0.0), self.probe.gap(started, now))
        self.stalls[fault] = max(self.stalls.get(fault, 0.0), self.probe.send_gap(started, now))

    async def scale_up(self) -> None:
        """Control came back by itself: desired 2 -> 3 starts a third replica, ready."""
        await self.writer.put(keys.desired_key(self.name), b"3")

        async def three() -> bool:
            return len(await self.members()) == 3 and self.service.controller.desired == 3

        took = await _until(three, SEEN_WITHIN)
        self.result.check(took is not None, "desired 3 after the faults: no third replica")
        self.result.figures["scale_up_seconds"] = took if took is not None else -1.0


async def etcd_members(scale: Scale, say: Say) -> FaultResult:
    result = FaultResult("etcd member loss", survived=True)
    async with private_etcd(3) as (cluster, store):
        secured = store_access(cluster.endpoints)  # its `vmbox` user, as every client's
        login = access.connect_kwargs(secured) if secured is not None else {}
        writer = await connect(cluster.endpoints, timeout=10, **login)  # a client of its own
        try:
            make_spec = lambda: fault_spec("etcdloss", 2)  # noqa: E731
            async with running_service(store, make_spec) as service:
                result = await _inject(cluster, writer, service, scale, say, result)
        finally:
            await writer.close()
    return result


async def _inject(
    cluster: EtcdCluster,
    writer: EtcdStore,
    service: Service,
    scale: Scale,
    say: Say,
    result: FaultResult,
) -> FaultResult:
    name = service.spec.service
    before = await read_state(service.store, name)
    limit = before[keys.state_key(name, "limit").removeprefix(keys.service_prefix(name))]
    watch_key = keys.service_prefix(name) + "fault/watched"
    load = asyncio.create_task(steady_load(service.spec.relay.listen, SOURCES, duration=300))
    try:
        async with (
            ReplicaSampler(service) as sampler,
            Prober(service.spec.relay.listen) as probe,
            RevisionCheck(service.store, writer, watch_key) as revisions,
        ):
            run = _Run(cluster, writer, service, sampler, probe, result, say)
            run.leases = await run.members()
            first = int(time.time()) + 1
            events0 = {
                rid: m.get("vmbox_state_watch_events", 0.0) for rid, m in sampler.last.items()
            }
            resumes0 = service.store.watch_resumes, sampler.total("vmbox_store_watch_resumes")
            await asyncio.sleep(1.0)
            for _ in range(CYCLES[scale]):
                await run.kill("leader", limit)
                await run.kill("follower", limit)
                await run.lose_quorum(OUTAGE[scale], limit)
            result.problems.extend(await revisions.verify())
            await sampler.scrape()
            for rid, metrics in sampler.last.items():
                delivered = metrics.get("vmbox_state_watch_events", 0.0) - events0.get(rid, 0.0)
                result.check(
                    delivered == run.limit_writes,
                    f"{rid}'s watch delivered {delivered:.0f} of {run.limit_writes} limit writes",
                )
            resumed = (
                service.store.watch_resumes - resumes0[0],
                sampler.total("vmbox_store_watch_resumes") - resumes0[1],
            )
            last = int(time.time()) - 1
            await run.scale_up()
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)

    def allowed(second: int) -> int | None:
        """The load's limit and every probe datagram sent (each far under its limit)."""
        return LIMIT * SOURCES + probe.sent_per_second[second] if first <= second <= last else None

    result.over_limit = over_limit(service.echo.history, allowed)
    quietest = min(received_between(service.echo.history, first, last))
    result.check(quietest > 0, "a whole second passed with nothing forwarded")
    after = await read_state(service.store, name)
    desired = keys.desired_key(name).removeprefix(keys.service_prefix(name))
    finish(result, sampler, before, after, written={desired: b"3"})
    worst = max(run.gaps.values(), default=0.0)
    policy = sampler.highest.get("vmbox_fail_policy_active", 0.0)
    stall = max(run.stalls.values(), default=0.0)
    result.figures |= {
        "worst_gap": worst,
        "worst_stall": stall,
        "acked": len(revisions.acked),
        "seen": len(revisions.seen),
        "limit_writes": run.limit_writes,
        "policy_max": policy,
        "resumed": resumed[0] + resumed[1],
    }
    result.notes += [
        f"leader change: new leader within {result.figures.get('election_max', 0):.2f} s; "
        f"{run.gap_line('leader kill')}; a probe every {probe.interval * 1000:.0f} ms",
        f"quorum lost {OUTAGE[scale]:.1f} s: static policy held; control back within "
        f"{result.figures.get('recovered_max', 0):.1f} s; 2->3 in "
        f"{result.figures.get('scale_up_seconds', 0):.1f} s",
        f"watch: {len(set(revisions.acked) & set(revisions.seen))} of "
        f"{len(revisions.acked)} acked revisions seen ({len(revisions.seen)} delivered, "
        f"{len(revisions.unacknowledged())} of them from puts that failed or were retried "
        f"and etcd committed all the same); "
        f"{run.limit_writes} limit writes, each seen by every replica's watch; "
        f"watch streams resumed {resumed[0]} times here, {resumed[1]:.0f} in the replicas",
    ]
    return result
