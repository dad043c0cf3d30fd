"""Leader election over a coordination.k8s.io/v1 Lease: the pure decision.

Called by vmbox.runtime.kubernetes.client (KubeClient.hold_lease), which reads
the Lease, asks `decide` what to write, and writes it with the observed
resourceVersion, so the API server lets exactly one of two racing operators
through (the other gets 409 Conflict and stays a follower). No I/O, no clock:
`now` is passed in, so the tests drive it with a fake clock.

Expiry follows client-go's leaderelection: a lease held by another identity
is free once `lease_duration_seconds` have passed since the later of its
renewTime and the moment this process first saw that version of it
(`seen_at`, our own clock). Counting from our own observation means a clock
ahead of the holder's never sees a live lease as expired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A Lease's spec and the resourceVersion it was read at (None: not yet written)."""

    holder: str | None
    duration_seconds: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int
    resource_version: str | None = None


class LeaseAction(Enum):
    CREATE = "create"  # no Lease yet: POST one naming us
    RENEW = "renew"  # ours: PUT a new renewTime
    TAKE = "take"  # another's, expired (or released): PUT us as holder, transitions + 1
    WAIT = "wait"  # another's and live: write nothing, follow


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    action: LeaseAction
    record: LeaseRecord | None  # what to write (None for WAIT)
    expires_at: datetime | None = None  # WAIT: when the holder's lease runs out, as we count


def decide(
    observed: LeaseRecord | None,
    *,
    identity: str,
    now: datetime,
    duration_seconds: int,
    seen_at: datetime | None = None,
) -> LeaseDecision:
    """May `identity` take or keep the lease, given what was read and `now`?

    `seen_at` is when this process first read `observed` in its current
    resourceVersion (defaults to its renewTime)."""
    if observed is None:
        created = LeaseRecord(identity, duration_seconds, now, now, 0)
        return LeaseDecision(LeaseAction.CREATE, created)
    if observed.holder == identity:
        renewed = replace(observed, duration_seconds=duration_seconds, renew_time=now)
        return LeaseDecision(LeaseAction.RENEW, renewed)
    expires = _expiry(observed, seen_at)
    if observed.holder and expires is not None and now < expires:
        return LeaseDecision(LeaseAction.WAIT, None, expires)
    taken = replace(
        observed,
        holder=identity,
        duration_seconds=duration_seconds,
        acquire_time=now,
        renew_time=now,
        transitions=observed.transitions + 1,
    )
    return LeaseDecision(LeaseAction.TAKE, taken)


def released(record: LeaseRecord, *, identity: str, now: datetime) -> LeaseRecord | None:
    """The record that gives a held lease up at once (client-go's ReleaseOnCancel):
    no holder, a one-second duration. None when `identity` does not hold it."""
    if record.holder != identity:
        return None
    return replace(record, holder=None, duration_seconds=1, acquire_time=now, renew_time=now)


def _expiry(observed: LeaseRecord, seen_at: datetime | None) -> datetime | None:
    marks = [t for t in (observed.renew_time, seen_at) if t is not None]
    if not marks:
        return None  # a holder that never renewed: treat as free
    return max(marks) + timedelta(seconds=observed.duration_seconds)
