"""The resize guard: shares stay safe while replicas disagree about the group.

Pure: no I/O, no clock reads (the time is passed in). The epoch of a group is
its member set; each replica writes the set it last applied, with the store
revision it saw it at, to /vmbox/<service>/acks/<id> (on its membership lease,
so the ack goes with the replica). `ResizeGuard` is the state machine (member
sets, ack snapshots and the time in; a `Group` out), `encode_ack`/`parse_ack`
the ack's bytes. vmbox.state.epochsync.EpochSync is the thin asyncio layer
that watches members and acks, writes this replica's ack and wakes the guard;
vmbox.replica runs one.

The problem: the shares of a window come from each replica's own view of the
group, and views change at slightly different times. A joiner that sees
{a, b} takes 50 of 100 while `a`, still seeing {a}, takes 100.

The rule: a replica keeps the member sets it applied since its *settle
point* (a set that every one of its members was seen to have acked at least
one window boundary ago; a fresh replica starts from the empty set). While
there is more than that one set it is *guarded*: its share is at most its
share under every set it keeps, and zero if one of them lacks it. Even shares
only shrink as members are added (checked in tests/unit/test_epoch.py), so
`Group.previous` is the union of the sets kept, or a set without me (then
`sharing` gives 0). A later set becomes the settle point at the first boundary
after all its members were seen to ack it (the ack says the member *applied*
the set, so every share taken in a window that starts after that comes from
it or a later set); the guard is down once only the view is left. Settling at
a set the view has already moved past lets a change that spans a boundary
cost one window less.

An ack also declares the first window its replica takes shares from the set:
the one after the window it applied the set in (the data plane fixes a
window's group when the window begins). Once every member's ack declares a
window that has begun, the set settles at once, mid-window, without waiting
for the boundary after the acks were seen: a join just before a boundary,
whose acks arrive just after it, no longer holds the joiner at nothing (and
the elders at the new share) for one whole window. The boundary rule still
bounds the wait, so a member whose clock runs ahead never delays it.

Why the shares of one window W (starting at boundary B) add up to at most
the limit L, whatever moment of W each serving replica takes its share at:

- A set becomes a settle point at a boundary after its acks were complete,
  or once the windows its members' acks declare have all begun; either way
  every settle point taken before W ends had all members of its set apply it
  before B (a member that declares window W or earlier applied the set before
  W began). Let F be the newest set any serving replica has settled at (if
  none, every replica still keeps the empty set it started with: 0 each).
- A serving member g of F applied F before B, and views only move forward:
  throughout W its view is F or newer, and its own settle point is no newer
  than F. So F is among the sets g keeps: its share is at most that under F.
- A serving replica outside F was added (or re-registered) after F: the sets
  it keeps include one without it (a fresh replica starts with the empty
  set), so it takes 0.
- So every share is at most the replica's share under F, which add up to L.
  tests/unit/test_epoch.py checks this by brute force over random schedules
  of joins, leaves, crashes and delays (and that keeping only the sets before
  and after the latest change, or the settle point and the view, does not).

Limits of the argument: a replica that lost its lease but cannot see that
(store unreachable) keeps its share: the fail policy covers that. A replica
that leaves takes 0 before it revokes its lease (`leaving`), so its last
packets do not count against a group that no longer includes it. Windows
coincide across replicas only as far as their clocks agree, as before.

Acks through the aggregator (vmbox.state.aggregator, the default): a replica
does not watch every ack; the service's aggregator does, and publishes the
sets every one of whose members acked them, each with the latest window their
acks declare, tagged with the store revision of the ack snapshot it read
(vmbox.state.summary). A replica turns a summary newer than the last it took
back into acks: each member of a complete set acks that set and declares its
latest window. For the guard that is the snapshot of the acks at that
revision with the incomplete sets' acks left out, seen later than its own
watch would have seen it, and the argument above holds as it is: a set is
still taken as acked only once every member wrote an ack of it, and an ack
still means "applied" (it was written after the member applied the set,
before the aggregator read it, before the replica saw the summary). Leaving
acks out only keeps a set from settling (the safe side), and a set's declared
windows are kept from the moment it is seen complete (`_declared`): a
member's later ack is of a later set and says nothing more about this one.
Taking only newer revisions keeps a replaced aggregator that does not yet
know it (its lease lost) from moving a replica back; even an older summary
would only show acks that were once true. tests/unit/test_epoch.py runs the
brute force through aggregators too: replaced ones, stale ones, summaries
as late as the acks themselves could be.

A member that never acks (its store is away) keeps the others guarded; the
guarded share is the union's split, so after a pure join it costs nothing and
after a leave it costs the leaver's part until the ack comes. An ack that
cannot be written keeps this replica guarded, the safe side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmbox.group import Group
from vmbox.state.store import KeyValue

MAX_SETS = 32  # sets kept since the settle point; older ones are merged (never unsafely)
# How much of a window must remain for a registration to land in it (see
# registration_delay): a replica process in its first seconds applies its own
# registration 3-80 ms after it (measured under load: its loop is still busy
# starting); a running one within a few ms.
REGISTER_MARGIN_STARTING = 0.12
REGISTER_MARGIN_RUNNING = 0.05
STARTING_FOR = 2.0  # seconds a replica process counts as starting


def registration_delay(now: float, window: float, margin: float) -> float:
    """Seconds to wait before registering, so that the whole group applies the join
    in the window it is registered in (pure).

    A join's set settles at the start of the latest window its members' acks
    declare, and each declares the window after the one it applied the set in.
    The elders apply it within milliseconds of the registration and take their
    smaller shares from the next window on; a joiner that applies its own
    registration only after that boundary declares one window more, and for that
    window the elders hold their smaller shares while the joiner takes nothing:
    the group admits less than the limit (the scaling experiment saw 75 and 50
    of 100 in such a second). So a registration in the last `margin` seconds of a
    window waits for the next one. The margin is capped at a quarter of the
    window, so short windows still admit joins early in each.
    """
    margin = min(margin, window / 4)
    left = window - now % window
    return left + 0.005 if left < margin else 0.0


@dataclass(frozen=True, slots=True)
class Ack:
    """The member set a replica last applied, the revision it saw it at, and the first
    window whose shares that replica takes from it (None from a replica that does not say)."""

    members: frozenset[str]
    revision: int
    window: int | None = None


def encode_ack(members: Iterable[str], revision: int, window: int | None = None) -> bytes:
    body: dict[str, object] = {"members": sorted(members), "revision": revision}
    if window is not None:
        body["window"] = window
    return json.dumps(body).encode()


def parse_ack(kv: KeyValue) -> Ack | None:
    """The ack in `kv`, or None for a value that is not one (it counts as absent)."""
    try:
        data = json.loads(kv.value)
        members = data["members"]
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return None
        window = data.get("window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
            window = None  # not a window number: as if unsaid (the boundary rule applies)
        return Ack(frozenset(members), int(data.get("revision", 0)), window)
    except (ValueError, TypeError, KeyError):
        return None


class ResizeGuard:
    """Pure: member sets, ack snapshots and the time in; this replica's `group` out."""

    def __init__(self, me: str, window: float, *, enabled: bool = True) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.me = me
        self.window = window
        self.enabled = enabled
        self.view: frozenset[str] = frozenset()
        self.revision = 0
        # The first window whose shares come from the view or a later set: the
        # data plane fixes a window's group when the window begins.
        self.view_window = 0
        self.acks: dict[str, frozenset[str]] = {}
        self.ack_windows: dict[str, int] = {}  # the windows the acks declare, where they do
        self.since: float | None = None  # when the current guard went up
        self.last_duration = 0.0  # how long the last guard stayed up
        self.lifted_at = 0.0  # when it came down (the clock `now` came from)
        self.lifts = 0
        # The sets applied since the settle point, that one first (a fresh
        # replica's is the empty set: it was a member of nothing), and when each
        # was seen acked by all its members. Settling at a later set drops the
        # ones before it; the guard is down once only the view is left.
        self._sets: list[frozenset[str]] = [frozenset()]
        self._acked_at: list[float | None] = [None]
        # The latest first window the members' acks declared when the set was seen
        # acked by all (None: one of them declared none), kept from then on: a member's
        # later ack is of a later set and says nothing more about this one.
        self._declared: list[int | None] = [None]
        self._left = False

    @property
    def guarded(self) -> bool:
        if not self.enabled:
            return False
        return self._left or len(self._sets) > 1 or self.me not in self._sets[0]

    @property
    def group(self) -> Group:
        members = tuple(sorted(self.view))
        if not self.guarded:
            return Group(members=members, me=self.me)
        return Group(members=members, me=self.me, previous=tuple(sorted(self._previous())))

    def _previous(self) -> frozenset[str]:
        """A set whose split gives me at most my share under every set since the settle point."""
        if self._left:
            return frozenset()
        for members in self._sets:
            if self.me not in members:
                return members  # I take nothing
        return frozenset().union(*self._sets)  # even shares only shrink as members are added

    def see_members(self, members: Iterable[str], revision: int, now: float) -> bool:
        """Take a member snapshot; True if the set changed (the ack must follow)."""
        new = frozenset(members)
        if new == self.view:
            return False
        # The first window whose group the view fixes. Not this one, even for a
        # replica that has taken nothing yet: a member that left in this window
        # may have taken its share before the view existed (the simulation in
        # tests/unit/test_epoch.py finds such schedules if this one is declared).
        self.view, self.revision = new, revision
        self.view_window = self._window_of(now) + 1
        if self.enabled:
            if not self.guarded or self.since is None:
                self.since = now
            self._sets.append(new)
            self._acked_at.append(None)
            self._declared.append(None)
            if len(self._sets) > MAX_SETS:
                self._fold()
            self._settle(now)
        return True

    def see_acks(
        self, acks: Mapping[str, Iterable[str]], now: float, windows: Mapping[str, int] = {}
    ) -> None:
        """Take a snapshot of every replica's ack (replica -> member set, and the first
        window it takes its shares from that set, for the acks that say)."""
        self.acks = {replica: frozenset(members) for replica, members in acks.items()}
        self.ack_windows = {r: w for r, w in windows.items() if r in self.acks}
        self._settle(now)

    def tick(self, now: float) -> None:
        """Let time pass: a set settles at the first boundary after its acks were complete."""
        self._settle(now)

    def wake_at(self) -> float | None:
        """The wall time at which `tick` may settle a set (None: nothing to wait for)."""
        if not self.guarded or self._left:
            return None
        times = [self._settles_at(i) for i in range(1, len(self._sets))]
        known = [at for at in times if at is not None]
        return min(known) if known else None

    def leaving(self) -> None:
        """Take nothing from now on: this replica is about to leave the group."""
        self._left = True

    def rejoined(self, now: float) -> None:
        """My member key is back on a new lease, after the old one was lost.

        While it was gone the others may have seen me leave and taken my share,
        and I may not have seen any of it (a partition stalls my watches; their
        re-list finds the set as it was). So start again as a fresh replica: the
        empty set first (I take nothing), then my view, which settles once every
        member acks it again (acks seen before now do not count) and a boundary
        passes, or the windows the new acks declare have begun.
        """
        if not self.enabled:
            return
        self._sets = [frozenset(), self.view]
        self._acked_at = [None, None]
        self._declared = [None, None]
        self.view_window = self._window_of(now) + 1  # what my next ack declares
        self.acks, self.ack_windows = {}, {}
        self.since = now

    def _window_of(self, when: float) -> int:
        return math.floor(when / self.window)

    def _boundary_after(self, when: float) -> float:
        return (self._window_of(when) + 1) * self.window

    def _settles_at(self, i: int) -> float | None:
        """When set i may become the settle point (None: not acked by all yet).

        The boundary after its acks were complete; or sooner, the start of the
        latest first window its members' acks declare, once all declare one.
        """
        at = self._acked_at[i]
        if at is None:
            return None
        latest = self._declared[i]
        if latest is None:
            return self._boundary_after(at)
        return min(self._boundary_after(at), latest * self.window)

    def _fold(self) -> None:
        """Merge the two sets after the settle point, keeping what they allow me (the least)."""
        a, b = self._sets[1], self._sets[2]
        merged = a | b if self.me in a and self.me in b else a if self.me not in a else b
        self._sets[1:3] = [merged]
        self._acked_at[1:3] = [None]  # a union nobody acks: never a settle point
        self._declared[1:3] = [None]

    def _acked(self, members: frozenset[str]) -> bool:
        return self.me in members and all(self.acks.get(m) == members for m in members)

    def _settle(self, now: float) -> None:
        if not self.guarded or self._left:
            return
        for i in range(1, len(self._sets)):
            if self._acked_at[i] is None and self._acked(self._sets[i]):
                self._acked_at[i] = now  # every member applied it by now
                declared = [self.ack_windows.get(m) for m in self._sets[i]]
                if all(w is not None for w in declared):
                    self._declared[i] = max(w for w in declared if w is not None)
        ready = [
            i
            for i in range(1, len(self._sets))
            if (at := self._settles_at(i)) is not None and now >= at
        ]
        if not ready:
            return
        self._sets = self._sets[ready[-1] :]
        self._acked_at = [None, *self._acked_at[ready[-1] + 1 :]]
        self._declared = [None, *self._declared[ready[-1] + 1 :]]
        if not self.guarded:
            self.last_duration = now - (self.since if self.since is not None else now)
            self.lifted_at = now
            self.lifts += 1
