"""The correctness experiment's pure arithmetic: the plateau's seconds and its accuracy."""

from __future__ import annotations

import pytest

from vmbox.experiments.correctness import (
    LIMIT,
    Second,
    accuracy,
    plateau,
    report_rows,
    shortfall,
    shortfall_notes,
)


def second(t: int, offered: float, received: int, replicas: int = 1) -> Second:
    return Second(replicas, t, offered, int(offered), received, received)


def test_plateau_is_the_seconds_offered_above_the_threshold_after_the_first() -> None:
    seconds = [second(0, 300, 100), second(1, 110, 100), second(2, 120, 99), second(3, 300, 101)]
    assert [s.second for s in plateau(seconds, LIMIT)] == [2, 3]
    assert [s.second for s in plateau(seconds, LIMIT, factor=1.0)] == [1, 2, 3]


def test_accuracy_is_mean_and_max_relative_error() -> None:
    acc = accuracy([second(1, 200, 100), second(2, 200, 94), second(3, 200, 103)], 100)
    assert acc is not None
    assert acc.seconds == 3
    assert acc.mean_received == pytest.approx(99.0)
    assert acc.mean_error == pytest.approx((0 + 0.06 + 0.03) / 3)
    assert acc.max_error == pytest.approx(0.06)
    assert acc.ok


def test_accuracy_over_the_tolerance_is_not_ok_and_no_seconds_is_none() -> None:
    acc = accuracy([second(1, 200, 120), second(2, 200, 80)], 100)
    assert acc is not None and acc.mean_error == pytest.approx(0.2) and not acc.ok
    assert accuracy([], 100) is None


def test_report_has_one_row_per_replica_count_and_fails_a_missing_plateau() -> None:
    seconds = [second(t, 50.0 * t, min(100, 50 * t), n) for n in (1, 2) for t in range(7)]
    rows = report_rows(seconds)
    assert [row.metric.split(", ")[1] for row in rows] == ["1 replica", "2 replicas", "4 replicas"]
    assert [row.ok for row in rows] == [True, True, False]
    assert rows[0].vmbox.startswith("100.0/s")
    assert rows[2].vmbox == "no plateau seconds"


def test_shortfall_finds_seconds_below_what_a_global_limiter_passes() -> None:
    seconds = [
        second(0, 10, 0, 4),  # the first second is left out
        second(1, 50, 50, 4),
        second(2, 90, 82, 4),  # 9% short of 90
        second(3, 130, 94, 4),  # 6% short of 100
        second(4, 170, 99, 4),
    ]
    assert [s.second for s in shortfall(seconds, 100)] == [2, 3]
    (note,) = shortfall_notes(seconds)
    assert note.startswith("4 replica(s): 2 s received more than 5% less than")
    assert "offers of 90-130/s" in note
    assert shortfall_notes([second(1, 200, 100, 1)]) == []
