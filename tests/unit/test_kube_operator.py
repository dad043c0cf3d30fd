"""The operator's driver (vmbox.kube.operator) against an in-memory API, no sockets.

`Cluster` is the API server's state shared by every operator: objects by
(apiVersion, kind, namespace, name), pods the test controls, pod metrics, and a
Lease kept with resourceVersions the way the API server keeps them (a write
at a stale version is refused, so two operators never both win). `FakeApi`
is one operator's client over it (KubeClient's calls), recording each write
with who made it. Nothing here runs against a real API server.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import Aio
from vmbox.cli.main import main
from vmbox.kube import operator as operator_module
from vmbox.kube.manifests import DELETION_COST, ETCD_ENDPOINT, MIDDLEBOX_LABEL
from vmbox.kube.operator import Operator, Stores
from vmbox.kube.reconcile import Event, Memory, Patch, Result
from vmbox.runtime.kubernetes import (
    KubeConflict,
    KubeForbidden,
    KubeUnreachable,
    LeaseAction,
    LeaseRecord,
    PodUsage,
    decide,
)
from vmbox.runtime.kubernetes.lease import released
from vmbox.state import keys
from vmbox.state.access import StoreSpec
from vmbox.state.memory import MemoryStore
from vmbox.state.store import Store, StoreUnavailable

NS, IMAGE = "default", "vmbox:test"
MB_API = "vmbox.dev/v1alpha1"
Json = dict[str, Any]
Key = tuple[str, str, str, str]


def middlebox(name: str = "web", count: int = 2) -> Json:
    return {
        "apiVersion": MB_API,
        "kind": "Middlebox",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "listen": "127.0.0.1:9001",
            "upstream": "127.0.0.1:9200",
            "middlebox": {"limit": 100},
            "replicas": {"count": count, "min": 1, "max": 4, "drain_timeout": "2s"},
        },
    }


def pod(name: str, ip: str, *, mb: str = "web", uid: str = "") -> Json:
    limits = {"memory": "64Mi"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid or f"uid-{name}",
            "labels": {MIDDLEBOX_LABEL: mb},
        },
        "spec": {"containers": [{"name": "replica", "resources": {"limits": limits}}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "replica", "restartCount": 0, "state": {}}],
        },
    }


def merged(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merged(out.get(k), v)
    return out


@dataclass
class Cluster:
    objects: dict[Key, Json] = field(default_factory=dict)
    pods: list[Json] = field(default_factory=list)
    usage: dict[str, PodUsage] = field(default_factory=dict)
    lease: LeaseRecord | None = None
    version: int = 0
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (who, verb, what)
    broken: set[str] = field(default_factory=set)  # Middlebox names whose reads are refused
    lease_down: bool = False

    def add(self, obj: Json) -> None:
        meta = obj["metadata"]
        self.objects[(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])] = obj

    def get(self, api_version: str, kind: str, name: str) -> Json | None:
        return self.objects.get((api_version, kind, NS, name))

    def written(self, who: str | None = None) -> list[tuple[str, str, str]]:
        return [w for w in self.writes if who is None or w[0] == who]


class FakeApi:
    """One operator's client: KubeClient's calls over the shared Cluster."""

    def __init__(self, cluster: Cluster, who: str) -> None:
        self.cluster = cluster
        self.who = who
        self.seen: dict[str | None, datetime] = {}  # lease version -> when first seen
        self.on_list_pods: list[Any] = []  # callables run when pods are listed

    def _write(self, verb: str, what: str) -> None:
        self.cluster.writes.append((self.who, verb, what))

    async def hold_lease(
        self, namespace: str, name: str, *, identity: str, duration_seconds: int, now: datetime
    ) -> bool:
        assert (namespace, name) == ("vmbox-system", "vmbox-operator")
        if self.cluster.lease_down:
            raise KubeUnreachable("kubernetes: the API server at https://k8s.test is unreachable")
        observed = self.cluster.lease
        version = observed.resource_version if observed else None
        seen_at = self.seen.setdefault(version, now)
        decision = decide(
            observed, identity=identity, now=now, duration_seconds=duration_seconds, seen_at=seen_at
        )
        if decision.record is None:
            return False
        await asyncio.sleep(0)  # another operator may write between our read and our write
        try:
            self._write_lease(decision.record, create=decision.action is LeaseAction.CREATE)
        except KubeConflict:
            return False
        return True

    async def release_lease(
        self, namespace: str, name: str, *, identity: str, now: datetime
    ) -> bool:
        observed = self.cluster.lease
        record = released(observed, identity=identity, now=now) if observed else None
        if record is None:
            return False
        self._write_lease(record, create=False)
        return True

    def _write_lease(self, record: LeaseRecord, *, create: bool) -> None:
        current = self.cluster.lease
        if create and current is not None:
            raise KubeConflict("kubernetes: 409 already exists")
        if not create and (current is None or current.resource_version != record.resource_version):
            raise KubeConflict("kubernetes: 409 conflict on update leases")
        self.cluster.version += 1
        self.cluster.lease = replace(record, resource_version=str(self.cluster.version))
        self._write("lease", str(record.holder))

    async def list_middleboxes(self, namespace: str | None = None) -> list[Json]:
        found = [o for (a, k, _, _), o in self.cluster.objects.items() if k == "Middlebox"]
        return copy.deepcopy(sorted(found, key=lambda o: str(o["metadata"]["name"])))

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Json | None:
        if name in self.cluster.broken:
            raise KubeForbidden(f"kubernetes: 403 Forbidden: may not get {kind.lower()}s {name}")
        return copy.deepcopy(self.cluster.objects.get((api_version, kind, namespace, name)))

    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[Json]:
        for hook in self.on_list_pods:
            hook()
        return [
            copy.deepcopy(p)
            for p in self.cluster.pods
            if all(p["metadata"]["labels"].get(k) == v for k, v in labels.items())
        ]

    async def pod_metrics(self, namespace: str, labels: Mapping[str, str]) -> list[PodUsage]:
        return list(self.cluster.usage.values())

    async def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> Json:
        self._write("patch", f"{kind} {name}")
        if kind == "Pod":
            target = next(p for p in self.cluster.pods if p["metadata"]["name"] == name)
            target.update(merged(target, body))
            return target
        key = (api_version, kind, namespace, name)
        self.cluster.objects[key] = merged(self.cluster.objects[key], body)
        return self.cluster.objects[key]

    async def apply(self, obj: Mapping[str, Any]) -> Json:
        self._write("apply", f"{obj['kind']} {obj['metadata']['name']}")
        self.cluster.add(copy.deepcopy(dict(obj)))
        return dict(obj)

    async def apply_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Json:
        self._write("status", f"Middlebox {name}")
        mb = self.cluster.objects[(MB_API, "Middlebox", namespace, name)]
        mb["status"] = copy.deepcopy(dict(status))
        return mb

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
        assert involved["kind"] == "Middlebox" and instance == self.who
        self._write("event", f"{reason}: {message}")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_800_000_000.0 + self.t


async def no_scrape(address: str, timeout: float) -> dict[str, float]:
    raise OSError(f"{address}: connection refused")


def make(cluster: Cluster, who: str, clock: Clock | None = None, **kw: Any) -> Operator:
    if clock is not None:
        kw |= {"clock": clock.mono, "wall": clock.wall}
    return Operator(
        FakeApi(cluster, who), None, who, image=IMAGE, scrape=kw.pop("scrape", no_scrape), **kw
    )


OWNED = {"ConfigMap web", "Deployment web", "PodDisruptionBudget web", "Service web"}


def applied(cluster: Cluster, who: str | None = None) -> set[str]:
    return {what for _, verb, what in cluster.written(who) if verb == "apply"}


# -- one pass --------------------------------------------------------------------


def test_a_new_middlebox_gets_its_owned_objects_and_status(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox(count=2))
    op = make(cluster, "a", clock)
    assert aio.run(op.renew())
    delay = aio.run(op.reconcile_all())
    assert applied(cluster) == OWNED
    deployment = cluster.get("apps/v1", "Deployment", "web")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    status = cluster.get(MB_API, "Middlebox", "web")["status"]  # type: ignore[index]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["message"]) == ("False", "0 of 2 replicas ready")
    events = [w for w in cluster.written() if w[1] == "event"]
    assert len(events) == 4 and all("created" in w[2] for w in events)
    assert 0 < delay <= operator_module.RESYNC
    assert ("default", "web") in op.memory
    # The order the reconcile doc prescribes: apply, then status, then events.
    verbs = [verb for _, verb, _ in cluster.written() if verb != "lease"]
    assert verbs == ["apply"] * 4 + ["status"] + ["event"] * 4


def test_a_second_pass_over_what_it_applied_applies_nothing(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock)
    aio.run(op.renew())
    aio.run(op.reconcile_all())
    before = len(applied(cluster))
    cluster.writes.clear()
    clock.t += 1
    aio.run(op.reconcile_all())
    assert before == 4
    assert applied(cluster) == set()  # read back through get_object, found equal
    assert [w[1] for w in cluster.written()] == ["status"]


def _stores(store: MemoryStore, opened: list[StoreSpec]) -> Stores:
    async def connect(target: StoreSpec) -> Store:
        opened.append(target)
        return store

    return Stores(connect)


def test_the_spec_is_published_to_the_pods_store_before_anything_is_applied(aio: Aio) -> None:
    cluster, clock, store = Cluster(), Clock(), MemoryStore()
    opened: list[StoreSpec] = []
    cluster.add(middlebox())
    op = make(cluster, "a", clock, stores=_stores(store, opened))
    aio.run(op.renew())
    aio.run(op.reconcile_all())
    # The pods' store (the managed etcd, with the mounted Secrets' files), once.
    assert [t.endpoints for t in opened] == [(ETCD_ENDPOINT,)]
    stored = aio.run(store.get(keys.spec_key("web")))
    assert stored is not None
    configmap = cluster.get("v1", "ConfigMap", "web")
    assert configmap is not None
    assert json.loads(stored.value) == json.loads(configmap["data"]["spec.json"])
    limit = aio.run(store.get(keys.state_key("web", "limit")))
    assert limit is not None and limit.value == b"100"
    # The same spec again: nothing written, the connection reused.
    revision = stored.mod_revision
    clock.t += 1
    aio.run(op.reconcile_all())
    again = aio.run(store.get(keys.spec_key("web")))
    assert again is not None and again.mod_revision == revision and len(opened) == 1


def test_a_changed_limit_reaches_the_store_and_overwrites_its_seed(aio: Aio) -> None:
    cluster, clock, store = Cluster(), Clock(), MemoryStore()
    cluster.add(middlebox())
    op = make(cluster, "a", clock, stores=_stores(store, []))
    aio.run(op.renew())
    aio.run(op.reconcile_all())
    aio.run(store.put(keys.state_key("web", "limit"), b"70"))  # `vmbox set` meanwhile
    clock.t += 1
    aio.run(op.reconcile_all())
    kept = aio.run(store.get(keys.state_key("web", "limit")))
    assert kept is not None and kept.value == b"70"  # an unchanged spec keeps the live value
    changed = middlebox()
    changed["spec"]["middlebox"]["limit"] = 50
    cluster.add(changed)
    clock.t += 1
    aio.run(op.reconcile_all())
    limit = aio.run(store.get(keys.state_key("web", "limit")))
    assert limit is not None and limit.value == b"50"  # the operator changed the spec


def test_an_unreachable_store_is_one_line_and_nothing_is_applied(
    aio: Aio, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse(target: StoreSpec) -> Store:
        raise StoreUnavailable("etcd at vmbox-etcd:2379: connection refused")

    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock, stores=Stores(refuse))
    aio.run(op.renew())
    with caplog.at_level(logging.WARNING):
        aio.run(op.reconcile_all())
    assert applied(cluster) == set()  # pods would start with no spec to read
    lines = [r.getMessage() for r in caplog.records if "web" in r.getMessage()]
    assert lines == ["middlebox default/web: etcd at vmbox-etcd:2379: connection refused"]


def test_a_second_middlebox_of_one_name_in_one_store_is_refused_not_merged(aio: Aio) -> None:
    # Both would run service "web" in the managed etcd: one spec, one limit, one membership.
    cluster, clock = Cluster(), Clock()
    first, second = middlebox(), middlebox()
    first["metadata"]["creationTimestamp"] = "2026-12-01T10:00:00Z"
    second["metadata"] |= {"namespace": "team-b", "creationTimestamp": "2026-12-02T10:00:00Z"}
    cluster.add(second)  # listed first: the older one keeps the name all the same
    cluster.add(first)
    op = make(cluster, "a", clock)
    aio.run(op.renew())
    aio.run(op.reconcile_all())
    team_b = {key[1] for key in cluster.objects if key[2] == "team-b"}
    assert team_b == {"Middlebox"}  # nothing applied for the younger one
    assert {key[1] for key in cluster.objects if key[2] == NS} >= {"Deployment", "Service"}
    status = cluster.objects[(MB_API, "Middlebox", "team-b", "web")]["status"]
    rejected = next(c for c in status["conditions"] if c["type"] == "SpecRejected")
    assert rejected["status"] == "True"
    assert "taken by middlebox default/web in the same store" in rejected["message"]


def test_a_deleted_service_is_applied_again(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock)
    aio.run(op.renew())
    aio.run(op.reconcile_all())
    del cluster.objects[("v1", "Service", NS, "web")]
    cluster.writes.clear()
    aio.run(op.reconcile_all())
    assert applied(cluster) == {"Service web"}


def test_the_result_is_carried_out_patches_apply_status_events_in_that_order(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    cluster.pods = [pod("web-a", "10.0.0.1")]
    op = make(cluster, "a", clock)
    aio.run(op.renew())
    mark = {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
    result = Result(
        apply=(
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS}},
        ),
        patches=(
            Patch(MB_API, "Middlebox", NS, "web", {"spec": {"replicas": {"count": 1}}}),
            Patch("v1", "Pod", NS, "web-a", mark),
        ),
        status={"replicas": 1},
        events=(Event("Normal", "Draining", "marked"),),
        requeue_after=1.0,
        memory=Memory(),
    )
    aio.run(op.carry_out(middlebox(), result))
    assert [(v, w) for _, v, w in cluster.written() if v != "lease"] == [
        ("patch", "Middlebox web"),
        ("patch", "Pod web-a"),
        ("apply", "Service web"),
        ("status", "Middlebox web"),
        ("event", "Draining: marked"),
    ]
    assert cluster.pods[0]["metadata"]["annotations"] == {DELETION_COST: "-1000"}
    assert cluster.get(MB_API, "Middlebox", "web")["spec"]["replicas"]["count"] == 1  # type: ignore[index]


def test_a_failing_middlebox_is_one_log_line_and_the_others_are_reconciled(
    aio: Aio, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox("bad"))
    cluster.add(middlebox("web"))
    cluster.broken = {"bad"}
    op = make(cluster, "a", clock)
    aio.run(op.renew())
    with caplog.at_level(logging.WARNING, logger="vmbox.kube.operator"):
        aio.run(op.reconcile_all())
    assert applied(cluster) == OWNED  # web's, none of bad's
    assert {w[2] for w in cluster.written() if w[1] == "status"} == {"Middlebox web"}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["middlebox default/bad: kubernetes: 403 Forbidden: may not get configmaps bad"]
    assert ("default", "bad") not in op.memory


# -- leadership ------------------------------------------------------------------


def test_a_follower_does_not_act_while_the_leader_holds_the_lease(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    a, b = make(cluster, "a", clock), make(cluster, "b", clock)
    assert aio.run(a.renew())
    assert not aio.run(b.renew())
    aio.run(b.reconcile_all())  # a pass the follower's loop would not start: still no write
    assert cluster.written("b") == []
    clock.t += 5  # a renews every duration/3; b still waits
    assert aio.run(a.renew()) and not aio.run(b.renew())
    assert cluster.lease is not None and cluster.lease.holder == "a"


def test_two_operators_racing_for_a_new_lease_never_both_lead(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()

    async def race() -> list[bool]:
        a, b = make(cluster, "a", clock), make(cluster, "b", clock)
        return list(await asyncio.gather(a.renew(), b.renew()))

    assert sorted(aio.run(race())) == [False, True]


def test_a_leader_that_cannot_renew_stops_writing_at_the_deadline(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock)
    assert aio.run(op.renew())
    cluster.lease_down = True
    clock.t += 5
    assert aio.run(op.renew())  # not confirmed, but within the deadline (10 s of 15)
    clock.t += 5.01  # 10.01 s after the last renewal began: before the Lease can expire
    assert not op.leading()
    cluster.writes.clear()
    aio.run(op.reconcile_all())
    assert cluster.written() == []


def test_a_leader_whose_lease_was_taken_stops_at_once(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock)
    assert aio.run(op.renew())
    assert cluster.lease is not None
    cluster.lease = replace(cluster.lease, holder="b", resource_version="99")  # b took it
    clock.t += 1
    assert not aio.run(op.renew())
    assert not op.leading()
    cluster.writes.clear()
    aio.run(op.reconcile_all())
    assert cluster.written() == []


def test_leadership_lapsing_in_the_middle_of_a_pass_stops_its_writes(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.add(middlebox())
    op = make(cluster, "a", clock)
    assert aio.run(op.renew())

    def slow_read() -> None:
        clock.t += 11  # the pass read for longer than the renew deadline

    assert isinstance(op.client, FakeApi)
    op.client.on_list_pods.append(slow_read)
    cluster.writes.clear()
    aio.run(op.reconcile_all())
    assert cluster.written() == []
    assert op.memory == {}


def test_run_leads_reconciles_and_releases_on_stop_then_the_other_takes_over(aio: Aio) -> None:
    cluster = Cluster()
    cluster.add(middlebox())
    fast: dict[str, Any] = {"lease_duration": 3, "resync": 0.05}

    async def scenario() -> None:
        a, b = make(cluster, "a", **fast), make(cluster, "b", **fast)
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        run_a = asyncio.create_task(a.run(stop_a))
        await asyncio.sleep(0.2)
        run_b = asyncio.create_task(b.run(stop_b))
        await asyncio.sleep(0.4)
        assert applied(cluster, "a") == OWNED
        assert [w for w in cluster.written("b")] == []  # b followed
        stop_a.set()
        await run_a
        assert cluster.lease is not None and cluster.lease.holder is None  # released
        await asyncio.sleep(1.5)  # b renews every second: it takes the released lease
        stop_b.set()
        await run_b
        assert any(verb == "status" for _, verb, _ in cluster.written("b"))

    aio.run(scenario(), timeout=10)


# -- samples ---------------------------------------------------------------------


def test_samples_rates_from_two_reads_and_usage_from_the_metrics_api(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()
    cluster.pods = [pod("web-a", "10.0.0.1"), pod("web-b", "10.0.0.2")]
    cluster.usage = {"web-a": PodUsage("web-a", 0.25, 32 << 20, 30.0, "t")}
    counters = {"vmbox_packets_received_total": 100.0, "vmbox_bytes_received_total": 1000.0}

    async def fake_scrape(address: str, timeout: float) -> dict[str, float]:
        if address != "10.0.0.1:9108":
            raise OSError("connection refused")
        return dict(counters)

    op = make(cluster, "a", clock, scrape=fake_scrape)
    labels = {MIDDLEBOX_LABEL: "web"}
    first = aio.run(op.samples(NS, labels, cluster.pods))
    clock.t += 2
    counters["vmbox_packets_received_total"] = 300.0
    counters["vmbox_bytes_received_total"] = 5000.0
    second = aio.run(op.samples(NS, labels, cluster.pods))
    assert set(first) == set(second) == {"web-a"}  # web-b's /metrics cannot be read
    assert first["web-a"].pps_in is None  # one read: no rate yet
    s = second["web-a"]
    assert (s.pps_in, s.bytes_in_per_s) == (100.0, 2000.0)
    assert s.memory_bytes == 32 << 20 and s.memory_limit == 64 << 20
    assert s.memory_percent == 50.0 and s.cpu_percent == 25.0
    assert s.value("pps") == 100.0


def test_a_restarted_pod_of_the_same_name_starts_its_rates_again(aio: Aio) -> None:
    cluster, clock = Cluster(), Clock()

    async def fake_scrape(address: str, timeout: float) -> dict[str, float]:
        return {"vmbox_packets_received_total": 50.0}

    op = make(cluster, "a", clock, scrape=fake_scrape)
    aio.run(op.samples(NS, {}, [pod("web-a", "10.0.0.1", uid="one")]))
    clock.t += 1
    again = aio.run(op.samples(NS, {}, [pod("web-a", "10.0.0.1", uid="two")]))
    assert again["web-a"].pps_in is None
    assert again["web-a"].memory_percent is None  # no metrics API answer: not guessed


# -- the command -----------------------------------------------------------------


def test_operator_help_says_what_it_does() -> None:
    out = CliRunner().invoke(main, ["operator", "--help"])
    assert out.exit_code == 0
    assert "Lease" in out.output and "--namespace" in out.output and "POD_NAME" in out.output


def test_operator_without_a_configuration_is_one_line(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = CliRunner().invoke(main, ["operator"])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kubernetes: no usable configuration")


def test_operator_with_an_unreachable_api_server_is_one_line(monkeypatch: Any) -> None:
    from vmbox.cli import k8s

    class Unreachable:
        async def read_lease(self, namespace: str, name: str) -> None:
            raise KubeUnreachable("kubernetes: the API server at https://k8s.test is unreachable")

        async def close(self) -> None:
            return None

    monkeypatch.setattr(k8s, "_connect", lambda: Unreachable())
    out = CliRunner().invoke(main, ["operator", "--identity", "x"])
    assert out.exit_code == 1
    assert out.output == "error: kubernetes: the API server at https://k8s.test is unreachable\n"
