"""What one Middlebox owns: the objects the operator applies, from the spec alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vmbox.kube import manifests as m
from vmbox.spec import SpecError, parse_spec


def spec(**change: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:9000",
        "upstream": "echo.default.svc:9100",
        "middlebox": {"function": "ratelimit", "limit": 100},
        "replicas": {"count": 2, "max": 4, "memory_limit": "70Mi", "drain_timeout": "3s"},
    } | change


def mb(name: str = "web", **change: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "edge", "uid": "0d1f-uid", "generation": 3}
    return {"apiVersion": m.API_VERSION, "kind": m.KIND, "metadata": meta, "spec": spec(**change)}


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    (only,) = pod["containers"]
    assert isinstance(only, dict)
    return only


def test_four_objects_sorted_by_kind_owned_and_labelled_deterministically() -> None:
    objects = m.owned_objects(mb(), replicas=3, image="img:1")
    assert [o["kind"] for o in objects] == sorted(o["kind"] for o in objects)
    assert [o["kind"] for o in objects] == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ]
    for o in objects:
        assert o["metadata"]["namespace"] == "edge"
        assert o["metadata"]["labels"][m.MIDDLEBOX_LABEL] == "web"
        (owner,) = o["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "vmbox.dev/v1alpha1",
            "kind": "Middlebox",
            "name": "web",
            "uid": "0d1f-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert objects == m.owned_objects(mb(), replicas=3, image="img:1")
    deployment = by_kind(objects)["Deployment"]["spec"]
    assert deployment["replicas"] == 3
    pod_labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= pod_labels.items()
    assert by_kind(objects)["Service"]["spec"]["selector"] == deployment["selector"]["matchLabels"]
    pdb = by_kind(objects)["PodDisruptionBudget"]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": deployment["selector"]}


def test_the_replica_pod_runs_vmbox_replica_named_after_itself() -> None:
    c = container(m.owned_objects(mb(), replicas=1, image="img:1"))
    assert c["image"] == "img:1" and c["command"] == ["vmbox"]
    args = c["args"]
    assert args[:5] == ["replica", "--service", "web", "--id", "$(POD_NAME)"]
    assert args[args.index("--etcd") + 1] == m.ETCD_ENDPOINT
    assert args[args.index("--metrics-port") + 1] == str(m.METRICS_PORT)
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["PYTHONMALLOC"]["value"] == "malloc"  # as the local runtime starts replicas
    assert c["resources"]["limits"] == {"memory": "70Mi"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["relay"] == {"name": "relay", "containerPort": 9000, "protocol": "UDP"}
    service = by_kind(m.owned_objects(mb(), replicas=1, image="i"))["Service"]
    assert service["spec"]["ports"][0]["protocol"] == "UDP"


def test_grace_period_outlasts_the_drain_and_the_window() -> None:
    pod = by_kind(m.owned_objects(mb(), replicas=1, image="i"))["Deployment"]
    grace = pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 3 + 1  # drain_timeout 3s, window 1s
    longer = mb(replicas={"drain_timeout": "30s"})
    pod = by_kind(m.owned_objects(longer, replicas=1, image="i"))["Deployment"]
    assert pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 31


def test_secrets_reach_the_pod_as_mounts_and_never_as_values() -> None:
    store = {
        "endpoints": ["https://etcd.example:2379"],
        "ca_cert": "/home/me/ca.pem",
        "cert": "c.pem",
        "key": "k.pem",
        "username": "vmbox",
        "password_env": "ETCD_PW",
    }
    objects = m.owned_objects(mb(store=store), replicas=1, image="i")
    c = container(objects)
    args = c["args"]
    assert args[args.index("--etcd-ca") + 1] == f"{m.TLS_DIR}/ca.crt"
    assert args[args.index("--etcd-key") + 1] == f"{m.TLS_DIR}/tls.key"
    assert args[args.index("--etcd-password-env") + 1] == "ETCD_PW"
    env = {e["name"]: e for e in c["env"]}
    ref = {"secretKeyRef": {"name": m.ETCD_AUTH_SECRET, "key": "password"}}
    assert env["ETCD_PW"]["valueFrom"] == ref
    volumes = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]["volumes"]
    tls = next(v for v in volumes if v["name"] == "etcd-tls")["secret"]
    assert [i["key"] for i in tls["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    assert not any(v["name"] == "etcd-auth" for v in volumes)  # the variable, not a file
    stored = json.loads(by_kind(objects)["ConfigMap"]["data"]["spec.json"])
    assert stored["store"]["ca_cert"] == f"{m.TLS_DIR}/ca.crt"  # the pod's file, not /home/me
    assert "password" not in stored["store"]


def test_the_configmap_holds_the_spec_the_pods_run() -> None:
    objects = m.owned_objects(mb(metrics_host="127.0.0.1"), replicas=1, image="i")
    stored = parse_spec(json.loads(by_kind(objects)["ConfigMap"]["data"]["spec.json"]), "cm")
    assert stored.service == "web"
    assert stored.relay.listen == ("0.0.0.0", 9000)  # the Service reaches the pod's address
    assert stored.metrics_host == "0.0.0.0"  # so do the probe and Prometheus
    assert stored.relay.upstream == ("echo.default.svc", 9100)
    assert stored.limiter.limit == 100 and stored.replicas.memory_limit == 70 * 1024**2


def test_a_low_port_gets_the_unprivileged_port_sysctl_and_no_capability() -> None:
    objects = m.owned_objects(mb(listen="0.0.0.0:53"), replicas=1, image="i")
    pod = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"][
        "sysctls"
    ]
    high = by_kind(m.owned_objects(mb(), replicas=1, image="i"))["Deployment"]
    assert "sysctls" not in high["spec"]["template"]["spec"]["securityContext"]


@pytest.mark.parametrize(
    ("change", "name", "error"),
    [
        ({"middlebox": {"limit": -5}}, "web", r"^middlebox edge/web: middlebox\.limit: "),
        ({}, "Web_1", r"^middlebox edge/Web_1: service: must be lowercase"),
        ({"service": "other"}, "web", r"service: unknown field \(metadata\.name is"),
        (
            {"dataplane": "nfqueue", "gateway": {"namespace": "gw"}, "listen": None},
            "web",
            r"dataplane: nfqueue is not built for Kubernetes",
        ),
        ({"replicas": {"count": 5, "max": 4}}, "web", r"replicas: count \(5\) must lie between"),
    ],
)
def test_spec_of_refuses_in_vmbox_ups_words(change: dict[str, Any], name: str, error: str) -> None:
    obj = mb(name, **change)
    obj["spec"] = {k: v for k, v in obj["spec"].items() if v is not None}
    if "gateway" in change:
        del obj["spec"]["upstream"]
    with pytest.raises(SpecError, match=error) as caught:
        m.spec_of(obj)
    assert "\n" not in str(caught.value)
    with pytest.raises(SpecError):
        m.owned_objects(obj, replicas=1, image="i")


def test_an_object_not_read_from_the_api_has_no_owner() -> None:
    obj = mb()
    del obj["metadata"]["uid"]
    with pytest.raises(ValueError, match="uid"):
        m.owned_objects(obj, replicas=1, image="i")


def test_quantities() -> None:
    assert m.quantity(70 * 1024**2) == "70Mi"
    assert m.quantity(2 * 1024**3) == "2Gi"
    assert m.quantity(64_000_000) == "62500Ki"
    assert m.quantity(64_000_001) == "64000001"


def test_middlebox_from_a_yaml_spec() -> None:
    obj = m.middlebox({"service": "web", "listen": "a:1"}, namespace="ns")
    assert obj["metadata"] == {"name": "web", "namespace": "ns"}
    assert obj["spec"] == {"listen": "a:1"} and obj["kind"] == "Middlebox"


def test_the_operators_rbac_is_least_privilege() -> None:
    from vmbox.kube import install

    rules = install.CLUSTER_RULES + install.LEASE_RULES
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "delete" not in rule["verbs"]  # ownerReferences: the garbage collector deletes
        assert "secrets" not in rule["resources"]  # mounted, never read through the API
    granted = {
        (g, r): set(rule["verbs"])
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert granted[("", "pods")] == {"get", "list", "watch", "patch"}  # the deletion cost
    assert granted[("metrics.k8s.io", "pods")] == {"get", "list"}
    assert "create" in granted[("coordination.k8s.io", "leases")]
    assert "patch" in granted[("vmbox.dev", "middleboxes/status")]


def test_the_operator_and_the_etcd_members() -> None:
    from vmbox.kube import install

    operator = install.operator_deployment("img:2")
    assert operator["spec"]["replicas"] == 2
    (c,) = operator["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["vmbox", "operator"] and c["image"] == "img:2"
    sts = install.etcd_statefulset()
    assert sts["spec"]["replicas"] == 3
    (etcd,) = sts["spec"]["template"]["spec"]["containers"]
    args = etcd["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.count("https://") == 3  # every member named, over TLS
    assert all(a.split("=")[1].startswith(install.ETCD_TLS_DIR) for a in args if "-file=" in a)
    (tls,) = sts["spec"]["template"]["spec"]["volumes"]
    assert tls["secret"]["secretName"] == m.ETCD_TLS_SECRET
    assert not any("password" in a for a in args)  # auth is switched on once, from the Secret


def test_a_spec_change_the_pods_read_at_start_rolls_them_and_a_limit_does_not() -> None:
    def template(**change: Any) -> dict[str, Any]:
        objects = m.owned_objects(mb(**change), replicas=2, image="img:1")
        pod_template: dict[str, Any] = by_kind(objects)["Deployment"]["spec"]["template"]
        return pod_template

    base = template()
    assert m.TEMPLATE_ANNOTATION in base["metadata"]["annotations"]
    # A limit is live state (the operator publishes it); the replica count is the Deployment's.
    assert template(middlebox={"function": "ratelimit", "limit": 5}) == base
    replicas = {"count": 3, "max": 4, "memory_limit": "70Mi", "drain_timeout": "3s"}
    assert template(replicas=replicas) == base
    consistency = {"function": "ratelimit", "limit": 100, "consistency": "fenced"}
    changed = template(middlebox=consistency)
    assert (
        changed["metadata"]["annotations"][m.TEMPLATE_ANNOTATION]
        != base["metadata"]["annotations"][m.TEMPLATE_ANNOTATION]
    )
