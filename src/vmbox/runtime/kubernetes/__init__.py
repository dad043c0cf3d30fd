"""The `kubernetes` runtime's API driver.

- client.py  KubeClient, the only module that imports the Kubernetes client
             library (lightkube over httpx2; an import-linter contract)
- lease.py   pure: the leader-election decision over a coordination.k8s.io Lease
- errors.py  pure: one-line errors for the API's answers (403 names the RBAC verb)

vmbox.kube (the operator's pure reconcile) decides; it calls KubeClient to act.
"""

from vmbox.runtime.kubernetes.client import (
    DELETION_COST,
    FIELD_MANAGER,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    KubeClient,
    PodUsage,
    ScaleInfo,
)
from vmbox.runtime.kubernetes.errors import (
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeUnreachable,
)
from vmbox.runtime.kubernetes.lease import LeaseAction, LeaseDecision, LeaseRecord, decide

__all__ = [
    "DELETION_COST",
    "FIELD_MANAGER",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "KubeClient",
    "KubeConflict",
    "KubeError",
    "KubeForbidden",
    "KubeNotFound",
    "KubeUnreachable",
    "LeaseAction",
    "LeaseDecision",
    "LeaseRecord",
    "PodUsage",
    "ScaleInfo",
    "decide",
]
