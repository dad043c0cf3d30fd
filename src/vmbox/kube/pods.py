"""Reading replica pods as the API returns them (dicts), pure: who they are, how they run.

Called by the reconcile (vmbox.kube.reconcile) and the status it writes
(vmbox.kube.status). A pod here is a core/v1 Pod as JSON: metadata (name,
labels, annotations, deletionTimestamp) and status (phase, conditions,
containerStatuses). Missing parts read as the API's defaults would mean them:
no phase is Pending, no Ready condition is not ready, no restartCount is 0.

Crash loops. A pod crash-loops while one of its containers waits in
CrashLoopBackOff (the kubelet's own verdict, visible without memory), or for
`plan.STABLE_AFTER` s after its restartCount grew (what the local runtime
calls a crash: a replica that ran that long has its backoff reset). Growth
needs the count of the pass before, which the caller remembers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmbox.control.plan import STABLE_AFTER
from vmbox.kube.manifests import DELETION_COST

Obj = Mapping[str, Any]

LEAVING_COST = "-1000"  # pod-deletion-cost of a pod chosen to go (the default is 0)


def labels(pod: Obj) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def name(pod: Obj) -> str:
    return str(pod["metadata"]["name"])


def live(pod: Obj) -> bool:
    """Not being deleted: a pod with a deletionTimestamp is draining or gone."""
    return not pod["metadata"].get("deletionTimestamp")


def marked(pod: Obj) -> bool:
    """Chosen to go: its deletion cost is the one the reconcile sets."""
    annotations = pod["metadata"].get("annotations") or {}
    return annotations.get(DELETION_COST) == LEAVING_COST


def phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase", "Pending"))


def ready(pod: Obj) -> bool:
    """Running and its Ready condition True (the readiness probe: its relay is bound)."""
    conditions = (pod.get("status") or {}).get("conditions") or ()
    ok = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ok and phase(pod) == "Running"


def _containers(pod: Obj) -> Sequence[Obj]:
    return (pod.get("status") or {}).get("containerStatuses") or ()


def restarts(pod: Obj) -> int:
    return sum(int(c.get("restartCount", 0)) for c in _containers(pod))


def backing_off(pod: Obj) -> bool:
    waiting = [((c.get("state") or {}).get("waiting") or {}) for c in _containers(pod)]
    return any(w.get("reason") == "CrashLoopBackOff" for w in waiting)


@dataclass(frozen=True, slots=True)
class Crashes:
    """The pods that crash-loop now, and what the next pass compares against."""

    crashing: Mapping[str, str]  # pod -> one line saying why
    restarts: Mapping[str, int]  # pod -> restartCount seen now
    crashed_at: Mapping[str, float]  # pod -> when its count last grew, within STABLE_AFTER


def crashes(
    pods: Sequence[Obj], seen: Mapping[str, int], since: Mapping[str, float], now: float
) -> Crashes:
    """Crash loops among `pods`, given the restart counts and growth times of the last pass."""
    counts: dict[str, int] = {}
    grew: dict[str, float] = {}
    crashing: dict[str, str] = {}
    for pod in pods:
        pod_name, count = name(pod), restarts(pod)
        counts[pod_name] = count
        before = seen.get(pod_name)
        at = now if before is not None and count > before else since.get(pod_name)
        if at is not None and now - at < STABLE_AFTER:
            grew[pod_name] = at
            crashing[pod_name] = f"{pod_name} restarted ({count} restarts)"
        if backing_off(pod):
            crashing[pod_name] = f"{pod_name} in CrashLoopBackOff ({count} restarts)"
    return Crashes(crashing, counts, grew)


def removal_order(
    pods: Sequence[Obj], crashing: Mapping[str, str], load: Mapping[str, float]
) -> dict[str, float]:
    """Each pod's key for `autoscale.choose_removals` (lowest goes first).

    The ReplicaSet deletes pending pods before running ones and unready ones
    before ready ones whatever their deletion cost, so marking another pod
    would not make it go: they rank first here too (below 0). A crash-looping
    pod ranks with the unready (its load says nothing). The rest rank by load.
    """
    out: dict[str, float] = {}
    for pod in pods:
        pod_name = name(pod)
        if phase(pod) != "Running":
            out[pod_name] = -2.0
        elif not ready(pod) or pod_name in crashing:
            out[pod_name] = -1.0
        else:
            out[pod_name] = load.get(pod_name, 0.0)
    return out
