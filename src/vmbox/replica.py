"""A replica process: spec + store + middlebox + driver + metrics.

Started by a runtime (`vmbox replica --service S --id R --etcd ...`, normally
by vmbox.runtime.local). It reads the service spec from etcd, builds the
middlebox, keeps its shared state fresh through one view per item, binds the
service address (SO_REUSEPORT, shared with its siblings) or, in-path
(`dataplane: nfqueue`), its netfilter queue in the gateway namespace once it
can decide what comes (`_bind`), serves Prometheus metrics, and
registers itself under members/<id> on a lease. Started with `--standby` it is
a warm spare (vmbox.state.standby): spec, store, views and metrics, but
nothing bound and no membership until the controller promotes it
(`_stand_by`); then it joins as a new replica would. A health probe
(vmbox.state.healthprobe) applies the spec's `fail` policy while etcd is away
longer than `store_timeout`. SIGTERM drains
(vmbox.dataplane.drain: the flows in flight finish here, new ones go to the
siblings, for at most `replicas.drain_timeout`), then leaves the membership so
the siblings' shares grow, then exits 0. SIGINT leaves at once and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from vmbox.allocator import MemoryReturn
from vmbox.chain import Chain, Held
from vmbox.dataplane.counters import Counters
from vmbox.dataplane.drain import Drain, DrainResult
from vmbox.dataplane.nfqueue import NfqueueDriver
from vmbox.dataplane.steering import queue_of, replica_number
from vmbox.dataplane.udp import UdpRelay
from vmbox.enforce.kernel import EnforceError, KernelEnforcer
from vmbox.enforce.nftables import NftablesError, Table, kernel_rules
from vmbox.enforce.node import NodeDriver, NodeGone, alive_for
from vmbox.enforce.rates import add_offered, node_rates, source_rates
from vmbox.functions import get_function
from vmbox.group import Group
from vmbox.metrics import ReplicaMetrics
from vmbox.middlebox import Middlebox
from vmbox.packet import Packet, Verdict
from vmbox.spec import GatewaySpec, MiddleboxSpec, Spec, parse_spec
from vmbox.spec.changes import template_of
from vmbox.spec.items import spec_items
from vmbox.state import keys
from vmbox.state.access import AccessError, StoreSpec, connect_kwargs
from vmbox.state.aggregator import Aggregation
from vmbox.state.demand import DemandAware
from vmbox.state.demandsync import DemandSharing
from vmbox.state.epoch import (
    REGISTER_MARGIN_RUNNING,
    REGISTER_MARGIN_STARTING,
    STARTING_FOR,
    ResizeGuard,
    registration_delay,
)
from vmbox.state.epochsync import EpochSync
from vmbox.state.health import FAIL_MODE_CODES
from vmbox.state.healthprobe import HealthProbe
from vmbox.state.keyedsync import KeyedSync
from vmbox.state.membership import Membership
from vmbox.state.standby import Standby
from vmbox.state.store import Store, StoreError
from vmbox.state.views import FencedView, StrongView, View, make_view

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 1.0  # a revoke takes milliseconds; the lease TTL covers a store that is away
INPATH_DRAIN_IDLE = 0.2  # an in-path replica's queue is drained once this long quiet
MARK_TIMEOUT = 0.5  # marking the member info as draining: a drain does not wait longer
MEMORY_CHECK = 1.0  # seconds between checks whether freed memory should go back (allocator.py)


class ReplicaConfigError(Exception):
    """A problem no restart can fix; the process exits with EXIT_CONFIG."""


def flow_budget(wanted: int, reserve: int = 256) -> int:
    """Upstream sockets this process may hold: raise the soft file limit, keep a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(16, min(wanted, soft - reserve))


async def load_service_spec(store: Store, service: str) -> Spec:
    """The spec the controller wrote for `service`."""
    kv = await store.get(keys.spec_key(service))
    if kv is None:
        raise ReplicaConfigError(
            f"no spec for service {service!r} in etcd (is `vmbox up` running?)"
        )
    return parse_spec(json.loads(kv.value), f"etcd {keys.spec_key(service)}")


class Replica:
    """One data-plane replica of a service, wired from its spec."""

    def __init__(
        self,
        spec: Spec,
        replica_id: str,
        store: Store,
        *,
        metrics_port: int = 0,
        standby: bool = False,
        headless: bool = False,
        aggregated: bool = True,
    ) -> None:
        self.spec = spec
        # No sockets (the control-plane simulation, vmbox.experiments.controlplane): no
        # relay, queue or node bound, no metrics server; packets come through `decide`.
        # Everything that talks to the store runs as in a real replica.
        self.headless = headless
        # The group's demand reports and resize acks reach this replica summarised by
        # the service's aggregator (vmbox.state.aggregator); False: by watching every
        # replica's keys itself, the protocol before the aggregator (N^2 watch events),
        # kept for the simulation's before/after comparison.
        self.aggregated = aggregated
        self.standby = standby  # a warm spare until promoted (`_stand_by`)
        self.replica_id = replica_id
        self.store = store
        self.metrics_port = metrics_port
        # Until every member acknowledges a group change, shares stay safe (vmbox.state.epoch);
        # a fresh replica takes nothing until then.
        limiter = spec.ratelimit
        self.guard = ResizeGuard(
            replica_id, spec.window, enabled=limiter is None or limiter.resize_guard
        )
        # The functions in order (vmbox.chain); `middlebox` is the first, which the kernel
        # driver and the demand split follow (a kernel-enforced chain is a ratelimit alone).
        self.chain = Chain(
            [
                (
                    section.function,
                    get_function(section.function).build(section.model_dump(), self.guard.group),
                )
                for section in spec.chain
            ]
        )
        self.middlebox: Middlebox = self.chain.stages[0]
        # A function without keyed tables never answers a Wait (decide's fast path).
        self._process_one = cast(Callable[[Packet, float], Verdict], self.middlebox.process)
        self.epoch = EpochSync(
            store, spec.service, self.guard, self._apply_group, follow_acks=not aggregated
        )
        self.counters = Counters()
        self.memory = MemoryReturn()
        self.views: dict[str, View] = {}
        self.members = 0
        for found in spec_items(spec):
            item, section = found.item, found.section
            assert isinstance(section, MiddleboxSpec), "only a ratelimit declares scalar items"
            self.views[item.name] = make_view(
                section.consistency,
                store,
                keys.state_key(spec.service, item.name),
                item,
                found.seed,
                poll_interval=section.poll_interval,
                on_change=self._on_change(item.name),
                ttl=spec.lease_ttl,
                ack_key=keys.fence_key(spec.service, item.name, replica_id),
            )
            if isinstance(self.views[item.name], FencedView):
                # Closed until its first probe confirms it is current (vmbox.state.fence).
                self.chain.update(values={item.name: item.closed})
        # Keyed tables (a firewall's connections): read on a miss, written behind the
        # packet path, durable where the function asks (vmbox.state.keyedsync).
        self.keyed: dict[str, KeyedSync] = {
            name: KeyedSync(store, keys.keyed_prefix(spec.service, name), table)
            for name, table in self.chain.tables.items()
            if table.shared
        }
        # The fail policy's answer for every packet while the store is down
        # (None: the middlebox decides); the health probe sets and clears it.
        self.fail_verdict: Verdict | None = None
        self.health = HealthProbe(
            store, keys.spec_key(spec.service), spec.store_timeout, spec.fail, self._set_fail
        )
        strong = [v for v in self.views.values() if isinstance(v, StrongView)]
        barrier = self._barrier(strong) if strong else None
        # The driver: a UDP relay, or (dataplane: nfqueue) this replica's queue in the gateway,
        # or (enforce: kernel) this replica's table in its node, which Python follows.
        self.relay: UdpRelay | None = None
        self.inpath: NfqueueDriver | None = None
        self.node: NodeDriver | None = None
        if spec.gateway is not None and spec.gateway.enforce == "kernel":
            self.node = self._node_driver(spec, spec.gateway, replica_id)
        elif spec.gateway is not None:
            try:
                queue = queue_of(spec.service, replica_id, spec.gateway.queue)
            except ValueError as exc:
                raise ReplicaConfigError(f"{exc}: an in-path replica's id says its queue") from None
            self.inpath = NfqueueDriver(
                spec.gateway.namespace,
                queue,
                self.decide if len(self.chain.stages) == 1 and not self.keyed else self.decide_held,
                counters=self.counters,
                barrier=barrier,
            )
        else:
            self.relay = UdpRelay(
                spec.relay.listen,
                spec.relay.upstream,
                self.decide,
                barrier=barrier,
                counters=self.counters,
                idle_timeout=spec.flow_idle_timeout,
                max_flows=flow_budget(spec.max_flows),
            )
        rule_counters = self.node.rule_counters if self.node else self.chain.rule_counters
        self.metrics = ReplicaMetrics(
            spec.service,
            replica_id,
            self.counters,
            self.gauges,
            rule_counters,
            self.chain.verdicts if len(self.chain.stages) > 1 else None,
        )
        self.membership: Membership | None = None
        self.demand: DemandSharing | None = None  # split: demand (vmbox.state.demandsync)
        self.aggregation: Aggregation | None = None  # vmbox.state.aggregator
        self.stopping = asyncio.Event()
        self.drain_first = False  # set by stop(drain=True), i.e. SIGTERM
        self._drain: Drain | None = None
        # Raised by run() once it has left: a config error, or (enforce: kernel) a node gone.
        self.fatal: ReplicaConfigError | NodeGone | None = None
        self.bound = False  # its address or queue is bound (_bind)
        self.created = time.monotonic()  # a process this young is still starting

    def _node_driver(self, spec: Spec, gateway: GatewaySpec, replica_id: str) -> NodeDriver:
        """enforce: kernel: the table of replica <service>-<n> in node n's namespace."""
        try:
            node = replica_number(spec.service, replica_id)
        except ValueError as exc:
            raise ReplicaConfigError(
                f"{exc}: a kernel-enforcing replica's id names its node"
            ) from None
        limiter = spec.chain[0]
        assert isinstance(limiter, MiddleboxSpec), "the spec allows a kernel ratelimit alone"
        try:
            table = Table(
                spec.service,
                kernel_rules(limiter.model_dump()),
                interface=gateway.interface,
                size=limiter.max_sources,  # the sources a replica tracks, as in Python
                demand=limiter.split == "demand",
            )
        except NftablesError as exc:
            raise ReplicaConfigError(str(exc)) from None
        demand = table.demand
        return NodeDriver(
            KernelEnforcer(gateway.node_namespace(node), table),
            lambda: node_rates(self.middlebox, table),
            on_reading=self._node_counted,
            on_gone=self._node_gone,
            sources=(lambda: source_rates(self.middlebox, table)) if demand else None,
            on_offered=(lambda rule, n: add_offered(self.middlebox, rule, n)) if demand else None,
            alive_for=alive_for(spec.lease_ttl),
        )

    def _node_gone(self, gone: NodeGone) -> None:
        """The node's namespace vanished: leave, so the siblings take the share it held."""
        if self.fatal is None:
            self.fatal = gone
        self.stop()

    def _node_counted(self, node: NodeDriver) -> None:
        """The node's table counted: its totals become the replica's traffic counters."""
        totals, counters = node.totals, self.counters
        counters.received, counters.bytes_received = totals.seen.packets, totals.seen.bytes
        counters.dropped = totals.dropped.packets
        counters.passed = totals.seen.packets - totals.dropped.packets
        counters.bytes_passed = totals.seen.bytes - totals.dropped.bytes

    def _on_change(self, name: str) -> Callable[[Any], None]:
        def apply(value: Any) -> None:
            self.chain.update(values={name: value})
            if self.node is not None:
                self.node.changed()

        return apply

    def _set_fail(self, verdict: Verdict | None) -> None:
        self.fail_verdict = verdict
        if self.node is not None:
            self.node.fail(verdict)

    def decide(self, packet: Packet, now: float) -> Verdict:
        """The relay's decide callable: the fail policy's verdict, else the middlebox's.

        For a chain of one function with no keyed state, whose answer is always a verdict.
        """
        if now >= self.epoch.due:
            self.epoch.catch_up(now)  # a resize guard due to lift: before this window starts
        verdict = self.fail_verdict
        if verdict is None:
            return self._process_one(packet, now)
        return verdict

    def decide_held(self, packet: Packet, now: float) -> Verdict | asyncio.Future[Verdict]:
        """The in-path driver's decide callable for a chain: a verdict, or one to come.

        A stage that must wait for a keyed entry (read, or made durable) holds
        this packet alone: the driver gets a future and decides the packets
        behind it meanwhile (vmbox.dataplane.nfqueue).
        """
        if now >= self.epoch.due:
            self.epoch.catch_up(now)
        if self.fail_verdict is not None:
            return self.fail_verdict
        answer = self.chain.process(packet, now)
        if isinstance(answer, Held):
            return asyncio.ensure_future(self._held(packet, answer))
        return answer

    async def _held(self, packet: Packet, held: Held) -> Verdict:
        """Do what each Wait asks, then decide the packet from the stage that waited."""
        answer: Verdict | Held = held
        while isinstance(answer, Held):
            wait = answer.wait
            sync = self.keyed[wait.table]
            if wait.commit:
                await sync.commit(wait.key)
                answer = self.chain.resume(packet, time.time(), answer.stage)
                continue
            try:
                await sync.fetch(wait.key)  # counts this packet among the key's waiters
                if self.fail_verdict is not None:
                    return self.fail_verdict
                answer = self.chain.resume(packet, time.time(), answer.stage)
            finally:
                sync.settled(wait.key)
        return answer

    def _barrier(self, views: list[StrongView]) -> Callable[[], Awaitable[None]]:
        async def read_all() -> None:
            if self.fail_verdict is not None:
                return  # failing closed or open: the answer needs no read
            for view in views:
                await view.read()

        return read_all

    @property
    def relay_driver(self) -> UdpRelay:
        assert self.relay is not None, "a relay service's replica has a relay"
        return self.relay

    @property
    def holding_share(self) -> bool:
        """Registered, the group it sees settled (its resize guard down), and under
        the demand split through the aggregator, its first summary taken (before
        it a window waits for one, vmbox.functions.fixedwindow)."""
        registered = self.membership is not None and self.membership.registered.is_set()
        demand = self.demand
        summarised = demand is None or demand.follow or demand.snapshots > 0
        return registered and not self.guard.guarded and summarised

    @property
    def ready(self) -> bool:
        """Holding its share, its address or queue bound (a readiness probe)."""
        return self.holding_share and self.bound

    def gauges(self) -> dict[str, float]:
        if self.inpath is not None:
            self.inpath.read_kernel_counters()  # the kernel's drops at this queue
        if self.node is not None:
            self.node.read_blocking()  # the table's counters, fresh for this scrape
        values = dict(self.chain.gauges())
        values["members"] = float(self.members)
        values["ready"] = float(self.ready)
        values["standby"] = float(self.standby)
        values["resize_guarded"] = float(self.guard.guarded)
        values["resize_guard_last_seconds"] = self.guard.last_duration
        values["resize_guard_lifts"] = float(self.guard.lifts)
        values["resize_guard_lifted_at"] = self.guard.lifted_at
        values["resize_ack_errors"] = float(self.epoch.ack_errors)
        values["store_stale"] = float(any(v.stale for v in self.views.values()))
        values["store_down_seconds"] = self.health.down_for()
        values["fail_policy_active"] = float(self.health.applying)
        values["fail_mode"] = float(FAIL_MODE_CODES[self.spec.fail])
        values["state_bad_values"] = float(sum(v.bad_values for v in self.views.values()))
        views = self.views.values()
        values["state_watch_events"] = float(sum(v.watch_events for v in views))
        values["state_watch_revision"] = float(max((v.watch_revision for v in views), default=0))
        values["state_watch_reopens"] = float(sum(v.watch_reopens for v in views))
        values["store_watch_resumes"] = float(self.store.watch_resumes)
        fenced = [v for v in views if isinstance(v, FencedView)]
        if fenced:
            values["state_fence_closed"] = float(sum(v.closed for v in fenced))
            values["state_fence_closings"] = float(sum(v.closings for v in fenced))
            values["state_fence_acks"] = float(sum(v.acks for v in fenced))
        if self.demand is not None:
            values.update(self.demand.gauges())
        if self.aggregation is not None:
            values.update(self.aggregation.gauges())
        values.update(self.memory.gauges())
        return values

    def _demand_sharing(self, membership: Membership) -> DemandSharing | None:
        """The demand reporter and watch, when the spec splits by demand."""
        mb = self.spec.ratelimit
        limiter = self.chain.first(DemandAware)
        if mb is None or mb.split != "demand" or limiter is None:
            return None
        return DemandSharing(
            self.store,
            self.spec.service,
            self.replica_id,
            limiter,
            lambda: membership.lease,
            interval=mb.report_interval,
            max_sources=mb.report_max_sources,
            # enforce: kernel: the node's table is what saw the packets; each report
            # first reads it, and each new snapshot of the reports may move its rates.
            gather=self.node.gather if self.node is not None else None,
            on_snapshot=self.node.changed if self.node is not None else None,
            follow=not self.aggregated,
        )

    def _aggregation(self) -> Aggregation | None:
        """The summaries' follower and candidate aggregator (None: the protocol before it)."""
        if not self.aggregated:
            return None
        mb = self.spec.ratelimit
        return Aggregation(
            self.store,
            self.spec.service,
            self.replica_id,
            self._member_lease,
            on_acks=self.epoch.see_summary,
            on_demand=self.demand.take if self.demand is not None else None,
            interval=mb.report_interval if mb is not None else 0.1,
            window=mb.window if mb is not None else 1.0,
        )

    async def _follow_members(self) -> None:
        # Survives store outages: the watches re-list after reconnecting. Members
        # and acks in, each new group (guarded or not) to _apply_group.
        membership = self.membership
        await self.epoch.run(lambda: membership.lease if membership is not None else 0)

    def _apply_group(self, group: Group) -> None:
        self.members = len(set(group.members) | {self.replica_id})
        self.chain.update(group=group)
        if self.node is not None:
            self.node.changed()

    async def run(self) -> None:
        """Serve until `stop()` or cancellation; leave the group on the way out.

        A spare stands by first (`_stand_by`) and starts serving when promoted."""
        if self.node is not None and not self.headless:
            self.node.check()  # a node that is not there: no membership, a restart later
        if not self.standby:
            self.chain.start(time.time())
        if self.relay is not None and not self.headless:
            try:  # resolved now, so the bind at a window boundary is immediate (_bind)
                await self.relay.prepare()
            except OSError as exc:
                raise ReplicaConfigError(str(exc)) from None
        metrics = ""
        if not self.headless:
            port = self.metrics.start(self.spec.metrics_host, self.metrics_port)
            metrics = f"{self.spec.metrics_host}:{port}"
        # `template`: which spec it runs, so a rollout knows whom to replace (vmbox.spec.changes).
        info = {"pid": os.getpid(), "metrics": metrics, "template": template_of(self.spec)}
        self.membership = Membership(
            self.store,
            self.spec.service,
            self.replica_id,
            info,
            ttl=self.spec.lease_ttl,
            on_registered_again=self._registered_again,
            before_register=self._registration_moment,
        )
        for view in self.views.values():
            if isinstance(view, FencedView):
                # The lease its probes keep alive and its acks live on (a spare's is
                # replaced when it is promoted): read through self.membership each time.
                view.lease_of = self._member_lease
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(view.run()) for view in self.views.values()]
            if self.standby:
                await self._stand_by(group, tasks)  # until promoted, or stopped
            tasks.append(group.create_task(self._follow_members()))
            tasks.append(group.create_task(self.membership.run()))
            self.demand = self._demand_sharing(self.membership)
            if self.demand is not None:
                tasks.append(group.create_task(self.demand.run()))
            self.aggregation = self._aggregation()
            if self.aggregation is not None:
                tasks.append(group.create_task(self.aggregation.run()))
            tasks.append(group.create_task(self.health.run()))
            tasks.append(group.create_task(self._return_memory()))
            tasks.extend(group.create_task(sync.run()) for sync in self.keyed.values())
            tasks.append(group.create_task(self._bind(self.membership)))
            await self.stopping.wait()
            if self.drain_first:
                await self._drain_flows()
            await self._leave()
            for task in tasks:
                task.cancel()
        if not self.headless:
            await self._close_driver()
        self.metrics.stop()
        if self.fatal is not None:
            raise self.fatal

    async def _close_driver(self) -> None:
        if self.node is not None:
            # Left: its share is 0 now, and stays so in the table (NodeDriver.stop).
            await self.node.stop(close=True)
        elif self.inpath is not None:
            await self.inpath.close()
        else:
            await self.relay_driver.close()

    def _registered_again(self, lease: int) -> None:
        # The lease was lost (a partition longer than the TTL): the others may have
        # taken this replica's share meanwhile. Start again as a fresh replica does:
        # nothing in the current window (start), nothing until the group has acked
        # it anew (the guard). Before the new lease is used: a fenced item opens
        # only after a probe on it.
        self.chain.start(time.time())
        self.chain.update()
        self.epoch.rejoined()

    async def _registration_moment(self) -> None:
        """Register where the whole group applies the join in the same window
        (vmbox.state.epoch.registration_delay): a process still starting gets a
        wider margin, its loop being slow to apply its own registration."""
        starting = time.monotonic() - self.created < STARTING_FOR
        margin = REGISTER_MARGIN_STARTING if starting else REGISTER_MARGIN_RUNNING
        delay = registration_delay(time.time(), self.spec.window, margin)
        if delay:
            await asyncio.sleep(delay)

    def _member_lease(self) -> int:
        membership = self.membership
        return membership.lease if membership is not None and not self.standby else 0

    async def _return_memory(self) -> None:
        """Give freed memory back once flows and sources have idled out (vmbox.allocator)."""
        while True:
            await asyncio.sleep(MEMORY_CHECK)
            self.chain.idle(time.time())
            held = self.counters.flows + int(self.chain.gauges().get("sources", 0))
            self.memory.check(held, time.monotonic())

    async def _stand_by(self, group: asyncio.TaskGroup, tasks: list[asyncio.Task[Any]]) -> None:
        """A warm spare: registered under standby/<id>, its views running, nothing bound.

        Returns when promoted, as a new replica that is starting: a member on the
        spare's own lease (the member info says when it was promoted), the
        middlebox started now (so it takes nothing in this window); the caller
        then runs the join path, which binds. Returns at once when stopped
        first, having removed its standby key.
        """
        membership = self.membership
        assert membership is not None
        spare = Standby(
            self.store, self.spec.service, self.replica_id, membership.info, self.spec.lease_ttl
        )
        tasks.append(group.create_task(spare.run()))
        order = asyncio.ensure_future(spare.promoted())
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({order, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not order.done():
            order.cancel()
            await asyncio.gather(order, stopped, return_exceptions=True)
            await spare.leave()
            await membership.leave()  # never registered: the join path below ends at once
            return
        promoted = order.result()
        self.membership = Membership(
            self.store,
            self.spec.service,
            self.replica_id,
            membership.info | promoted,
            ttl=self.spec.lease_ttl,
            lease=spare.release(),
            on_registered_again=self._registered_again,
            before_register=self._registration_moment,
        )
        self.standby = False
        self.chain.start(time.time())
        tasks.append(group.create_task(spare.retire(self.membership)))
        log.info("replica %s promoted from standby", self.replica_id)

    async def _bind(self, membership: Membership) -> None:
        """Bind the service address (relay) or this replica's queue (in-path) once it
        can decide packets as the limit allows.

        Until then the kernel hands it nothing: a relay is not yet in the
        SO_REUSEPORT group, so its siblings keep every flow under the shares they
        hold; an in-path queue has no listener, so its flows meet the fail policy
        in the kernel (--queue-bypass passes them under `fail: open`, the rest
        drop). Bound earlier, it would be handed its part of the flows and drop
        them all: a replica takes nothing until it is registered and its resize
        guard is down, nor in the window it started in (its predecessor's
        admissions of that window are unknown). The guard comes down at a window
        boundary, when the siblings' shares shrink, so the flows move as the
        shares do. In-path, the member info then says `queue`, and the
        controller steers to it. A port or queue that cannot be bound stops the
        replica with one line (ReplicaConfigError).
        """
        window = self.spec.window
        started = time.time()
        while not self.holding_share:
            await asyncio.sleep(0.01)
        now = time.time()
        if int(now / window) == int(started / window):
            await asyncio.sleep(window - now % window)
        if self.headless:
            self.bound = True
            return
        try:
            if self.node is not None:
                await self.node.start()
            elif self.inpath is not None:
                await self.inpath.start()
            else:
                await self.relay_driver.start()
        except NodeGone as exc:
            self.fatal = exc
            self.stop()
            return
        except OSError as exc:
            self.fatal = ReplicaConfigError(str(exc))
            self.stop()
            return
        self.bound = True
        if self.inpath is not None:
            where: dict[str, Any] = {"queue": self.inpath.queue}
        elif self.node is not None:
            where = {"node": replica_number(self.spec.service, self.replica_id)}
        else:
            return
        while True:  # until the controller can see it: it steers nothing here before
            try:
                async with asyncio.timeout(MARK_TIMEOUT * 4):
                    await membership.set_info(membership.info | where)
                return
            except (StoreError, TimeoutError):
                await asyncio.sleep(0.2)

    def _no_drain_because(self) -> str:
        """Why draining would be pointless now ('' when it is not)."""
        if self.membership is None or not self.membership.registered.is_set():
            return "never registered"
        if not self.bound:
            return "never bound"  # the kernel handed it nothing
        if self.membership.last_error is not None:
            return "store unreachable"
        if self.members <= 1:
            return "only member"  # no sibling would take the flows after it
        return ""

    async def _drain_flows(self) -> None:
        """Finish the flows in flight while still a member (holding its share); log one line."""
        started = time.monotonic()
        reason = self._no_drain_because()
        try:
            if reason:
                result = DrainResult(skipped=reason)
            elif self.node is not None:
                # Nothing in flight here: the node's table goes on deciding, at a share of 0
                # once this replica leaves (the controller routes the node out first).
                await self._mark_draining()
                return
            elif self.inpath is not None:
                # The controller took this queue out of the steering before SIGTERM:
                # what is still queued is decided here, nothing new arrives.
                await self._mark_draining()
                await self.inpath.drain(INPATH_DRAIN_IDLE, self.spec.replicas.drain_timeout)
                quiet = time.monotonic() - started
                log.info("replica %s drained its queue in %.2fs", self.replica_id, quiet)
                return
            else:
                self._drain = Drain(
                    self.relay_driver,
                    timeout=self.spec.replicas.drain_timeout,
                    window=self.spec.window,
                )
                await self._drain.begin()
                await self._mark_draining()
                result = await self._drain.finish()
        except Exception as exc:
            # Leaving and exiting matter more than the flows in flight.
            log.warning(
                "replica %s: drain failed after %.2fs: %s",
                self.replica_id,
                time.monotonic() - started,
                exc,
            )
            return
        log.info("replica %s %s", self.replica_id, result.line())

    async def _mark_draining(self) -> None:
        """Say so in the member info: a controller started meanwhile must not take this
        replica for a running one (and its exit for a crash). Best effort, within the
        drain's own time: the drain goes on either way."""
        membership = self.membership
        if membership is None:
            return
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(MARK_TIMEOUT):
                await membership.set_info(membership.info | {"draining": True})

    async def _leave(self) -> None:
        # Take nothing from here on: the siblings' shares grow once the lease goes.
        self.epoch.leaving()
        for sync in self.keyed.values():
            # The connections' latest states, for the siblings that carry them on.
            with contextlib.suppress(StoreError, asyncio.TimeoutError):
                await asyncio.wait_for(sync.flush(), LEAVE_TIMEOUT)
        if self.node is not None and self.bound:
            # In the node's table before the lease goes, not when its task comes to it.
            with contextlib.suppress(EnforceError, asyncio.TimeoutError):
                await asyncio.wait_for(self.node.sync(), LEAVE_TIMEOUT)
        if self.membership is not None:
            with contextlib.suppress(StoreError, asyncio.TimeoutError):
                await asyncio.wait_for(self.membership.leave(), LEAVE_TIMEOUT)

    def stop(self, drain: bool = False) -> None:
        """Stop serving: drain first (SIGTERM), or at once (SIGINT, which cuts a drain short)."""
        if not drain:
            self.drain_first = False
            if self._drain is not None:
                self._drain.cut_short()
        elif not self.stopping.is_set():
            self.drain_first = True
        self.stopping.set()


async def replica_main(
    service: str, replica_id: str, target: StoreSpec, metrics_port: int, standby: bool = False
) -> int:
    """Entry point of a replica process (a warm spare if `standby`); returns the exit code."""
    from vmbox.state.etcd import connect

    try:
        settings = connect_kwargs(target)
    except AccessError as exc:
        raise ReplicaConfigError(str(exc)) from None  # a restart reads the same files
    store = await connect(target.endpoints, **settings)
    try:
        spec = await load_service_spec(store, service)
        replica = Replica(spec, replica_id, store, metrics_port=metrics_port, standby=standby)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, replica.stop, True)
        loop.add_signal_handler(signal.SIGINT, replica.stop)
        try:
            await replica.run()
        except NodeGone as exc:
            # Not a config error: the controller restarts it (with backoff) as after a crash.
            log.error("%s", exc)
            return 1
        return 0
    finally:
        await store.close()
