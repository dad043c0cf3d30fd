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

    def observe(self) -> Observed:
        return Observed(
            SVC,
            self.desired,
            set(self.running),
            set(self.draining),
            dict(self.backoff),
            self.now,
            dict(self.load),
        )

    def reconcile(self) -> Plan:
        actions = plan(self.observe())
        for rid in actions.drain:
            self.draining.add(rid)
        for rid in actions.restart + actions.start:
            self.running.add(rid)
            self.started_at[rid] = self.now
            self.log.append((self.now, "start", rid))
        self.backoff = dict(actions.backoff)
        return actions

    def crash(self, rid: str) -> Backoff:
        self.running.discard(rid)
        ran_for = self.now - self.started_at[rid]
        state = self.backoff[rid] = crashed(self.backoff.get(rid), ran_for, self.now)
        self.log.append((self.now, "crash", rid))
        return state

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
    running = set(seen.running) - set(seen.draining)
    waiting = {r for r, b in seen.backoff.items() if b.waiting and r not in running}
    actions = [*result.forget, *result.drain, *result.restart, *result.start]
    assert len(actions) == len(set(actions)), result  # 1: one action per id
    assert set(result.forget) <= waiting and set(result.restart) <= waiting
    assert set(result.drain) <= running
    assert not set(result.start) & (set(seen.running) | waiting | set(seen.draining))
    assert all(r.startswith(f"{SVC}-") for r in result.start)
    level = len(running - set(result.drain)) + len(waiting - set(result.forget)) + len(result.start)
    assert level == seen.desired, (seen, result)  # 2
    still = waiting - set(result.forget)
    due = {r for r in still if seen.backoff[r].not_before <= seen.now}
    assert set(result.restart) == due  # 3
    later = [seen.backoff[r].not_before for r in still - due]
    if later:  # 4
        assert result.requeue_after == pytest.approx(min(later) - seen.now)
        assert result.requeue_after is not None and result.requeue_after > 0
    else:
        assert result.requeue_after is None
    gone = set(result.forget) | set(result.drain)  # 5
    assert set(result.backoff) == set(seen.backoff) - gone
    for rid, state in result.backoff.items():
        old = seen.backoff[rid]
        if rid in result.restart:
            assert state == Backoff(old.failures, old.not_before, waiting=False)
        else:
            assert state == old


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
    for _ in range(3000):
        numbers = range(1, 9)
        running = {f"{SVC}-{n}" for n in numbers if rng.random() < 0.5}
        draining = {r for r in running if rng.random() < 0.3}
        backoff = {
            f"{SVC}-{n}": Backoff(rng.randint(1, 6), rng.uniform(0, 20), rng.random() < 0.7)
            for n in numbers
            if rng.random() < 0.4
        }
        load = {r: float(rng.randint(0, 3)) for r in running}
        seen = Observed(
            SVC, rng.randint(0, 8), running, draining, backoff, rng.uniform(0, 20), load
        )
        check_invariants(seen, plan(seen))
