"""The Middlebox reconcile, pure, on a fake clock and a fake cluster (vmbox.kube.reconcile).

`Cluster` plays the API server and the ReplicaSet: it carries a Result out
as the operator's driver does (patches, apply, status, memory) and, when
told to, deletes or creates pods as a ReplicaSet would (pending, then
unready, then the lowest pod-deletion-cost go first), so a test walks a
Middlebox through creation, scaling, drains, crashes and spec changes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from vmbox.control.monitor import Sample
from vmbox.control.plan import STABLE_AFTER
from vmbox.kube.manifests import DELETION_COST, MIDDLEBOX_LABEL
from vmbox.kube.pods import LEAVING_COST
from vmbox.kube.reconcile import (
    PENDING_REQUEUE,
    SPEC_HASH,
    Memory,
    Result,
    reconcile,
)

NAME, NS, IMAGE = "web", "default", "vmbox:test"
AUTO = {
    "metric": "pps",
    "scale_up_at": 150,
    "scale_down_at": 40,
    "up_for": 2,
    "down_for": 2,
    "cooldown": "5s",
}


def middlebox(count: int = 2, autoscale: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "listen": "127.0.0.1:9001",
        "upstream": "127.0.0.1:9200",
        "middlebox": {"limit": 100},
        "replicas": {"count": count, "min": 1, "max": 4, "drain_timeout": "2s"},
    }
    if autoscale is not None:
        spec["autoscale"] = autoscale
    return {
        "apiVersion": "vmbox.dev/v1alpha1",
        "kind": "Middlebox",
        "metadata": {"name": NAME, "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": spec,
    }


def pod(
    name: str, *, phase: str = "Running", ready: bool = True, restarts: int = 0
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": {MIDDLEBOX_LABEL: NAME}},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "replica", "restartCount": restarts, "state": {}}],
        },
    }


def sample(name: str, at: float, pps: float = 0.0) -> Sample:
    return Sample(name, at, 40 << 20, 70 << 20, 57.0, 5.0, pps, pps, 0.0, 0.0, 0.0, "metrics")


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


@dataclass
class Cluster:
    """The API server's objects, a ReplicaSet, a clock and the operator's memory."""

    mb: dict[str, Any] = field(default_factory=middlebox)
    objects: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, Sample] = field(default_factory=dict)
    memory: Memory = field(default_factory=Memory)
    now: float = 1_800_000_000.0
    made: int = 0

    def reconcile(self, *, carry_out: bool = True) -> Result:
        seen = copy.deepcopy((self.mb, self.objects, self.pods))
        result = reconcile(
            self.mb,
            objects=self.objects,
            pods=self.pods,
            samples=self.samples,
            memory=self.memory,
            now=self.now,
            image=IMAGE,
        )
        assert (self.mb, self.objects, self.pods) == seen, "reconcile changed its input"
        if carry_out:
            self.carry_out(result)
        return result

    def carry_out(self, result: Result) -> None:
        for patch in result.patches:
            if patch.kind == "Middlebox":
                self.mb["spec"]["replicas"].update(patch.body["spec"]["replicas"])
                self.mb["metadata"]["generation"] += 1
            else:
                target = self.pod(patch.name)
                notes = target["metadata"].setdefault("annotations", {})
                for key, value in patch.body["metadata"]["annotations"].items():
                    if value is None:
                        notes.pop(key, None)
                    else:
                        notes[key] = value
        for obj in result.apply:
            self.objects[obj["kind"]] = copy.deepcopy(obj)
        self.mb["status"] = copy.deepcopy(result.status)
        self.memory = result.memory

    def pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.pods if p["metadata"]["name"] == name)

    def live(self) -> list[str]:
        return sorted(
            p["metadata"]["name"] for p in self.pods if not p["metadata"].get("deletionTimestamp")
        )

    def replica_set(self) -> list[str]:
        """Delete or create pods toward the Deployment's replicas; the names deleted."""
        deployment = self.objects["Deployment"]
        assert deployment is not None
        want = deployment["spec"]["replicas"]
        live = [p for p in self.pods if not p["metadata"].get("deletionTimestamp")]
        while len(live) < want:
            self.made += 1
            live.append(pod(f"{NAME}-{self.made}"))
            self.pods.append(live[-1])

        def rank(p: dict[str, Any]) -> tuple[int, int, int]:
            ready = condition(p["status"], "Ready")["status"] == "True"
            cost = int((p["metadata"].get("annotations") or {}).get(DELETION_COST, "0"))
            return (p["status"]["phase"] == "Running", ready, cost)

        gone = sorted(live, key=rank)[: max(0, len(live) - want)]
        for p in gone:
            p["metadata"]["deletionTimestamp"] = "2027-01-15T08:00:00Z"
        return [p["metadata"]["name"] for p in gone]

    def settle(self) -> None:
        """Reconcile, let the ReplicaSet act, forget deleted pods, mark the rollout done."""
        for _ in range(4):
            self.reconcile()
            self.replica_set()
            self.pods = [p for p in self.pods if not p["metadata"].get("deletionTimestamp")]
            deployment = self.objects["Deployment"]
            assert deployment is not None
            deployment.setdefault("metadata", {})["generation"] = 1
            deployment["status"] = {
                "observedGeneration": 1,
                "replicas": len(self.pods),
                "updatedReplicas": len(self.pods),
            }


def steady(count: int = 3, autoscale: dict[str, Any] | None = None) -> Cluster:
    cluster = Cluster(mb=middlebox(count, autoscale))
    cluster.settle()
    assert len(cluster.live()) == count
    return cluster


def test_create_from_nothing_applies_every_owned_object_at_the_spec_count() -> None:
    cluster = Cluster(mb=middlebox(count=2))
    result = cluster.reconcile()
    assert sorted(o["kind"] for o in result.apply) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ]
    deployment = next(o for o in result.apply if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == result.replicas == 2
    assert SPEC_HASH in deployment["spec"]["template"]["metadata"]["annotations"]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "u-1" for o in result.apply)
    assert result.store_spec is not None and json.loads(result.store_spec)["service"] == NAME
    assert [e.message for e in result.events if e.reason == "Applied"] == [
        f"{k} web created" for k in ("ConfigMap", "Deployment", "PodDisruptionBudget", "Service")
    ]
    assert condition(result.status, "Ready")["status"] == "False"
    assert condition(result.status, "Progressing")["status"] == "True"
    assert result.requeue_after is not None
    assert result.patches == ()
    # Once the pods run, the next pass changes nothing and does not come back by itself.
    cluster.settle()
    again = cluster.reconcile()
    assert again.apply == () and again.patches == () and again.requeue_after is None
    assert condition(again.status, "Ready")["status"] == "True"
    assert condition(again.status, "Progressing")["status"] == "False"
    assert again.status["replicas"] == again.status["readyReplicas"] == 2


def test_autoscaler_scales_up_on_fresh_samples_only() -> None:
    cluster = steady(count=2, autoscale=AUTO)
    names = cluster.live()
    cluster.now += 1
    cluster.samples = {n: sample(n, cluster.now, pps=200) for n in names}
    first = cluster.reconcile()
    assert first.patches == ()  # one sample of up_for 2
    cluster.now += 1
    assert cluster.reconcile().patches == (), "the same samples counted twice"
    cluster.samples = {n: sample(n, cluster.now, pps=200) for n in names}
    up = cluster.reconcile()
    assert [(p.kind, p.body) for p in up.patches] == [
        ("Middlebox", {"spec": {"replicas": {"count": 3}}})
    ]
    deployment = next(o for o in up.apply if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3  # at once: a scale-up waits for nothing
    last = up.status["lastScale"]
    assert (last["from"], last["to"]) == (2, 3) and "pps 200.0 >= 150" in last["reason"]
    assert any(e.reason == "Autoscaled" and "2 -> 3" in e.message for e in up.events)
    assert cluster.mb["spec"]["replicas"]["count"] == 3


def test_scale_down_marks_the_least_loaded_pod_and_lowers_the_count_once_it_is_marked() -> None:
    cluster = steady(count=3)
    loads = dict(zip(cluster.live(), (50.0, 5.0, 30.0), strict=True))
    quiet = min(loads, key=loads.__getitem__)
    cluster.samples = {n: sample(n, cluster.now, pps=v) for n, v in loads.items()}
    cluster.mb["spec"]["replicas"]["count"] = 2  # kubectl scale middlebox web --replicas 2

    marking = cluster.reconcile(carry_out=False)
    assert [(p.kind, p.name, p.body) for p in marking.patches] == [
        ("Pod", quiet, {"metadata": {"annotations": {DELETION_COST: LEAVING_COST}}})
    ]
    assert marking.replicas == 3 and not any(o["kind"] == "Deployment" for o in marking.apply)
    assert marking.requeue_after == PENDING_REQUEUE
    # The mark did not reach the pod (a failed patch): the count still holds.
    cluster.carry_out(Result((), (), marking.status, (), None, marking.memory))
    again = cluster.reconcile()
    assert again.replicas == 3 and [p.name for p in again.patches] == [quiet]
    # The observed pod carries the mark: now the count drops, and nothing else is marked.
    lower = cluster.reconcile()
    assert lower.patches == () and lower.replicas == 2
    deployment = next(o for o in lower.apply if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # Before the ReplicaSet acts the mark stays (it decides which pod goes).
    assert cluster.reconcile().patches == ()
    assert cluster.replica_set() == [quiet]
    assert cluster.reconcile().patches == ()
    last = cluster.mb["status"]["lastScale"]
    assert (last["from"], last["to"], last["reason"]) == (3, 2, "spec.replicas.count set to 2")


def test_autoscaled_scale_down_drains_the_pod_the_replicaset_ranks_first() -> None:
    cluster = steady(count=3, autoscale=AUTO)
    names = cluster.live()
    cluster.pod(names[0])["status"]["conditions"][0]["status"] = "False"  # unready: goes first
    for _ in range(2):
        cluster.now += 1
        cluster.samples = {n: sample(n, cluster.now, pps=10 + i) for i, n in enumerate(names)}
        decided = cluster.reconcile()
    assert [p.kind for p in decided.patches] == ["Middlebox", "Pod"]
    assert decided.patches[1].name == names[0]
    assert decided.replicas == 3 and cluster.mb["spec"]["replicas"]["count"] == 2
    assert cluster.reconcile().replicas == 2
    assert cluster.replica_set() == [names[0]]


def test_a_scale_up_while_a_pod_is_marked_removes_the_mark() -> None:
    cluster = steady(count=3)
    cluster.mb["spec"]["replicas"]["count"] = 2
    marked = cluster.reconcile().patches[0].name
    cluster.mb["spec"]["replicas"]["count"] = 4
    result = cluster.reconcile()
    assert [(p.name, p.body) for p in result.patches] == [
        (marked, {"metadata": {"annotations": {DELETION_COST: None}}})
    ]
    assert result.replicas == 4
    assert DELETION_COST not in cluster.pod(marked)["metadata"]["annotations"]


def test_a_crash_looping_pod_degrades_and_its_samples_decide_nothing() -> None:
    auto = AUTO | {"up_for": 1}
    cluster = steady(count=2, autoscale=auto)
    sick, well = cluster.live()
    cluster.pod(sick)["status"]["containerStatuses"][0]["restartCount"] = 1
    cluster.now += 1
    cluster.samples = {
        sick: sample(sick, cluster.now, pps=900),
        well: sample(well, cluster.now, 100),
    }
    result = cluster.reconcile()
    degraded = condition(result.status, "Degraded")
    assert degraded["status"] == "True" and sick in degraded["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "CrashLoop")]
    assert result.patches == ()  # its 900/s would have scaled up (below)
    assert result.requeue_after is not None and result.requeue_after <= STABLE_AFTER
    warned = []
    for _ in range(2):  # a scale-down on the others' samples goes on, without its
        cluster.now += 1
        cluster.samples = {sick: sample(sick, cluster.now, 900), well: sample(well, cluster.now)}
        calm = cluster.reconcile()
        warned += [e.reason for e in calm.events if e.type == "Warning"]
    assert warned == []  # the warning once, not every pass
    assert [p.name for p in calm.patches[1:]] == [sick]  # it ranks first to go
    cluster.mb["spec"]["replicas"]["count"] = 2  # undo, to see its load count again
    cluster.reconcile()
    # Stable for STABLE_AFTER: the pod counts again, and its load decides.
    cluster.now += STABLE_AFTER
    cluster.samples[sick] = sample(sick, cluster.now, pps=900)
    healed = cluster.reconcile()
    assert condition(healed.status, "Degraded")["status"] == "False"
    assert [p.kind for p in healed.patches] == ["Middlebox"]


def test_crash_loop_backoff_is_seen_without_memory() -> None:
    cluster = steady(count=2)
    sick = cluster.live()[0]
    status = cluster.pod(sick)["status"]
    status["containerStatuses"][0]["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
    cluster.memory = Memory()  # an operator that just started
    degraded = condition(cluster.reconcile().status, "Degraded")
    assert degraded["status"] == "True" and "CrashLoopBackOff" in degraded["message"]


def test_a_deleted_service_is_applied_again_and_nothing_else_is() -> None:
    cluster = steady(count=2)
    cluster.objects["Service"] = None
    result = cluster.reconcile()
    assert [o["kind"] for o in result.apply] == ["Service"]
    assert [e.message for e in result.events] == ["Service web created"]
    assert cluster.reconcile().apply == ()


def test_a_new_limit_changes_the_configmap_without_a_rollout() -> None:
    cluster = steady(count=2)
    before = cluster.reconcile().store_spec
    cluster.mb["spec"]["middlebox"]["limit"] = 300
    result = cluster.reconcile()
    assert [o["kind"] for o in result.apply] == ["ConfigMap"]
    assert result.store_spec != before and '"limit":300' in (result.store_spec or "")
    assert result.status["shares"] == {n: 150 for n in cluster.live()}
    assert result.status["limit"] == "300 per 1s"


def test_a_spec_change_a_replica_reads_at_start_rolls_the_pods() -> None:
    cluster = steady(count=2)
    old = cluster.objects["Deployment"]
    assert old is not None
    old_hash = old["spec"]["template"]["metadata"]["annotations"][SPEC_HASH]
    cluster.mb["spec"]["middlebox"]["window"] = "2s"
    cluster.mb["metadata"]["generation"] = 2
    result = cluster.reconcile()
    assert sorted(o["kind"] for o in result.apply) == ["ConfigMap", "Deployment"]
    new = next(o for o in result.apply if o["kind"] == "Deployment")
    assert new["spec"]["template"]["metadata"]["annotations"][SPEC_HASH] != old_hash
    assert new["spec"]["replicas"] == 2
    # The Deployment took the new template (generation 2) but has not rolled it out yet.
    deployment = cluster.objects["Deployment"]
    assert deployment is not None
    deployment["metadata"]["generation"] = 2
    deployment["status"] = {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1}
    rolling = cluster.reconcile()
    assert condition(rolling.status, "Progressing")["status"] == "True"
    assert "rolling out" in condition(rolling.status, "Progressing")["message"]
    assert rolling.status["observedGeneration"] == 2


def test_status_conditions_keep_their_transition_time_and_say_why() -> None:
    cluster = steady(count=2)
    ready = condition(cluster.mb["status"], "Ready")
    stable = condition(cluster.mb["status"], "Progressing")
    cluster.now += 60
    cluster.pod(cluster.live()[0])["status"]["conditions"][0]["status"] = "False"
    result = cluster.reconcile()
    still = condition(result.status, "Progressing")
    assert (still["status"], still["lastTransitionTime"]) == ("False", stable["lastTransitionTime"])
    now_ready = condition(result.status, "Ready")
    assert now_ready["status"] == "False" and now_ready["message"] == "1 of 2 replicas ready"
    assert now_ready["lastTransitionTime"] > ready["lastTransitionTime"]
    assert result.status["shares"] == {cluster.live()[1]: 100}


def test_a_rejected_spec_applies_nothing_and_says_the_one_line_reason() -> None:
    cluster = steady(count=2)
    cluster.mb["spec"]["replicas"]["count"] = 9  # kubectl scale past max: the API cannot refuse
    cluster.mb["metadata"]["generation"] = 5
    result = cluster.reconcile()
    assert result.apply == () and result.patches == () and result.store_spec is None
    rejected = condition(result.status, "SpecRejected")
    assert rejected["status"] == "True"
    assert rejected["message"] == (
        "middlebox default/web: replicas: count (9) must lie between min and max"
    )
    assert condition(result.status, "Ready")["status"] == "True"  # the pods still serve
    assert result.status["observedGeneration"] == 5
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "SpecError")]
    assert cluster.reconcile().events == ()
    cluster.mb["spec"]["replicas"]["count"] = 3
    fixed = cluster.reconcile()
    assert condition(fixed.status, "SpecRejected")["status"] == "False"
    assert fixed.replicas == 3


@pytest.mark.parametrize("observed", [1, 4])
def test_the_scale_subresource_count_wins_without_autoscale(observed: int) -> None:
    """Someone scaled the Deployment itself: the Middlebox's count brings it back."""
    cluster = steady(count=2)
    deployment = cluster.objects["Deployment"]
    assert deployment is not None
    deployment["spec"]["replicas"] = observed
    cluster.replica_set()
    for _ in range(3):
        result = cluster.reconcile()
        cluster.replica_set()
    assert result.replicas == 2 and len(cluster.live()) == 2
    assert cluster.mb["spec"]["replicas"]["count"] == 2


def test_a_manual_count_on_an_autoscaled_middlebox_lasts_until_the_next_decision() -> None:
    cluster = steady(count=2, autoscale=AUTO)
    cluster.mb["spec"]["replicas"]["count"] = 3
    cluster.settle()
    assert len(cluster.live()) == 3
    for _ in range(2):
        cluster.now += 1
        cluster.samples = {n: sample(n, cluster.now, pps=5) for n in cluster.live()}
        result = cluster.reconcile()
    assert result.patches[0].body == {"spec": {"replicas": {"count": 2}}}


def test_shares_split_the_limit_evenly_and_the_selector_finds_the_pods() -> None:
    cluster = steady(count=3)
    cluster.mb["spec"]["middlebox"]["limit"] = 100
    result = cluster.reconcile()
    assert sorted(result.status["shares"].values()) == [33, 33, 34]
    assert sum(result.status["shares"].values()) == 100
    wanted = dict(part.split("=") for part in result.status["selector"].split(","))
    deployment = cluster.objects["Deployment"]
    assert deployment is not None
    assert wanted == deployment["spec"]["selector"]["matchLabels"]


def test_without_a_limit_the_first_ratelimit_rule_is_shown_and_split() -> None:
    cluster = Cluster(mb=middlebox(count=2))
    rules = [
        {"name": "dns", "match": {"proto": "udp", "dport": 53}, "action": "accept"},
        {"name": "rest", "action": "ratelimit", "limit": 51},
    ]
    cluster.mb["spec"]["middlebox"] = {"rules": rules}
    cluster.settle()
    status = cluster.mb["status"]
    assert status["limit"] == "rule rest: 51 packets per 1s"
    assert sorted(status["shares"].values()) == [25, 26]


def test_every_status_written_fits_the_crd_status_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from vmbox.kube.crd import STATUS

    cluster = steady(count=2, autoscale=AUTO)
    written = [cluster.mb["status"]]
    for _ in range(2):
        cluster.now += 1
        cluster.samples = {n: sample(n, cluster.now, pps=200) for n in cluster.live()}
        written.append(cluster.reconcile().status)
    cluster.mb["spec"]["replicas"]["count"] = 9
    written.append(cluster.reconcile().status)
    assert "lastScale" in written[-2] and written[-1]["conditions"][-1]["status"] == "True"
    for status in written:
        jsonschema.validate(status, STATUS)
