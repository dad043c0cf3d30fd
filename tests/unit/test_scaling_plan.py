"""The scaling experiment's phases: valid specs, bounded runs, the ramp."""

from __future__ import annotations

import pytest

from vmbox.experiments.scaling.phases import PHASES, phase_spec


@pytest.mark.parametrize("scale", ["full", "small"])
@pytest.mark.parametrize("cgroup", [True, False])
def test_every_phase_has_a_valid_autoscaled_spec(scale: str, cgroup: bool) -> None:
    for plan in PHASES[scale]:
        spec = phase_spec(plan, 9000, 9001, cgroup=cgroup)
        assert spec.autoscale is not None and spec.autoscale.metric == plan.kind
        assert spec.replicas.min == 1 and spec.replicas.max == 4
        # Without a cgroup the monitor reads RSS, so the limit must leave idle room.
        assert spec.replicas.memory_limit == (70 if cgroup else 128) * 2**20


def test_runs_are_bounded() -> None:
    assert sum(p.total for p in PHASES["full"]) <= 300
    assert sum(p.total for p in PHASES["small"]) <= 80
    memory = PHASES["full"][0]
    assert memory.idle == 30  # the published figure's quiet start


def test_memory_load_ramps_linearly_and_holds_its_end() -> None:
    plan = PHASES["full"][0]
    start, end = plan.ramp
    assert plan.rate_at(0) == start
    assert plan.rate_at(plan.load_for / 2) == pytest.approx((start + end) / 2)
    assert plan.rate_at(plan.load_for * 3) == end
