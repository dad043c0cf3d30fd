"""The load generator's plan and schedule: pure math, no sockets."""

from __future__ import annotations

import math

import pytest

from vmbox.tools.loadplan import LoadPlan, Schedule, flow_sources, source_addresses

TARGET = ("127.0.0.1", 9000)


def test_constant_rate_schedule() -> None:
    schedule = Schedule(LoadPlan(TARGET, rate=200, duration=2.0))
    assert schedule.total == 400
    assert schedule.time_of(0) == 0 and schedule.time_of(1) == pytest.approx(0.005)
    assert schedule.time_of(399) == pytest.approx(1.995) and schedule.time_of(400) == math.inf
    assert schedule.due(0.0) == 1 and schedule.due(0.0049) == 1 and schedule.due(0.005) == 2
    assert schedule.due(1.0) == 201 and schedule.due(5.0) == 400


def test_due_agrees_with_time_of() -> None:
    schedule = Schedule(LoadPlan(TARGET, ramp=(0, 70, 30), duration=4.5))
    for k in range(schedule.total):
        t = schedule.time_of(k)
        assert schedule.due(t) == k + 1, k
        assert t < 4.5


def test_ramp_rates_and_totals() -> None:
    plan = LoadPlan(TARGET, ramp=(10, 300, 100), duration=5.0)
    assert [plan.rate_at(s) for s in range(5)] == [10, 110, 210, 300, 300]
    assert Schedule(plan).total == 10 + 110 + 210 + 300 + 300
    down = LoadPlan(TARGET, ramp=(300, 100, 150), duration=3.0)
    assert [down.rate_at(s) for s in range(3)] == [300, 150, 100]
    assert down.max_rate == 300


def test_zero_rate_second_sends_nothing() -> None:
    schedule = Schedule(LoadPlan(TARGET, ramp=(0, 10, 10), duration=2.0))
    assert schedule.due(0.99) == 0 and schedule.time_of(0) == 1.0
    assert schedule.total == 10


def test_partial_last_second_and_cap() -> None:
    schedule = Schedule(LoadPlan(TARGET, rate=100, duration=1.5))
    assert schedule.total == 150
    assert schedule.cap >= schedule.total and schedule.cap <= 150 + 16


def test_sources_and_flows() -> None:
    assert source_addresses(3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert source_addresses(253)[-1] == "127.0.0.254"
    assert flow_sources(2, 5) == ["127.0.0.2", "127.0.0.3"] * 2 + ["127.0.0.2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sources": 254, "flows": 254}, "sources must be 1..253"),
        ({"sources": 3, "flows": 2}, "flows must be between"),
        ({"ramp": (1, 2, 1)}, "exactly one of rate and ramp"),
        ({"rate": None}, "exactly one of rate and ramp"),
        ({"rate": -1}, "rates must be"),
        ({"duration": 0}, "duration"),
        ({"payload": 8}, "payload"),
    ],
)
def test_invalid_plans_are_one_line(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"target": TARGET, "rate": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        LoadPlan(**args)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
