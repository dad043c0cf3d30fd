"""What one Middlebox owns on Kubernetes: ConfigMap, Deployment, Service, PodDisruptionBudget.

Pure: dicts in, dicts out, no client. Called by the reconcile
(vmbox.kube.reconcile), by `vmbox k8s render` and by the tests, which check
every object against the official Kubernetes schemas offline.

Choices, and why:
- Replica pods run `vmbox replica --service NAME --id $(POD_NAME) --etcd ...
  --metrics-port 9108`, as the local runtime starts them; the replica id is
  the pod's name (downward API), unique for the pod's life. The replica reads
  the spec from the store (keys.spec_key), as it does locally, so `vmbox
  replica` is unchanged and a spec change reaches running pods without a
  rollout. The ConfigMap holds the spec the pods run (`spec.json`, what the
  operator writes to the store): `pod_spec()` of the Middlebox's spec.
- `pod_spec()` differs from the user's spec in three places only. `listen`
  binds 0.0.0.0 on its port and `metrics_host` is 0.0.0.0: in a pod, loopback
  is reachable from that pod alone, and the Service, the kubelet's readiness
  probe and Prometheus all come in on the pod's address (the pod's network
  namespace is the boundary; a NetworkPolicy narrows it). `store` becomes
  what the pod sees: `managed` is the in-cluster etcd of install.py
  (ETCD_ENDPOINT, TLS and the root password); an external store keeps its
  endpoints, user and server name, while its file paths (they name files on
  the machine the spec was written on) become the mounted Secrets' files.
- Secrets, never the spec, carry TLS and the password (DESIGN.md
  "Conventions"): Secret ETCD_TLS_SECRET (`ca.crt`, and `tls.crt`/`tls.key`
  for mutual TLS) and Secret ETCD_AUTH_SECRET (`password`) in the
  Middlebox's namespace, mounted read-only; `password_env` in a spec becomes
  that variable, filled from the Secret.
- The readiness probe GETs /metrics: a replica serves it only once its relay
  is bound, so ready means taking traffic. terminationGracePeriodSeconds is
  drain_timeout + window (a busy drain ends just before a window boundary) +
  GRACE_MARGIN (leaving the membership, exiting): SIGTERM drains as locally.
- resources: requests.memory = limits.memory = replicas.memory_limit (the
  memory metric is a percentage of it, and equal figures keep the pod from
  being evicted first); a small CPU request and no CPU limit, which would
  throttle and distort the cpu metric.
- `dataplane: nfqueue` (in-path) is not built here: it would need pods on the
  gateway nodes (a DaemonSet or host-network pods with NET_ADMIN binding the
  netfilter queues of the node's forwarding path) and the steering rule per
  node. spec_of() refuses it in one line, and the operator reports that as a
  condition. `relay` gets a ClusterIP Service, UDP on the listen port.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbox import allocator
from vmbox.spec import Spec, SpecError, parse_spec
from vmbox.spec.changes import template_of
from vmbox.state.access import StoreSpec, replica_flags

GROUP = "vmbox.dev"
VERSION = "v1alpha1"
KIND = "Middlebox"
PLURAL = "middleboxes"
API_VERSION = f"{GROUP}/{VERSION}"
MIDDLEBOX_LABEL = "vmbox.dev/middlebox"  # on every owned object and pod: the Middlebox name
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
TEMPLATE_ANNOTATION = "vmbox.dev/template"  # on the pod template: which spec the pods run
FIELD_MANAGER = "vmbox-operator"

SYSTEM_NAMESPACE = "vmbox-system"  # the operator and the managed etcd (install.py)
ETCD_SERVICE = "vmbox-etcd"  # the managed etcd's client Service (install.py)
ETCD_ENDPOINT = f"https://{ETCD_SERVICE}.{SYSTEM_NAMESPACE}.svc:2379"
ETCD_ROOT_USER = "root"
ETCD_TLS_SECRET = "vmbox-etcd-tls"  # ca.crt [tls.crt tls.key]; same name as install.py's
ETCD_AUTH_SECRET = "vmbox-etcd-auth"  # password
TLS_DIR = "/var/run/secrets/vmbox/etcd-tls"
AUTH_DIR = "/var/run/secrets/vmbox/etcd-auth"
METRICS_PORT = 9108
GRACE_MARGIN = 5  # seconds beyond the drain: leave the membership, stop, exit
CPU_REQUEST = "100m"
RUN_AS = 10001  # the image's user (Containerfile)

COMMON_LABELS = {"app.kubernetes.io/name": "vmbox", "app.kubernetes.io/managed-by": FIELD_MANAGER}


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object as the API returns it; no namespace is `default`."""
    meta = obj["metadata"]
    return str(meta.get("namespace", "default")), str(meta["name"])


def spec_of(mb: Mapping[str, Any]) -> Spec:
    """The Middlebox's spec, validated as `vmbox up` validates a YAML spec; SpecError in one line.

    metadata.name is the service name; a `service:` field of its own is refused.
    """
    meta = mb.get("metadata") or {}
    name = meta.get("name", "")
    source = f"middlebox {meta.get('namespace', 'default')}/{name}"
    data = mb.get("spec")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: spec: expected a mapping of fields")
    if "service" in data:
        raise SpecError(f"{source}: service: unknown field (metadata.name is the service name)")
    spec = parse_spec({"service": name, **data}, source)
    if spec.dataplane != "relay":
        raise SpecError(
            f"{source}: dataplane: {spec.dataplane} is not built for Kubernetes yet "
            "(in-path needs pods on the gateway nodes); use dataplane: relay"
        )
    return spec


def middlebox(data: Mapping[str, Any], *, namespace: str = "default") -> dict[str, Any]:
    """A YAML spec (what `vmbox up` reads) as a Middlebox object: `service` is metadata.name."""
    spec = {key: value for key, value in data.items() if key != "service"}
    meta = {"name": data.get("service"), "namespace": namespace}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def pod_spec(spec: Spec) -> Spec:
    """The spec as the replica pods run it (see the module doc): pod-wide binds, mounted secrets."""
    listen = ("0.0.0.0", spec.relay.listen[1])
    return spec.model_copy(
        update={"listen": listen, "metrics_host": "0.0.0.0", "store": pod_store(spec.store)}
    )


def pod_store(store: Any) -> StoreSpec:
    """The store as a pod reaches it: endpoints and names kept, files from the mounted Secrets."""
    if not isinstance(store, StoreSpec):  # `managed`: the in-cluster etcd of install.py
        return StoreSpec(
            endpoints=(ETCD_ENDPOINT,),
            ca_cert=Path(TLS_DIR, "ca.crt"),
            username=ETCD_ROOT_USER,
            password_file=Path(AUTH_DIR, "password"),
        )
    files = {
        "ca_cert": f"{TLS_DIR}/ca.crt",
        "cert": f"{TLS_DIR}/tls.crt",
        "key": f"{TLS_DIR}/tls.key",
        "password_file": f"{AUTH_DIR}/password",
    }
    update = {field: path for field, path in files.items() if getattr(store, field) is not None}
    return StoreSpec.model_validate(store.model_dump(exclude={"password"}) | update)


def labels(name: str, component: str = "replica") -> dict[str, str]:
    return COMMON_LABELS | {
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        MIDDLEBOX_LABEL: name,
    }


def selector(name: str) -> dict[str, str]:
    """The replica pods of one Middlebox (immutable in a Deployment: keep it this small)."""
    return {MIDDLEBOX_LABEL: name, "app.kubernetes.io/component": "replica"}


def owner_reference(mb: Mapping[str, Any]) -> dict[str, Any]:
    meta = mb["metadata"]
    if not meta.get("uid"):
        raise ValueError(f"middlebox {meta.get('name')}: no metadata.uid (not read from the API?)")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(mb: Mapping[str, Any], component: str) -> dict[str, Any]:
    meta = mb["metadata"]
    return {
        "name": meta["name"],
        "namespace": meta.get("namespace", "default"),
        "labels": labels(meta["name"], component),
        "ownerReferences": [owner_reference(mb)],
    }


def owned_objects(mb: Mapping[str, Any], *, replicas: int, image: str) -> list[dict[str, Any]]:
    """ConfigMap, Deployment, PodDisruptionBudget and Service of `mb`, sorted by kind.

    Deterministic: the same Middlebox, count and image give equal dicts.
    Raises SpecError (spec_of) for a spec that cannot run.
    """
    spec = spec_of(mb)
    return [
        config_map(mb, spec),
        deployment(mb, spec, replicas=replicas, image=image),
        disruption_budget(mb),
        service(mb, spec),
    ]


def config_map(mb: Mapping[str, Any], spec: Spec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(mb, "spec"),
        "data": {"spec.json": pod_spec(spec).to_json()},
    }


def service(mb: Mapping[str, Any], spec: Spec) -> dict[str, Any]:
    port = spec.relay.listen[1]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(mb, "service"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(mb["metadata"]["name"]),
            "ports": [{"name": "relay", "protocol": "UDP", "port": port, "targetPort": port}],
        },
    }


def disruption_budget(mb: Mapping[str, Any]) -> dict[str, Any]:
    """One replica at a time may go for a node drain: the rest take over its share."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(mb, "disruption-budget"),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(mb["metadata"]["name"])},
        },
    }


def grace_seconds(spec: Spec) -> int:
    """terminationGracePeriodSeconds: above the longest drain a replica may take."""
    return math.ceil(spec.replicas.drain_timeout + spec.window) + GRACE_MARGIN


def deployment(mb: Mapping[str, Any], spec: Spec, *, replicas: int, image: str) -> dict[str, Any]:
    name = mb["metadata"]["name"]
    pod_labels = labels(name)
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
        # What the pods run (vmbox.spec.changes): a spec change the replicas read only at
        # start changes the pod template, so the Deployment rolls them; a limit does not.
        TEMPLATE_ANNOTATION: template_of(pod_spec(spec)),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(mb, "replica"),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name)},
            # A surge pod joins before an old one drains: the group never shrinks on a rollout.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": _pod(spec, image),
            },
        },
    }


def _pod(spec: Spec, image: str) -> dict[str, Any]:
    port = spec.relay.listen[1]
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if port < 1024:  # a "safe" sysctl: a non-root replica may bind a low port without a capability
        security["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    return {
        "terminationGracePeriodSeconds": grace_seconds(spec),
        "securityContext": security,
        "enableServiceLinks": False,  # no SERVICE_HOST variables: the replica reads none
        "containers": [_container(spec, image)],
        "volumes": _volumes(spec.store),
    }


def _container(spec: Spec, image: str) -> dict[str, Any]:
    port = spec.relay.listen[1]
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    env += [{"name": k, "value": v} for k, v in sorted(allocator.ENVIRONMENT.items())]
    env += [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}]
    store = pod_store(spec.store)
    if store.password_env is not None:
        ref = {"name": ETCD_AUTH_SECRET, "key": "password"}
        env.append({"name": store.password_env, "valueFrom": {"secretKeyRef": ref}})
    container: dict[str, Any] = {
        "name": "replica",
        "image": image,
        "command": ["vmbox"],
        "args": replica_args(spec),
        "env": env,
        "ports": [
            {"name": "relay", "containerPort": port, "protocol": "UDP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "resources": _resources(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": _mounts(spec.store),
    }
    return container


def replica_args(spec: Spec) -> list[str]:
    """`vmbox replica`'s arguments in a pod: its id is the pod name ($(POD_NAME), expanded)."""
    store = pod_store(spec.store)
    return [
        "replica",
        "--service",
        spec.service,
        "--id",
        "$(POD_NAME)",
        "--etcd",
        ",".join(store.endpoints),
        "--metrics-port",
        str(METRICS_PORT),
        *replica_flags(store),
    ]


def _resources(spec: Spec) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": CPU_REQUEST}
    resources: dict[str, Any] = {"requests": requests}
    if spec.replicas.memory_limit is not None:
        memory = quantity(spec.replicas.memory_limit)
        requests["memory"] = memory
        resources["limits"] = {"memory": memory}
    return resources


def quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity: 73400320 -> '70Mi' when exact, else plain bytes."""
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _secret_files(store: StoreSpec) -> tuple[list[str], bool]:
    """The keys of ETCD_TLS_SECRET the pod needs, and whether it needs ETCD_AUTH_SECRET's file."""
    keys = [
        k
        for f, k in (("ca_cert", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))
        if getattr(store, f)
    ]
    return keys, store.password_file is not None


def _volumes(store_field: Any) -> list[dict[str, Any]]:
    tls, auth = _secret_files(pod_store(store_field))
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]
    if tls:
        items = [{"key": k, "path": k} for k in tls]
        volumes.append(
            {"name": "etcd-tls", "secret": {"secretName": ETCD_TLS_SECRET, "items": items}}
        )
    if auth:
        items = [{"key": "password", "path": "password"}]
        volumes.append(
            {"name": "etcd-auth", "secret": {"secretName": ETCD_AUTH_SECRET, "items": items}}
        )
    return volumes


def _mounts(store_field: Any) -> list[dict[str, Any]]:
    tls, auth = _secret_files(pod_store(store_field))
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if tls:
        mounts.append({"name": "etcd-tls", "mountPath": TLS_DIR, "readOnly": True})
    if auth:
        mounts.append({"name": "etcd-auth", "mountPath": AUTH_DIR, "readOnly": True})
    return mounts
