"""KubeClient against the exact HTTP requests the Kubernetes API expects.

No API server runs here. The client is built from a kubeconfig naming
https://k8s.test:6443 and sends through an httpx2.MockTransport (lightkube's
own `transport` hook): `FakeApi` records every request (method, path, query,
content type, body) and answers with what an API server would send for it.
The assertions are on those recorded requests: what vmbox sends, not a claim
that a cluster accepted it. The Lease server at the end keeps resourceVersions
the way the API server does, so two operators can race for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from tests.conftest import Aio
from vmbox.runtime.kubernetes import (
    KubeClient,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeUnreachable,
)
from vmbox.runtime.kubernetes.client import go_duration, quantity
from vmbox.runtime.kubernetes.errors import rbac_target
from vmbox.runtime.kubernetes.lease import LeaseAction, LeaseRecord, decide, released

SERVER = "https://k8s.test:6443"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
SSA = {"fieldManager": "vmbox-operator", "force": "true"}
T0 = datetime(2026, 12, 3, 6, 0, 0, tzinfo=UTC)

Json = dict[str, Any]
Handler = Callable[[httpx2.Request], Awaitable[httpx2.Response]]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    params: dict[str, str]
    content_type: str | None
    body: Any
    auth: str | None


class FakeApi:
    """Records requests; answers from `routes` ((METHOD, path) -> response or callable)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], Any] = {}

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        await asyncio.sleep(0)  # yield, as a network would: lets racing callers interleave
        body = json.loads(request.content) if request.content else None
        seen = Seen(
            request.method,
            request.url.path,
            dict(request.url.params),
            request.headers.get("content-type"),
            body,
            request.headers.get("authorization"),
        )
        self.seen.append(seen)
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return status_response(404, "NotFound", f"{request.url.path} not found")
        if callable(answer):
            result: httpx2.Response = answer(seen)
            return result
        assert isinstance(answer, httpx2.Response)
        return answer


def status_response(code: int, reason: str, message: str) -> httpx2.Response:
    """An API server's error answer: a meta/v1 Status as application/json."""
    status: Json = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    status.update({"message": message, "reason": reason, "code": code})
    return httpx2.Response(code, json=status)


def echo(code: int = 200) -> Callable[[Seen], httpx2.Response]:
    """Answer with the object sent, as an apply or create of it returns it."""
    return lambda seen: httpx2.Response(code, json=seen.body)


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": SERVER}}],
        "users": [{"name": "op", "user": {"token": "sekrit"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "op"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def kube(kubeconfig: Path, api: FakeApi, aio: Aio) -> Iterator[KubeClient]:
    client = KubeClient.connect(kubeconfig, transport=httpx2.MockTransport(api.handle))
    yield client
    aio.run(client.close())


def deployment(name: str = "web-vmbox") -> Json:
    labels = {"vmbox.dev/middlebox": "web"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "replica", "image": "vmbox:test"}]},
            },
        },
    }


# -- server-side apply ---------------------------------------------------------


def test_apply_is_a_server_side_apply_patch_with_the_field_manager(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/web-vmbox"
    api.routes[("PATCH", path)] = echo()
    obj = deployment()
    got = aio.run(kube.apply(obj))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.params) == ("PATCH", path, SSA)
    assert seen.content_type == APPLY
    assert seen.body == obj  # the whole intent, nothing added or dropped
    assert seen.auth == "Bearer sekrit"
    assert got["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("api_version", "kind", "path"),
    [
        ("v1", "ConfigMap", "/api/v1/namespaces/ns/configmaps/web-spec"),
        ("v1", "Service", "/api/v1/namespaces/ns/services/web-spec"),
        (
            "policy/v1",
            "PodDisruptionBudget",
            "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/web-spec",
        ),
    ],
)
def test_apply_goes_to_each_owned_kinds_path(
    kube: KubeClient, api: FakeApi, aio: Aio, api_version: str, kind: str, path: str
) -> None:
    api.routes[("PATCH", path)] = echo()
    obj = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "web-spec", "namespace": "ns"},
    }
    aio.run(kube.apply(obj))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.params, seen.content_type) == ("PATCH", path, SSA, APPLY)
    assert seen.body == obj


def test_apply_refuses_a_kind_the_operator_does_not_own_before_sending(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "ns"}}
    with pytest.raises(KubeError, match="does not apply v1 Secret"):
        aio.run(kube.apply(obj))
    assert api.seen == []


def test_status_is_applied_to_the_status_subresource_alone(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes/web/status"
    api.routes[("PATCH", path)] = echo()
    status = {
        "replicas": 2,
        "readyReplicas": 1,
        "conditions": [{"type": "Ready", "status": "False"}],
    }
    aio.run(kube.apply_status("ns", "web", status))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.params, seen.content_type) == ("PATCH", path, SSA, APPLY)
    assert seen.body == {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "Middlebox",
        "metadata": {"name": "web", "namespace": "ns"},
        "status": status,
    }


def test_middleboxes_are_read_as_a_generic_resource(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    mb = {"apiVersion": "vmbox.dev/v1alpha1", "kind": "Middlebox", "metadata": {"name": "web"}}
    listing = {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "MiddleboxList",
        "metadata": {},
        "items": [mb],
    }
    api.routes[("GET", "/apis/vmbox.dev/v1alpha1/middleboxes")] = httpx2.Response(200, json=listing)
    api.routes[("GET", "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes")] = httpx2.Response(
        200, json=listing
    )
    assert aio.run(kube.list_middleboxes()) == [mb]
    assert aio.run(kube.list_middleboxes("ns")) == [mb]
    assert aio.run(kube.get_middlebox("ns", "gone")) is None  # 404 is "deleted", not an error
    assert [(s.method, s.path) for s in api.seen] == [
        ("GET", "/apis/vmbox.dev/v1alpha1/middleboxes"),
        ("GET", "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes"),
        ("GET", "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes/gone"),
    ]


# -- scale, pods, deletion cost, metrics, events --------------------------------


def scale_body(seen: Seen) -> httpx2.Response:
    replicas = seen.body["spec"]["replicas"] if seen.body else 2
    return httpx2.Response(
        200,
        json={
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": "web-vmbox", "namespace": "ns"},
            "spec": {"replicas": replicas},
            "status": {"replicas": 2, "selector": "vmbox.dev/middlebox=web"},
        },
    )


def test_scale_reads_and_merge_patches_the_scale_subresource(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/web-vmbox/scale"
    api.routes[("GET", path)] = scale_body
    api.routes[("PATCH", path)] = scale_body
    before = aio.run(kube.get_scale("ns", "web-vmbox"))
    after = aio.run(kube.set_scale("ns", "web-vmbox", 3))
    assert (before.replicas, before.current, before.selector) == (2, 2, "vmbox.dev/middlebox=web")
    assert (after.replicas, after.current) == (3, 2)
    get, patch = api.seen
    assert (get.method, get.path, get.params) == ("GET", path, {})
    assert (patch.method, patch.path, patch.content_type) == ("PATCH", path, MERGE)
    assert patch.params == {"fieldManager": "vmbox-operator"}  # not forced: only SSA forces
    assert patch.body == {"spec": {"replicas": 3}}


def test_pods_are_listed_by_label_selector(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-vmbox-abc", "namespace": "ns"},
    }
    listing = {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}
    api.routes[("GET", "/api/v1/namespaces/ns/pods")] = httpx2.Response(200, json=listing)
    pods = aio.run(kube.list_pods("ns", {"vmbox.dev/middlebox": "web"}))
    assert [p["metadata"]["name"] for p in pods] == ["web-vmbox-abc"]
    [seen] = api.seen
    assert seen.params == {"labelSelector": "vmbox.dev/middlebox=web"}


def test_deletion_cost_is_a_merge_patch_of_the_pods_annotation(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/api/v1/namespaces/ns/pods/web-vmbox-abc"
    api.routes[("PATCH", path)] = httpx2.Response(
        200, json={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-vmbox-abc"}}
    )
    aio.run(kube.set_deletion_cost("ns", "web-vmbox-abc", -100))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.content_type) == ("PATCH", path, MERGE)
    assert seen.body == {
        "metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-100"}}
    }


def test_get_object_reads_an_owned_kind_by_its_path_and_none_when_missing(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/web"
    api.routes[("GET", path)] = httpx2.Response(200, json=deployment("web"))
    got = aio.run(kube.get_object("apps/v1", "Deployment", "ns", "web"))
    gone = aio.run(kube.get_object("v1", "Service", "ns", "web"))
    assert got is not None and got["spec"]["replicas"] == 2
    assert gone is None  # the route answers 404: deleted, to be applied again
    first, second = api.seen
    assert (first.method, first.path, first.params, first.body) == ("GET", path, {}, None)
    assert (second.method, second.path) == ("GET", "/api/v1/namespaces/ns/services/web")


def test_get_object_refuses_a_kind_the_operator_does_not_handle(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    with pytest.raises(KubeError, match="does not handle v1 Secret"):
        aio.run(kube.get_object("v1", "Secret", "ns", "x"))
    assert api.seen == []


def test_merge_patch_of_a_middlebox_count_and_of_a_pods_mark_removal(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    mb_path = "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes/web"
    pod_path = "/api/v1/namespaces/ns/pods/web-abc"
    api.routes[("PATCH", mb_path)] = httpx2.Response(
        200, json={"apiVersion": "vmbox.dev/v1alpha1", "kind": "Middlebox", "metadata": {}}
    )
    api.routes[("PATCH", pod_path)] = httpx2.Response(
        200, json={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-abc"}}
    )
    count = {"spec": {"replicas": {"count": 3}}}
    unmark = {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": None}}}
    aio.run(kube.merge_patch("vmbox.dev/v1alpha1", "Middlebox", "ns", "web", count))
    aio.run(kube.merge_patch("v1", "Pod", "ns", "web-abc", unmark))
    first, second = api.seen
    assert (first.method, first.path, first.content_type) == ("PATCH", mb_path, MERGE)
    assert first.params == {"fieldManager": "vmbox-operator"}  # not forced: only SSA forces
    assert first.body == count
    assert (second.path, second.content_type, second.body) == (pod_path, MERGE, unmark)


def test_pod_metrics_are_listed_from_the_metrics_api_and_summed_per_pod(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    item = {
        "metadata": {"name": "web-vmbox-abc", "namespace": "ns"},
        "timestamp": "2026-12-03T06:00:00Z",
        "window": "10.5s",
        "containers": [
            {"name": "replica", "usage": {"cpu": "250m", "memory": "12Mi"}},
            {"name": "sidecar", "usage": {"cpu": "1500000n", "memory": "1024Ki"}},
        ],
    }
    listing: Json = {"apiVersion": "metrics.k8s.io/v1beta1", "kind": "PodMetricsList"}
    listing["items"] = [item]
    path = "/apis/metrics.k8s.io/v1beta1/namespaces/ns/pods"
    api.routes[("GET", path)] = httpx2.Response(200, json=listing)
    [usage] = aio.run(kube.pod_metrics("ns", {"vmbox.dev/middlebox": "web"}))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.params) == (
        "GET",
        path,
        {"labelSelector": "vmbox.dev/middlebox=web"},
    )
    assert usage.pod == "web-vmbox-abc"
    assert usage.cpu_cores == pytest.approx(0.2515)
    assert usage.memory_bytes == 12 * 2**20 + 2**20
    assert usage.window_seconds == pytest.approx(10.5)


def test_an_event_is_created_on_the_object_it_is_about(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/api/v1/namespaces/ns/events"
    api.routes[("POST", path)] = echo(201)
    mb = {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "Middlebox",
        "metadata": {"name": "web", "namespace": "ns", "uid": "u-1"},
    }
    now = T0 + timedelta(microseconds=250)
    aio.run(kube.create_event(mb, reason="ScaledUp", message="2 -> 3: cpu 0.9", now=now))
    [seen] = api.seen
    assert (seen.method, seen.path, seen.content_type) == ("POST", path, "application/json")
    body = seen.body
    assert body["involvedObject"] == {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "Middlebox",
        "name": "web",
        "namespace": "ns",
        "uid": "u-1",
    }
    assert (body["reason"], body["message"], body["type"]) == (
        "ScaledUp",
        "2 -> 3: cpu 0.9",
        "Normal",
    )
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-12-03T06:00:00Z"
    assert body["metadata"]["name"].startswith("web.")
    assert body["source"] == {"component": "vmbox-operator"}


# -- errors ------------------------------------------------------------------------


def test_forbidden_names_the_missing_rbac_verb_and_resource(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/web-vmbox/scale"
    api.routes[("PATCH", path)] = status_response(
        403, "Forbidden", 'deployments.apps "web-vmbox" is forbidden: User "x" cannot patch ...'
    )
    with pytest.raises(KubeForbidden) as caught:
        aio.run(kube.set_scale("ns", "web-vmbox", 3))
    line = str(caught.value)
    assert "\n" not in line
    assert "may not patch deployments/scale (API group apps) in namespace ns" in line
    assert 'add verb "patch" on "deployments/scale"' in line


def test_a_stale_write_is_a_conflict(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    path = "/apis/apps/v1/namespaces/ns/deployments/web-vmbox"
    msg = 'Operation cannot be fulfilled on deployments.apps "web-vmbox": the object was modified'
    api.routes[("PATCH", path)] = status_response(409, "Conflict", msg)
    with pytest.raises(
        KubeConflict, match="409 conflict on patch deployments web-vmbox in namespace ns: Operation"
    ):
        aio.run(kube.apply(deployment()))


def test_a_missing_crd_says_so(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    with pytest.raises(KubeNotFound, match="Middlebox CRD installed"):
        aio.run(kube.list_middleboxes("ns"))


def test_a_non_json_error_still_ends_in_one_line(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    path = "/api/v1/namespaces/ns/pods"
    api.routes[("GET", path)] = httpx2.Response(503, text="upstream\nconnect error")
    with pytest.raises(KubeError) as caught:
        aio.run(kube.list_pods("ns", {"a": "b"}))
    assert str(caught.value) == (
        "kubernetes: 503 Service Unavailable on GET /api/v1/namespaces/ns/pods: "
        "upstream connect error"
    )


def test_an_unreachable_api_server_is_one_line(kubeconfig: Path, aio: Aio) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)

    client = KubeClient.connect(kubeconfig, transport=httpx2.MockTransport(refuse))
    try:
        with pytest.raises(KubeUnreachable) as caught:
            aio.run(client.get_scale("ns", "web-vmbox"))
    finally:
        aio.run(client.close())
    assert str(caught.value).startswith(
        f"kubernetes: the API server at {SERVER} is unreachable ([Errno 111] Connection refused)"
    )


def test_no_configuration_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(KubeError, match="no usable configuration") as caught:
        KubeClient.connect(tmp_path / "absent")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/ns/pods", "labelSelector=a%3Db", ("list", "pods", "", "ns")),
        ("GET", "/api/v1/namespaces/ns/pods", "watch=true", ("watch", "pods", "", "ns")),
        (
            "GET",
            "/apis/vmbox.dev/v1alpha1/middleboxes",
            "",
            ("list", "middleboxes", "vmbox.dev", None),
        ),
        (
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases/op",
            "",
            ("update", "leases", "coordination.k8s.io", "ns"),
        ),
        ("POST", "/api/v1/namespaces/ns/events", "", ("create", "events", "", "ns")),
        ("DELETE", "/api/v1/namespaces/ns/pods", "", ("deletecollection", "pods", "", "ns")),
        (
            "PATCH",
            "/apis/vmbox.dev/v1alpha1/namespaces/ns/middleboxes/web/status",
            "",
            ("patch", "middleboxes/status", "vmbox.dev", "ns"),
        ),
    ],
)
def test_rbac_target_of_a_request(
    method: str, path: str, query: str, expected: tuple[str, str, str, str | None]
) -> None:
    t = rbac_target(method, path, query)
    assert (t.verb, t.resource, t.group, t.namespace) == expected


def test_quantities_the_metrics_api_writes() -> None:
    assert quantity("1500000n") == Decimal("0.0015")
    assert quantity("250m") == Decimal("0.25")
    assert quantity("12Mi") == 12 * 2**20
    assert quantity("2k") == 2000
    with pytest.raises(KubeError, match="cannot read the quantity '12Zi'"):
        quantity("12Zi")


def test_go_durations() -> None:
    assert go_duration("30s") == 30.0
    assert go_duration("1m0.5s") == pytest.approx(60.5)
    assert go_duration("1h2m") == 3720.0
    assert go_duration("250ms") == pytest.approx(0.25)


# -- the lease: the pure decision on a fake clock ------------------------------------


def held(holder: str | None, renew: datetime, rv: str = "7", transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, 15, T0, renew, transitions, rv)


def test_no_lease_is_created_naming_us() -> None:
    d = decide(None, identity="a", now=T0, duration_seconds=15)
    assert d.action is LeaseAction.CREATE
    assert d.record == LeaseRecord("a", 15, T0, T0, 0, None)


def test_our_lease_is_renewed_at_its_resource_version() -> None:
    now = T0 + timedelta(seconds=10)
    d = decide(held("a", T0, transitions=2), identity="a", now=now, duration_seconds=15)
    assert d.action is LeaseAction.RENEW
    assert d.record == LeaseRecord("a", 15, T0, now, 2, "7")


def test_a_live_lease_of_another_is_waited_out_then_taken() -> None:
    other = held("b", T0, transitions=1)
    live = decide(other, identity="a", now=T0 + timedelta(seconds=14.9), duration_seconds=15)
    assert (live.action, live.record, live.expires_at) == (
        LeaseAction.WAIT,
        None,
        T0 + timedelta(seconds=15),
    )
    now = T0 + timedelta(seconds=15)
    taken = decide(other, identity="a", now=now, duration_seconds=15)
    assert taken.action is LeaseAction.TAKE
    assert taken.record == LeaseRecord("a", 15, now, now, 2, "7")


def test_expiry_counts_from_when_we_first_saw_the_record() -> None:
    # The holder's clock is 60 s behind ours: its renewTime looks long expired, but we
    # only saw this version 5 s ago, so it is still live.
    stale_looking = held("b", T0 - timedelta(seconds=60))
    d = decide(
        stale_looking,
        identity="a",
        now=T0 + timedelta(seconds=5),
        duration_seconds=15,
        seen_at=T0,
    )
    assert d.action is LeaseAction.WAIT


def test_a_released_lease_is_taken_at_once() -> None:
    mine = held("a", T0)
    later = T0 + timedelta(seconds=3)
    free = released(mine, identity="a", now=later)
    assert free == LeaseRecord(None, 1, later, later, 0, "7")
    assert released(mine, identity="b", now=later) is None
    d = decide(free, identity="b", now=later, duration_seconds=15, seen_at=later)
    assert d.action is LeaseAction.TAKE


# -- the lease over HTTP -------------------------------------------------------------


LEASES = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
LEASE = f"{LEASES}/vmbox-operator"


class LeaseServer:
    """One Lease kept as the API server keeps it: a create of an existing name is 409
    AlreadyExists, a PUT whose resourceVersion is not the current one is 409 Conflict."""

    def __init__(self, api: FakeApi) -> None:
        self.obj: Json | None = None
        self.version = 0
        api.routes[("GET", LEASE)] = self.get
        api.routes[("POST", LEASES)] = self.create
        api.routes[("PUT", LEASE)] = self.replace

    def get(self, seen: Seen) -> httpx2.Response:
        if self.obj is None:
            return status_response(404, "NotFound", 'leases "vmbox-operator" not found')
        return httpx2.Response(200, json=self.obj)

    def create(self, seen: Seen) -> httpx2.Response:
        if self.obj is not None:
            return status_response(409, "AlreadyExists", 'leases "vmbox-operator" already exists')
        return self.store(seen.body, 201)

    def replace(self, seen: Seen) -> httpx2.Response:
        assert self.obj is not None
        if seen.body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            return status_response(409, "Conflict", "the object has been modified")
        return self.store(seen.body, 200)

    def store(self, body: Json, code: int) -> httpx2.Response:
        self.version += 1
        self.obj = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        return httpx2.Response(code, json=self.obj)


def test_a_lease_is_acquired_by_create_then_renewed_at_its_version(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    LeaseServer(api)
    assert aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=T0)
    )
    later = T0 + timedelta(seconds=5, microseconds=123456)
    assert aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=later)
    )
    create, renew = api.seen[1], api.seen[3]
    assert [(s.method, s.path) for s in api.seen] == [
        ("GET", LEASE),
        ("POST", LEASES),
        ("GET", LEASE),
        ("PUT", LEASE),
    ]
    assert create.params == {"fieldManager": "vmbox-operator"}
    assert create.body["spec"] == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-12-03T06:00:00Z",
        "renewTime": "2026-12-03T06:00:00Z",
        "leaseTransitions": 0,
    }
    assert renew.body["metadata"]["resourceVersion"] == "1"  # optimistic concurrency
    assert renew.body["spec"]["renewTime"] == "2026-12-03T06:00:05.123456Z"  # MicroTime
    assert renew.body["spec"]["acquireTime"] == "2026-12-03T06:00:00Z"


def test_a_conflicting_write_means_not_leading(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "vmbox-operator", "namespace": "ns", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": "a",
            "leaseDurationSeconds": 15,
            "renewTime": "2026-12-03T06:00:00.000000Z",
        },
    }
    api.routes[("GET", LEASE)] = httpx2.Response(200, json=lease)
    api.routes[("PUT", LEASE)] = status_response(409, "Conflict", "the object has been modified")
    now = T0 + timedelta(seconds=5)
    assert not aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=now)
    )
    assert api.seen[-1].body["metadata"]["resourceVersion"] == "7"


def test_a_live_lease_of_another_is_not_written(kube: KubeClient, api: FakeApi, aio: Aio) -> None:
    server = LeaseServer(api)
    assert aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="b", duration_seconds=15, now=T0)
    )
    writes = len(api.seen)
    # "a" first sees b's lease at T0 + 1; it is b's until T0 + 16 on a's clock.
    for second in (1, 10, 15.9):
        now = T0 + timedelta(seconds=second)
        assert not aio.run(
            kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=now)
        )
    assert [s.method for s in api.seen[writes:]] == ["GET"] * 3
    now = T0 + timedelta(seconds=16)
    assert aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=now)
    )
    assert server.obj is not None
    assert server.obj["spec"]["holderIdentity"] == "a"
    assert server.obj["spec"]["leaseTransitions"] == 1


def test_two_operators_racing_never_both_lead(kubeconfig: Path, api: FakeApi, aio: Aio) -> None:
    """Both read, then both write, on every round (the handler yields between requests);
    the resourceVersion lets one through. Over 40 rounds of a fake clock, with the leader
    sometimes missing its renewals, at most one of them leads at any moment."""
    LeaseServer(api)
    transport = httpx2.MockTransport(api.handle)
    a = KubeClient.connect(kubeconfig, transport=transport)
    b = KubeClient.connect(kubeconfig, transport=transport)

    async def rounds() -> list[tuple[bool, bool]]:
        out = []
        for i in range(40):
            now = T0 + timedelta(seconds=4 * i)
            # a stops renewing for rounds 10..19 (a paused leader), then comes back.
            a_try = (
                asyncio.sleep(0, False)
                if 10 <= i < 20
                else a.hold_lease(
                    "ns", "vmbox-operator", identity="a", duration_seconds=15, now=now
                )
            )
            b_try = b.hold_lease("ns", "vmbox-operator", identity="b", duration_seconds=15, now=now)
            got_a, got_b = await asyncio.gather(a_try, b_try)
            out.append((bool(got_a), bool(got_b)))
        return out

    try:
        results = aio.run(rounds())
    finally:
        aio.run(a.close())
        aio.run(b.close())
    assert all(not (x and y) for x, y in results)
    # A leader believes it leads for the lease's duration after each success: the
    # other may only win once that has passed (a paused leader is waited out).
    last: tuple[str, int] | None = None
    for i, (got_a, got_b) in enumerate(results):
        for who, got in (("a", got_a), ("b", got_b)):
            if not got:
                continue
            if last is not None and last[0] != who:
                assert 4 * i >= last[1] + 15, f"{who} led at {4 * i} s, {last} had it"
            last = (who, 4 * i)
    assert any(x for x, _ in results) and any(y for _, y in results)  # the lead changed hands
    assert results[0].count(True) == 1  # the first race: exactly one create won


def test_release_frees_the_lease_for_the_next_operator(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    server = LeaseServer(api)
    assert aio.run(
        kube.hold_lease("ns", "vmbox-operator", identity="a", duration_seconds=15, now=T0)
    )
    later = T0 + timedelta(seconds=2)
    assert aio.run(kube.release_lease("ns", "vmbox-operator", identity="a", now=later))
    assert server.obj is not None
    assert server.obj["spec"].get("holderIdentity") is None
    assert server.obj["spec"]["leaseDurationSeconds"] == 1
    assert not aio.run(kube.release_lease("ns", "vmbox-operator", identity="a", now=later))


def test_the_api_names_match_the_manifests() -> None:
    manifests = pytest.importorskip("vmbox.kube.manifests")
    from vmbox.runtime import kubernetes as k

    assert (k.GROUP, k.VERSION, k.KIND, k.PLURAL) == (
        manifests.GROUP,
        manifests.VERSION,
        manifests.KIND,
        manifests.PLURAL,
    )
    assert (k.FIELD_MANAGER, k.DELETION_COST) == (manifests.FIELD_MANAGER, manifests.DELETION_COST)


def test_every_owned_object_the_manifests_render_is_applied_to_its_path(
    kube: KubeClient, api: FakeApi, aio: Aio
) -> None:
    """vmbox.kube.manifests' own objects, sent as they are: each goes to its kind's path."""
    manifests = pytest.importorskip("vmbox.kube.manifests")
    spec = yaml.safe_load((Path(__file__).parents[2] / "examples" / "autoscale.yaml").read_text())
    spec.pop("service")
    mb = {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "Middlebox",
        "metadata": {"name": "web", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": spec,
    }
    objects = manifests.owned_objects(mb, replicas=2, image="vmbox:test")
    for obj in objects:
        api.routes[("PATCH", object_path(obj))] = echo()
        aio.run(kube.apply(obj))
    assert [(s.method, s.path, s.params, s.content_type) for s in api.seen] == [
        ("PATCH", object_path(obj), SSA, APPLY) for obj in objects
    ]
    assert [s.body for s in api.seen] == objects
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Deployment", "Service"}


def object_path(obj: Json) -> str:
    """The REST path of a namespaced object, written out independently of lightkube."""
    plural = {
        "ConfigMap": "configmaps",
        "Deployment": "deployments",
        "Service": "services",
        "PodDisruptionBudget": "poddisruptionbudgets",
    }[obj["kind"]]
    group = "api/v1" if obj["apiVersion"] == "v1" else f"apis/{obj['apiVersion']}"
    meta = obj["metadata"]
    return f"/{group}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
