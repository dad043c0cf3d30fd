"""The reconcile plan and the crash backoff, pure, on a fake clock (vmbox.control.plan).

`World` plays the controller and the runtime: it carries a plan's actions out
the way `Controller.reconcile` does, and crashes replicas when told to, so a
test walks a service through crash loops and scale changes second by second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from vmbox.control.plan import (
    STABLE_AFTER,
    Backoff,
    Observed,
    Plan,
    crashed,
    plan,
    restart_delay,
    rollout_surge,
    serving,
    spares_wanted,
)

SVC = "web"


def ids(*numbers: int) -> set[str]:
    return {f"{SVC}-{n}" for n in numbers}


@dataclass
class World:
    """A runtime, a controller's tables and a clock."""

    desired: int
    now: float = 1000.0
    running: set[str] = field(default_factory=set)
    started_at: dict[str, float] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    backoff: dict[str, Backoff] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    log: list[tuple[float, str, str]] = field(default_factory=list)
    spares: set[str] = field(default_factory=set)
    warm: int = 0
    most: int = 4
    template: str = "a"  # the spec's; each replica runs the one it started with
    runs: dict[str, str] = field(default_factory=dict)

    def observe(self) -> Observed:
        # A replica is a member (ready) once a tick has passed since its start.
        up = {r for r in self.running if self.started_at.get(r, -1.0) < self.now}
        return Observed(
            SVC,
            self.desired,
            set(self.running),
            set(self.draining),
            dict(self.backoff),
            self.now,
            dict(self.load),
            spares=set(self.spares),
            spares_wanted=spares_wanted(self.warm, self.most, self.desired),
            outdated={r for r in up if self.runs.get(r, self.template) != self.template},
            ready=up,
        )

    def reconcile(self) -> Plan:
        seen = self.observe()
        actions = plan(seen)
        check_invariants(seen, actions)
        for rid in actions.drain + actions.stop_spare:
            self.draining.add(rid)
        self.spares -= set(actions.promote) | set(actions.stop_spare)
        for rid in actions.restart + actions.start + actions.start_spare:
            self.running.add(rid)
            self.started_at[rid] = self.now
            self.runs[rid] = self.template
            standby = rid in actions.start_spare or actions.backoff.get(rid, Backoff()).standby
            if standby:
                self.spares.add(rid)
            self.log.append((self.now, "spare" if standby else "start", rid))
        for rid in actions.promote:
            self.log.append((self.now, "promote", rid))
        self.backoff = dict(actions.backoff)
        return actions

    def crash(self, rid: str) -> Backoff:
        self.running.discard(rid)
        standby = rid in self.spares
        self.spares.discard(rid)
        ran_for = self.now - self.started_at[rid]
        state = crashed(self.backoff.get(rid), ran_for, self.now, standby=standby)
        self.backoff[rid] = state
        self.log.append((self.now, "crash", rid))
        return state

    def serving(self) -> set[str]:
        return self.running - self.draining - self.spares

    def finish_drains(self) -> None:
        self.running -= self.draining
        self.draining.clear()

    def run_until(self, end: float, tick: float = 1.0) -> None:
        """Reconcile as Controller.run does, sleeping min(tick, requeue_after), through `end`."""
        for _ in range(1000):  # a plan that requeues without moving on must not hang the test
            if self.now > end:
                return
            requeue = self.reconcile().requeue_after
            self.now += tick if requeue is None else min(tick, requeue)
        raise AssertionError(f"still reconciling at {self.now}")


def check_invariants(seen: Observed, result: Plan) -> None:
    """The invariants stated in vmbox.control.plan, for any observation."""
    everyone = set(seen.running) - set(seen.draining)
    spares = set(seen.spares) & everyone
    running = everyone - spares
    waiting_all = {r for r, b in seen.backoff.items() if b.waiting and r not in everyone}
    spare_waiting = {r for r in waiting_all if seen.backoff[r].standby}
    waiting = waiting_all - spare_waiting
    stale = spares & set(seen.outdated)
    surge = rollout_surge(seen.desired, running, waiting, seen.outdated, seen.ready)
    actions = [
        *result.forget,
        *result.drain,
        *result.restart,
        *result.start,
        *result.promote,
        *result.stop_spare,
        *result.start_spare,
    ]
    assert len(actions) == len(set(actions)), result  # 1: one action per id
    assert set(result.forget) <= waiting_all and set(result.restart) <= waiting_all
    assert set(result.drain) <= running
    fresh = set(result.start) | set(result.start_spare)
    assert not fresh & (set(seen.running) | waiting_all | set(seen.draining))
    assert all(r.startswith(f"{SVC}-") for r in fresh)
    level = (
        len(running - set(result.drain))
        + len(waiting - set(result.forget))
        + len(result.start)
        + len(result.promote)
    )
    assert level == seen.desired + surge, (seen, result)  # 2, and 7's surge
    rolled = running & set(seen.outdated)  # 7: outdated replicas are drained first
    assert set(result.drain) <= rolled or rolled <= set(result.drain), (seen, result)
    still = waiting_all - set(result.forget)
    due = {r for r in still if seen.backoff[r].not_before <= seen.now}
    assert set(result.restart) == due  # 3
    later = [seen.backoff[r].not_before for r in still - due]
    if later:  # 4
        assert result.requeue_after == pytest.approx(min(later) - seen.now)
        assert result.requeue_after is not None and result.requeue_after > 0
    else:
        assert result.requeue_after is None
    gone = set(result.forget) | set(result.drain) | set(result.stop_spare)  # 5
    assert set(result.backoff) == set(seen.backoff) - gone
    for rid, state in result.backoff.items():
        old = seen.backoff[rid]
        if rid in result.restart:
            assert state == Backoff(old.failures, old.not_before, False, old.standby)
        elif rid in result.promote:
            assert state == Backoff(old.failures, old.not_before, old.waiting, standby=False)
        else:
            assert state == old
    # 6: spares
    assert set(result.promote) <= spares - stale and set(result.stop_spare) <= spares
    assert stale <= set(result.stop_spare)  # 7: outdated spares are replaced
    serving_short = seen.desired + surge - len(running) - len(waiting)
    assert len(result.promote) == max(0, min(len(spares - stale), serving_short))
    if result.start:
        assert set(result.promote) == spares - stale
    kept = (
        len(spares - set(result.promote) - set(result.stop_spare))
        + len(spare_waiting - set(result.forget))
        + len(result.start_spare)
    )
    assert kept == seen.spares_wanted, (seen, result)


# -- the crash backoff -------------------------------------------------------


def test_restart_backoff_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.6]
    assert restart_delay(50) == 10.0


def test_a_crash_loop_backs_off_doubling_to_the_cap_and_is_restarted_on_time() -> None:
    world = World(desired=1)
    world.reconcile()
    assert world.running == ids(1)
    delays = []
    for _ in range(9):
        world.now += 0.5  # each run is short: the crashes are consecutive
        state = world.crash("web-1")
        delays.append(round(state.not_before - world.now, 6))
        crashed_at = world.now
        world.run_until(state.not_before)
        # Restarted at not_before exactly, not at the next 1 s tick.
        when, kind, rid = world.log[-1]
        assert (kind, rid) == ("start", "web-1")
        assert when == pytest.approx(crashed_at + delays[-1])
        assert world.running == ids(1)
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]


def test_a_replica_that_ran_stable_after_seconds_starts_its_backoff_afresh() -> None:
    old = Backoff(failures=5, not_before=0.0, waiting=False)
    assert crashed(old, ran_for=STABLE_AFTER, now=100.0) == Backoff(1, 100.2, waiting=True)
    assert crashed(old, ran_for=STABLE_AFTER - 0.1, now=100.0) == Backoff(6, 106.4, waiting=True)
    assert crashed(None, ran_for=0.0, now=100.0) == Backoff(1, 100.2, waiting=True)
    # On the world's clock: two quick crashes, then a long run, then a crash.
    world = World(desired=1)
    world.reconcile()
    for _ in range(2):
        world.now += 1.0
        world.run_until(world.crash("web-1").not_before)
    world.now += STABLE_AFTER
    assert world.crash("web-1").failures == 1


def test_requeue_after_is_the_time_to_the_earliest_restart() -> None:
    world = World(desired=3)
    world.reconcile()
    world.now += 1.0
    world.crash("web-2")  # due at now + 0.2
    world.backoff["web-3"] = Backoff(failures=3, not_before=world.now + 0.7, waiting=True)
    world.running.discard("web-3")
    first = world.reconcile()
    assert first.restart == () and first.start == ()  # waiting replicas are not replaced
    assert first.requeue_after == pytest.approx(0.2)
    world.now += 0.2
    second = world.reconcile()
    assert second.restart == ("web-2",)
    assert second.requeue_after == pytest.approx(0.5)
    world.now += 0.5
    assert world.reconcile().restart == ("web-3",)
    assert world.reconcile().requeue_after is None
    assert world.running == ids(1, 2, 3)


def test_a_replica_not_yet_due_waits_even_a_hair_before() -> None:
    seen = Observed(SVC, 1, set(), set(), {"web-1": Backoff(1, 10.0, True)}, now=9.999)
    early = plan(seen)
    assert early.restart == () and early.start == ()
    assert early.requeue_after == pytest.approx(0.001)
    on_time = plan(Observed(SVC, 1, set(), set(), dict(seen.backoff), now=10.0))
    assert on_time.restart == ("web-1",) and on_time.requeue_after is None
    assert on_time.backoff["web-1"] == Backoff(1, 10.0, waiting=False)


# -- adoption -----------------------------------------------------------------


def test_adopted_running_replicas_are_kept_and_adopted_draining_ones_count_as_leaving() -> None:
    # A restarted controller found web-1 and web-2 running and web-3 draining.
    seen = Observed(SVC, 3, ids(1, 2, 3), ids(3), {}, now=5.0)
    result = plan(seen)
    check_invariants(seen, result)
    assert result.restart == () and result.drain == () and result.forget == ()
    assert result.start == ("web-4",)  # web-3 still holds its id while it drains
    assert result.requeue_after is None
    # At the desired count already: nothing at all.
    assert plan(Observed(SVC, 2, ids(1, 2, 3), ids(3), {}, now=5.0)) == Plan()


# -- surplus while draining -----------------------------------------------------


def test_surplus_while_draining_drains_each_replica_once() -> None:
    world = World(desired=3)
    world.reconcile()
    world.load = {"web-1": 50.0, "web-2": 10.0, "web-3": 30.0}
    world.desired = 1
    first = world.reconcile()
    assert first.drain == ("web-2", "web-3")  # the least loaded first
    again = world.reconcile()  # the drains are still in flight
    assert again == Plan(), again
    world.desired = 2  # back up while they drain: a new id, not a draining one
    assert world.reconcile().start == ("web-4",)
    world.finish_drains()
    assert world.running == ids(1, 4)
    assert world.reconcile() == Plan()


def test_surplus_forgets_crashed_waiting_replicas_before_draining_running_ones() -> None:
    waiting = {f"{SVC}-{n}": Backoff(2, 50.0, waiting=True) for n in (3, 4)}
    seen = Observed(SVC, 3, ids(1, 2), set(), waiting, now=49.0)
    result = plan(seen)
    check_invariants(seen, result)
    assert result.forget == ("web-4",) and result.drain == ()  # highest id first
    assert result.requeue_after == pytest.approx(1.0)  # web-3 is still wanted
    seen = Observed(SVC, 1, ids(1, 2), set(), waiting, now=49.0)
    result = plan(seen)
    check_invariants(seen, result)
    assert result.forget == ("web-4", "web-3") and result.drain == ("web-2",)
    assert result.requeue_after is None and result.backoff == {}


# -- desired changes during backoff -------------------------------------------------


def test_desired_drops_below_during_backoff_forgets_the_waiting_replica() -> None:
    world = World(desired=2)
    world.reconcile()
    world.now += 1.0
    world.crash("web-2")
    assert world.reconcile().requeue_after == pytest.approx(0.2)
    world.desired = 1
    dropped = world.reconcile()
    assert dropped.forget == ("web-2",) and dropped.drain == ()
    assert dropped.requeue_after is None and "web-2" not in world.backoff
    world.now += 1.0
    world.reconcile()
    assert world.running == ids(1)  # web-1 stays, web-2 never comes back
    world.desired = 2  # wanted again later: a fresh backoff, started at once
    assert world.reconcile().start == ("web-2",)


def test_desired_rises_during_backoff_with_new_ids_clear_of_draining_ones() -> None:
    backoff = {"web-3": Backoff(1, 10.2, waiting=True)}
    seen = Observed(SVC, 5, ids(1, 2), ids(2), backoff, now=10.0)
    result = plan(seen)
    check_invariants(seen, result)
    # web-1 runs, web-2 drains, web-3 waits for its restart: 1 + 1 waiting + 3 new.
    assert result.start == ("web-4", "web-5", "web-6")
    assert result.restart == () and result.requeue_after == pytest.approx(0.2)
    later = plan(Observed(SVC, 5, ids(1, 2, 4, 5, 6), ids(2), dict(result.backoff), now=10.2))
    assert later.restart == ("web-3",) and later.start == ()


def test_invariants_hold_for_random_observations() -> None:
    rng = random.Random(11)
    for _ in range(5000):
        numbers = range(1, 9)
        running = {f"{SVC}-{n}" for n in numbers if rng.random() < 0.5}
        draining = {r for r in running if rng.random() < 0.3}
        spares = {r for r in running if rng.random() < 0.3}
        backoff = {
            f"{SVC}-{n}": Backoff(
                rng.randint(1, 6), rng.uniform(0, 20), rng.random() < 0.7, rng.random() < 0.3
            )
            for n in numbers
            if rng.random() < 0.4
        }
        load = {r: float(rng.randint(0, 3)) for r in running}
        desired = rng.randint(0, 8)
        outdated = {r for r in running if rng.random() < 0.3}
        ready = {r for r in running if rng.random() < 0.7}
        seen = Observed(
            SVC,
            desired,
            running,
            draining,
            backoff,
            rng.uniform(0, 20),
            load,
            spares=spares,
            spares_wanted=spares_wanted(rng.randint(0, 3), 8, desired),
            outdated=outdated,
            ready=ready,
        )
        check_invariants(seen, plan(seen))


# -- warm spares ------------------------------------------------------------------


def test_spares_wanted_count_against_max() -> None:
    assert [spares_wanted(2, 4, d) for d in (1, 2, 3, 4)] == [2, 2, 1, 0]
    assert spares_wanted(0, 4, 1) == 0
    assert spares_wanted(1, 4, 5) == 0  # never negative


def test_a_scale_up_promotes_the_spare_and_starts_one_behind_it() -> None:
    world = World(desired=1, warm=1)
    first = world.reconcile()
    assert first.start == ("web-1",) and first.start_spare == ("web-2",)
    assert world.serving() == ids(1) and world.spares == ids(2)
    assert world.reconcile() == Plan()  # at the level: nothing
    world.desired = 2
    up = world.reconcile()
    assert up.promote == ("web-2",) and up.start == () and up.start_spare == ("web-3",)
    assert world.serving() == ids(1, 2) and world.spares == ids(3)
    world.desired = 4  # more than the spares: promote the one, start the rest
    up = world.reconcile()
    assert up.promote == ("web-3",) and up.start == ("web-4",) and up.start_spare == ()
    assert world.serving() == ids(1, 2, 3, 4) and world.spares == set()


def test_spares_never_exceed_max_minus_desired() -> None:
    world = World(desired=2, warm=2, most=4)
    rng = random.Random(3)
    for _ in range(300):
        world.desired = rng.randint(1, 4)
        world.warm = rng.randint(0, 3)
        world.reconcile()
        if rng.random() < 0.5:
            world.finish_drains()
        world.now += 1.0
        spares = world.spares - world.draining
        assert len(spares) <= max(0, world.most - world.desired)
        assert len(spares) == spares_wanted(world.warm, world.most, world.desired)
        assert len(world.serving()) == world.desired or world.draining


def test_scale_down_drains_a_serving_replica_and_a_lower_warm_stops_spares() -> None:
    world = World(desired=2, warm=2, most=5)
    world.reconcile()
    assert world.serving() == ids(1, 2) and world.spares == ids(3, 4)
    world.load = {"web-1": 5.0, "web-2": 1.0}
    world.desired = 1
    down = world.reconcile()
    assert down.drain == ("web-2",) and down.stop_spare == ()  # spares hold no flows
    assert down.start_spare == ()  # warm 2 already kept
    world.warm = 0
    fewer = world.reconcile()
    assert fewer.stop_spare == ("web-4", "web-3") and fewer.drain == ()
    world.finish_drains()
    assert world.running == ids(1) and world.spares == set()


def test_a_crashed_spare_is_restarted_as_a_spare_with_the_backoff() -> None:
    world = World(desired=1, warm=1)
    world.reconcile()
    world.now += 0.5
    state = world.crash("web-2")
    assert state.standby and state.waiting
    early = world.reconcile()  # not replaced, not due
    assert early.start_spare == () and early.restart == ()
    assert early.requeue_after == pytest.approx(0.2)
    world.now = state.not_before
    again = world.reconcile()
    assert again.restart == ("web-2",) and world.spares == ids(2)
    world.desired = 2  # a scale-up while a spare waits: a new replica, the spare stays
    world.now += 0.5
    world.crash("web-2")
    up = world.reconcile()
    assert up.promote == () and up.start == ("web-3",) and up.start_spare == ()
    world.now += 1.0
    assert world.reconcile().restart == ("web-2",)
    assert world.spares == ids(2) and world.serving() == ids(1, 3)


def test_a_promoted_spare_crashes_as_a_serving_replica() -> None:
    world = World(desired=1, warm=1)
    world.reconcile()
    world.now += 0.5
    world.run_until(world.crash("web-2").not_before)  # restarted as a spare once
    world.desired = 2
    promoted = world.reconcile()
    assert promoted.promote == ("web-2",)
    assert world.backoff["web-2"].standby is False  # its backoff now restarts it serving
    world.now += 0.5
    state = world.crash("web-2")
    assert not state.standby
    world.run_until(state.not_before)
    assert world.serving() == ids(1, 2) and world.spares == ids(3)


def test_waiting_spares_are_not_steered_to() -> None:
    backoff = {"web-2": Backoff(1, 5.0, True), "web-3": Backoff(1, 5.0, True, standby=True)}
    # A crashed serving replica stays in the path only while no other serves.
    assert serving(set(), set(), backoff, set()) == ("web-2",)
    assert serving({"web-1"}, ids(1), backoff, set()) == ("web-1",)


# -- rollouts (invariant 7) ----------------------------------------------------------


@pytest.mark.parametrize("desired", [1, 3])
def test_a_rollout_replaces_every_replica_one_at_a_time_never_under_desired(desired: int) -> None:
    world = World(desired=desired, warm=1, most=desired + 2)
    world.run_until(world.now + 2)
    assert len(world.serving()) == desired and len(world.spares) == 1
    world.template = "b"  # `vmbox apply` changed what the replicas run
    changed = world.now
    for _ in range(4 * desired + 6):
        world.reconcile()
        serving = world.serving()
        assert desired <= len(serving) <= desired + 1, world.log  # a surge of one
        world.now += 1.0
        world.finish_drains()
    # Every old replica, the spare too, was replaced (ids are reused once free).
    assert all(world.started_at[r] >= changed for r in world.running)
    assert all(world.runs[r] == "b" for r in world.running)
    assert len(world.serving()) == desired and len(world.spares) == 1
    assert world.reconcile() == Plan()  # and then nothing


def test_a_rollout_waits_for_the_new_replica_before_draining_an_old_one() -> None:
    running = ids(1, 2)
    seen = Observed(SVC, 2, running, set(), {}, 0.0, outdated=running, ready=running)
    assert plan(seen).start == ("web-3",) and plan(seen).drain == ()
    running = ids(1, 2, 3)
    waiting_for_3 = Observed(SVC, 2, running, set(), {}, 1.0, outdated=ids(1, 2), ready=ids(1, 2))
    assert plan(waiting_for_3) == Plan()
    ready = Observed(SVC, 2, running, set(), {}, 2.0, outdated=ids(1, 2), ready=running)
    assert len(plan(ready).drain) == 1 and set(plan(ready).drain) <= ids(1, 2)
