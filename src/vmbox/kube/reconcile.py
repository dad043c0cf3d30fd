"""The level-based reconcile of one Middlebox, as a pure function: what is -> what to do.

The operator's driver (vmbox.runtime.kubernetes) reads what is (the Middlebox
as the API returns it, the objects it owns, its pods, the latest sample of
each pod), calls `reconcile`, carries the `Result` out in this order and
comes back after `requeue_after` (controller-runtime's `Result{RequeueAfter}`)
or at the next watch event, whichever is first:
  1. `patches`, in order (JSON merge patches: the Middlebox's count, then the
     pods' deletion-cost annotations),
  2. `store_spec` to the store's spec key, seeding the state items from it as
     `Controller.setup` does (before 3: pods a rollout starts read it),
  3. `apply`, each object by server-side apply (field manager FIELD_MANAGER),
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

A spec change. The ConfigMap and `store_spec` carry the new spec at once.
What running replicas watch (the limits: shared state items, seeded from
store_spec) reaches them without a restart; what a replica reads only at
start changes `restart_hash`, stamped on the pod template (SPEC_HASH), so the
Deployment rolls its pods (one surge pod joins before an old one drains).
`replicas` and `autoscale` are the operator's and change neither.

The autoscaler is `autoscale.Autoscaler`, rebuilt each pass from `Memory`
(its streaks, cooldown and the newest sample fed) and fed the samples of the
pass once; its decision patches spec.replicas.count and moves the Deployment
in the same pass. Memory also holds each pod's restartCount, for crash loops
(vmbox.kube.pods.crashes). An operator that restarts starts with an empty
Memory: streaks and cooldown begin again, CrashLoopBackOff is still seen.
`replicas.warm` has no effect here (no standby pods yet).

Invariants of a `Result` (tests/unit/test_kube_reconcile.py checks each):

1. The Deployment's replicas is lowered from R to the target only in a pass
   that finds at least min(R, live) - target live pods carrying the mark, and
   that pass places no new mark; until then it stays R. So the ReplicaSet,
   when it deletes, deletes marked pods.
2. The pods marked are those the ReplicaSet ranks first anyway (pending, then
   unready or crash-looping), then the least loaded (`autoscale.
   choose_removals` over `pods.removal_order`: the autoscale metric's value,
   packets/s without autoscale).
3. Marks beyond what the lowering needs are removed (a scale-up while a pod
   is marked), but only when no live pod is beyond max(R, target): while the
   ReplicaSet still owes a deletion, the mark decides which pod it takes.
4. Samples count toward a decision only from live, running pods that do not
   crash-loop, and only once: a pass without a sample newer than the last
   one fed makes no decision.
5. `apply` holds exactly the owned objects that are missing or differ from
   the observed object in a field the operator sets; a spec the models
   refuse applies nothing and patches nothing, and says why in SpecRejected
   (the other conditions stay as they were: the pods still serve).
6. Conditions keep their lastTransitionTime while their status is unchanged,
   and a Warning event is emitted once per bad condition and message
   (vmbox.kube.status).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmbox.control.autoscale import Autoscaler, Decision, Policy, choose_removals
from vmbox.control.plan import STABLE_AFTER
from vmbox.kube import pods as _pods
from vmbox.kube import status
from vmbox.kube.manifests import (
    API_VERSION,
    DELETION_COST,
    KIND,
    MIDDLEBOX_LABEL,
    object_key,
    owned_objects,
    pod_spec,
    spec_of,
)
from vmbox.kube.pods import LEAVING_COST
from vmbox.spec import Spec, SpecError

if TYPE_CHECKING:
    from vmbox.control.monitor import Sample

Obj = Mapping[str, Any]

SPEC_HASH = "vmbox.dev/spec-hash"  # pod template annotation: a change rolls the pods
PENDING_REQUEUE = 1.0  # a mark placed: the pod watch usually brings the next pass sooner
PROGRESS_REQUEUE = 2.0  # pods starting, leaving or rolling out
# What the driver observes for `objects` (a missing one is None): what owned_objects makes.
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
    """A core/v1 Event about the Middlebox (`kubectl describe` shows them)."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """What one pass asks the driver to do (the module doc gives the order)."""

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
    refused: str | None = None,
) -> Result:
    """One pass for Middlebox `mb`; `objects` maps each of OWNED_KINDS to what was
    observed, `samples` a pod's name to its latest sample, `image` is the replicas'.
    `refused` is a reason found across Middleboxes (`name_clashes`): it is treated
    as a spec the models refuse."""
    name = mb["metadata"]["name"]
    live = [p for p in pods if _mine(p, name) and _pods.live(p)]
    seen = _pods.crashes(live, memory.restarts, memory.crashed_at, now)
    memory = _with(memory, restarts=seen.restarts, crashed_at=seen.crashed_at)
    try:
        spec = spec_of(mb)
    except SpecError as exc:
        return _rejected(mb, str(exc), memory, now)
    if refused is not None:
        return _rejected(mb, refused, memory, now)
    decision, memory = _autoscale(spec, live, seen.crashing, samples, memory, now)
    target = decision.desired if decision is not None else spec.replicas.count
    load = _pods.removal_order(live, seen.crashing, _load(spec, samples))
    scale = _scale(target, _replicas(objects.get("Deployment")), live, load)
    wanted = _owned(mb, spec, scale.replicas, image)
    apply = tuple(o for o in wanted if not _contains(objects.get(o["kind"]), o))
    patches, events = scale.patches, _applied_events(apply, objects) + scale.events
    if decision is not None:
        patches = (_count_patch(mb, decision.desired), *patches)
        events = (_decided(decision), *events)
    state = status.Seen(
        spec, target, scale.held, scale.replicas, live, seen.crashing, decision, now
    )
    new = status.status(mb, state, objects.get("Deployment"))
    events += _warnings(mb, new)
    return Result(
        apply=apply,
        patches=patches,
        status=new,
        events=events,
        requeue_after=_requeue(state, memory, new),
        memory=memory,
        store_spec=pod_spec(spec).to_json(),
        replicas=scale.replicas,
    )


def _mine(pod: Obj, name: str) -> bool:
    return _pods.labels(pod).get(MIDDLEBOX_LABEL) == name


def _owned(mb: Obj, spec: Spec, replicas: int, image: str) -> list[dict[str, Any]]:
    """owned_objects, the Deployment's pod template stamped with restart_hash."""
    wanted = owned_objects(mb, replicas=replicas, image=image)
    for obj in wanted:
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]["metadata"]
            template.setdefault("annotations", {})[SPEC_HASH] = restart_hash(spec)
    return wanted


def _load(spec: Spec, samples: Mapping[str, Sample]) -> dict[str, float]:
    """Each pod's load as the autoscaler sees it (packets/s without autoscale)."""
    metric = spec.autoscale.metric if spec.autoscale else "pps"
    values = {pod: sample.value(metric) for pod, sample in samples.items()}
    return {pod: value for pod, value in values.items() if value is not None}


def _warnings(mb: Obj, new: Obj) -> tuple[Event, ...]:
    found = status.warnings(mb.get("status") or {}, new)
    return tuple(Event("Warning", reason, message) for reason, message in found)


def name_clashes(middleboxes: Sequence[Obj]) -> dict[tuple[str, str], str]:
    """The Middleboxes that would share another's keys in etcd, each with its reason.

    A Middlebox's name is its service name in the store (keys.spec_key and the
    rest under /vmbox/<name>/), so two of one name in two namespaces whose
    pods use the same store would share one spec, one membership and one
    limit. The oldest (creationTimestamp, then namespace) keeps the name; every
    other is refused, by (namespace, name). A spec the models refuse takes no
    name (it is refused for its own reason).
    """
    holders: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}
    refused: dict[tuple[str, str], str] = {}
    ranked = sorted(
        middleboxes,
        key=lambda mb: (
            str(mb["metadata"].get("creationTimestamp") or ""),
            str(mb["metadata"].get("namespace", "default")),
        ),
    )
    for mb in ranked:
        ns, name = object_key(mb)
        try:
            store = pod_spec(spec_of(mb)).store
        except SpecError:
            continue
        where = tuple(getattr(store, "endpoints", ()) or (str(store),))
        holder = holders.setdefault((name, where), (ns, name))
        if holder != (ns, name):
            refused[(ns, name)] = (
                f"middlebox {ns}/{name}: name: {name} is taken by middlebox "
                f"{holder[0]}/{name} in the same store (the name keys its state there): "
                "rename one, or give it another store"
            )
    return refused


def _rejected(mb: Obj, reason: str, memory: Memory, now: float) -> Result:
    """Invariant 5: nothing applied or patched; the other conditions stay as they were."""
    new = status.rejected(mb, reason, now)
    return Result((), (), new, _warnings(mb, new), None, memory)


def restart_hash(spec: Spec) -> str:
    """A digest of what a running replica reads only at start (a change rolls the pods).

    Left out: `replicas` and `autoscale` (the operator's), and the limits,
    which are shared state items the replicas watch (seeded from store_spec),
    so a new limit reaches running pods without a rollout.
    """
    data = json.loads(pod_spec(spec).to_json())
    data.pop("replicas", None)
    data.pop("autoscale", None)
    stages = data.get("middlebox") or []
    for box in stages:
        box.pop("limit", None)
        for rule in box.get("rules") or ():
            rule.pop("limit", None)
    if len(stages) == 1:
        data["middlebox"] = stages[0]  # one function's section hashes as it always did
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        samples[_pods.name(p)]
        for p in live
        if _pods.name(p) in samples
        and _pods.phase(p) == "Running"
        and _pods.name(p) not in crashing
    ]
    fresh = [s.time for s in (samples.get(_pods.name(p)) for p in live) if s is not None]
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
    events: tuple[Event, ...] = ()


def _replicas(deployment: Obj | None) -> int | None:
    if deployment is None:
        return None
    return int((deployment.get("spec") or {}).get("replicas", 1))


def _scale(target: int, held: int | None, live: Sequence[Obj], load: Mapping[str, float]) -> _Scale:
    """Invariants 1-3: mark the pods to go, lower the count once they carry the mark."""
    if held is None:
        return _Scale(target, None)
    marked = sorted(_pods.name(p) for p in live if _pods.marked(p))
    need = max(0, min(held, len(live)) - target)
    if need > len(marked):
        unmarked = sorted(_pods.name(p) for p in live if not _pods.marked(p))
        chosen = choose_removals(unmarked, need - len(marked), load)
        patches = tuple(_mark(p, live, LEAVING_COST) for p in chosen)
        message = f"marked to go before {held} -> {target}: " + ", ".join(
            f"{p} (load {load.get(p, 0.0):g})" for p in chosen
        )
        return _Scale(held, held, patches, (Event("Normal", "Draining", message),))
    keep = choose_removals(marked, need, load)
    extra = [p for p in marked if p not in keep] if len(live) <= max(held, target) else []
    patches = tuple(_mark(p, live, None) for p in extra)
    events: tuple[Event, ...] = ()
    if held != target:
        events = (Event("Normal", "Scaled", f"Deployment replicas {held} -> {target}"),)
    return _Scale(target, held, patches, events)


def _mark(pod_name: str, live: Sequence[Obj], cost: str | None) -> Patch:
    namespace = next(
        (p["metadata"].get("namespace", "default") for p in live if _pods.name(p) == pod_name),
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


def _requeue(state: status.Seen, memory: Memory, new: Obj) -> float | None:
    """When to come back without a watch event: the soonest thing that is due."""
    due: list[float] = []
    if state.replicas != state.target:  # marks placed, the count held
        due.append(PENDING_REQUEUE)
    if state.spec.autoscale is not None:
        due.append(state.spec.autoscale.interval)
    if any(c["type"] == "Progressing" and c["status"] == "True" for c in new["conditions"]):
        due.append(PROGRESS_REQUEUE)
    due += [since + STABLE_AFTER - state.now for since in memory.crashed_at.values()]
    return max(0.1, min(due)) if due else None
