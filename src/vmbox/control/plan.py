"""The reconcile plan of one service, as a pure function: what is -> what to do.

`Controller.reconcile` (vmbox.control.controller) reads what is (the runtime's
running replicas, the drains in flight, the desired count, each replica's
load), calls `plan`, carries its actions out and sleeps `min(tick,
requeue_after)`, like controller-runtime's `Result{RequeueAfter}`: a replica
due for a restart in 0.2 s is restarted 0.2 s later, not at the next tick.
Crashes go through `crashed`, which keeps each replica's restart backoff.
No I/O and no clock reads here: `now` is passed in (`time.monotonic` in the
controller, a number in tests/unit/test_plan.py).

Terms. A replica is *running* if the runtime runs it and it is not *draining*
(being stopped in the background: asked to finish its flows and leave, by this
controller or by one before it that this one adopted). It is *waiting* if it
crashed and has not been restarted yet: its `Backoff` says when it may be
(`not_before`). Waiting replicas are wanted ones: they count toward the
desired count, so a crash is healed by restarting the same id, never by
starting another one beside it.

Warm spares (`replicas.warm`): a *spare* is a running replica started with
`--standby`: registered under standby/<id>, not a member, taking no traffic.
The controller keeps `spares_wanted(warm, max, desired)` = min(warm, max -
desired) of them (spares count against `replicas.max`). Spares are not
*serving*: the desired count is met by serving replicas (running ones that are
not spares, and waiting ones whose backoff is not `standby`), and a shortfall
promotes spares (lowest ids first) before it starts new replicas. A crashed
spare waits (its backoff says `standby`) and is restarted as a spare; an
excess of spares forgets waiting spares first, then stops running ones
(highest ids first, no drain: they hold no flows).

Invariants of a `Plan` (tests/unit/test_plan.py checks each):

1. Each replica id is in at most one action, and each action fits what was
   seen: `forget` and `restart` take waiting replicas, `drain` takes running
   ones (never a draining one: no replica is drained twice), and `start` takes
   ids that are none of running, waiting or draining (a draining replica still
   holds its id until it has gone).
2. The level: when the plan's actions are done, running - drained + waiting -
   forgotten + started == desired. A surplus forgets waiting replicas first
   (highest ids first: nothing to stop), then drains the least loaded running
   ones (`autoscale.choose_removals`); a shortfall starts the lowest free ids
   (`autoscale.free_ids`).
3. A waiting replica is restarted exactly when `not_before <= now` (and it is
   still wanted); one that is not due stays waiting and is not replaced.
4. `requeue_after` is the time from `now` to the earliest `not_before` of the
   replicas still waiting after the plan (always > 0), or None when none is.
5. `backoff` is the table after the actions: forgotten, drained and stopped
   replicas have no entry (a replica that comes back under that id starts its
   backoff afresh), restarted ones are no longer waiting and keep their
   failure count, promoted ones are no longer `standby`, every other entry is
   unchanged.
6. Spares: `promote` takes running spares, only while serving replicas fall
   short of desired, and a new serving replica is started only when every
   running spare is promoted;
   `stop_spare` takes running spares that are not promoted; `start_spare`
   takes free ids like `start`. Afterwards spares (running, waiting, started)
   number exactly `spares_wanted`, so serving + spares never exceed `max`
   when desired is within it.

7. Rollouts (a spec whose replicas must restart, vmbox.spec.changes): a
   running serving replica is *outdated* when its member info names another
   template than the controller's spec. While one is, the level of invariant
   2 is desired + 1 (one more replica, started with the new spec) until every
   running replica that is not outdated is *ready* (a member; in-path, its
   queue bound); then it is desired again, and the surplus drains an
   outdated replica. Serving replicas never fall under desired for a rollout
   (a surge of one, none unavailable). Surplus drains take outdated replicas
   first. Outdated spares are stopped and replaced (they serve nothing), and
   never promoted.

Invariants 1 and 2 count serving replicas only: in 1 `drain` takes running
serving replicas and `forget`/`restart` waiting ones of either role; in 2
running and waiting mean serving ones, and promoted spares count as started.

For an in-path service, `serving` says which replicas' queues the gateway
steers traffic to (vmbox.dataplane.steering); the controller rewrites the
steering before it drains a replica, so a leaving replica's queue is out of
the path before it is told to stop, and in the pass that follows a crash
(the runtime wakes it), so a crashed replica's flows move to the living ones
(unless none other serves).

Crash backoff: the n-th consecutive crash of a replica waits
`restart_delay(n)` (0.2 s doubling up to 10 s); a crash of a replica that ran
for `STABLE_AFTER` seconds or more counts as the first again.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace

from vmbox.control.autoscale import choose_removals, free_ids

STABLE_AFTER = 30.0  # a replica that ran this long has its crash backoff reset


def restart_delay(failures: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff for the n-th consecutive crash."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


@dataclass(frozen=True, slots=True)
class Backoff:
    """One replica's crash bookkeeping."""

    failures: int = 0  # consecutive crashes (a crash after STABLE_AFTER s of running is 1)
    not_before: float = 0.0  # when it may be restarted (the clock `now` comes from)
    waiting: bool = False  # crashed, to be restarted at not_before
    standby: bool = False  # a warm spare: restarted as one


def crashed(old: Backoff | None, ran_for: float, now: float, standby: bool = False) -> Backoff:
    """The backoff of a replica (a spare if `standby`) that just exited on its own
    after running `ran_for` s."""
    previous = old.failures if old is not None else 0
    failures = 1 if ran_for >= STABLE_AFTER else previous + 1
    return Backoff(failures, now + restart_delay(failures), waiting=True, standby=standby)


def spares_wanted(warm: int, most: int, desired: int) -> int:
    """How many warm spares to keep: `warm`, within what `max` leaves beside `desired`."""
    return max(0, min(warm, most - desired))


@dataclass(frozen=True, slots=True)
class Observed:
    """What one reconcile pass saw."""

    service: str  # replica ids are <service>-<n>
    desired: int
    running: Set[str]  # what the runtime runs, draining replicas included
    draining: Set[str]  # being stopped in the background (they count as leaving)
    backoff: Mapping[str, Backoff]
    now: float
    load: Mapping[str, float] = field(default_factory=dict)  # for choosing whom to drain
    spares: Set[str] = frozenset()  # running replicas that are warm spares (standby)
    spares_wanted: int = 0  # spares_wanted(warm, max, desired)
    outdated: Set[str] = frozenset()  # running an older template than the spec's (a rollout)
    ready: Set[str] = frozenset()  # members (in-path: queue bound): a rollout goes on past them


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions of one pass, in the order the controller carries them out."""

    forget: tuple[str, ...] = ()  # waiting replicas no longer wanted: just drop their backoff
    drain: tuple[str, ...] = ()  # surplus running replicas to stop in the background
    restart: tuple[str, ...] = ()  # waiting replicas whose backoff is over
    start: tuple[str, ...] = ()  # new replicas
    promote: tuple[str, ...] = ()  # spares that join the group instead of new replicas
    stop_spare: tuple[str, ...] = ()  # surplus spares, stopped in the background (no drain)
    start_spare: tuple[str, ...] = ()  # new spares
    requeue_after: float | None = None  # seconds until the next restart is due
    backoff: Mapping[str, Backoff] = field(default_factory=dict)  # the table afterwards


def plan(seen: Observed) -> Plan:
    """The actions that move the service from what was seen toward its desired count."""
    running = set(seen.running) - set(seen.draining)
    waiting = {rid for rid, b in seen.backoff.items() if b.waiting and rid not in running}
    spares = set(seen.spares) & running
    running -= spares
    stale_spares = spares & set(seen.outdated)
    spares -= stale_spares
    spare_waiting = {rid for rid in waiting if seen.backoff[rid].standby}
    waiting -= spare_waiting
    level = seen.desired + rollout_surge(seen.desired, running, waiting, seen.outdated, seen.ready)
    surplus = len(running) + len(waiting) - level
    forget = sorted(waiting, reverse=True)[: max(0, surplus)]
    waiting.difference_update(forget)
    surplus -= len(forget)
    old = running & set(seen.outdated)
    drain = choose_removals(sorted(old), surplus, seen.load)
    drain += choose_removals(sorted(running - old), surplus - len(drain), seen.load)
    short = max(0, level - len(running) - len(waiting))
    promote = sorted(spares, key=_by_number)[:short]
    spares.difference_update(promote)
    extra = len(spares) + len(spare_waiting) - seen.spares_wanted
    forget += sorted(spare_waiting, reverse=True)[: max(0, extra)]
    spare_waiting.difference_update(forget)
    stop_spare = sorted(stale_spares, key=_by_number)
    stop_spare += sorted(spares, key=_by_number, reverse=True)[
        : max(0, len(spares) + len(spare_waiting) - seen.spares_wanted)
    ]
    waiting |= spare_waiting
    due = sorted(rid for rid in waiting if seen.backoff[rid].not_before <= seen.now)
    # Forgotten ids stay taken for this pass: one action per id.
    taken = set(seen.running) | waiting | set(forget) | set(seen.draining)
    starts = short - len(promote)
    new = free_ids(seen.service, taken, starts + max(0, -extra))

    gone = set(forget) | set(drain) | set(stop_spare)
    table = {rid: b for rid, b in seen.backoff.items() if rid not in gone}
    for rid in due:
        table[rid] = replace(table[rid], waiting=False)
    for rid in promote:
        if rid in table:
            table[rid] = replace(table[rid], standby=False)
    later = [table[rid].not_before for rid in waiting if table[rid].waiting]
    return Plan(
        forget=tuple(forget),
        drain=tuple(drain),
        restart=tuple(due),
        start=tuple(new[:starts]),
        promote=tuple(promote),
        stop_spare=tuple(stop_spare),
        start_spare=tuple(new[starts:]),
        requeue_after=min(later) - seen.now if later else None,
        backoff=table,
    )


def rollout_surge(
    desired: int, running: Set[str], waiting: Set[str], outdated: Set[str], ready: Set[str]
) -> int:
    """1 while a rollout needs one more replica than desired (invariant 7), else 0.

    With outdated replicas running: one more while the serving ones are not
    above desired (start one with the new spec), and while a replica with the
    new spec is not ready yet (keep the outdated ones serving meanwhile); 0
    once every new one is ready, so the surplus drains an outdated one.
    """
    old = set(running) & set(outdated)
    if not old:
        return 0
    if len(running) + len(waiting) <= desired:
        return 1
    return 0 if set(running) - old <= set(ready) else 1


def _by_number(rid: str) -> tuple[int, str]:
    suffix = rid.rsplit("-", 1)[-1]
    return (int(suffix) if suffix.isdigit() else 0, rid)


def serving(
    bound: Set[str],
    running: Set[str],
    backoff: Mapping[str, Backoff],
    leaving: Set[str],
    *,
    keep_crashed: bool = False,
) -> tuple[str, ...]:
    """The replicas an in-path service's traffic is steered to, by replica number.

    A replica enters once it runs and its member info says it has bound its
    queue (it binds once registered, its resize guard down and a new window
    begun, so it can decide what it gets). One that crashed (a backoff entry,
    not a spare's, and not running with its queue bound: waiting for its
    restart, or restarted and not bound yet) is out while any other replica
    serves, so its flows re-hash onto the living ones at once rather than meet
    a queue nobody reads; when none other serves it stays, since there is
    nowhere to move its flows, and the fail policy in the kernel applies to
    them until its restart binds again. With `keep_crashed` (kernel
    enforcement: a dead replica's node table goes on enforcing its last share
    while the controller holds its place) a crashed replica always stays. One
    that is leaving (draining, or about to be drained by this pass, or a
    waiting one forgotten) is out.
    """
    live = set(bound) & set(running)
    dead = {r for r, b in backoff.items() if not b.standby} - live
    chosen = live - set(leaving)
    if keep_crashed or not chosen:
        chosen |= dead - set(leaving)
    return tuple(sorted(chosen, key=_by_number))
