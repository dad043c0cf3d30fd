"""What the operator needs once per cluster: namespace, RBAC, its Deployment, a 3-member etcd.

Pure. Called by `vmbox k8s render --install` and `vmbox k8s deploy DIR`
(which writes deploy/, the kustomize base: `deploy_files()`), and by the tests,
which check deploy/ equals what this renders and validate every object
against the official Kubernetes schemas.

RBAC is least-privilege: a ClusterRole (Middleboxes live in any namespace)
reads Middleboxes and patches their count (the autoscaler), writes their
status, applies the four kinds a Middlebox owns (server-side apply is a
patch; create for the first apply; no delete: ownerReferences let the
garbage collector remove them) and scales Deployments, reads and patches
pods (the deletion-cost annotation), reads pod metrics (metrics.k8s.io) and
records events. A Role in vmbox-system holds the leader-election Lease.

The operator runs `vmbox operator` (2 replicas, one leader holding the Lease
LEASE in its namespace; POD_NAME is its identity, VMBOX_IMAGE the replica
pods' image, VMBOX_ETCD the store for `store: managed`).

The etcd StatefulSet: 3 members on a headless Service (peer DNS names), a
client Service `vmbox-etcd`, peer and client TLS from the Secret
`vmbox-etcd-tls` and the root password in the Secret `vmbox-etcd-auth`. No
manifest here makes a secret. Make them once, e.g. with openssl:

    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=vmbox-etcd-ca \\
        -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj /CN=vmbox-etcd -keyout tls.key -out tls.csr
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \\
        -out tls.crt -extfile <(printf 'extendedKeyUsage=serverAuth,clientAuth\\n%s' \\
        'subjectAltName=DNS:vmbox-etcd.vmbox-system.svc,DNS:*.vmbox-etcd-peer.vmbox-system.svc,DNS:localhost,IP:127.0.0.1')
    kubectl -n vmbox-system create secret generic vmbox-etcd-tls \\
        --from-file=ca.crt --from-file=tls.crt --from-file=tls.key
    kubectl -n vmbox-system create secret generic vmbox-etcd-auth --from-file=password
    # each Middlebox namespace: the CA alone, and the password
    kubectl -n NS create secret generic vmbox-etcd-tls --from-file=ca.crt
    kubectl -n NS create secret generic vmbox-etcd-auth --from-file=password

etcd takes no password at start-up: auth is switched on once the members run
(before it is on, no credentials are needed; the password goes on stdin, not
on a command line):

    kubectl -n vmbox-system exec -i vmbox-etcd-0 -- etcdctl --endpoints \\
        https://127.0.0.1:2379 --cacert /etc/etcd/tls/ca.crt \\
        user add root --interactive=false < password
    kubectl -n vmbox-system exec vmbox-etcd-0 -- etcdctl --endpoints \\
        https://127.0.0.1:2379 --cacert /etc/etcd/tls/ca.crt auth enable

A `vmbox k8s certs` command that makes both Secrets is a follow-up.
"""

from __future__ import annotations

from typing import Any

import yaml

from vmbox.kube import crd
from vmbox.kube.manifests import (
    ETCD_AUTH_SECRET,
    ETCD_ENDPOINT,
    ETCD_SERVICE,
    ETCD_TLS_SECRET,
    FIELD_MANAGER,
    GROUP,
    PLURAL,
    RUN_AS,
    SYSTEM_NAMESPACE,
    middlebox,
)

IMAGE = "localhost/vmbox:0.1.0"  # what `make image` tags (podman's local name)
ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.5.17"
OPERATOR = "vmbox-operator"
LEASE = "vmbox-operator"
ETCD_PEERS = "vmbox-etcd-peer"
ETCD_MEMBERS = 3
ETCD_UID = 65532
ETCD_TLS_DIR = "/etc/etcd/tls"

_SYSTEM_LABELS = {"app.kubernetes.io/name": "vmbox", "app.kubernetes.io/part-of": "vmbox"}


def _meta(name: str, component: str, namespaced: bool = True) -> dict[str, Any]:
    labels = _SYSTEM_LABELS | {"app.kubernetes.io/component": component}
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespaced:
        meta["namespace"] = SYSTEM_NAMESPACE
    return meta


def namespace() -> dict[str, Any]:
    meta = _meta(SYSTEM_NAMESPACE, "namespace", namespaced=False)
    # Every pod here runs non-root with a read-only root: the strictest profile holds.
    meta["labels"]["pod-security.kubernetes.io/enforce"] = "restricted"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


APPLY = ["get", "list", "watch", "create", "patch", "update"]
CLUSTER_RULES = [
    # patch: the autoscaler writes spec.replicas.count, as `kubectl scale` does.
    _rule([GROUP], [PLURAL], ["get", "list", "watch", "patch"]),
    _rule([GROUP], [f"{PLURAL}/status", f"{PLURAL}/scale"], ["get", "patch", "update"]),
    _rule(["apps"], ["deployments"], APPLY),
    _rule(["apps"], ["deployments/scale"], ["get", "patch", "update"]),
    _rule([""], ["services", "configmaps"], APPLY),
    _rule(["policy"], ["poddisruptionbudgets"], APPLY),
    _rule([""], ["pods"], ["get", "list", "watch", "patch"]),
    _rule(["metrics.k8s.io"], ["pods"], ["get", "list"]),
    _rule(["", "events.k8s.io"], ["events"], ["create", "patch"]),
]
LEASE_RULES = [
    _rule(
        ["coordination.k8s.io"], ["leases"], ["get", "list", "watch", "create", "update", "patch"]
    )
]


def rbac() -> list[dict[str, Any]]:
    subject = [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": SYSTEM_NAMESPACE}]
    rbac_api = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(OPERATOR, "operator")},
        {
            "apiVersion": rbac_api,
            "kind": "ClusterRole",
            "metadata": _meta(OPERATOR, "operator", namespaced=False),
            "rules": CLUSTER_RULES,
        },
        {
            "apiVersion": rbac_api,
            "kind": "ClusterRoleBinding",
            "metadata": _meta(OPERATOR, "operator", namespaced=False),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": OPERATOR,
            },
            "subjects": subject,
        },
        {
            "apiVersion": rbac_api,
            "kind": "Role",
            "metadata": _meta(OPERATOR, "operator"),
            "rules": LEASE_RULES,
        },
        {
            "apiVersion": rbac_api,
            "kind": "RoleBinding",
            "metadata": _meta(OPERATOR, "operator"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR},
            "subjects": subject,
        },
    ]


def _restricted(uid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod and container securityContext of the `restricted` Pod Security profile."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def operator_deployment(image: str = IMAGE) -> dict[str, Any]:
    pod_security, container_security = _restricted(RUN_AS)
    selector = {"app.kubernetes.io/name": "vmbox", "app.kubernetes.io/component": "operator"}
    secrets = [
        {
            "name": "etcd-tls",
            "secret": {
                "secretName": ETCD_TLS_SECRET,
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
            },
        },
        {
            "name": "etcd-auth",
            "secret": {
                "secretName": ETCD_AUTH_SECRET,
                "items": [{"key": "password", "path": "password"}],
            },
        },
    ]
    container = {
        "name": "operator",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vmbox", "operator"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            {"name": "VMBOX_IMAGE", "value": image},
            {"name": "VMBOX_ETCD", "value": ETCD_ENDPOINT},
            {"name": "VMBOX_LEASE", "value": LEASE},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": container_security,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "etcd-tls", "mountPath": "/var/run/secrets/vmbox/etcd-tls", "readOnly": True},
            {
                "name": "etcd-auth",
                "mountPath": "/var/run/secrets/vmbox/etcd-auth",
                "readOnly": True,
            },
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(OPERATOR, "operator"),
        "spec": {
            "replicas": 2,  # one leads (the Lease), one waits to take over
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": _SYSTEM_LABELS | selector},
                "spec": {
                    "serviceAccountName": OPERATOR,
                    "securityContext": pod_security,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}, *secrets],
                },
            },
        },
    }


def _etcd_selector() -> dict[str, str]:
    return {"app.kubernetes.io/name": "vmbox", "app.kubernetes.io/component": "etcd"}


def etcd_services() -> list[dict[str, Any]]:
    ports = [
        {"name": "client", "port": 2379, "targetPort": 2379},
        {"name": "peer", "port": 2380, "targetPort": 2380},
    ]
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ETCD_PEERS, "etcd"),
        # Members find each other by name before any is ready.
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _etcd_selector(),
            "ports": ports,
        },
    }
    client = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ETCD_SERVICE, "etcd"),
        "spec": {"type": "ClusterIP", "selector": _etcd_selector(), "ports": ports[:1]},
    }
    return [headless, client]


def _peer_url(member: int, port: int) -> str:
    return f"https://vmbox-etcd-{member}.{ETCD_PEERS}.{SYSTEM_NAMESPACE}.svc:{port}"


def etcd_args() -> list[str]:
    """etcd's flags: no shell in the image, so $(POD_NAME) is expanded by Kubernetes."""
    own = f"https://$(POD_NAME).{ETCD_PEERS}.{SYSTEM_NAMESPACE}.svc"
    cluster = ",".join(f"vmbox-etcd-{i}={_peer_url(i, 2380)}" for i in range(ETCD_MEMBERS))
    tls = ETCD_TLS_DIR
    return [
        "--name=$(POD_NAME)",
        "--data-dir=/var/lib/etcd/data",
        "--listen-client-urls=https://0.0.0.0:2379",
        f"--advertise-client-urls={own}:2379",
        "--listen-peer-urls=https://0.0.0.0:2380",
        f"--initial-advertise-peer-urls={own}:2380",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        "--initial-cluster-token=vmbox-etcd",
        "--listen-metrics-urls=http://0.0.0.0:2381",
        f"--cert-file={tls}/tls.crt",
        f"--key-file={tls}/tls.key",
        f"--peer-cert-file={tls}/tls.crt",
        f"--peer-key-file={tls}/tls.key",
        f"--peer-trusted-ca-file={tls}/ca.crt",
        "--peer-client-cert-auth=true",
        "--auto-compaction-retention=1h",
    ]


def etcd_statefulset() -> dict[str, Any]:
    pod_security, container_security = _restricted(ETCD_UID)
    container = {
        "name": "etcd",
        "image": ETCD_IMAGE,
        "command": ["etcd"],
        "args": etcd_args(),
        "env": [_field_env("POD_NAME", "metadata.name")],
        "ports": [
            {"name": "client", "containerPort": 2379},
            {"name": "peer", "containerPort": 2380},
            {"name": "metrics", "containerPort": 2381},
        ],
        # /health is false without a leader: a readiness signal, never a reason to restart.
        "readinessProbe": {"httpGet": {"path": "/health", "port": "metrics"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": container_security,
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/etcd"},
            {"name": "tls", "mountPath": ETCD_TLS_DIR, "readOnly": True},
        ],
    }
    claim = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("vmbox-etcd", "etcd"),
        "spec": {
            "serviceName": ETCD_PEERS,
            "replicas": ETCD_MEMBERS,
            "podManagementPolicy": "Parallel",  # all three must start to form the cluster
            "selector": {"matchLabels": _etcd_selector()},
            "template": {
                "metadata": {"labels": _SYSTEM_LABELS | _etcd_selector()},
                "spec": {
                    "securityContext": pod_security,
                    "containers": [container],
                    "volumes": [{"name": "tls", "secret": {"secretName": ETCD_TLS_SECRET}}],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def etcd_disruption_budget() -> dict[str, Any]:
    """A quorum of 3 survives one member away, not two."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta("vmbox-etcd", "etcd"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _etcd_selector()}},
    }


def etcd() -> list[dict[str, Any]]:
    return [*etcd_services(), etcd_statefulset(), etcd_disruption_budget()]


def install_objects(image: str = IMAGE) -> list[dict[str, Any]]:
    """Everything once per cluster, in apply order (the CRD first, the namespace next)."""
    return [crd.crd(), namespace(), *rbac(), operator_deployment(image), *etcd()]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """YAML documents separated by `---`, keys in their written order, for `kubectl apply -f -`."""
    return "---\n".join(yaml.safe_dump(o, sort_keys=False, width=100) for o in objects)


# deploy/: one file per part, in the order kustomization.yaml lists them.
PARTS = ("crd.yaml", "namespace.yaml", "rbac.yaml", "operator.yaml", "etcd.yaml")


def _part(name: str, image: str) -> list[dict[str, Any]]:
    return {
        "crd.yaml": [crd.crd()],
        "namespace.yaml": [namespace()],
        "rbac.yaml": rbac(),
        "operator.yaml": [operator_deployment(image)],
        "etcd.yaml": etcd(),
    }[name]


# deploy/example/middlebox.yaml: a relay in front of an echo Service, scaled on packet rate.
EXAMPLE_SPEC: dict[str, Any] = {
    "service": "web",
    "listen": "0.0.0.0:9000",  # a pod binds every address anyway (manifests.pod_spec)
    "upstream": "echo.default.svc.cluster.local:9100",
    "middlebox": {"function": "ratelimit", "limit": 100, "window": "1s"},
    "replicas": {"count": 2, "min": 1, "max": 4, "memory_limit": "70Mi", "drain_timeout": "2s"},
    "autoscale": {"metric": "pps", "scale_up_at": 150, "scale_down_at": 40, "aggregate": "mean"},
}
HEADER = "# Generated by `vmbox k8s deploy deploy/` from vmbox.kube.install: do not edit.\n"


def deploy_files(image: str = IMAGE) -> dict[str, str]:
    """The kustomize base and the example Middlebox: path under deploy/ -> text."""
    files = {name: HEADER + to_yaml(_part(name, image)) for name in PARTS}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(PARTS),
    }
    files["kustomization.yaml"] = HEADER + to_yaml([kustomization])
    files["example/middlebox.yaml"] = HEADER + to_yaml([middlebox(EXAMPLE_SPEC)])
    return files


__all__ = ["FIELD_MANAGER", "IMAGE", "deploy_files", "install_objects", "to_yaml"]
