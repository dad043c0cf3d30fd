"""The autoscaling policy with a fake clock: hysteresis, cooldown, bounds, no flapping."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Any

import pytest

from vmbox.control.autoscale import (
    Autoscaler,
    Decision,
    Policy,
    choose_removals,
    free_ids,
    next_sample_in,
    recommend,
)
from vmbox.spec import parse_spec

BASE = Policy(
    metric="pps",
    mode="threshold",
    scale_up_at=150.0,
    scale_down_at=50.0,
    target=0.0,
    tolerance=0.1,
    aggregate="max",
    up_for=2,
    down_for=3,
    cooldown=5.0,
    minimum=1,
    maximum=4,
)


def run(policy: Policy, series: list[list[float]], start: int = 1, step: float = 1.0) -> list[Any]:
    """Feed one sample per `step` seconds; return (time, decision) for each change."""
    scaler = Autoscaler(policy)
    current, out = start, []
    for i, values in enumerate(series):
        decision = scaler.observe(i * step, current, values)
        if decision is not None:
            out.append((i * step, decision))
            current = decision.desired
    return out


def test_scales_up_only_after_up_for_consecutive_samples() -> None:
    changes = run(BASE, [[200.0], [100.0], [200.0], [200.0]])
    assert [(t, d.current, d.desired) for t, d in changes] == [(3.0, 1, 2)]
    assert changes[0][1].direction == "up"
    assert ">= 150" in changes[0][1].reason and changes[0][1].value == 200.0
    assert changes[0][1].since == 2.0  # the first sample of the streak that decided


def test_values_between_the_thresholds_change_nothing() -> None:
    assert run(BASE, [[100.0]] * 50, start=2) == []


def test_cooldown_spaces_decisions_and_its_samples_do_not_count() -> None:
    changes = run(BASE, [[400.0]] * 20)
    times = [t for t, _ in changes]
    assert [d.desired for _, d in changes] == [2, 3, 4]
    # 1 s for the streak, then 5 s of cooldown and 2 fresh samples each time.
    assert times == [1.0, 7.0, 13.0]


def test_never_leaves_the_bounds() -> None:
    assert [d.desired for _, d in run(BASE, [[10_000.0]] * 100)] == [2, 3, 4]
    assert run(BASE, [[0.0]] * 100, start=1) == []
    down = run(BASE, [[0.0]] * 100, start=4)
    assert [d.desired for _, d in down] == [3, 2, 1]


def test_scale_down_waits_until_the_load_fits_on_fewer_replicas() -> None:
    # 3 replicas at 45 each: 67.5 each on 2 replicas is below 150, so one goes.
    assert [d.desired for _, d in run(BASE, [[45.0] * 3] * 4, start=3)] == [2]
    # With the upper threshold at 60, 45 * 3 / 2 = 67.5 would cross it: stay.
    tight = replace(BASE, scale_up_at=60.0, scale_down_at=45.0)
    assert run(tight, [[45.0] * 3] * 20, start=3) == []


def test_memory_re_divides_only_what_lies_above_the_idle_base() -> None:
    memory = replace(BASE, metric="memory", scale_up_at=60.0, scale_down_at=55.0, aggregate="mean")
    # The scaling experiment's replicas once their flows idled out: mean 54.0.
    # Seen as load, 54 * 4 / 3 = 72 would "cross" 60 and nothing would ever go;
    # above the least loaded replica's 53.1, 0.9 points become 1.2: one goes.
    after = [[55.3, 53.9, 53.7, 53.1]] * 6
    assert [(d.current, d.desired) for _, d in run(memory, after, start=4)] == [(4, 3)]
    # The part above the base still counts: 0.9 points on 3 replicas would reach
    # 54.3, over an upper line of 54.2, so nothing goes there.
    assert run(replace(memory, scale_up_at=54.2), after, start=4) == []
    # Packet rate has no base: the same figures are all load.
    pps = replace(memory, metric="pps")
    assert run(pps, after, start=4) == []


def test_an_interrupted_streak_starts_again() -> None:
    series = [[0.0], [0.0], [100.0], [0.0], [0.0], [0.0]]
    changes = run(BASE, series, start=2)
    assert [(t, d.desired) for t, d in changes] == [(5.0, 1)]


def test_no_flapping_on_a_noisy_signal() -> None:
    rng = random.Random(7)
    # Gaussian noise inside the band, plus isolated spikes past both thresholds.
    series = [[rng.gauss(100.0, 12.0)] for _ in range(600)]
    for i in range(5, 600, 7):
        series[i] = [rng.choice([170.0, 30.0])]
    assert run(BASE, series, start=2) == []
    # A step into the band: at most max - min decisions, all the same way.
    step = [[300.0]] * 30 + [[100.0]] * 300
    changes = run(BASE, step)
    assert len(changes) <= BASE.maximum - BASE.minimum
    assert {d.direction for _, d in changes} == {"up"}


def test_even_a_hostile_signal_is_rate_limited_by_the_cooldown() -> None:
    rng = random.Random(11)
    series = [[rng.choice([0.0, 1000.0])] * 2 for _ in range(600)]
    times = [t for t, _ in run(BASE, series, start=2)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= BASE.cooldown + 1.0
    assert len(times) <= 600 / (BASE.cooldown + 1.0) + 1


def test_mean_or_max_over_replicas() -> None:
    assert run(BASE, [[200.0, 10.0]] * 3, start=2)[0][1].desired == 3
    mean = replace(BASE, aggregate="mean")
    assert run(mean, [[200.0, 10.0]] * 3, start=2) == []


def test_no_values_no_decision() -> None:
    scaler = Autoscaler(BASE)
    assert scaler.observe(0.0, 1, []) is None


def test_proportional_rule_and_tolerance() -> None:
    assert recommend(2, 100.0, 50.0, 0.1) == 4
    assert recommend(2, 54.0, 50.0, 0.1) == 2  # inside the band
    assert recommend(3, 10.0, 50.0, 0.1) == 1
    assert recommend(1, 0.0, 50.0, 0.1) == 0


def test_proportional_stabilises_and_at_most_doubles() -> None:
    hpa = replace(BASE, mode="proportional", target=50.0, aggregate="mean", maximum=10)
    up = run(hpa, [[400.0]] * 3)
    assert [(d.current, d.desired) for _, d in up] == [(1, 2)]
    # A single dip does not shrink; a sustained one does, to the largest recent recommendation.
    series = [[50.0] * 4, [5.0] * 4, [50.0] * 4] + [[20.0] * 4] * 3
    down = run(hpa, series, start=4)
    assert [(d.current, d.desired) for _, d in down] == [(4, 2)]


def test_choose_removals_least_loaded_then_newest() -> None:
    load = {"w-1": 50.0, "w-2": 10.0, "w-3": 10.0, "w-4": 90.0}
    assert choose_removals(list(load), 2, load) == ["w-3", "w-2"]
    assert choose_removals(["w-1", "w-2"], 1, {}) == ["w-2"]
    assert choose_removals(["w-1"], 0, {}) == []


def test_free_ids_fill_the_lowest_gaps() -> None:
    assert free_ids("w", {"w-1", "w-3"}, 2) == ["w-2", "w-4"]


def test_policy_from_spec() -> None:
    spec = parse_spec(
        {
            "service": "w",
            "listen": "127.0.0.1:1",
            "upstream": "127.0.0.1:2",
            "middlebox": {"limit": 100},
            "replicas": {"min": 1, "max": 3, "memory_limit": "70Mi"},
            "autoscale": {"metric": "memory", "scale_up_at": 60, "scale_down_at": 30},
        }
    )
    policy = Policy.from_spec(spec)
    assert (policy.metric, policy.aggregate, policy.maximum) == ("memory", "max", 3)
    assert isinstance(run(policy, [[70.0]] * 2)[0][1], Decision)
    with pytest.raises(ValueError):
        Policy.from_spec(spec.model_copy(update={"autoscale": None}))


def test_samples_end_just_before_the_ticks_and_the_loop_never_waits_long() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        interval = rng.choice((0.25, 0.5, 1.0, 2.0))
        lead, took = rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.1)
        now = 1_800_000_000 + rng.uniform(0, 100)
        wait = next_sample_in(now, interval, lead, took)
        assert 0.0 <= wait <= 1.1 * interval + 1e-9
        end = now + wait + took
        phase = (end + lead) / interval
        assert abs(phase - round(phase)) < 1e-6, (now, interval, lead, took)
        assert end - now >= interval / 10 - 1e-9 or wait == 0.0
    # With an interval dividing a 1 s window, a sample ends lead s before each boundary.
    ends, now = [], 1_800_000_000.37
    for _ in range(8):
        now += next_sample_in(now, 0.5, 0.15, 0.02) + 0.02
        ends.append(round(now % 1.0, 6))
    assert set(ends) == {0.35, 0.85}
