"""The scaling experiment's phases: valid specs, runs within budget, the ramp, and
memory figures that can show what the experiment claims.

The memory checks weigh each phase's spec against what a replica's memory is
made of (DESIGN.md "Autoscaling", vmbox.spec.sections): an idle replica must
sit below the trigger, the flows it may hold must fit under its limit, and the
memory phase's load must be able to cross the trigger at all.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from vmbox.experiments import EXPERIMENTS
from vmbox.experiments.scaling.phases import (
    MEMORY_UP,
    PHASES,
    WARM_AFTER,
    PhasePlan,
    phase_spec,
    stages,
)
from vmbox.registry import Scale
from vmbox.spec.sections import FLOW_MEMORY, IDLE_MEMORY

MIB = 1024 * 1024
IDLE_RSS = 64 * MIB  # an idle replica's RSS (DESIGN.md: 61 MiB, 28 of it shared libraries)
FLOW_RSS = 1.9 * 1024  # what RSS sees of a flow: its Python objects, not its kernel socket
SET_UP = 20  # seconds a phase's etcd, echo and replicas may take to start and stop (about 1)


def flows_at_peak(plan: PhasePlan) -> float:
    """Flows open at the end of the memory ramp: those begun within a flow idle timeout."""
    span = min(plan.flow_idle, plan.load_for)
    return sum(plan.rate_at(plan.load_for - t - 0.5) for t in range(int(span)))


@pytest.mark.parametrize("scale", ["full", "small"])
@pytest.mark.parametrize("cgroup", [True, False])
def test_every_phase_has_a_valid_autoscaled_spec(scale: str, cgroup: bool) -> None:
    for plan in PHASES[scale]:
        spec = phase_spec(plan, 9000, 9001, cgroup=cgroup)
        assert spec.autoscale is not None and spec.autoscale.metric == plan.kind
        assert spec.replicas.min == 1 and spec.replicas.max == 4
        limit = spec.replicas.memory_limit
        assert limit is not None
        # Idle, a replica must not trigger a scale-up by itself: its working set
        # (cgroup) or its RSS, which also counts shared libraries (psutil).
        idle = IDLE_MEMORY if cgroup else IDLE_RSS
        assert idle < MEMORY_UP / 100 * limit, (idle, limit)
        # The flows it may hold fit under the limit (the OOM killer acts there).
        per_flow = FLOW_MEMORY if cgroup else FLOW_RSS
        assert idle + spec.max_flows * per_flow < limit, (spec.max_flows, limit)


@pytest.mark.parametrize("scale", ["full", "small"])
def test_the_memory_load_can_cross_the_trigger_under_a_cgroup(scale: str) -> None:
    (plan,) = [p for p in PHASES[scale] if p.kind == "memory"]
    spec = phase_spec(plan, 9000, 9001, cgroup=True)
    assert spec.replicas.memory_limit is not None
    flows = min(flows_at_peak(plan), spec.max_flows)
    peak = IDLE_MEMORY + flows * FLOW_MEMORY
    assert peak > MEMORY_UP / 100 * spec.replicas.memory_limit, (flows, peak)


@pytest.mark.parametrize("scale", ["full", "small"])
def test_runs_fit_the_experiments_time_budget(scale: Scale) -> None:
    entry = EXPERIMENTS.lookup("scaling")
    assert entry is not None
    run_for = sum(p.total for p in PHASES[scale])
    assert run_for + SET_UP * len(PHASES[scale]) <= entry.budget_for(scale), run_for


def test_memory_load_ramps_linearly_and_holds_its_end() -> None:
    plan = PHASES["full"][0]
    start, end = plan.ramp
    assert plan.rate_at(0) == start
    assert plan.rate_at(plan.load_for / 2) == pytest.approx((start + end) / 2)
    assert plan.rate_at(plan.load_for * 3) == end


@pytest.mark.parametrize("scale", ["full", "small"])
def test_every_phase_runs_once_in_its_order_and_only_the_packet_rate_twins_together(
    scale: str,
) -> None:
    staged = stages(scale)
    assert [plan for stage in staged for plan in stage] == list(PHASES[scale])
    together = [stage for stage in staged if len(stage) > 1]
    if scale == "small":  # the suite's run: the twins paired, the memory phase alone
        assert [[p.name for p in stage] for stage in together] == [["pps", "pps-warm"]]
        (pps, warm) = together[0]
        # The same load, a tick apart (phases.WARM_AFTER); only the spare differs.
        assert replace(pps, warm=warm.warm, idle=pps.idle + WARM_AFTER) == warm
        assert warm.warm == 1
    else:
        assert together == []
