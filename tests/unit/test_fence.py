"""The fence of a `fenced` item (vmbox.state.fence) on a fake clock, and its promise.

The promise: when a replica's lease expires (etcd: TTL after the last
keep-alive arrived), the replica has already closed the item, whatever the
pattern of its successful and failed probes and their delays.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbox.state.fence import (
    Fence,
    FenceWait,
    encode_ack,
    fence_deadline,
    parse_ack,
    probe_interval,
)

TTL = 2.0


def test_the_deadline_is_half_the_ttl_and_several_probes_fit_in_it() -> None:
    assert fence_deadline(3) == 1.5
    assert probe_interval(2) * 4 == pytest.approx(fence_deadline(2))
    with pytest.raises(ValueError):
        fence_deadline(0)


def test_closed_until_a_confirmation_on_a_lease() -> None:
    fence = Fence(TTL)
    assert not fence.admits(100.0)
    assert fence.step(100.0) is None  # starts closed: nothing to tell
    fence.confirmed(100.0, lease=0)  # unregistered: does not count
    assert not fence.admits(100.1)
    fence.confirmed(100.0, lease=7)
    assert fence.admits(100.1)
    assert fence.step(100.1) == "opened"
    assert fence.step(100.5) is None


def test_closes_a_deadline_after_the_confirmation_started() -> None:
    fence = Fence(TTL)
    fence.confirmed(10.0, lease=7)
    fence.step(10.0)
    assert fence.closes_at() == 11.0
    assert fence.admits(10.999)
    assert fence.step(11.0) == "closed"
    assert not fence.admits(11.0)
    fence.confirmed(10.1, lease=7)  # a late answer: counts from its start, already past
    assert fence.step(11.2) is None
    fence.confirmed(10.5, lease=7)  # a probe started at 10.5 keeps it open until 11.5
    assert fence.step(11.2) == "opened"
    assert fence.step(11.5) == "closed"
    fence.confirmed(11.4, lease=7)
    fence.confirmed(10.9, lease=7)  # older than what is known: no step back
    assert fence.closes_at() == 12.4


def test_a_new_lease_needs_its_own_confirmation() -> None:
    fence = Fence(TTL)
    fence.confirmed(10.0, lease=7)
    fence.lease_changed(7)
    assert fence.admits(10.5)
    fence.lease_changed(8)  # re-registered: what lease 7 confirmed does not count
    assert not fence.admits(10.5)
    assert fence.closes_at() == -math.inf
    fence.confirmed(10.6, lease=8)
    assert fence.admits(10.7)


@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 1.5),  # gap before the probe starts
            st.floats(0.0, 0.8),  # how long the probe takes
            st.booleans(),  # whether it succeeded (keep-alive and read)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_a_replica_is_closed_whenever_its_lease_has_expired(
    probes: list[tuple[float, float, bool]],
) -> None:
    fence = Fence(TTL)
    now, lease_deadline, lease = 0.0, 0.0 + TTL, 7
    events: list[tuple[float, float, bool]] = []  # (answer time, start, ok)
    for gap, took, ok in probes:
        now += gap
        events.append((now + took, now, ok))
    # etcd's view: each successful keep-alive arrived at some time in [start, answer].
    for answered, started, ok in sorted(events):
        if not ok:
            continue
        if started >= lease_deadline:
            break  # the lease had expired before this keep-alive: LeaseLost, not a confirmation
        lease_deadline = max(lease_deadline, started + TTL)  # arrival >= start
        fence.confirmed(started, lease)
        # Whenever the replica admits after this answer, the lease has not expired.
        for t in (answered, fence.closes_at() - 1e-9):
            if fence.admits(t):
                assert t < lease_deadline - TTL / 2 + 1e-9


def test_acks_parse_and_garbage_is_no_ack() -> None:
    assert parse_ack(encode_ack(42)) == 42
    assert parse_ack(b" 7\n") == 7
    assert parse_ack(b"abc") is None
    assert parse_ack(b"-3") is None


def test_a_wait_ends_when_every_member_acked_or_left() -> None:
    wait = FenceWait(revision=50)
    assert not wait.see({"a", "b", "c"}, {"a": 50, "b": 49})
    assert wait.acked == {"a"} and wait.waiting == {"b", "c"}
    assert not wait.see({"a", "b", "c"}, {"a": 50, "b": 51})  # a newer ack covers 50
    assert wait.waiting == {"c"}
    assert wait.see({"a", "b"}, {"a": 50, "b": 51, "c": 10})  # c's lease went
    assert wait.acked == {"a", "b"} and wait.fenced_out == {"c"} and wait.done


def test_a_member_that_joins_during_the_wait_must_ack_too() -> None:
    wait = FenceWait(revision=5)
    assert not wait.see({"a", "d"}, {"a": 5})
    assert wait.waiting == {"d"}
    assert wait.see({"a", "d"}, {"a": 5, "d": 5})
    assert wait.fenced_out == set()


def test_no_members_nothing_to_wait_for() -> None:
    wait = FenceWait(revision=5)
    assert wait.see(set(), {})
    assert not wait.acked and not wait.fenced_out
