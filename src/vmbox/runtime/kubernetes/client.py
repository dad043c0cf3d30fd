"""KubeClient: the operator's calls to the Kubernetes API, and nothing more.

The only module that imports the client library (lightkube, over httpx2: see
docs/kubernetes-client.md; an import-linter contract holds every other
module to it). It speaks plain dicts to its callers, so vmbox.kube's pure
reconcile never sees a client type; every failure is one of the one-line
errors of vmbox.runtime.kubernetes.errors.

Writes of owned objects and of the Middlebox status are server-side applies
(PATCH, application/apply-patch+yaml, fieldManager=vmbox-operator, force);
the replica count goes through the Deployment's scale subresource, a pod's
deletion cost through a merge patch of its annotation. Leader election is a
Lease written with optimistic concurrency (the decision: lease.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
from lightkube import ALL_NS, AsyncClient, ConfigError
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Event, Pod, Service
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from vmbox.runtime.kubernetes import errors
from vmbox.runtime.kubernetes.lease import LeaseAction, LeaseRecord, decide, released

# The Middlebox resource. vmbox.kube.manifests holds the same names, but the
# layers put vmbox.kube above vmbox.runtime, so they are repeated here (a test
# keeps the two equal).
GROUP = "vmbox.dev"
VERSION = "v1alpha1"
KIND = "Middlebox"
PLURAL = "middleboxes"
FIELD_MANAGER = "vmbox-operator"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

Middlebox = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
PodMetrics = create_namespaced_resource(
    "metrics.k8s.io", "v1beta1", "PodMetrics", "pods", verbs=["get", "list"]
)

# What the operator applies (vmbox.kube.manifests' owned objects); anything
# else is refused before a request is sent.
_APPLIED: dict[tuple[str, str], type[NamespacedResource]] = {
    ("v1", "ConfigMap"): ConfigMap,
    ("v1", "Service"): Service,
    ("apps/v1", "Deployment"): Deployment,
    ("policy/v1", "PodDisruptionBudget"): PodDisruptionBudget,
    (f"{GROUP}/{VERSION}", KIND): Middlebox,
}
# What get_object reads and merge_patch patches: those, and pods (deletion cost).
_HANDLED = _APPLIED | {("v1", "Pod"): Pod}


@dataclass(frozen=True, slots=True)
class ScaleInfo:
    """A Deployment's scale subresource."""

    replicas: int  # spec.replicas: desired
    current: int  # status.replicas: pods the ReplicaSets have now
    selector: str  # status.selector, the label selector of its pods


@dataclass(frozen=True, slots=True)
class PodUsage:
    """One pod's sample from the metrics API (summed over its containers)."""

    pod: str
    cpu_cores: float
    memory_bytes: int
    window_seconds: float
    timestamp: str


class KubeClient:
    """The operator's Kubernetes API calls (async); build with `connect`."""

    def __init__(self, api: AsyncClient) -> None:
        self._api = api
        self._server = str(api.config.cluster.server)
        # (namespace, name) -> (resourceVersion, when we first saw it): lease expiry
        # is counted on our own clock (see lease.py).
        self._lease_seen: dict[tuple[str, str], tuple[str | None, datetime]] = {}

    @classmethod
    def connect(
        cls,
        kubeconfig: Path | None = None,
        *,
        context: str | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> KubeClient:
        """In a pod: its service account; else `kubeconfig`, $KUBECONFIG or ~/.kube/config.
        `transport` replaces the network (the tests record requests with it)."""
        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            single = config.get(context)
        except (ConfigError, OSError) as e:
            raise errors.KubeError(
                f"kubernetes: no usable configuration ({e}): set KUBECONFIG, pass a "
                "kubeconfig, or run in a pod with a service account"
            ) from e
        if single is None:
            raise errors.KubeError(f"kubernetes: no context {context!r} in the kubeconfig")
        api = AsyncClient(single, field_manager=FIELD_MANAGER, transport=transport, trust_env=False)
        return cls(api)

    async def close(self) -> None:
        await self._api.close()

    # -- Middleboxes ---------------------------------------------------------

    async def get_middlebox(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Middlebox, or None if it is gone."""
        with self._mapped():
            try:
                return _plain(await self._api.get(Middlebox, name, namespace=namespace))
            except httpx2.HTTPStatusError as e:
                if e.response.status_code == 404:
                    return None
                raise

    async def list_middleboxes(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Middlebox in `namespace`, or in all namespaces when None."""
        ns = namespace if namespace is not None else ALL_NS
        with self._mapped():
            return [_plain(o) async for o in self._api.list(Middlebox, namespace=ns)]

    # -- server-side apply ----------------------------------------------------

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply of one owned object (as vmbox.kube.manifests renders it)."""
        res = _APPLIED.get((obj.get("apiVersion", ""), obj.get("kind", "")))
        if res is None:
            raise errors.KubeError(
                f"kubernetes: the operator does not apply {obj.get('apiVersion')} "
                f"{obj.get('kind')} objects"
            )
        meta = obj.get("metadata", {})
        with self._mapped():
            done = await self._api.patch(
                res,
                meta["name"],
                dict(obj),
                namespace=meta["namespace"],
                patch_type=PatchType.APPLY,
                field_manager=FIELD_MANAGER,
                force=True,
            )
        return _plain(done)

    async def apply_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Server-side apply of a Middlebox's status subresource (only the status is sent)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": dict(status),
        }
        with self._mapped():
            done = await self._api.patch(
                Middlebox.Status,
                name,
                body,
                namespace=namespace,
                patch_type=PatchType.APPLY,
                field_manager=FIELD_MANAGER,
                force=True,
            )
        return _plain(done)

    # -- any owned object, by kind -------------------------------------------

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """One object of a kind the operator applies (or a Pod), or None if there is none."""
        res = _kind(api_version, kind)
        with self._mapped():
            try:
                return _plain(await self._api.get(res, name, namespace=namespace))
            except httpx2.HTTPStatusError as e:
                if e.response.status_code == 404:
                    return None
                raise

    async def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch (application/merge-patch+json) of one object: the reconcile's
        Patch (a Middlebox's count; a pod's deletion cost, null removing it)."""
        res = _kind(api_version, kind)
        with self._mapped():
            done = await self._api.patch(
                res, name, dict(body), namespace=namespace, patch_type=PatchType.MERGE
            )
        return _plain(done)

    # -- the Deployment's scale, its pods ------------------------------------

    async def get_scale(self, namespace: str, deployment: str) -> ScaleInfo:
        with self._mapped():
            scale = await self._api.get(Deployment.Scale, deployment, namespace=namespace)
        return _scale_info(scale)

    async def set_scale(self, namespace: str, deployment: str, replicas: int) -> ScaleInfo:
        """Set spec.replicas through the scale subresource (a merge patch of it alone)."""
        patch = {"spec": {"replicas": replicas}}
        with self._mapped():
            scale = await self._api.patch(
                Deployment.Scale,
                deployment,
                patch,
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        return _scale_info(scale)

    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        with self._mapped():
            pods = self._api.list(Pod, namespace=namespace, labels=dict(labels))
            return [_plain(p) async for p in pods]

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        """Mark a pod with controller.kubernetes.io/pod-deletion-cost, so the ReplicaSet
        removes the lowest-cost pod (the drained one) when the Deployment shrinks."""
        patch = {"metadata": {"annotations": {DELETION_COST: str(cost)}}}
        with self._mapped():
            await self._api.patch(Pod, pod, patch, namespace=namespace, patch_type=PatchType.MERGE)

    async def pod_metrics(self, namespace: str, labels: Mapping[str, str]) -> list[PodUsage]:
        """The metrics API's latest sample of each matching pod (metrics.k8s.io/v1beta1)."""
        with self._mapped():
            items = self._api.list(PodMetrics, namespace=namespace, labels=dict(labels))
            return [_usage(_plain(m)) async for m in items]

    # -- events ----------------------------------------------------------------

    async def create_event(
        self,
        involved: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        now: datetime,
        warning: bool = False,
        instance: str = "",
    ) -> None:
        """Record a core/v1 Event on `involved` (a Middlebox or a pod, as the API returned
        it), which `kubectl describe` shows."""
        meta = involved["metadata"]
        stamp = now.replace(microsecond=0)
        event = Event(
            metadata=ObjectMeta(
                name=f"{meta['name']}.{int(now.timestamp() * 1e9):x}",
                namespace=meta["namespace"],
            ),
            involvedObject=ObjectReference(
                apiVersion=involved.get("apiVersion"),
                kind=involved.get("kind"),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resourceVersion=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
            count=1,
            firstTimestamp=stamp,
            lastTimestamp=stamp,
            source=EventSource(component=FIELD_MANAGER),
            reportingComponent=FIELD_MANAGER,
            reportingInstance=instance or None,
        )
        with self._mapped():
            await self._api.create(event)

    # -- leader election -------------------------------------------------------

    async def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        with self._mapped():
            try:
                lease = await self._api.get(Lease, name, namespace=namespace)
            except httpx2.HTTPStatusError as e:
                if e.response.status_code == 404:
                    return None
                raise
        return _record(lease)

    async def hold_lease(
        self, namespace: str, name: str, *, identity: str, duration_seconds: int, now: datetime
    ) -> bool:
        """Take or renew the Lease for `identity`; True if we lead until `now` plus the
        duration. A 409 (another operator wrote first) is False, never an error."""
        observed = await self.read_lease(namespace, name)
        seen_at = self._seen(namespace, name, observed, now)
        decision = decide(
            observed,
            identity=identity,
            now=now,
            duration_seconds=duration_seconds,
            seen_at=seen_at,
        )
        if decision.record is None:
            return False
        try:
            if decision.action is LeaseAction.CREATE:
                await self._write_lease(namespace, name, decision.record, create=True)
            else:
                await self._write_lease(namespace, name, decision.record, create=False)
        except errors.KubeConflict:
            return False
        return True

    async def release_lease(
        self, namespace: str, name: str, *, identity: str, now: datetime
    ) -> bool:
        """Give the Lease up at once if `identity` holds it (on a clean shutdown)."""
        observed = await self.read_lease(namespace, name)
        record = released(observed, identity=identity, now=now) if observed else None
        if record is None:
            return False
        try:
            await self._write_lease(namespace, name, record, create=False)
        except errors.KubeConflict:
            return False
        return True

    async def _write_lease(
        self, namespace: str, name: str, record: LeaseRecord, *, create: bool
    ) -> None:
        lease = Lease(
            metadata=ObjectMeta(
                name=name, namespace=namespace, resourceVersion=record.resource_version
            ),
            spec=LeaseSpec(
                holderIdentity=record.holder,
                leaseDurationSeconds=record.duration_seconds,
                acquireTime=record.acquire_time,
                renewTime=record.renew_time,
                leaseTransitions=record.transitions,
            ),
        )
        with self._mapped():
            if create:
                await self._api.create(lease)
            else:
                await self._api.replace(lease)

    def _seen(
        self, namespace: str, name: str, observed: LeaseRecord | None, now: datetime
    ) -> datetime | None:
        if observed is None:
            self._lease_seen.pop((namespace, name), None)
            return None
        version = observed.resource_version
        last = self._lease_seen.get((namespace, name))
        if last is None or last[0] != version:
            last = (version, now)
            self._lease_seen[(namespace, name)] = last
        return last[1]

    # -- errors ----------------------------------------------------------------

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Turn the library's failures into vmbox.runtime.kubernetes.errors."""
        try:
            yield
        except httpx2.HTTPStatusError as e:
            raise _status_error(e) from e
        except httpx2.TransportError as e:
            raise errors.unreachable(self._server, e) from e


def _kind(api_version: str, kind: str) -> type[NamespacedResource]:
    res = _HANDLED.get((api_version, kind))
    if res is None:
        raise errors.KubeError(f"kubernetes: the operator does not handle {api_version} {kind}")
    return res


def _status_error(e: httpx2.HTTPStatusError) -> errors.KubeError:
    reason = message = ""
    try:
        body = e.response.json()
    except ValueError:
        message = e.response.text
    else:
        if isinstance(body, dict):
            reason = str(body.get("reason", ""))
            message = str(body.get("message", ""))
    url = e.request.url
    return errors.from_status(
        e.response.status_code,
        reason or e.response.reason_phrase,
        message,
        method=e.request.method,
        path=url.path,
        query=url.query.decode(),
    )


def _plain(obj: Any) -> dict[str, Any]:
    """The library's object as the plain dict the API sent."""
    return dict(obj.to_dict())


def _scale_info(scale: Any) -> ScaleInfo:
    s = _plain(scale)
    return ScaleInfo(
        replicas=int(s.get("spec", {}).get("replicas", 0)),
        current=int(s.get("status", {}).get("replicas", 0)),
        selector=str(s.get("status", {}).get("selector", "")),
    )


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    return LeaseRecord(
        holder=spec.holderIdentity or None,
        duration_seconds=int(spec.leaseDurationSeconds or 0),
        acquire_time=spec.acquireTime,
        renew_time=spec.renewTime,
        transitions=int(spec.leaseTransitions or 0),
        resource_version=lease.metadata.resourceVersion,
    )


def _usage(m: Mapping[str, Any]) -> PodUsage:
    cpu = Decimal(0)
    memory = Decimal(0)
    for c in m.get("containers", []):
        usage = c.get("usage", {})
        cpu += quantity(str(usage.get("cpu", "0")))
        memory += quantity(str(usage.get("memory", "0")))
    return PodUsage(
        pod=m["metadata"]["name"],
        cpu_cores=float(cpu),
        memory_bytes=int(memory),
        window_seconds=go_duration(str(m.get("window", "0s"))),
        timestamp=str(m.get("timestamp", "")),
    )


_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)([a-zA-Z]*)")
_SUFFIX = {
    "n": Decimal("1e-9"),  # metrics-server reports CPU in nanocores
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("250m", "1500000n", "12Mi") as a plain number.
    (lightkube's parse_quantity does not know the "n" and "u" suffixes.)"""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None or match.group(2) not in _SUFFIX:
        raise errors.KubeError(f"kubernetes: cannot read the quantity {text!r}")
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go duration string as the metrics API writes `window` ("30s", "1m0.5s")."""
    return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))
