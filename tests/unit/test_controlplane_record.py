"""What a control-plane point measured, from the workers' results; its points and plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmbox.experiments.controlplane.points import (
    SIZES,
    Series,
    WorkerPlan,
    layout,
    new_limit,
    plans,
    point,
    point_budget,
    points,
    service_spec,
)
from vmbox.experiments.controlplane.record import (
    PointResult,
    accuracy,
    busy_share,
    crowding,
    limit_reach,
    merge_counts,
    saturation,
    settle_time,
)
from vmbox.experiments.controlplane.traffic import TrafficModel

SERIES: tuple[Series, ...] = ("N", "S")
MODEL = TrafficModel(100, ((3.0, 1), (2.0, 4)), 2, 0.5, 0.8, 2)


def test_counts_from_several_workers_add_up_per_source_and_window() -> None:
    workers = [
        {"counts": [[0, 0, 10, 150, 60], [0, 1, 10, 100, 50]]},
        {"counts": [[0, 0, 10, 150, 41], [0, 2, 10, 20, 20]]},
    ]
    merged = merge_counts(workers)
    assert merged[(0, 0, 10)] == [300, 101]
    got = accuracy(merged, MODEL, range(10, 11))
    assert got is not None
    assert got.heavy_max == 1.01 and got.one_flow_mean == 1.01 and got.all_max == 1.01
    assert got.heavy_mean == (1.01 + 0.5) / 2
    assert accuracy(merged, MODEL, range(11, 12)) is None  # no window measured


def test_limit_reach_is_the_last_replica_of_each_service_and_counts_the_missed() -> None:
    written = {0: 100.0, 1: 100.5}
    workers = [
        {"limits": [[0, 0, 100.01, 150.0], [0, 1, 100.03, 150.0], [1, 0, 100.52, 150.0]]},
        {"limits": [[1, 1, 99.0, 120.0], [0, 2, 105.0, 150.0]]},  # another value; the spare
    ]
    reach, missed = limit_reach(workers, written, 150.0, 2)
    assert len(reach) == 1 and abs(reach[0] - 0.03) < 1e-6
    assert missed == 1  # service 1's replica r1 never applied 150


def test_settle_is_the_last_watching_worker_and_none_if_one_did_not() -> None:
    done: list[dict[str, Any]] = [
        {"watched": True, "settled_at": 10.4},
        {"watched": True, "settled_at": 10.2},
        {"watched": False, "settled_at": None},
    ]
    assert abs((settle_time(done, 10.0) or 0) - 0.4) < 1e-9
    assert settle_time([*done, {"watched": True, "settled_at": None}], 10.0) is None


def test_saturation_names_the_bottleneck() -> None:
    p = point("N", "after", 4, 1500.0)
    calm = PointResult(p, worker_cpu=0.2, worker_cpu_max=0.1, lag_p95=0.002)
    assert saturation(calm, 2) == ""
    assert "late" in saturation(PointResult(p, lag_p95=0.3), 2)
    assert "core" in saturation(PointResult(p, worker_cpu_max=0.95), 2)
    assert "cores" in saturation(PointResult(p, worker_cpu=1.7), 2)
    crowded = PointResult(p, worker_cpu=0.2, machine=0.95)
    assert saturation(crowded, 2) == "" and "1.7 cores for other jobs" in crowding(crowded, 2)
    assert crowding(calm, 2) == ""


def test_busy_share_is_the_non_idle_time_of_the_machine() -> None:
    before = {"user": 10.0, "system": 5.0, "idle": 80.0, "iowait": 5.0}
    after = {"user": 13.0, "system": 6.0, "idle": 84.0, "iowait": 5.0}
    assert busy_share(before, after) == 0.5
    assert busy_share(before, before) == 0.0


def test_every_size_has_valid_specs_and_bounded_points() -> None:
    for size in SIZES.values():
        for series in SERIES:
            for p in points(size, series):
                spec = service_spec(0, p)
                limiter = spec.ratelimit
                assert limiter is not None and limiter.split == "demand"
                assert limiter.limit == p.model.limit and spec.replicas.max == p.replicas + 1
                assert new_limit(p) > p.model.limit
                assert point_budget(size, p) < 200
    small = SIZES["small"]
    assert [p.label for p in points(small, "N")][:2] == ["N=1 after", "N=1 before"]
    assert all(p.mode == "after" for p in points(small, "S"))


def test_layout_deals_replicas_round_robin_and_plans_round_trip(tmp_path: Path) -> None:
    p = point("S", "after", 3, 1500.0)
    lay = layout(p, 2)
    assert lay.mine == [[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1), (2, 1)]]
    made = plans(p, lay, ["127.0.0.1:2379"], {"username": "vmbox"}, 10.0, 60.0, tmp_path)
    assert [plan.spare for plan in made] == [(0, 2), None]
    again = WorkerPlan.loads(made[0].dumps())
    assert again == made[0] and again.traffic() == p.model
    assert "password" not in json.loads(made[0].dumps())["access"]
