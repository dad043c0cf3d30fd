"""The level-based reconcile of one Middlebox, as a pure function: what is -> what to do.

The operator's driver (vmbox.runtime.kubernetes) reads what is (the Middlebox
as the API returns it, the objects it owns, its pods, the latest sample of
each pod), calls `reconcile`, carries the `Result` out in this order and
comes back after `requeue_after` (controller-runtime's `Result{RequeueAfter}`)
or at the next watch event, whichever is first:
  1. `patches`, in order (JSON merge patches: the Middlebox's count, then the
     pods' deletion-cost annotations),
  2. `apply`, each object by server-side apply (field manager FIELD_MANAGER),
  3. `store_spec` to the store's spec key, seeding the state items from it as
     `Controller.setup` does,
  4. `status` to the status subresource, `events` as Events of the Middlebox,
  5. keeps `memory` for the next pass of this Middlebox.
No I/O and no clock reads here: `now` is epoch seconds, passed in.

Where the desired count lives. `spec.replicas.count` of the Middlebox, the
scale subresource's specReplicasPath, is the one desired count: `kubectl
scale middlebox web --replicas 3` writes it and so does the autoscaler (a
Patch of the Middlebox), as `vmbox scale` and the local autoscaler write the
same desired key, so a manual scale of an autoscaled Middlebox lasts until the
next decision (as with Kubernetes' own autoscaler) and a manual one of a
Middlebox without `autoscale:` lasts. Not the Deployment's replicas: that
count lags the desired one on purpose while a pod is marked to go (below),
and the Deployment is an owned object that is re-created from the Middlebox
when deleted, so it cannot be where the count is kept. A count outside
min..max is a spec the spec models refuse (SpecRejected), as `vmbox up` would.

Scale-down drains the pod chosen to go. Kubernetes' ReplicaSet picks which
pod to delete: pending before running, unready before ready, then the lowest
`controller.kubernetes.io/pod-deletion-cost`. So the reconcile first marks the
chosen pod (LEAVING_COST) and lowers the Deployment's replicas only in a later
pass, once the observed pod carries the mark: the ReplicaSet then deletes that
pod and its SIGTERM drain (terminationGracePeriodSeconds above drain_timeout,
vmbox.kube.manifests.grace_seconds) finishes its flows. The drain itself does
not depend on the mark: any deleted pod drains; the mark decides which one.

Invariants of a `Result` (tests/unit/test_kube_reconcile.py checks each):

1. The Deployment's replicas never falls below the number of live pods that
   are not marked to go while the count is being lowered: it is lowered from
   R to the target only when at least min(R, live) - target live pods carry
   the mark, and in that pass no new mark is placed. Before that it stays R.
2. The marked pods are chosen as the ReplicaSet would order them among equal
   costs: pending, then unready, then by load (`autoscale.choose_removals`:
   the autoscale metric's value, packets/s without autoscale; lowest first).
3. When the target is at or above R and every live pod is within R (no
   deletion the ReplicaSet still owes), marks are removed: a mark left on a
   pod would send it first at a later scale-down or rollout.
4. Samples count toward a decision only from live, running pods that do not
   crash-loop (CrashLoopBackOff, or a restartCount that grew within
   `plan.STABLE_AFTER` s), and only once: a pass without a sample newer than
   the last one fed makes no decision.
5. `apply` holds exactly the owned objects that are missing or differ from
   the observed object in a field the operator sets; a spec the models
   refuse applies nothing and patches nothing, and says why in SpecRejected.
6. Conditions keep their lastTransitionTime while their status is unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vmbox import sharing
from vmbox.control.autoscale import Autoscaler, Decision, Policy, choose_removals
from vmbox.control.plan import STABLE_AFTER
from vmbox.functions.rules import CATCH_ALL, limit_item
from vmbox.kube.manifests import (
    API_VERSION,
    DELETION_COST,
    KIND,
    MIDDLEBOX_LABEL,
    owned_objects,
    pod_spec,
    spec_of,
)
from vmbox.spec import Spec, SpecError

if TYPE_CHECKING:
    from vmbox.control.monitor import Sample

Obj = Mapping[str, Any]

LEAVING_COST = "-1000"  # pod-deletion-cost of a pod chosen to go (the default is 0)
SPEC_HASH = "vmbox.dev/spec-hash"  # pod template annotation: a change rolls the pods
PENDING_REQUEUE = 1.0  # a mark placed: the pod watch usually brings the next pass sooner
PROGRESS_REQUEUE = 2.0  # pods starting, leaving or rolling out
OWNED_KINDS = ("ConfigMap", "Deployment", "PodDisruptionBudget", "Service")


@dataclass(frozen=True, slots=True)
class Memory:
    """What one pass leaves for the next of the same Middlebox (the driver keeps it)."""

    policy: Policy | None = None  # the streaks below count toward this policy only
    up_streak: int = 0
    down_streak: int = 0
    last_change: float | None = None
    streak_since: float | None = None
    recommendations: tuple[int, ...] = ()
    sampled_at: float | None = None  # the newest sample time fed to the autoscaler
    restarts: Mapping[str, int] = field(default_factory=dict)  # pod -> restartCount seen
    crashed_at: Mapping[str, float] = field(default_factory=dict)  # pod -> when it grew


@dataclass(frozen=True, slots=True)
class Patch:
    """A JSON merge patch (application/merge-patch+json) of one object."""

    api_version: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    apply: tuple[dict[str, Any], ...]
    patches: tuple[Patch, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]
    requeue_after: float | None
    memory: Memory
    store_spec: str | None = None  # the spec the pods run (None: spec rejected)
    replicas: int | None = None  # the Deployment's replicas after this pass


def reconcile(
    mb: Obj,
    *,
    objects: Mapping[str, Obj | None],
    pods: Sequence[Obj],
    samples: Mapping[str, Sample],
    memory: Memory,
    now: float,
    image: str,
) -> Result:
    """One pass for Middlebox `mb`; `objects` maps an owned kind to what was observed."""
    name = mb["metadata"]["name"]
    mine = [p for p in pods if _labels(p).get(MIDDLEBOX_LABEL) == name]
    live = [p for p in mine if not p["metadata"].get("deletionTimestamp")]
    memory, crashing = _crashes(live, memory, now)
    previous = mb.get("status") or {}
    try:
        spec = spec_of(mb)
    except SpecError as exc:
        return _rejected(mb, str(exc), live, crashing, memory, now)
    decision, memory = _autoscale(spec, live, crashing, samples, memory, now)
    target = decision.desired if decision is not None else spec.replicas.count
    load = _load(spec, live, crashing, samples)
    scale = _scale(target, _replicas(objects.get("Deployment")), live, load)
    wanted = owned_objects(mb, replicas=scale.replicas, image=image)
    for obj in wanted:
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]["metadata"]
            template.setdefault("annotations", {})[SPEC_HASH] = restart_hash(spec)
    apply = tuple(o for o in wanted if not _contains(objects.get(o["kind"]), o))
    events = _applied_events(apply, objects) + scale.events
    patches = scale.patches
    if decision is not None:
        patches = (_count_patch(mb, decision.desired), *patches)
        events = (_decided(decision), *events)
    state = _State(spec, target, scale.held, scale.replicas, live, crashing, decision, now)
    status = _status(mb, state, objects.get("Deployment"), previous)
    events += _transitions(previous, status)
    return Result(
        apply=apply,
        patches=patches,
        status=status,
        events=events,
        requeue_after=_requeue(state, memory, status),
        memory=memory,
        store_spec=pod_spec(spec).to_json(),
        replicas=scale.replicas,
    )


def restart_hash(spec: Spec) -> str:
    """A digest of what a running replica reads only at start (a change rolls the pods).

    Left out: `replicas` and `autoscale` (the operator's), and the limits,
    which are shared state items the replicas watch (seeded from store_spec),
    so a new limit reaches running pods without a rollout.
    """
    data = json.loads(pod_spec(spec).to_json())
    data.pop("replicas", None)
    data.pop("autoscale", None)
    box = data.get("middlebox") or {}
    box.pop("limit", None)
    for rule in box.get("rules") or ():
        rule.pop("limit", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- pods ---------------------------------------------------------------------


def _labels(pod: Obj) -> Mapping[str, str]:
    return pod.get("metadata", {}).get("labels") or {}


def _name(pod: Obj) -> str:
    return str(pod["metadata"]["name"])


def _marked(pod: Obj) -> bool:
    annotations = pod["metadata"].get("annotations") or {}
    return annotations.get(DELETION_COST) == LEAVING_COST


def _phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase", "Pending"))


def _ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _containers(pod: Obj) -> Sequence[Obj]:
    return (pod.get("status") or {}).get("containerStatuses") or ()


def _crashes(live: Sequence[Obj], memory: Memory, now: float) -> tuple[Memory, dict[str, str]]:
    """The pods that crash-loop now (pod -> why), and the restart counts to remember."""
    restarts: dict[str, int] = {}
    crashed_at: dict[str, float] = {}
    crashing: dict[str, str] = {}
    for pod in live:
        pod_name = _name(pod)
        count = sum(int(c.get("restartCount", 0)) for c in _containers(pod))
        restarts[pod_name] = count
        seen = memory.restarts.get(pod_name)
        since = now if seen is not None and count > seen else memory.crashed_at.get(pod_name)
        if since is not None and now - since < STABLE_AFTER:
            crashed_at[pod_name] = since
            crashing[pod_name] = f"{pod_name} restarted ({count} restarts)"
        waiting = [((c.get("state") or {}).get("waiting") or {}) for c in _containers(pod)]
        if any(w.get("reason") == "CrashLoopBackOff" for w in waiting):
            crashing[pod_name] = f"{pod_name} in CrashLoopBackOff ({count} restarts)"
    return _with(memory, restarts=restarts, crashed_at=crashed_at), crashing


def _load(
    spec: Spec, live: Sequence[Obj], crashing: Mapping[str, str], samples: Mapping[str, Sample]
) -> dict[str, float]:
    """Each pod's removal key: below 0 as the ReplicaSet ranks it first (a crash-looping
    pod with them: its load says nothing), else its load."""
    metric = spec.autoscale.metric if spec.autoscale else "pps"
    out: dict[str, float] = {}
    for pod in live:
        sample = samples.get(_name(pod))
        value = sample.value(metric) if sample is not None else None
        out[_name(pod)] = value if value is not None else 0.0
        if _phase(pod) != "Running":
            out[_name(pod)] = -2.0
        elif not _ready(pod) or _name(pod) in crashing:
            out[_name(pod)] = -1.0
    return out


# -- the autoscaler -----------------------------------------------------------

_STREAK_FIELDS = ("up_streak", "down_streak", "last_change", "streak_since", "recommendations")


def _with(memory: Memory, **changes: Any) -> Memory:
    values = {f: getattr(memory, f) for f in Memory.__dataclass_fields__}
    return Memory(**(values | changes))


def _autoscale(
    spec: Spec,
    live: Sequence[Obj],
    crashing: Mapping[str, str],
    samples: Mapping[str, Sample],
    memory: Memory,
    now: float,
) -> tuple[Decision | None, Memory]:
    """Feed the newest samples, once, to `autoscale.Autoscaler` rebuilt from `memory`."""
    if spec.autoscale is None:
        return None, _with(memory, **{f: getattr(Memory(), f) for f in _STREAK_FIELDS})
    policy = Policy.from_spec(spec)
    counted = [
        samples[_name(p)]
        for p in live
        if _name(p) in samples and _phase(p) == "Running" and _name(p) not in crashing
    ]
    fresh = [s.time for s in (samples.get(_name(p)) for p in live) if s is not None]
    newest = max(fresh, default=None)
    if newest is None or (memory.sampled_at is not None and newest <= memory.sampled_at):
        return None, memory
    scaler = Autoscaler(policy)
    if memory.policy == policy:
        scaler.up_streak, scaler.down_streak = memory.up_streak, memory.down_streak
        scaler.last_change, scaler.streak_since = memory.last_change, memory.streak_since
        scaler.recommendations.extend(memory.recommendations)
    values = [v for v in (s.value(policy.metric) for s in counted) if v is not None]
    decision = scaler.observe(now, spec.replicas.count, values)
    return decision, _with(
        memory,
        policy=policy,
        up_streak=scaler.up_streak,
        down_streak=scaler.down_streak,
        last_change=scaler.last_change,
        streak_since=scaler.streak_since,
        recommendations=tuple(scaler.recommendations),
        sampled_at=newest,
    )


def _count_patch(mb: Obj, count: int) -> Patch:
    meta = mb["metadata"]
    body = {"spec": {"replicas": {"count": count}}}
    return Patch(API_VERSION, KIND, meta.get("namespace", "default"), meta["name"], body)


def _decided(decision: Decision) -> Event:
    return Event(
        "Normal",
        "Autoscaled",
        f"autoscale {decision.current} -> {decision.desired}: {decision.reason}",
    )


# -- the Deployment's count and the marks -------------------------------------


@dataclass(frozen=True, slots=True)
class _Scale:
    replicas: int  # the Deployment's replicas after this pass
    held: int | None  # what it was (None: no Deployment)
    patches: tuple[Patch, ...] = ()
    leaving: tuple[str, ...] = ()  # pods marked after this pass
    events: tuple[Event, ...] = ()


def _replicas(deployment: Obj | None) -> int | None:
    if deployment is None:
        return None
    return int((deployment.get("spec") or {}).get("replicas", 1))


def _scale(target: int, held: int | None, live: Sequence[Obj], load: Mapping[str, float]) -> _Scale:
    """Invariants 1-3: mark the pods to go, lower the count once they carry the mark."""
    if held is None:
        return _Scale(target, None)
    marked = sorted(_name(p) for p in live if _marked(p))
    need = max(0, min(held, len(live)) - target)
    if need > len(marked):
        unmarked = sorted(_name(p) for p in live if not _marked(p))
        chosen = choose_removals(unmarked, need - len(marked), load)
        patches = tuple(_mark(p, live, LEAVING_COST) for p in chosen)
        message = f"marked to go before {held} -> {target}: " + ", ".join(
            f"{p} (load {load.get(p, 0.0):g})" for p in chosen
        )
        return _Scale(
            held, held, patches, tuple(marked + chosen), (Event("Normal", "Draining", message),)
        )
    keep = choose_removals(marked, need, load)
    extra = [p for p in marked if p not in keep] if len(live) <= max(held, target) else []
    patches = tuple(_mark(p, live, None) for p in extra)
    events: tuple[Event, ...] = ()
    if held != target:
        events = (Event("Normal", "Scaled", f"Deployment replicas {held} -> {target}"),)
    leaving = tuple(p for p in marked if p not in extra)
    return _Scale(target, held, patches, leaving, events)


def _mark(pod_name: str, live: Sequence[Obj], cost: str | None) -> Patch:
    namespace = next(
        (p["metadata"].get("namespace", "default") for p in live if _name(p) == pod_name),
        "default",
    )
    body = {"metadata": {"annotations": {DELETION_COST: cost}}}
    return Patch("v1", "Pod", namespace, pod_name, body)


# -- what to apply ------------------------------------------------------------


def _contains(observed: Any, wanted: Any) -> bool:
    """Whether `observed` holds every field of `wanted` (the API server adds its own)."""
    if isinstance(wanted, Mapping):
        return isinstance(observed, Mapping) and all(
            k in observed and _contains(observed[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(wanted)
            and all(_contains(o, w) for o, w in zip(observed, wanted, strict=True))
        )
    return bool(observed == wanted)


def _applied_events(apply: Sequence[Obj], objects: Mapping[str, Obj | None]) -> tuple[Event, ...]:
    events = []
    for obj in apply:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        verb = "created" if objects.get(kind) is None else "updated"
        events.append(Event("Normal", "Applied", f"{kind} {obj_name} {verb}"))
    return tuple(events)


# -- status ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    spec: Spec
    target: int
    held: int | None  # the Deployment's replicas as observed (None: no Deployment)
    replicas: int  # and after this pass
    live: Sequence[Obj]
    crashing: Mapping[str, str]
    decision: Decision | None
    now: float


def _time(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shares(spec: Spec, ready: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each limit's even split over the ready pods: item -> pod -> share."""
    limits: dict[str, int] = {}
    for rule in spec.middlebox.rules or ():
        if rule.action == "ratelimit" and rule.limit is not None:
            limits[limit_item(rule.name)] = rule.limit
    if spec.middlebox.limit is not None:
        limits[CATCH_ALL] = spec.middlebox.limit
    return {
        item: {pod: sharing.even(total, ready, pod) for pod in ready}
        for item, total in limits.items()
    }


def _status(mb: Obj, state: _State, deployment: Obj | None, previous: Obj) -> dict[str, Any]:
    generation = mb["metadata"].get("generation")
    ready = sorted(_name(p) for p in state.live if _ready(p) and _phase(p) == "Running")
    progress = _progress(state, deployment, generation)
    found = [
        (
            "Ready",
            len(ready) >= state.target and deployment is not None,
            "AllReplicasReady" if len(ready) >= state.target else "ReplicasNotReady",
            f"{len(ready)} of {state.target} replicas ready",
        ),
        (
            "Progressing",
            progress is not None,
            "Progressing" if progress else "Stable",
            progress or f"{state.target} replicas, rolled out",
        ),
        (
            "Degraded",
            bool(state.crashing),
            "CrashLoop" if state.crashing else "NoCrashes",
            "; ".join(state.crashing[p] for p in sorted(state.crashing)) or "no pod crash-loops",
        ),
        ("SpecRejected", False, "SpecAccepted", "the spec is valid"),
    ]
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": len(state.live),
        "readyReplicas": len(ready),
        "selector": f"{MIDDLEBOX_LABEL}={mb['metadata']['name']}",
        "shares": shares(state.spec, ready),
        "conditions": _conditions(previous, found, state.now, generation),
    }
    last = _last_scale(state, previous)
    if last is not None:
        status["lastScale"] = last
    return status


def _progress(state: _State, deployment: Obj | None, generation: Any) -> str | None:
    """Why the Middlebox is still moving (None: it is where its spec says)."""
    if deployment is None:
        return "creating the Deployment"
    if state.replicas != state.target:
        return f"draining: Deployment at {state.replicas}, target {state.target}"
    seen = deployment.get("status") or {}
    if seen.get("observedGeneration", 0) < (deployment["metadata"].get("generation") or 0):
        return "the Deployment's change is not observed yet"
    if seen.get("updatedReplicas", 0) < state.replicas:
        return f"rolling out: {seen.get('updatedReplicas', 0)} of {state.replicas} updated"
    if len(state.live) != state.target:
        return f"{len(state.live)} pods, target {state.target}"
    return None


def _last_scale(state: _State, previous: Obj) -> dict[str, Any] | None:
    """The last change of the desired count: the autoscaler's, or a new spec.replicas.count."""
    last = previous.get("lastScale")
    if state.decision is not None:
        d = state.decision
        return {"time": _time(state.now), "from": d.current, "to": d.desired, "reason": d.reason}
    if state.held is None or state.held == state.target or (last or {}).get("to") == state.target:
        return dict(last) if last else None
    return {
        "time": _time(state.now),
        "from": state.held,
        "to": state.target,
        "reason": f"spec.replicas.count set to {state.target}",
    }


def _conditions(
    previous: Obj, found: Sequence[tuple[str, bool, str, str]], now: float, generation: Any
) -> list[dict[str, Any]]:
    """Invariant 6: a condition whose status did not change keeps its lastTransitionTime."""
    before = {c.get("type"): c for c in previous.get("conditions") or ()}
    out = []
    for kind, true, reason, message in found:
        status = "True" if true else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or _time(now),
                "observedGeneration": generation,
            }
        )
    return out


def _transitions(previous: Obj, status: Obj) -> tuple[Event, ...]:
    """Warnings for a condition that turned bad (or changed its reason while bad)."""
    before = {c.get("type"): c for c in previous.get("conditions") or ()}
    events = []
    for cond in status["conditions"]:
        if cond["type"] not in ("Degraded", "SpecRejected") or cond["status"] != "True":
            continue
        old = before.get(cond["type"]) or {}
        if old.get("status") != "True" or old.get("message") != cond["message"]:
            events.append(Event("Warning", cond["reason"], cond["message"]))
    return tuple(events)


def _rejected(
    mb: Obj,
    reason: str,
    live: Sequence[Obj],
    crashing: Mapping[str, str],
    memory: Memory,
    now: float,
) -> Result:
    """Invariant 5: nothing applied or patched; the other conditions stay as they were."""
    previous = mb.get("status") or {}
    generation = mb["metadata"].get("generation")
    kept = [c for c in previous.get("conditions") or () if c.get("type") != "SpecRejected"]
    conditions = _conditions(
        previous, [("SpecRejected", True, "SpecError", reason)], now, generation
    )
    status = dict(previous) | {
        "observedGeneration": generation,
        "conditions": [dict(c) for c in kept] + conditions,
    }
    return Result((), (), status, _transitions(previous, status), None, memory)


def _requeue(state: _State, memory: Memory, status: Obj) -> float | None:
    """When to come back without a watch event: the soonest thing that is due."""
    due: list[float] = []
    if state.replicas != state.target:  # marks placed, the count held
        due.append(PENDING_REQUEUE)
    if state.spec.autoscale is not None:
        due.append(state.spec.autoscale.interval)
    if any(c["type"] == "Progressing" and c["status"] == "True" for c in status["conditions"]):
        due.append(PROGRESS_REQUEUE)
    due += [since + STABLE_AFTER - state.now for since in memory.crashed_at.values()]
    return max(0.1, min(due)) if due else None
