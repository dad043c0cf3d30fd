"""Pure: the fence of a `fenced` state item, and what a writer that waits on it decides.

A replica's `FencedView` (vmbox.state.views) keeps one `Fence`; `vmbox set`
(vmbox.cli.setitem) keeps one `FenceWait`. Neither does I/O or reads a clock:
times come in as arguments (the replica's monotonic clock), so tests drive
them with plain numbers.

The promise. A writer puts a new value of item X at revision R (committed at
time tw), then waits until every live member has acked a revision >= R under
fence/<X>/<member> or has lost its lease. Once it returns, no replica admits
a packet under a value of X older than R.

The replica's rule (`Fence.admits`). A *confirmation* is a probe that started
at time tc, kept the member lease L alive (one keep-alive that succeeded) and
then read X linearizably and applied what it read. The replica admits under X
at time t only if its latest confirmation started at tc with
t < tc + deadline, where deadline = TTL / 2 (TTL: the lease's TTL); otherwise
X is closed: the item's `closed` value (a limit of 0) is in force, which
admits nothing. A confirmation counts only for the lease it kept alive: when
the member lease changes (a re-registration), the fence closes until a probe
on the new lease succeeds.

Why the writer is never wrong, member by member (M, lease L):

1. M acked r >= R. An ack is written after its value was applied, and views
   apply only newer revisions, so M enforces R or later from before the ack.
2. M's lease expired at te (etcd's clock). etcd moves a lease's deadline to
   (arrival of its last keep-alive) + TTL, and every confirmation's
   keep-alive arrived after that confirmation started, so te >= tc + TTL
   for M's latest confirmation tc. M closes X at tc + deadline = tc + TTL/2,
   which is TTL/2 before te: by the time the writer sees the lease gone, M
   admits nothing under X. The TTL/2 margin covers the two clocks' drift over
   a few seconds and the lateness of the replica's timer that closes X (the
   event loop wakes it milliseconds late, not half a TTL).
3. M's lease was revoked. vmbox revokes only the lease of a replica that has
   stopped admitting: one that leaves (it takes nothing from just before its
   revoke, vmbox.replica) or whose process has exited (the controller). A
   revoke made by hand with etcdctl is outside the promise.
4. M registered after the writer last listed the members (revision J > R).
   Its confirmations start after its member key was written, so they read R
   or later; before its first one, X is closed.
5. M failed to confirm since tw: every confirmation before tw may have read
   an older value, and M closes X within `deadline` of the last one; if M's
   lease is still alive, the writer keeps waiting (case 1 or 2 ends it).

A replica that reaches etcd again confirms at its next probe (a read that
applies the newest value first), and X opens with that value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Transition = Literal["opened", "closed"] | None

FENCE_RATIO = 0.5  # deadline = TTL * FENCE_RATIO: strictly below the TTL (case 2)
PROBES_PER_DEADLINE = 4  # confirmations a healthy replica makes within one deadline


def fence_deadline(ttl: float) -> float:
    """How long a confirmation keeps an item open: half the member lease's TTL."""
    if ttl <= 0:
        raise ValueError("a lease TTL is positive")
    return ttl * FENCE_RATIO


def probe_interval(ttl: float) -> float:
    """Seconds between a replica's confirmations: a few per deadline, so one slow probe
    does not close a healthy replica's item."""
    return fence_deadline(ttl) / PROBES_PER_DEADLINE


@dataclass(slots=True)
class Fence:
    """Whether one replica may admit under one fenced item (times: its monotonic clock)."""

    ttl: float
    deadline: float = field(init=False)
    confirmed_at: float = -math.inf  # start of the latest confirmation on `lease`
    lease: int = 0
    open: bool = False  # what the data plane was last told (step() reports changes)

    def __post_init__(self) -> None:
        self.deadline = fence_deadline(self.ttl)

    def confirmed(self, started: float, lease: int) -> None:
        """A probe that started at `started` kept `lease` alive, then read and applied."""
        if lease == 0:
            return  # unregistered: nothing the writer waits for covers this replica yet
        if lease != self.lease:
            self.lease, self.confirmed_at = lease, started
        else:
            self.confirmed_at = max(self.confirmed_at, started)

    def lease_changed(self, lease: int) -> None:
        """The member lease is now `lease` (0: none): earlier confirmations no longer count."""
        if lease != self.lease:
            self.lease, self.confirmed_at = lease, -math.inf

    def admits(self, now: float) -> bool:
        return now < self.confirmed_at + self.deadline

    def closes_at(self) -> float:
        """When the item closes unless another confirmation comes (-inf: closed)."""
        return self.confirmed_at + self.deadline

    def step(self, now: float) -> Transition:
        """'opened' or 'closed' when what the data plane must enforce changes at `now`."""
        admits = self.admits(now)
        if admits == self.open:
            return None
        self.open = admits
        return "opened" if admits else "closed"


def parse_ack(raw: bytes) -> int | None:
    """A fence ack's revision (ASCII digits), None for anything else."""
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def encode_ack(revision: int) -> bytes:
    return str(int(revision)).encode("ascii")


@dataclass(slots=True)
class FenceWait:
    """A writer's wait for revision `revision` of one item (vmbox set).

    `see(members, acks)` takes the member set and the acks as they are now;
    `done` once every member present acked >= revision. A member seen earlier
    in the wait and absent now lost its lease: fenced out (case 2 or 3 above).
    """

    revision: int
    acked: set[str] = field(default_factory=set)
    fenced_out: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)

    def see(self, members: set[str], acks: Mapping[str, int]) -> bool:
        """Update from a snapshot; True when the wait is over."""
        self.seen |= members
        for member in members:
            if acks.get(member, 0) >= self.revision:
                self.acked.add(member)
        self.fenced_out = {m for m in self.seen - members if m not in self.acked}
        self.waiting = {m for m in members if m not in self.acked}
        return self.done

    @property
    def done(self) -> bool:
        return not self.waiting
