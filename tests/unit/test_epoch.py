"""The resize guard's state machine, and a brute-force check of its promise.

The promise (vmbox.state.epoch): in every window, the shares the serving
replicas take add up to at most the limit, however late each of them sees a
member change or an ack. `simulate` plays random joins, leaves and crashes
with random delays, millisecond by millisecond, and takes for every replica
the largest share it held at any moment of a window (a replica freezes its
share at some moment of the window; the largest is the worst case).
"""

from __future__ import annotations

import heapq
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbox.group import Group
from vmbox.sharing import even, even_share
from vmbox.state.epoch import (
    REGISTER_MARGIN_STARTING,
    Ack,
    ResizeGuard,
    encode_ack,
    parse_ack,
    registration_delay,
)
from vmbox.state.store import KeyValue
from vmbox.state.summary import AckSummary, as_acks, complete_sets

LIMIT = 100
T = TypeVar("T")


def settled(me: str, members: set[str], now: float = 10.0) -> ResizeGuard:
    """A guard that has seen `members`, all acked, and a boundary since."""
    guard = ResizeGuard(me, 1.0)
    guard.see_members(members, 1, now)
    guard.see_acks({m: members for m in members}, now)
    guard.tick(now + 1.0)
    assert not guard.guarded
    return guard


def share(guard: ResizeGuard) -> int:
    return even_share(LIMIT, guard.group)


def test_a_fresh_replica_takes_nothing_until_acked_and_a_boundary_passed() -> None:
    guard = ResizeGuard("a", 1.0)
    assert guard.group == Group(members=(), me="a", previous=())
    assert share(guard) == 0
    guard.see_members({"a"}, 5, 10.2)
    guard.see_acks({"a": {"a"}}, 10.3)
    assert guard.guarded and share(guard) == 0 and guard.wake_at() == 11.0
    guard.tick(10.99)
    assert guard.guarded
    guard.tick(11.0)
    assert not guard.guarded and share(guard) == LIMIT
    assert guard.group == Group(members=("a",), me="a")
    assert abs(guard.last_duration - 0.8) < 1e-9 and guard.lifts == 1


def test_a_join_takes_the_new_share_at_once_and_the_joiner_nothing() -> None:
    a = settled("a", {"a"})
    a.see_members({"a", "b", "c", "d"}, 7, 20.5)
    assert a.guarded and share(a) == 25
    b = ResizeGuard("b", 1.0)
    b.see_members({"a", "b", "c", "d"}, 7, 20.5)
    assert share(b) == 0
    everyone = {m: {"a", "b", "c", "d"} for m in "abcd"}
    for guard in (a, b):
        guard.see_acks(everyone, 20.6)
        guard.tick(21.0)
        assert not guard.guarded and share(guard) == 25


def test_acks_seen_after_a_boundary_lift_the_guard_at_once_when_they_declare_windows() -> None:
    """A join just before a boundary: the acks arrive in the next window, which every
    member already takes its shares from; the joiner need not wait for one more."""
    both = {"a", "b"}
    for declared, lifted_at in ((True, 1.02), (False, 2.0)):
        a = settled("a", {"a"}, now=-5.0)
        b = ResizeGuard("b", 1.0)
        b.see_members(both, 7, 0.95)
        a.see_members(both, 7, 0.96)
        assert (a.view_window, b.view_window) == (1, 1)  # applied in window 0
        windows = {"a": a.view_window, "b": b.view_window} if declared else {}
        for guard in (a, b):
            guard.see_acks({"a": both, "b": both}, 1.02, windows)
        assert b.guarded is not declared and share(b) == (50 if declared else 0)
        assert b.wake_at() == (None if declared else 2.0)
        b.tick(lifted_at)
        assert not b.guarded and share(b) == 50


def test_a_joiner_that_sees_itself_only_after_the_boundary_waits_one_window() -> None:
    """The cost that remains: b cannot tell whether a member that left just before
    it came took its share in this window, so it binds itself from the next one."""
    both = {"a", "b"}
    a = settled("a", {"a"}, now=-5.0)
    a.see_members(both, 7, 0.97)  # b registered at 0.96; a applies it in window 0
    b = ResizeGuard("b", 1.0)
    b.see_members(both, 7, 1.004)  # b's own watch delivers it after the boundary
    assert (a.view_window, b.view_window) == (1, 2)
    b.see_acks({"a": both, "b": both}, 1.02, {"a": 1, "b": 2})
    assert b.guarded and b.wake_at() == 2.0 and share(b) == 0


def test_a_registration_late_in_a_window_waits_for_the_next_one() -> None:
    margin = REGISTER_MARGIN_STARTING
    assert registration_delay(10.5, 1.0, margin) == 0.0
    assert registration_delay(10.74, 1.0, margin) == 0.0
    assert registration_delay(10.96, 1.0, margin) == pytest.approx(0.045)
    assert registration_delay(10.9999, 1.0, margin) == pytest.approx(0.0051)
    # A short window caps the margin at a quarter of it.
    assert registration_delay(10.07, 0.1, margin) == 0.0
    assert registration_delay(10.08, 0.1, margin) == pytest.approx(0.025)


def test_a_join_registered_before_the_margin_settles_for_all_at_the_next_boundary() -> None:
    """What the margin buys: the joiner applies its registration 80 ms late (a busy
    new process) and still declares the same window as the elder, so at the boundary
    the elder's smaller share and the joiner's share come in together."""
    both = {"a", "b"}
    registered = 0.74
    assert registration_delay(registered, 1.0, REGISTER_MARGIN_STARTING) == 0.0
    a = settled("a", {"a"}, now=-5.0)
    a.see_members(both, 7, registered + 0.005)
    b = ResizeGuard("b", 1.0)
    b.see_members(both, 7, registered + 0.08)
    assert (a.view_window, b.view_window) == (1, 1)
    for guard in (a, b):
        guard.see_acks({"a": both, "b": both}, 0.85, {"a": 1, "b": 1})
        guard.tick(1.0)
    assert share(a) + share(b) == LIMIT and not a.guarded and not b.guarded


def test_a_declared_window_still_to_come_is_waited_for_but_never_past_the_boundary() -> None:
    both = {"a", "b"}
    b = ResizeGuard("b", 1.0)
    b.see_members(both, 7, 0.95)
    b.see_acks({"a": both, "b": both}, 0.97, {"a": 1, "b": 1})
    assert b.guarded and b.wake_at() == 1.0  # window 1 has not begun
    b.tick(0.99)
    assert b.guarded
    # A member whose clock runs ahead declares a later window: the boundary
    # after the acks were seen complete still bounds the wait, as without windows.
    b.see_acks({"a": both, "b": both}, 0.98, {"a": 3, "b": 1})
    assert b.wake_at() == 1.0
    b.tick(1.0)
    assert not b.guarded


def test_a_leave_keeps_the_old_share_until_acked() -> None:
    a = settled("a", {"a", "b", "c", "d"})
    a.see_members({"a"}, 9, 30.1)
    assert share(a) == 25 and a.group.previous == ("a", "b", "c", "d")
    a.see_acks({"a": {"a", "b", "c", "d"}}, 30.2)  # its own ack still says the old set
    a.tick(31.5)
    assert a.guarded and share(a) == 25
    a.see_acks({"a": {"a"}}, 31.6)
    a.tick(31.9)
    assert a.guarded
    a.tick(32.0)
    assert not a.guarded and share(a) == LIMIT


def test_every_member_must_ack_the_same_set() -> None:
    a = settled("a", {"a", "b"})
    a.see_members({"a", "b", "c"}, 3, 40.0)
    a.see_acks({"a": {"a", "b", "c"}, "b": {"a", "b"}, "c": {"a", "b", "c"}}, 40.1)
    a.tick(45.0)
    assert a.guarded  # b has not applied the new set
    a.see_acks({"a": {"a", "b", "c"}, "b": {"a", "b", "c"}, "c": {"a", "b", "c"}}, 45.1)
    assert a.wake_at() == 46.0
    a.see_acks({"a": {"a", "b", "c"}, "c": {"a", "b", "c"}}, 45.2)  # b left: it had applied it
    a.tick(45.99)
    assert a.guarded
    a.tick(46.0)
    assert not a.guarded


def test_a_set_acked_before_a_boundary_settles_though_the_view_moved_on() -> None:
    """b joins at 9.95 (acked by 9.97), c at 9.99: from 10.0 on, b may take the {a, b, c} share."""
    b = ResizeGuard("b", 1.0)
    b.see_members({"a", "b"}, 4, 9.95)
    b.see_acks({"a": {"a", "b"}, "b": {"a", "b"}}, 9.97)
    assert share(b) == 0
    b.see_members({"a", "b", "c"}, 5, 9.99)
    assert b.wake_at() == 10.0 and share(b) == 0
    b.tick(10.0)
    # Settled at {a, b}: every replica's shares in this window come from it or later.
    assert b.guarded and b.group.previous == ("a", "b", "c") and share(b) == 33
    b.see_acks({m: {"a", "b", "c"} for m in "abc"}, 10.05)
    b.tick(11.0)
    assert not b.guarded and share(b) == 33


def test_changes_while_guarded_accumulate() -> None:
    a = settled("a", {"a", "b"})
    a.see_members({"a", "b", "c", "d"}, 3, 50.0)
    a.see_members({"a", "c", "d"}, 4, 50.1)
    # Every set since the last lift counts: a takes at most 25, not 34.
    assert a.group.previous == ("a", "b", "c", "d") and share(a) == 25
    a.see_members({"c", "d"}, 5, 50.2)  # a lost its registration
    assert share(a) == 0
    a.see_members({"a", "c", "d"}, 6, 50.3)
    assert share(a) == 0  # until the acks of the set it is back in
    a.see_acks({m: {"a", "c", "d"} for m in "acd"}, 50.4)
    a.tick(51.0)
    assert share(a) == 34


def test_a_join_then_a_leave_keep_the_smallest_share() -> None:
    """abc -> abce -> ace: e may already be unguarded at abce (25 each), so c takes 25, not 33."""
    c = settled("c", {"a", "b", "c"})
    c.see_members({"a", "b", "c", "e"}, 3, 5.0)
    c.see_members({"a", "c", "e"}, 4, 5.1)
    assert share(c) == even(LIMIT, ["a", "b", "c", "e"], "c") == 25


def test_a_same_set_snapshot_is_no_change() -> None:
    a = settled("a", {"a", "b"})
    assert not a.see_members({"b", "a"}, 12, 60.0)
    assert not a.guarded


def test_leaving_takes_nothing_for_good() -> None:
    a = settled("a", {"a", "b"})
    a.leaving()
    assert share(a) == 0
    a.see_acks({"a": {"a", "b"}, "b": {"a", "b"}}, 70.0)
    a.tick(80.0)
    assert share(a) == 0


def test_a_replica_registered_again_takes_nothing_until_the_group_acks_it_anew() -> None:
    # Partitioned past its lease: b saw it go and took the whole limit; its own
    # watch never saw the gap, so its view is still {a, b} when it comes back.
    a = settled("a", {"a", "b"})
    assert share(a) == 50
    a.rejoined(40.3)
    assert a.guarded and share(a) == 0 and a.view_window == 41
    a.tick(45.0)  # the acks it saw before the lease was lost do not count
    assert share(a) == 0
    a.see_acks({"a": {"a", "b"}, "b": {"b"}}, 45.1)  # b has not seen the new key yet
    a.tick(47.0)
    assert share(a) == 0
    a.see_acks({"a": {"a", "b"}, "b": {"a", "b"}}, 47.2)
    a.tick(47.9)
    assert share(a) == 0
    a.tick(48.0)
    assert not a.guarded and share(a) == 50


def test_turned_off_it_follows_the_view() -> None:
    a = ResizeGuard("a", 1.0, enabled=False)
    assert a.group == Group(members=(), me="a")
    a.see_members({"a", "b"}, 1, 1.0)
    assert a.group == Group(members=("a", "b"), me="a") and not a.guarded
    a.leaving()
    assert a.group.previous is None


def test_acks_round_trip_and_garbage_is_absent() -> None:
    raw = encode_ack({"b", "a"}, 42)
    assert raw == b'{"members": ["a", "b"], "revision": 42}'
    assert parse_ack(KeyValue("/k", raw, 1)) == Ack(frozenset({"a", "b"}), 42)
    for bad in (b"abc", b"[]", b'{"members": "a"}', b'{"members": [1]}', b"{}"):
        assert parse_ack(KeyValue("/k", bad, 1)) is None


@given(
    st.integers(1, 5_000),
    st.sets(st.sampled_from("abcdefgh"), min_size=1),
    st.sets(st.sampled_from("abcdefgh")),
)
def test_even_shares_never_grow_when_members_are_added(
    total: int, members: set[str], more: set[str]
) -> None:
    """Why the union of the sets since the last lift is a safe `previous`."""
    for me in members:
        assert even(total, sorted(members | more), me) <= even(total, sorted(members), me)


# -- brute force -------------------------------------------------------------

WINDOW_MS = 50


@dataclass
class Proc:
    """One replica process in the simulation."""

    rid: str
    start: int
    registered: int
    stop: int = 10**9  # stops serving (leaves or crashes)
    leave: int | None = None  # when it starts leaving (takes 0 from then, if guarded)
    views: list[tuple[int, frozenset[str]]] = field(default_factory=list)


def _deliver(
    rng: random.Random, events: list[tuple[int, T]], start: int, late: int
) -> list[tuple[int, T]]:
    """A watch of `events` (time-ordered) from `start`: a listing, then each event, in order.

    The listing shows the latest state when it is taken (up to `late` ms after
    `start`); every later event arrives up to `late` ms after it happened.
    """
    listed = start + rng.randint(0, late)
    before = [what for when, what in events if when <= listed]
    out: list[tuple[int, T]] = [(listed, before[-1])] if before else []
    at = listed
    for when, what in events:
        if when > listed:
            at = max(at, when + rng.randint(0, late))
            out.append((at, what))
    return out


def simulate(
    seed: int, guard: bool, declare: bool = True, aggregated: bool = False
) -> list[tuple[int, int]]:
    """(window, sum of largest shares) for every window whose sum exceeds the limit.

    With `declare` the acks say the first window their replica takes shares
    from the acked set (and the guard may lift then, mid-window); without,
    the guard waits for the boundary after it saw the acks complete. With
    `aggregated` replicas see the acks through aggregators' summaries.
    """
    return _simulate(seed, guard, declare, aggregated)[0]


def _simulate(
    seed: int, guard: bool, declare: bool, aggregated: bool = False
) -> tuple[list[tuple[int, int]], int]:
    """simulate's result, and the milliseconds replicas spent guarded."""
    rng = random.Random(seed)
    late = rng.choice([3, 10, 30, 120])  # the longest watch delay, in ms (a window is 50)
    procs = _processes(rng)
    changes = _membership(rng, procs)
    history: list[tuple[int, frozenset[str]]] = []
    current: set[str] = set()
    for when, rid, present in changes:
        (current.add if present else current.discard)(rid)
        history.append((when, frozenset(current)))
    for p in procs:
        p.views = _deliver(rng, history, p.start, late)
    watch = (SummaryWatch if aggregated else AckWatch)(rng, procs, changes, late)
    return _run(watch, procs, guard, declare)


def _processes(rng: random.Random) -> list[Proc]:
    """One to three replicas from the start, then joins, leaves and crashes at random."""
    ids = iter("abcdefghijklmnop")
    procs = [Proc(next(ids), 0, rng.randint(0, 5)) for _ in range(rng.randint(1, 3))]
    for _ in range(rng.randint(1, 5)):
        t = rng.randint(50, 400)
        alive = [p for p in procs if p.stop > t and p.leave is None and p.registered < t]
        kind = rng.choice(["join", "join", "leave", "crash"])
        if kind == "join" or len(alive) <= 1:
            procs.append(Proc(next(ids), t, t + rng.randint(0, 15)))
        elif kind == "leave":
            victim = rng.choice(alive)
            victim.leave, victim.stop = t, t + rng.randint(0, 5)
        else:
            rng.choice(alive).stop = t
    return procs


def _membership(rng: random.Random, procs: list[Proc]) -> list[tuple[int, str, bool]]:
    """(time, replica, present): a key appears at registration, goes at leave or lease expiry."""
    changes = []
    for p in procs:
        changes.append((p.registered, p.rid, True))
        if p.leave is not None:
            changes.append((p.leave + rng.randint(0, 3), p.rid, False))
        elif p.stop < 10**9:
            changes.append((p.stop + rng.randint(0, 60), p.rid, False))
    return sorted(changes)


Acks = dict[str, tuple[frozenset[str], int]]  # replica -> (set, declared window)


class AckWatch:
    """The acks key space as the guards write and watch it, in simulated time.

    A replica writes its ack (the set and the window its own guard declares)
    up to 5 ms after applying a view, once registered; the ack goes with its
    member key. Each replica lists the acks up to `late` ms after it starts,
    then sees every later write or deletion, in order, up to `late` ms after it.
    """

    def __init__(
        self, rng: random.Random, procs: list[Proc], changes: list[tuple[int, str, bool]], late: int
    ) -> None:
        self.rng, self.late = rng, late
        self.procs = {p.rid: p for p in procs}
        self.gone = {p.rid: 10**9 for p in procs}
        for when, rid, present in changes:
            if not present:
                self.gone[rid] = when
        self.events: list[tuple[int, int, str, tuple[frozenset[str], int] | None]] = []
        self.seq = 0
        for rid, when in self.gone.items():
            if when < 10**9:
                self._push(when, rid, None)
        self.acks: Acks = {}  # what the store holds
        self.listed = {p.rid: p.start + rng.randint(0, late) for p in procs}
        self.inbox: dict[str, list[tuple[int, str, tuple[frozenset[str], int] | None]]] = {
            p.rid: [] for p in procs
        }
        self.last_in = {p.rid: 0 for p in procs}
        self.last_write = {p.rid: 0 for p in procs}
        self.seen: dict[str, Acks | None] = {p.rid: None for p in procs}  # None: not listed

    def _push(self, when: int, rid: str, ack: tuple[frozenset[str], int] | None) -> None:
        heapq.heappush(self.events, (when, self.seq, rid, ack))
        self.seq += 1

    def write(self, t: int, rid: str, view: frozenset[str], window: int) -> None:
        p = self.procs[rid]
        at = max(t + 1 + self.rng.randint(0, 5), p.registered, self.last_write[rid])
        if at < min(self.gone[rid], p.stop):
            self._push(at, rid, (view, window))
            self.last_write[rid] = at

    def commit(self, t: int) -> None:
        """What the store does at `t`, and when each replica will see it."""
        while self.events and self.events[0][0] <= t:
            when, _, rid, ack = heapq.heappop(self.events)
            if ack is None:
                self.acks.pop(rid, None)
            else:
                self.acks[rid] = ack
            for other, listed in self.listed.items():
                if when > listed:
                    at = max(self.last_in[other], when + self.rng.randint(0, self.late))
                    self.inbox[other].append((at, rid, ack))
                    self.last_in[other] = at

    def deliver(self, t: int, rid: str) -> Acks | None:
        """The snapshot replica `rid` sees at `t` if it changed, else None."""
        changed = False
        if self.seen[rid] is None and t >= self.listed[rid]:
            self.seen[rid], changed = dict(self.acks), True
        inbox, mine = self.inbox[rid], self.seen[rid]
        while mine is not None and inbox and inbox[0][0] <= t:
            _, writer, ack = inbox.pop(0)
            if ack is None:
                mine.pop(writer, None)
            else:
                mine[writer] = ack
            changed = True
        return dict(mine) if changed and mine is not None else None


class SummaryWatch(AckWatch):
    """The acks as replicas see them through the aggregator (vmbox.state.aggregator).

    Aggregators watch the acks as a replica does (a listing, then each event
    up to `late` ms late) and publish the sets complete in their snapshot,
    tagged with its revision, up to 5 ms later, whenever those change. One to
    three aggregators take turns; the one replaced goes on publishing from its
    stale watch for up to 2 * late ms (it lost its lease and does not know).
    Each replica lists the summary key, then sees each write up to `late` ms
    late, and takes a summary only if its revision is newer than the last.
    """

    def __init__(
        self, rng: random.Random, procs: list[Proc], changes: list[tuple[int, str, bool]], late: int
    ) -> None:
        super().__init__(rng, procs, changes, late)
        self.committed = 0  # store events so far: the revision of a snapshot
        end = max(p.start for p in procs) + 8 * WINDOW_MS
        turns = sorted(rng.sample(range(1, end), rng.randint(0, 2)))
        self.aggs: list[tuple[str, int, int]] = []  # (name, start, stop)
        for i, start in enumerate([0, *turns]):
            stop = turns[i] + rng.randint(0, 2 * late) if i < len(turns) else 10**9
            name = f"agg{i}"
            self.aggs.append((name, start, stop))
            self.listed[name] = start + rng.randint(0, late)
            self.inbox[name], self.last_in[name], self.seen[name] = [], 0, None
        self.agg_rev = {name: 0 for name, _, _ in self.aggs}
        self.agg_sets: dict[str, object] = {}
        self.writes: list[tuple[int, int, Acks]] = []  # (when, revision, synthesized acks)
        self.taken: dict[str, tuple[int, int]] = {p.rid: (-1, -1) for p in procs}  # (write, rev)
        self.arrives: dict[str, list[int]] = {p.rid: [] for p in procs}

    def commit(self, t: int) -> None:
        before = len(self.events)
        super().commit(t)
        self.committed += before - len(self.events)
        for name, start, stop in self.aggs:
            if not start <= t < stop:
                continue
            listing = self.seen[name] is None
            waiting = len(self.inbox[name])
            snapshot = super().deliver(t, name)
            if snapshot is None:
                continue
            if listing:
                self.agg_rev[name] = self.committed - len(self.inbox[name])
            else:
                self.agg_rev[name] += waiting - len(self.inbox[name])
            done = complete_sets({r: Ack(m, 0, w) for r, (m, w) in snapshot.items()})
            if done != self.agg_sets.get(name):
                self.agg_sets[name] = done
                acks, windows = as_acks(AckSummary(self.agg_rev[name], done))
                synthesized = {r: (members, windows[r]) for r, members in acks.items()}
                at = t + 1 + self.rng.randint(0, 5)
                self.writes.append((at, self.agg_rev[name], synthesized))
                for arrivals in self.arrives.values():
                    last = arrivals[-1] if arrivals else 0
                    arrivals.append(max(last, at + self.rng.randint(0, self.late)))

    def deliver(self, t: int, rid: str) -> Acks | None:
        """The newest summary replica `rid` has received by `t`, if newer than the last."""
        write, rev = self.taken[rid]
        newest = None
        arrivals = self.arrives[rid]
        while write + 1 < len(arrivals) and arrivals[write + 1] <= t:
            write += 1
            if self.writes[write][1] > rev:
                rev, newest = self.writes[write][1], self.writes[write][2]
        self.taken[rid] = (write, rev)
        return None if newest is None else dict(newest)


def _run(
    watch: AckWatch, procs: list[Proc], guard: bool, declare: bool
) -> tuple[list[tuple[int, int]], int]:
    guards = {p.rid: ResizeGuard(p.rid, WINDOW_MS / 1000, enabled=guard) for p in procs}
    largest: dict[int, dict[str, int]] = {}
    guarded = 0
    end = max(p.start for p in procs) + 8 * WINDOW_MS
    for t in range(end):
        now = t / 1000
        watch.commit(t)
        for p in procs:
            if not p.start <= t < p.stop:
                continue
            g = guards[p.rid]
            while p.views and p.views[0][0] <= t:
                if g.see_members(p.views.pop(0)[1], t, now):
                    # The declared window is the guard's own (EpochSync writes it).
                    watch.write(t, p.rid, g.view, g.view_window)
            acks = watch.deliver(t, p.rid)
            if acks is not None:
                windows = {r: w for r, (_, w) in acks.items()} if declare else {}
                g.see_acks({r: members for r, (members, _) in acks.items()}, now, windows)
            if p.leave is not None and t >= p.leave:
                g.leaving()
            g.tick(now)
            guarded += g.guarded and not g._left
            window = largest.setdefault(t // WINDOW_MS, {})
            # As ratelimit does, a replica admits nothing in the window it starts in.
            mine = 0 if t // WINDOW_MS == p.start // WINDOW_MS else even_share(LIMIT, g.group)
            window[p.rid] = max(window.get(p.rid, 0), mine)
    bad = [(w, total) for w, s in largest.items() if (total := sum(s.values())) > LIMIT]
    return bad, guarded


@pytest.mark.parametrize("aggregated", [False, True], ids=["own watch", "aggregator"])
@pytest.mark.parametrize("declare", [True, False], ids=["declared windows", "boundary rule"])
def test_with_the_guard_no_window_ever_admits_more_than_the_limit(
    declare: bool, aggregated: bool
) -> None:
    # Shares are taken as the largest a replica had at any moment of a window,
    # so a guard that lifts mid-window is held to the limit too.
    # 1,000 schedules: an unsound declaration (the current window for a replica
    # that had taken nothing yet) showed in 4 of 3,000.
    bad = {
        seed: over for seed in range(1000) if (over := simulate(seed, True, declare, aggregated))
    }
    assert not bad, bad


def test_through_the_aggregator_guards_still_lift() -> None:
    """The summaries carry the acks: guards lift, a little later than on their own watch."""
    direct = aggregated = 0
    for seed in range(200):
        direct += _simulate(seed, True, True)[1]
        aggregated += _simulate(seed, True, True, aggregated=True)[1]
    assert direct <= aggregated < 3 * direct, (direct, aggregated)


def test_an_aggregator_that_passed_on_incomplete_sets_would_break_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The brute force can fail through the aggregator: summarising every set anyone
    acked, not just the complete ones, lets windows go over."""

    def every_set(acks: dict[str, Ack]) -> tuple[tuple[frozenset[str], int | None], ...]:
        return tuple((ack.members, ack.window) for ack in acks.values())

    monkeypatch.setattr(sys.modules[__name__], "complete_sets", every_set)
    assert any(simulate(seed, True, True, aggregated=True) for seed in range(300))


def test_declared_windows_lift_the_guard_sooner_never_later() -> None:
    sooner = 0
    for seed in range(300):
        with_windows = _simulate(seed, True, declare=True)[1]
        without = _simulate(seed, True, declare=False)[1]
        assert with_windows <= without, seed
        sooner += with_windows < without
    assert sooner > 30, sooner  # acks seen after a boundary no longer cost a window


class OldAndNew(ResizeGuard):
    """The smaller of the share under the set before the latest change and the new one."""

    def __init__(self, me: str, window: float, *, enabled: bool = True) -> None:
        super().__init__(me, window, enabled=enabled)
        self.before: frozenset[str] = frozenset()
        self.settled_set: frozenset[str] = frozenset()

    def see_members(self, members: Iterable[str], revision: int, now: float) -> bool:
        before = self.view
        changed = super().see_members(members, revision, now)
        if changed:
            self.before = before
        return changed

    def _settle(self, now: float) -> None:
        super()._settle(now)
        if not self.guarded:
            self.settled_set = self.view

    def old(self) -> frozenset[str]:
        return self.before

    @property
    def group(self) -> Group:
        group = super().group
        if group.previous is None or self.me not in group.previous:
            return group
        return Group(group.members, self.me, tuple(sorted(self.old())))


class LastSettled(OldAndNew):
    """The smaller of the share under the set last settled at and the new one."""

    def old(self) -> frozenset[str]:
        return self.settled_set


@pytest.mark.parametrize("rule", [OldAndNew, LastSettled])
def test_two_sets_are_not_enough(rule: type[ResizeGuard], monkeypatch: pytest.MonkeyPatch) -> None:
    """Why `previous` is the union of every set since the last lift (see the module)."""
    monkeypatch.setattr(sys.modules[__name__], "ResizeGuard", rule)
    # Under the boundary rule 200 schedules show it; with declared windows the
    # guards lift sooner and it takes about 1,000 (2 of them for LastSettled).
    assert any(simulate(seed, guard=True, declare=False) for seed in range(200))


def test_without_the_guard_the_same_schedules_do() -> None:
    bad = [seed for seed in range(300) if simulate(seed, guard=False)]
    assert len(bad) > 30, bad
