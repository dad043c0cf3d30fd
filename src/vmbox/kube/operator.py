"""The operator's driver: leader election, then the pure reconcile carried out against the API.

`Operator.run(stop)` does two things at once until `stop` is set:

- Leader election over the Lease `lease_name` in `lease_namespace` (the
  operator's own namespace), through KubeClient.hold_lease (the decision is
  vmbox.runtime.kubernetes.lease). It renews every duration/3. Leadership is
  good until `renew_deadline` (2/3 of the duration) after the start of the
  last successful renewal, on the monotonic clock: the Lease on the server
  lasts the full duration from a moment after that start, so this operator
  stops writing before any other may take over. A renewal another operator
  wins (hold_lease False) ends leadership at once; an API error leaves it
  to lapse at the deadline. A clean stop releases the Lease (the next
  operator takes over at once).
- While leading, passes: each lists the Middleboxes (in `namespace`, or in
  all namespaces for None) and, for each, reads its owned objects, its pods,
  their metrics-API usage and each pod's own /metrics, calls
  vmbox.kube.reconcile.reconcile and carries the Result out in the order its
  module doc prescribes: patches, apply, status, events; then keeps the
  Memory. It sleeps min(requeue_after of every Middlebox, `resync`); there
  is no watch yet. Every write first checks that leadership still holds
  (NotLeading ends the pass: nothing more is written).

One Middlebox's failure (a KubeError) is one log line and the next
Middlebox is reconciled; the failed one is tried again at the next pass.

The store. A replica reads its spec from the store (keys.spec_key) and its
shared state items from there, as locally, so before applying (before a pod
a rollout starts can look) the operator publishes the Result's `store_spec`
with vmbox.control.publish.publish_changed: the spec key and the state
items' seeds, written only when the spec differs from what is stored. The
store is the one the pods use (`store_spec`'s own `store`, managed or an
external etcd), reached through `Stores`, one connection per distinct store;
the operator's pod mounts the same two Secrets at the same paths as the
replica pods (vmbox.kube.install), so those paths hold there too. Without
`stores` (tests of the API side only) nothing is published.

Samples. A pod contributes a Sample (vmbox.control.monitor's) only when its
/metrics on METRICS_PORT at its podIP could be read: packet and byte rates
come from two successive reads of the same pod (uid), so a pod's first
sample has rates None, as the local Monitor's. Memory and CPU come from the
metrics API (metrics.k8s.io, the metrics-server); without it, memory_bytes
is 0 and memory_percent and cpu_percent are None (an autoscale on memory or
CPU then decides nothing, one on pps or bandwidth still works).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from vmbox.control.monitor import TRAFFIC, Sample
from vmbox.control.publish import publish_changed
from vmbox.kube import pods as _pods
from vmbox.kube.manifests import (
    API_VERSION,
    METRICS_PORT,
    MIDDLEBOX_LABEL,
    SYSTEM_NAMESPACE,
    object_key,
)
from vmbox.kube.reconcile import OWNED_KINDS, Memory, Result, name_clashes, reconcile
from vmbox.metrics import scrape
from vmbox.runtime.kubernetes import KubeError, PodUsage
from vmbox.runtime.kubernetes.client import quantity
from vmbox.spec import Spec, parse_spec
from vmbox.state.access import StoreSpec
from vmbox.state.store import Store, StoreError

log = logging.getLogger(__name__)

LEASE = "vmbox-operator"
LEASE_DURATION = 15  # seconds, client-go's default
RESYNC = 30.0  # seconds between passes when no Middlebox asks sooner
SCRAPE_TIMEOUT = 1.0
# The apiVersion of each owned kind (reconcile.OWNED_KINDS), to read it back.
OWNED_API = {
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Service": "v1",
}

Obj = Mapping[str, Any]
Scrape = Callable[[str, float], Awaitable[dict[str, float]]]
Connect = Callable[[StoreSpec], Awaitable[Store]]


class Stores:
    """One connection per distinct store the Middleboxes' pods use, opened on first need."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self._open: dict[str, Store] = {}

    async def get(self, target: StoreSpec) -> Store:
        key = target.model_dump_json()
        store = self._open.get(key)
        if store is None:
            store = self._open[key] = await self.connect(target)
        return store

    async def close(self) -> None:
        stores, self._open = list(self._open.values()), {}
        for store in stores:
            with contextlib.suppress(StoreError):
                await store.close()


class Api(Protocol):
    """What the operator calls (KubeClient has each; the tests fake them in memory)."""

    async def hold_lease(
        self, namespace: str, name: str, *, identity: str, duration_seconds: int, now: datetime
    ) -> bool: ...

    async def release_lease(
        self, namespace: str, name: str, *, identity: str, now: datetime
    ) -> bool: ...

    async def list_middleboxes(self, namespace: str | None = None) -> list[dict[str, Any]]: ...

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None: ...

    async def list_pods(
        self, namespace: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]: ...

    async def pod_metrics(self, namespace: str, labels: Mapping[str, str]) -> list[PodUsage]: ...

    async def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def apply_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    async def create_event(
        self,
        involved: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        now: datetime,
        warning: bool = False,
        instance: str = "",
    ) -> None: ...


class NotLeading(Exception):
    """Leadership could not be confirmed before its deadline: write nothing more."""


@dataclass(frozen=True, slots=True)
class _Read:
    """One pod's /metrics counters, when and from which pod instance they were read."""

    uid: str
    at: float  # monotonic
    counters: dict[str, float]


class Operator:
    """Runs the Middlebox reconcile while this process holds the operator Lease."""

    def __init__(
        self,
        client: Api,
        namespace: str | None,
        identity: str,
        *,
        image: str,
        lease_namespace: str = SYSTEM_NAMESPACE,
        lease_name: str = LEASE,
        lease_duration: int = LEASE_DURATION,
        resync: float = RESYNC,
        scrape: Scrape = scrape,
        scrape_timeout: float = SCRAPE_TIMEOUT,
        stores: Stores | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.identity = identity
        self.image = image
        self.lease_namespace = lease_namespace
        self.lease_name = lease_name
        self.lease_duration = lease_duration
        self.renew_every = lease_duration / 3
        self.renew_deadline = lease_duration * 2 / 3
        self.resync = resync
        self.scrape = scrape
        self.scrape_timeout = scrape_timeout
        self.stores = stores
        self.clock = clock
        self.wall = wall
        self.memory: dict[tuple[str, str], Memory] = {}  # (namespace, name) -> last pass's
        self._lead_until: float | None = None  # monotonic; None: not leading
        self._reads: dict[tuple[str, str], _Read] = {}  # (ns, pod) -> its last /metrics
        self._changed = asyncio.Event()  # leadership gained: pass at once

    # -- leadership --------------------------------------------------------------

    def leading(self) -> bool:
        return self._lead_until is not None and self.clock() < self._lead_until

    def _check(self) -> None:
        if not self.leading():
            raise NotLeading(f"{self.identity}: leadership not confirmed: writing nothing")

    async def renew(self) -> bool:
        """One attempt to take or keep the Lease; True if leading after it."""
        started = self.clock()
        was = self.leading()
        try:
            held = await asyncio.wait_for(
                self.client.hold_lease(
                    self.lease_namespace,
                    self.lease_name,
                    identity=self.identity,
                    duration_seconds=self.lease_duration,
                    now=self._now(),
                ),
                self.renew_deadline,
            )
        except (KubeError, TimeoutError) as exc:
            log.warning(
                "operator %s: lease %s: %s", self.identity, self.lease_name, exc or "timeout"
            )
            return self.leading()  # lapses at the deadline unless a renewal succeeds first
        if held:
            self._lead_until = started + self.renew_deadline
            if not was:
                log.info("operator %s: leading (lease %s)", self.identity, self.lease_name)
                self._changed.set()
        else:
            if was:
                log.warning("operator %s: lost the lease %s", self.identity, self.lease_name)
            self._lead_until = None
        return held

    async def release(self) -> None:
        """Give the Lease up (a clean stop): another operator takes over at once."""
        held = self._lead_until is not None
        self._lead_until = None
        if not held:
            return
        try:
            await self.client.release_lease(
                self.lease_namespace, self.lease_name, identity=self.identity, now=self._now()
            )
        except KubeError as exc:
            log.warning("operator %s: releasing lease %s: %s", self.identity, self.lease_name, exc)

    # -- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Elect, and reconcile while leading, until `stop` is set; then release the Lease."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._elect(stop))
                tasks.create_task(self._reconcile_loop(stop))
        finally:
            await self.release()

    async def _elect(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.renew()
            await _wait(stop, self.renew_every)

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delay = self.resync
            if self.leading():
                delay = await self.reconcile_all()
            self._changed.clear()
            await _wait(stop, delay, self._changed)

    async def reconcile_all(self) -> float:
        """One pass over every Middlebox; the seconds until the next one is due."""
        try:
            found = await self.client.list_middleboxes(self.namespace)
        except KubeError as exc:
            log.warning("operator: listing middleboxes: %s", exc)
            return self.resync
        delay = self.resync
        seen = set()
        clashes = name_clashes([mb for mb in found if (mb.get("metadata") or {}).get("name")])
        for mb in found:
            meta = mb.get("metadata") or {}
            key = (str(meta.get("namespace", "default")), str(meta.get("name", "")))
            seen.add(key)
            try:
                result = await self.reconcile_one(mb, refused=clashes.get(key))
            except NotLeading as exc:
                log.warning("operator: %s", exc)
                return self.resync
            except (KubeError, StoreError) as exc:
                log.warning("middlebox %s/%s: %s", key[0], key[1], exc)
                continue
            if result.requeue_after is not None:
                delay = min(delay, result.requeue_after)
        self.memory = {k: m for k, m in self.memory.items() if k in seen}
        return delay

    async def reconcile_one(self, mb: Obj, refused: str | None = None) -> Result:
        """Read what is, reconcile, and carry the Result out (reconcile's order)."""
        ns, name = object_key(mb)
        objects = {
            kind: await self.client.get_object(OWNED_API[kind], kind, ns, name)
            for kind in OWNED_KINDS
        }
        labels = {MIDDLEBOX_LABEL: name}
        pods = await self.client.list_pods(ns, labels)
        samples = await self.samples(ns, labels, pods)
        result = reconcile(
            mb,
            objects=objects,
            pods=pods,
            samples=samples,
            memory=self.memory.get((ns, name), Memory()),
            now=self.wall(),
            image=self.image,
            refused=refused,
        )
        await self.carry_out(mb, result)
        self.memory[(ns, name)] = result.memory
        return result

    async def carry_out(self, mb: Obj, result: Result) -> None:
        ns, name = object_key(mb)
        for patch in result.patches:
            self._check()
            await self.client.merge_patch(
                patch.api_version, patch.kind, patch.namespace, patch.name, patch.body
            )
        if result.store_spec is not None and self.stores is not None:
            spec: Spec = parse_spec(json.loads(result.store_spec), f"middlebox {ns}/{name}")
            if not isinstance(spec.store, StoreSpec):  # pod_spec() always names the store
                raise StoreError(f"the pods' spec names no store ({spec.store!r})")
            store = await self.stores.get(spec.store)
            self._check()
            await publish_changed(store, spec)
        for obj in result.apply:
            self._check()
            await self.client.apply(obj)
        self._check()
        await self.client.apply_status(ns, name, result.status)
        involved = {"apiVersion": API_VERSION, "kind": "Middlebox", **mb}
        for event in result.events:
            self._check()
            await self.client.create_event(
                involved,
                reason=event.reason,
                message=event.message,
                now=self._now(),
                warning=event.type == "Warning",
                instance=self.identity,
            )

    # -- samples -------------------------------------------------------------------

    async def samples(
        self, ns: str, labels: Mapping[str, str], pods: Sequence[Obj]
    ) -> dict[str, Sample]:
        """A Sample of each live pod whose /metrics could be read (see the module doc)."""
        try:
            usage = {u.pod: u for u in await self.client.pod_metrics(ns, labels)}
        except KubeError as exc:
            log.debug("operator: no pod metrics in %s: %s", ns, exc)
            usage = {}
        live = [p for p in pods if _pods.live(p) and (p.get("status") or {}).get("podIP")]
        found = await asyncio.gather(*(self._sample(p, usage.get(_pods.name(p))) for p in live))
        names = {(ns, _pods.name(p)) for p in pods}
        self._reads = {k: r for k, r in self._reads.items() if k[0] != ns or k in names}
        return {s.replica: s for s in found if s is not None}

    async def _sample(self, pod: Obj, usage: PodUsage | None) -> Sample | None:
        name = _pods.name(pod)
        address = f"{pod['status']['podIP']}:{METRICS_PORT}"
        try:
            counters = await self.scrape(address, self.scrape_timeout)
        except Exception as exc:  # a pod starting or dying contributes no sample
            log.debug("operator: cannot scrape %s (%s): %s", name, address, exc)
            return None
        at = self.clock()
        uid = str(pod["metadata"].get("uid", ""))
        key = (str(pod["metadata"].get("namespace", "default")), name)
        before = self._reads.get(key)
        self._reads[key] = _Read(uid, at, counters)
        if before is not None and before.uid != uid:
            before = None  # another pod of the same name: its counters began again
        limit = memory_limit(pod)
        memory = usage.memory_bytes if usage is not None else 0
        return Sample(
            replica=name,
            time=self.wall(),
            memory_bytes=memory,
            memory_limit=limit,
            memory_percent=memory / limit * 100.0 if usage is not None and limit else None,
            cpu_percent=usage.cpu_cores * 100.0 if usage is not None else None,
            source="metrics.k8s.io" if usage is not None else "prometheus",
            **rates(counters, before, at),
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), UTC)


def rates(now: Mapping[str, float], before: _Read | None, at: float) -> dict[str, float | None]:
    """Per-second rates of each Sample traffic field between two reads (None on the first,
    or when the counters went back: the pod's replica restarted)."""
    out: dict[str, float | None] = dict.fromkeys(TRAFFIC)
    if before is None or at <= before.at:
        return out
    for field, counters in TRAFFIC.items():
        current = sum(now.get(c, 0.0) for c in counters)
        previous = sum(before.counters.get(c, 0.0) for c in counters)
        if current >= previous:
            out[field] = (current - previous) / (at - before.at)
    return out


def memory_limit(pod: Obj) -> int | None:
    """The pod's memory limit (the sum over its containers; None if one has none)."""
    containers = (pod.get("spec") or {}).get("containers") or ()
    total = 0
    for c in containers:
        limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        if limit is None:
            return None
        total += int(quantity(str(limit)))
    return total or None


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep `seconds`, or less if `stop` (or `wake`) is set meanwhile."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w
