"""The pure parts of a drain: when to look again, what counts as idle, the log line."""

from __future__ import annotations

import pytest

from vmbox.dataplane.drain import (
    DrainResult,
    count_idle,
    next_check,
    until_boundary,
)

IDLE = 0.5


def test_no_flow_in_flight_ends_at_once() -> None:
    assert next_check([], now=10.0, deadline=12.0, idle=IDLE) is None


def test_waits_until_the_latest_flow_has_idled() -> None:
    # Flows last active at 9.0 and 9.8: the later one idles at 10.3.
    assert next_check([9.0, 9.8], now=10.0, deadline=12.0, idle=IDLE) == 10.3
    assert next_check([9.0, 9.8], now=10.3, deadline=12.0, idle=IDLE) is None


def test_activity_pushes_the_end_back_but_not_past_the_deadline() -> None:
    assert next_check([11.9], now=11.95, deadline=12.0, idle=IDLE) == 12.0
    assert next_check([11.99], now=12.0, deadline=12.0, idle=IDLE) is None


def test_flows_idle_before_the_drain_do_not_hold_it() -> None:
    assert next_check([1.0, 2.0], now=10.0, deadline=12.0, idle=IDLE) is None


def test_count_idle() -> None:
    assert count_idle([9.0, 9.5, 9.9], now=10.0, idle=IDLE) == 2
    assert count_idle([], now=10.0, idle=IDLE) == 0


def test_result_is_one_line() -> None:
    done = DrainResult(flows=3, idle=3, active=0, seconds=0.62, packets=120, replies=120)
    assert done.line() == (
        "drain done in 0.62s: 3 flows in flight, 3 went idle, 0 still active; "
        "120 packets, 120 replies relayed"
    )
    assert (
        DrainResult(flows=2, idle=1, active=1, seconds=2.0)
        .line()
        .startswith("drain timed out in 2.00s")
    )
    assert DrainResult(flows=1, active=1, cut_short=True).line().startswith("drain cut short")
    assert DrainResult(skipped="only member").line() == "drain skipped (only member)"
    assert "\n" not in done.line()


def test_a_busy_drain_ends_just_before_the_next_window_boundary() -> None:
    assert until_boundary(1000.2, 1.0) == pytest.approx(0.55)  # at 1000.75
    assert until_boundary(1000.8, 1.0) == 0.0  # already inside the lead: end now
    # Too close to leave before the boundary (the siblings would ack after it): the next one.
    assert until_boundary(1000.9, 1.0) == pytest.approx(0.85)
    assert until_boundary(1000.0, 1.0) == pytest.approx(0.75)  # on the boundary itself
    assert until_boundary(1001.1, 0.5) == pytest.approx(0.15)  # at 1001.25, before 1001.5
