"""The reconcile loop of one service: keep it at its desired replica count.

Called by `vmbox up` (and `vmbox demo`). Level-based, like controller-runtime:
each pass reads what is (running replicas, desired count in etcd) and acts
toward what should be; a missed event is healed by the next pass. Store errors
requeue the pass with backoff; a replica that cannot start for a reason no
restart fixes (busy port, bad spec) raises PermanentError.

A pass reads, plans and acts: what it decides is the pure function
vmbox.control.plan.plan (tested on a fake clock), and it returns when the next
crashed replica is due for a restart, so `run` sleeps `min(tick, that)`.

Beside the reconcile loop runs the sampling loop (vmbox.control.scaling), which
moves the desired count when the spec asks for autoscaling. A surplus replica
is the least loaded one; it is drained (SIGTERM: it keeps its open flows for
up to `replicas.drain_timeout`, then leaves the membership) in the background,
so a scale-up never waits for a scale-down to finish.

Spec changes (`vmbox apply`, vmbox.spec.changes): each pass reads the spec
key and follows a new spec: the controller's own fields at once, a rollout
when what the replicas run changed (plan invariant 7: one more replica with
the new spec, then an old one drained, until none is left). A stored spec
that changes what cannot change live is ignored, with an event.

Warm spares (`replicas.warm`, vmbox.state.standby): the controller keeps
min(warm, max - desired) replicas started with `--standby`. A scale-up
promotes a spare (writes its promote key) instead of starting a process, and
starts a new spare behind it; a `promote` event records the seconds from that
decision to the spare's member registration. Excess spares are stopped
without a drain; a crashed spare is restarted as a spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Set

from vmbox.control import events
from vmbox.control.exporter import ControllerMetrics, ControllerView
from vmbox.control.inpath import PathSteering
from vmbox.control.nodes import FleetRoute, NodeTables
from vmbox.control.plan import (
    Backoff,
    Observed,
    crashed,
    plan,
    restart_delay,
    serving,
    spares_wanted,
)
from vmbox.control.publish import publish
from vmbox.control.scaling import ScaleLoop
from vmbox.enforce.node import alive_for
from vmbox.runtime.base import EXIT_CONFIG, Exited, ExitWatch, Runtime
from vmbox.spec import Spec, SpecError, parse_spec
from vmbox.spec.changes import diff, template_of
from vmbox.state import keys
from vmbox.state.membership import MemberInfo, list_members
from vmbox.state.standby import list_promotions, list_standby, promote
from vmbox.state.store import Store, StoreError

log = logging.getLogger(__name__)

STOP_MARGIN = 3.0  # beyond the drain timeout, before a draining replica is killed
# enforce: kernel: how long a dead replica's place (its lease) is kept for its restart,
# and how often it is refreshed meanwhile (at most a third of the lease's TTL)
HOLD_PLACE, HOLD_REFRESH = 10.0, 0.5


class PermanentError(Exception):
    """The service cannot run as specified; retrying will not help."""


class Controller:
    """Keeps one service at its desired count on a runtime."""

    def __init__(
        self,
        spec: Spec,
        store: Store,
        runtime: Runtime,
        *,
        tick: float = 1.0,
        on_event: Callable[[events.Event], None] | None = None,
        metrics_port: int | None = 0,
    ) -> None:
        self.spec = spec
        self.store = store
        self.runtime = runtime
        self.tick = tick
        self.on_event = on_event
        self.desired = spec.replicas.count
        self.backoff: dict[str, Backoff] = {}
        self.draining: dict[str, asyncio.Task[float]] = {}
        # enforce: kernel: dead replicas whose place is kept for their restart (_hold_place)
        self.holding: dict[str, asyncio.Task[None]] = {}
        self.spares: set[str] = set()  # running warm spares, not promoted
        self.promoting: set[str] = set()  # promoted spares not yet seen as members
        self.spares_stopping: set[str] = set()  # spares among `draining` (no drain: no flows)
        self.restarts = 0
        self.template = template_of(spec)  # what replicas started now run (member info)
        self.stored_spec = spec.to_json().encode()  # the spec key's value last followed
        self.wake = asyncio.Event()
        # An in-path service: the gateway's steering follows the serving replicas; under
        # enforce: kernel each replica's node holds a table, which leaves with the service.
        # With a lab's fleet in front (gateway.lab), its route follows them as steering does.
        gateway = spec.gateway
        kernel = gateway is not None and gateway.enforce == "kernel"
        self.path: PathSteering | FleetRoute | None = None
        if gateway is not None and not kernel:
            self.path = PathSteering(spec, gateway)
        elif gateway is not None and gateway.lab is not None:
            self.path = FleetRoute(spec, gateway.lab)
        self.tables = NodeTables(spec, gateway) if gateway and kernel else None
        self.alive_for = alive_for(spec.lease_ttl)  # a table's dead man's switch
        self.scaler = ScaleLoop(
            spec,
            store,
            runtime,
            current=lambda: self.desired,
            decided=self._decided,
            event=self.event,
        )
        self.metrics_port = metrics_port
        self.metrics = ControllerMetrics(
            ControllerView(
                spec.service,
                desired=lambda: self.desired,
                running=lambda: len(set(self.runtime.running()) - self.spares),
                spares=lambda: len(self.spares),
                restarts=lambda: self.restarts,
                stats=lambda: self.scaler.stats,
            )
        )

    def _decided(self, desired: int) -> None:
        self.desired = desired
        self.wake.set()

    @property
    def service(self) -> str:
        return self.spec.service

    async def event(self, kind: str, message: str, **data: object) -> None:
        log.info("%s: %s", kind, message)
        try:
            ev = await events.record(self.store, self.service, kind, message, **data)
        except StoreError:
            ev = events.Event(time.time(), kind, message, dict(data))
        if self.on_event is not None:
            self.on_event(ev)

    async def setup(self) -> None:
        """Write the spec, desired count and state seeds; adopt running replicas."""
        old_spec = await publish(self.store, self.spec)
        current = await self.store.get(keys.desired_key(self.service))
        count_changed = old_spec is None or old_spec.get("replicas", {}).get("count") != (
            self.spec.replicas.count
        )
        if current is None or count_changed:
            await self.store.put(keys.desired_key(self.service), str(self.desired).encode())
        # A restarted controller keeps the count `vmbox scale` (or the autoscaler) set;
        # starting from the spec's would record a scale that never happened.
        self.desired = await self.read_desired()
        await self._adopt()
        if self.path is not None:
            await self._install_path()

    async def _adopt(self) -> None:
        """Take over the replicas still running; one that is draining (a controller
        before this one was stopping it) goes on draining and counts as leaving."""
        members = await list_members(self.store, self.service)
        for rid, member in sorted(members.items()):
            pid = member.info.get("pid")
            if not isinstance(pid, int) or not self.runtime.adopt(rid, pid):
                continue
            if member.info.get("draining"):
                self._drain(rid)
                message = f"adopted draining replica {rid} (pid {pid}); it finishes and exits"
                await self.event("adopt", message, replica=rid, draining=True)
            else:
                await self.event("adopt", f"adopted running replica {rid} (pid {pid})", replica=rid)
        await self._adopt_spares()

    async def _adopt_spares(self) -> None:
        """Take over the warm spares still running; one whose promote key is there was
        being promoted (it joins by itself) and counts as serving."""
        orders = await list_promotions(self.store, self.service)
        for rid, info in sorted((await list_standby(self.store, self.service)).items()):
            pid = info.get("pid")
            if not isinstance(pid, int) or not self.runtime.adopt(rid, pid):
                continue
            if rid in orders:
                self.promoting.add(rid)
                await self.event(
                    "adopt",
                    f"adopted spare {rid} (pid {pid}) being promoted",
                    replica=rid,
                    promoting=True,
                )
            else:
                self.spares.add(rid)
                await self.event(
                    "adopt", f"adopted spare {rid} (pid {pid})", replica=rid, standby=True
                )
        for rid in orders.keys() - set(self.runtime.running()):
            with contextlib.suppress(StoreError):  # an order for a spare that is gone
                await self.store.delete(keys.promote_key(self.service, rid))

    async def read_desired(self) -> int:
        kv = await self.store.get(keys.desired_key(self.service))
        lo, hi = self.spec.replicas.min, self.spec.replicas.max
        try:
            wanted = int(kv.value) if kv is not None else self.spec.replicas.count
        except ValueError:
            log.warning("ignoring unparseable desired count %r", kv.value if kv else None)
            return self.desired
        return max(lo, min(hi, wanted))

    async def reconcile(self) -> float | None:
        """One level-based pass: read, plan, act; returns seconds until a restart is due."""
        ended = [(exited, self._note_exit(exited)) for exited in self.runtime.reap()]
        if ended and self.path is not None:
            # In-path, a crashed replica's queue leaves the steering first (plan.serving),
            # before the store writes below: until then its flows meet a queue nobody reads.
            # The store unreachable: the plan's steering below, or the pass's retry, does it.
            with contextlib.suppress(StoreError):
                bound = await self._bound()
                await self._steer(bound, set(self.runtime.running()), set(self.draining))
        for exited, standby in ended:
            await self._on_exit(exited, standby)
        await self._finish_drains()
        await self._follow_spec()
        desired = await self.read_desired()
        if desired != self.desired:
            await self.event(
                "scale",
                f"desired replicas {self.desired} -> {desired}",
                old=self.desired,
                new=desired,
            )
            self.desired = desired
        outdated, ready = await self._templates()
        seen = Observed(
            service=self.service,
            desired=self.desired,
            running=set(self.runtime.running()),
            draining=set(self.draining),
            backoff=dict(self.backoff),
            now=time.monotonic(),
            load=self.scaler.load(),
            spares=set(self.spares),
            spares_wanted=spares_wanted(
                self.spec.replicas.warm, self.spec.replicas.max, self.desired
            ),
            outdated=outdated,
            ready=ready,
        )
        actions = plan(seen)
        for rid in actions.forget:
            del self.backoff[rid]  # a crashed replica that is no longer wanted
        for rid in actions.promote:
            await self._promote(rid, actions.backoff.get(rid))
        if self.path is not None:
            # Before any drain: a leaving replica's queue is out of the path first.
            # `ready` is the bound replicas in-path: one members read a pass serves both.
            await self._steer(ready, seen.running, set(seen.draining) | set(actions.drain))
        for rid in actions.drain:
            self._drain(rid)
        for rid in actions.stop_spare:
            self._drain(rid, spare=True)
        for rid in actions.restart:
            await self._start(rid, restart=actions.backoff[rid])
        for rid in actions.start:
            await self._start(rid)
        for rid in actions.start_spare:
            await self._start(rid, standby=True)
        if self.promoting:
            await self._promotions_done()
        return actions.requeue_after

    async def _follow_spec(self) -> None:
        """Take up a spec written since (`vmbox apply`): the next plan follows it."""
        kv = await self.store.get(keys.spec_key(self.service))
        if kv is None or kv.value == self.stored_spec:
            return
        self.stored_spec = kv.value  # judged once, followed or not
        try:
            new = parse_spec(json.loads(kv.value), "stored spec")
        except (SpecError, ValueError) as exc:
            await self.event("apply", f"stored spec ignored: {exc}")
            return
        changes = diff(self.spec, new)
        if changes.refusal:
            await self.event("apply", f"stored spec ignored: {changes.refusal}")
            return
        if changes.empty:
            return
        template = template_of(new)
        rollout = template != self.template
        self.spec, self.template = new, template
        self.scaler.respec(new)
        what = f"; rolling out: replicas replaced one at a time ({template})" if rollout else ""
        await self.event(
            "apply",
            f"spec applied: {', '.join(c.path for c in changes.changes)}{what}",
            changes=[c.path for c in changes.changes],
            rollout=rollout,
        )

    async def _templates(self) -> tuple[set[str], set[str]]:
        """Registered replicas (and spares) running an older spec, and the ready members
        (in-path: those whose queue is bound)."""
        members = await list_members(self.store, self.service)
        ready = set(members) if self.path is None else _in_path(members)
        outdated = {r for r, m in members.items() if m.info.get("template") != self.template}
        if self.spares:
            spares = await list_standby(self.store, self.service)
            outdated |= {r for r, info in spares.items() if info.get("template") != self.template}
        return outdated, ready

    async def _promote(self, rid: str, backoff: Backoff | None) -> None:
        """Order a spare to join the group; it serves from here on, for this controller."""
        await promote(self.store, self.service, rid, time.time())
        self.spares.discard(rid)
        self.promoting.add(rid)
        if backoff is not None:
            self.backoff[rid] = backoff  # no longer a spare's: a crash restarts it serving

    async def _promotions_done(self) -> None:
        """A `promote` event for each promoted spare now registered as a member, with the
        seconds from the decision to its registration (both in its member info)."""
        members = await list_members(self.store, self.service)
        for rid in sorted(self.promoting & set(members)):
            self.promoting.discard(rid)
            info = members[rid].info
            decided, at = info.get("decided"), info.get("promoted_at")
            took = at - decided if isinstance(decided, float) and isinstance(at, float) else None
            shown = f" {took:.3f}s after the decision" if took is not None else ""
            await self.event(
                "promote",
                f"spare {rid} (pid {info.get('pid')}) promoted: a member{shown}",
                replica=rid,
                seconds=took,
                decided_at=decided,
            )

    async def _install_path(self) -> None:
        """Put the service in the gateway's path, steering to the replicas adopted."""
        assert self.path is not None
        replicas = serving(
            await self._bound(),
            set(self.runtime.running()),
            self.backoff,
            set(self.draining),
            keep_crashed=self.tables is not None,
        )
        try:
            await self.path.install(replicas)
        except OSError as exc:
            raise PermanentError(str(exc)) from None
        await self.event("steer", f"in the path: {self.path.describe()}")

    async def _bound(self) -> set[str]:
        """Registered replicas whose queue or table is in place (their member info says)."""
        return _in_path(await list_members(self.store, self.service))

    async def _steer(self, bound: Set[str], running: Set[str], leaving: Set[str]) -> None:
        """Rewrite the gateway's steering when the serving replicas changed."""
        assert self.path is not None
        # Under enforce: kernel a dead replica's node table goes on enforcing its share
        # while its place is held (_hold_place): its node stays in the route.
        keep = self.tables is not None
        replicas = serving(bound, set(running), self.backoff, leaving, keep_crashed=keep)
        before = self.path.describe()
        try:
            changed = await self.path.sync(replicas)
        except OSError as exc:  # the next pass tries again
            await self.event("steer", f"steering not rewritten: {exc}")
            return
        if changed:
            await self.event(
                "steer",
                f"steering {before} -> {self.path.describe()}",
                replicas=list(replicas),
            )

    async def _start(self, rid: str, restart: Backoff | None = None, standby: bool = False) -> None:
        standby = standby or (restart is not None and restart.standby)
        if standby:
            # A promote order left behind for this id must not promote the new spare.
            await self.store.delete(keys.promote_key(self.service, rid))
        self.runtime.start(rid, standby=standby)
        if standby:
            self.spares.add(rid)
        if restart is not None:
            self.backoff[rid] = restart  # no longer waiting
            self.restarts += 1
        what = "spare" if standby else "replica"
        await self.event("start", f"started {what} {rid}", replica=rid, standby=standby)

    def _drain(self, rid: str, spare: bool = False) -> None:
        """Stop one replica in the background: it drains, leaves, exits (or is killed).
        A spare holds no flows: it leaves at once."""
        self.backoff.pop(rid, None)
        timeout = self.spec.replicas.drain_timeout + STOP_MARGIN
        if spare:
            self.spares.discard(rid)
            self.spares_stopping.add(rid)

        def stop() -> float:
            started = time.monotonic()
            self.runtime.stop(rid, timeout)
            return time.monotonic() - started

        self.draining[rid] = asyncio.create_task(asyncio.to_thread(stop))

    async def _finish_drains(self) -> None:
        for rid, task in list(self.draining.items()):
            if task.done():
                del self.draining[rid]
                spare = rid in self.spares_stopping
                self.spares_stopping.discard(rid)
                try:
                    took = task.result()
                except Exception as exc:  # one failed stop must not end the reconcile loop
                    await self.event("stop", f"stopping replica {rid} failed: {exc}", replica=rid)
                    continue
                what = "stopped spare" if spare else "drained and stopped replica"
                await self.event("stop", f"{what} {rid} in {took:.1f}s", replica=rid)

    def _note_exit(self, exited: Exited) -> bool:
        """Book a replica's exit: its crash backoff (a spare's if it was one, returned)."""
        rid = exited.replica_id
        standby = rid in self.spares
        self.spares.discard(rid)
        self.promoting.discard(rid)
        now = time.monotonic()
        self.backoff[rid] = crashed(self.backoff.get(rid), exited.ran_for, now, standby)
        return standby

    async def _on_exit(self, exited: Exited, standby: bool) -> None:
        """Act on a booked exit: its member goes (or its place is held), and an event."""
        rid = exited.replica_id
        member = (await self._members()).get(rid)
        if self.tables is not None and not standby and member is not None and member.lease:
            # Its node's table goes on enforcing its last share: keep its place in the
            # group (the lease) for its restart rather than let the others take the share.
            self.holding[rid] = asyncio.create_task(self._hold_place(rid, member.lease))
        else:
            await self._revoke_member(rid)
        if exited.exit_code == EXIT_CONFIG:
            await self.event("failed", f"replica {rid} cannot run: {exited.last_log_line}")
            raise PermanentError(
                exited.last_log_line or f"replica {rid} exited with a config error"
            )
        delay = restart_delay(self.backoff[rid].failures)
        detail = f": {exited.last_log_line}" if exited.last_log_line else ""
        what = "spare" if standby else "replica"
        await self.event(
            "crash",
            f"{what} {rid} exited (code {exited.exit_code}){detail}; restarting in {delay:.1f}s",
            replica=rid,
            code=exited.exit_code,
            standby=standby,
        )

    async def _members(self) -> Mapping[str, MemberInfo]:
        with contextlib.suppress(StoreError):
            return await list_members(self.store, self.service)
        return {}

    async def _hold_place(self, rid: str, lease: int) -> None:
        """enforce: kernel: a dead replica's table keeps its last share; keep its member
        lease alive until its restart has registered (on a lease of its own), whose table
        then replaces the old one at the same share: no share moves, no packet is lost.

        Not back within HOLD_PLACE seconds (a crash loop, a node gone), or the store in
        the way: close its table (drop everything there), then revoke the lease, in this
        order, since the siblings' shares grow as soon as the member goes."""
        interval = min(HOLD_REFRESH, self.spec.lease_ttl / 3)
        deadline = time.monotonic() + HOLD_PLACE
        try:
            while time.monotonic() < deadline:
                member = (await list_members(self.store, self.service)).get(rid)
                if member is not None and member.lease != lease:
                    await self.store.revoke_lease(lease)  # the key is on the new lease now
                    return
                if member is None:
                    break
                await self.store.refresh_lease(lease)
                # The table's own switch too: its replica no longer renews it.
                assert self.tables is not None
                with contextlib.suppress(OSError):
                    await self.tables.renew(rid, math.floor(time.time() + self.alive_for))
                await asyncio.sleep(interval)
        except StoreError:
            pass
        finally:
            self.holding.pop(rid, None)
        assert self.tables is not None
        try:
            closed = await self.tables.close(rid)
        except OSError as exc:
            await self.event("crash", f"table of {rid} not closed: {exc}", replica=rid)
        else:
            if closed is not None:
                await self.event("crash", f"{rid} not back: its table closed in {closed}")
        await self._revoke_member(rid)

    async def _revoke_member(self, rid: str) -> None:
        """Remove a dead replica's member (or standby) key now rather than at lease expiry,
        and a promote order it did not carry out."""
        with contextlib.suppress(StoreError):
            member = (await list_members(self.store, self.service)).get(rid)
            if member is not None and member.lease:
                await self.store.revoke_lease(member.lease)
            spare = await self.store.get(keys.standby_key(self.service, rid))
            if spare is not None and spare.lease:
                await self.store.revoke_lease(spare.lease)
            await self.store.delete(keys.promote_key(self.service, rid))

    async def _wake_on(self, key: str) -> None:
        """A pass at once when `key` changes (the desired count, the spec)."""
        while True:
            with contextlib.suppress(StoreError):
                async for _ in self.store.watch_prefix(key):
                    self.wake.set()
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        """Reconcile and sample until cancelled; store errors are retried with backoff."""
        await self._serve_metrics()
        helpers = [
            asyncio.create_task(self._wake_on(keys.desired_key(self.service))),
            asyncio.create_task(self._wake_on(keys.spec_key(self.service))),
            asyncio.create_task(self.scaler.run()),
        ]
        if self.path is not None:
            # A replica that bound its queue (or installed its table) says so in its member
            # info, at the window boundary where the others' shares shrink: steer to it
            # now, not at the next tick, or its part of the flows meets the smaller shares
            # alone until then (the in-path demo, whose tick is 0.5 s, once read 65 of 100
            # in a second at 2 replicas).
            helpers.append(asyncio.create_task(self._wake_on(keys.members_prefix(self.service))))
        # A replica that exits wakes a pass at once (the local runtime watches each one's
        # pidfd): in-path, a crashed replica's queue leaves the steering in milliseconds.
        exits = self.runtime if isinstance(self.runtime, ExitWatch) else None
        if exits is not None:
            exits.watch_exits(self.wake.set)
        delay = 0.2
        try:
            while True:
                # Cleared before the pass, not after: a wake during the pass (an exit, a
                # member change) brings the next one at once instead of being lost.
                self.wake.clear()
                try:
                    requeue_after = await self.reconcile()
                    delay = 0.2
                except StoreError as exc:
                    log.warning("reconcile failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as the event is set, and the loop lives on.
                with contextlib.suppress(TimeoutError):
                    wait = self.tick if requeue_after is None else min(self.tick, requeue_after)
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
        finally:
            if exits is not None:
                exits.watch_exits(None)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _serve_metrics(self) -> None:
        """Serve /metrics and record where, with this process's pid, for `vmbox status`."""
        if self.metrics_port is None:
            return
        port = self.metrics.start(self.spec.metrics_host, self.metrics_port)
        info = {"pid": os.getpid(), "metrics": f"{self.spec.metrics_host}:{port}"}
        with contextlib.suppress(StoreError):
            await self.store.put(keys.controller_key(self.service), json.dumps(info).encode())

    async def drain_all(self) -> None:
        """Drain every replica at once (the service is being deleted); spares just stop.
        Returns when all have gone (each within its drain timeout, or killed after it)."""
        for rid in sorted(set(self.runtime.running()) - set(self.draining)):
            self._drain(rid, spare=rid in self.spares)
        await asyncio.gather(*self.draining.values(), return_exceptions=True)
        with contextlib.suppress(StoreError):
            await self._finish_drains()

    async def shutdown(self) -> None:
        """Stop every replica (each leaves the membership first) and mark the service down."""
        await asyncio.gather(*self.draining.values(), return_exceptions=True)
        self.draining.clear()
        for task in self.holding.values():
            task.cancel()
        await asyncio.gather(*self.holding.values(), return_exceptions=True)
        await asyncio.to_thread(self.runtime.stop_all)
        if self.path is not None:
            with contextlib.suppress(OSError):
                await self.path.remove()  # the gateway forwards as it did before
        if self.tables is not None:
            try:
                removed = await self.tables.remove(self.runtime.running())
            except OSError as exc:
                await self.event("down", f"tables not all removed: {exc}")
            else:
                await self.event("down", f"table removed from {', '.join(removed) or 'no node'}")
        self.metrics.stop()
        with contextlib.suppress(StoreError):
            await self.store.delete(keys.desired_key(self.service))
            await self.store.delete(keys.controller_key(self.service))
            await self.store.delete(keys.samples_key(self.service))
            await self.event("down", "service stopped")


def _in_path(members: Mapping[str, MemberInfo]) -> set[str]:
    """The members whose info names their queue (bound) or node (its table installed)."""
    return {rid for rid, m in members.items() if "queue" in m.info or "node" in m.info}
