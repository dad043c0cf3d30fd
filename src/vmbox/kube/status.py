"""The Middlebox's status subresource from what one reconcile pass saw and decided, pure.

Called by vmbox.kube.reconcile; the fields are those of the CRD's status
schema (vmbox.kube.crd.STATUS). `replicas` and `readyReplicas` count the live
pods (the scale subresource's statusReplicasPath is `.status.replicas`),
`selector` is the replica pods' label selector (its labelSelectorPath, so a
HorizontalPodAutoscaler could target a Middlebox), `shares` what each ready pod
holds of the limit under the even split (vmbox.sharing.even, as the replicas
compute it; `limit` says which limit: under the default `split: demand` it is
what a source in no demand report gets, a reported one's share following where
its traffic arrives), `lastScale` the last change of the desired count and why.

Conditions (metav1.Condition): Ready (as many ready pods as the target),
Progressing (the Deployment being created, scaled, drained or rolled out),
Degraded (a pod crash-loops: vmbox.kube.pods.crashes), SpecRejected (the
spec models refuse the spec: the one-line SpecError). A condition whose status
did not change keeps its lastTransitionTime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmbox import sharing
from vmbox.control.autoscale import Decision
from vmbox.kube import pods
from vmbox.kube.manifests import selector
from vmbox.spec import Spec

Obj = Mapping[str, Any]
WARNINGS = ("Degraded", "SpecRejected")  # conditions that are bad news when True


@dataclass(frozen=True, slots=True)
class Seen:
    """What the status is made from."""

    spec: Spec
    target: int  # the desired count after this pass
    held: int | None  # the Deployment's replicas as observed (None: no Deployment)
    replicas: int  # the Deployment's replicas after this pass
    live: Sequence[Obj]  # the Middlebox's pods not being deleted
    crashing: Mapping[str, str]
    decision: Decision | None  # the autoscaler's, this pass
    now: float  # epoch seconds


def timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def limit(spec: Spec) -> tuple[str, int] | None:
    """The limit `shares` divides, and how `kubectl get` shows it: `middlebox.limit`, or
    without it the first ratelimit rule's."""
    limiter = spec.ratelimit
    if limiter is None:
        return None
    window = f"{limiter.window:g}s"
    if limiter.limit is not None:
        return f"{limiter.limit} per {window}", limiter.limit
    for rule in limiter.rules or ():
        if rule.action == "ratelimit" and rule.limit is not None:
            return f"rule {rule.name}: {rule.limit} {rule.unit} per {window}", rule.limit
    return None


def status(mb: Obj, seen: Seen, deployment: Obj | None) -> dict[str, Any]:
    """The whole status of an accepted spec."""
    previous = mb.get("status") or {}
    generation = mb["metadata"].get("generation")
    ready = sorted(pods.name(p) for p in seen.live if pods.ready(p))
    moving = progress(seen, deployment)
    crashing = "; ".join(seen.crashing[p] for p in sorted(seen.crashing))
    enough = len(ready) >= seen.target
    found = [
        ("Ready", enough and deployment is not None, "AllReplicasReady" if enough else
         "ReplicasNotReady", f"{len(ready)} of {seen.target} replicas ready"),
        ("Progressing", moving is not None, "Progressing" if moving else "Stable",
         moving or f"{seen.target} replicas, rolled out"),
        ("Degraded", bool(crashing), "CrashLoop" if crashing else "NoCrashes",
         crashing or "no pod crash-loops"),
        ("SpecRejected", False, "SpecAccepted", "the spec is valid"),
    ]  # fmt: skip
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": len(seen.live),
        "readyReplicas": len(ready),
        "selector": ",".join(
            f"{k}={v}" for k, v in sorted(selector(mb["metadata"]["name"]).items())
        ),
        "conditions": conditions(previous, found, seen.now, generation),
    }
    shown = limit(seen.spec)
    if shown is not None:
        out["limit"] = shown[0]
        out["shares"] = {pod: sharing.even(shown[1], ready, pod) for pod in ready}
    last = last_scale(seen, previous.get("lastScale"))
    if last is not None:
        out["lastScale"] = last
    return out


def rejected(mb: Obj, reason: str, now: float) -> dict[str, Any]:
    """The status of a refused spec: SpecRejected says why, the rest stays as it was."""
    previous = mb.get("status") or {}
    generation = mb["metadata"].get("generation")
    kept = [dict(c) for c in previous.get("conditions") or () if c.get("type") != "SpecRejected"]
    found = [("SpecRejected", True, "SpecError", reason)]
    return dict(previous) | {
        "observedGeneration": generation,
        "conditions": kept + conditions(previous, found, now, generation),
    }


def progress(seen: Seen, deployment: Obj | None) -> str | None:
    """Why the Middlebox is still moving (None: it is where its spec says)."""
    if deployment is None:
        return "creating the Deployment"
    if seen.replicas != seen.target:
        return f"draining: Deployment at {seen.replicas}, target {seen.target}"
    observed = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation") or 0
    if observed.get("observedGeneration", 0) < generation:
        return "the Deployment's change is not observed yet"
    if observed.get("updatedReplicas", 0) < seen.replicas:
        return f"rolling out: {observed.get('updatedReplicas', 0)} of {seen.replicas} updated"
    if len(seen.live) != seen.target:
        return f"{len(seen.live)} pods, target {seen.target}"
    return None


def last_scale(seen: Seen, last: Obj | None) -> dict[str, Any] | None:
    """The last change of the desired count: the autoscaler's, or a new spec.replicas.count."""
    if seen.decision is not None:
        d = seen.decision
        return {"time": timestamp(seen.now), "from": d.current, "to": d.desired, "reason": d.reason}
    if seen.held is None or seen.held == seen.target or (last or {}).get("to") == seen.target:
        return dict(last) if last else None
    return {
        "time": timestamp(seen.now),
        "from": seen.held,
        "to": seen.target,
        "reason": f"spec.replicas.count set to {seen.target}",
    }


def conditions(
    previous: Obj, found: Sequence[tuple[str, bool, str, str]], now: float, generation: Any
) -> list[dict[str, Any]]:
    """Each (type, true, reason, message) as a condition; its lastTransitionTime is kept
    while its status is unchanged."""
    before = {c.get("type"): c for c in previous.get("conditions") or ()}
    out = []
    for kind, true, reason, message in found:
        value = "True" if true else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == value else None
        out.append(
            {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or timestamp(now),
                "observedGeneration": generation,
            }
        )
    return out


def warnings(previous: Obj, current: Obj) -> list[tuple[str, str]]:
    """(reason, message) of each bad condition that turned True or changed its message."""
    before = {c.get("type"): c for c in previous.get("conditions") or ()}
    out = []
    for cond in current["conditions"]:
        if cond["type"] not in WARNINGS or cond["status"] != "True":
            continue
        old = before.get(cond["type"]) or {}
        if old.get("status") != "True" or old.get("message") != cond["message"]:
            out.append((cond["reason"], cond["message"]))
    return out
