"""One-line errors for what the Kubernetes API answers (pure: no client import).

vmbox.runtime.kubernetes.client turns every failed call into one of these, so
the operator logs one line naming the cause and what to do, never a client
library traceback. A 403 names the RBAC verb and resource the operator's Role
lacks, worked out from the request itself (`rbac_target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs


class KubeError(Exception):
    """A Kubernetes API call failed; str() is one line."""


class KubeUnreachable(KubeError):
    """No answer from the API server (connection refused, DNS, TLS, timeout)."""


class KubeForbidden(KubeError):
    """403: the service account's RBAC does not allow the call."""


class KubeConflict(KubeError):
    """409: the object changed since it was read, or already exists."""


class KubeNotFound(KubeError):
    """404: the object (or the resource type itself) does not exist."""


@dataclass(frozen=True, slots=True)
class RbacTarget:
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    resource: str  # plural, with a subresource: deployments/scale
    group: str  # "" for the core group
    namespace: str | None
    name: str | None


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def rbac_target(method: str, path: str, query: str = "") -> RbacTarget:
    """The RBAC verb and resource of a request, e.g. PATCH
    /apis/apps/v1/namespaces/ns/deployments/web/scale -> patch deployments/scale (apps)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[2:]
    else:
        group, rest = (parts[1] if len(parts) > 1 else ""), parts[3:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else None
    resource = f"{plural}/{rest[2]}" if len(rest) > 2 else plural
    method = method.upper()
    if method == "GET":
        watching = parse_qs(query).get("watch") == ["true"]
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return RbacTarget(verb, resource, group, namespace, name)


def from_status(
    code: int, reason: str, message: str, *, method: str, path: str, query: str = ""
) -> KubeError:
    """The one-line error for an API answer `code` (`reason` and `message` as in
    its Status body, empty if it had none) to `method path?query`."""
    t = rbac_target(method, path, query)
    what = f"{t.resource} {t.name}" if t.name else t.resource
    where = f" in namespace {t.namespace}" if t.namespace else ""
    group = f" (API group {t.group})" if t.group else ""
    said = f": {_one_line(message)}" if message else ""
    if code == 401:
        return KubeError(
            "kubernetes: 401 Unauthorized: the API server refused our credentials "
            "(the service account token or the kubeconfig user)"
        )
    if code == 403:
        return KubeForbidden(
            f"kubernetes: 403 Forbidden: may not {t.verb} {t.resource}{group}{where}: "
            f'add verb "{t.verb}" on "{t.resource}" to the operator\'s Role'
        )
    if code == 404:
        return KubeNotFound(f"kubernetes: 404 not found: {what}{group}{where}{_hint_404(t)}")
    if code == 409:
        kind = "already exists" if reason == "AlreadyExists" else "conflict"
        return KubeConflict(f"kubernetes: 409 {kind} on {t.verb} {what}{where}{said}")
    if code == 422:
        return KubeError(f"kubernetes: 422 invalid {what}{where}{said}")
    label = f"{code} {reason}".strip()
    return KubeError(f"kubernetes: {label} on {method.upper()} {path}{said}")


def unreachable(server: str, exc: BaseException) -> KubeUnreachable:
    detail = _one_line(str(exc)) or type(exc).__name__
    return KubeUnreachable(
        f"kubernetes: the API server at {server} is unreachable ({detail}): "
        "check the kubeconfig's server, or that the pod's service account can reach it"
    )


def _hint_404(t: RbacTarget) -> str:
    if t.name is not None:
        return ""
    if t.group == "metrics.k8s.io":
        return ": is metrics-server installed?"
    if t.group.endswith("vmbox.dev"):
        return ": is the Middlebox CRD installed (deploy/)?"
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())
