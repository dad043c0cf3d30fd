"""The overhead experiment's pure parts: statistics, run order and its verdicts."""

from __future__ import annotations

import pytest

from vmbox.experiments.overhead import (
    VARIANTS,
    Stats,
    order,
    report_rows,
    scale_note,
    summarize,
)
from vmbox.experiments.results import ExperimentError, median_interval, percentile


def test_summarize_gives_exact_min_mean_max_and_nearest_rank_percentiles() -> None:
    stats = summarize([[float(x) for x in range(100, 0, -1)]], sent=120)
    assert (stats.sent, stats.received) == (120, 100)
    assert (stats.min, stats.max, stats.mean, stats.round_median) == (1.0, 100.0, 50.5, 50.5)
    assert (stats.p50, stats.p99) == (50.0, 99.0)
    assert percentile([3.0], 0.99) == 3.0


def test_one_noisy_round_moves_the_round_median_little() -> None:
    stats = summarize([[0.1] * 10, [0.1] * 10, [0.12] * 10, [2.0] * 10], sent=40)
    assert stats.mean == pytest.approx(0.58)
    assert stats.round_median == pytest.approx(0.11)


def test_paired_ratios_cancel_drift_that_round_medians_do_not() -> None:
    """The machine slows down over the run: base's and the variant's rounds drift together,
    so each round's ratio is 1.02 while the round medians differ by 10%."""
    base = [[0.10] * 5, [0.11] * 5, [0.12] * 5, [0.13] * 5]
    variant = [[0.102] * 5, [0.1122] * 5, [0.1224] * 5, [0.1326] * 5]
    stats = summarize(variant, sent=20, base=base)
    assert stats.paired == pytest.approx(1.02)
    # One round spoiled by a burst moves the median of the ratios little.
    spoiled = summarize([*variant[:3], [0.5] * 5], sent=20, base=base)
    assert spoiled.paired == pytest.approx(1.02)
    assert summarize(base, sent=20).paired == 1.0  # base itself
    with pytest.raises(ValueError, match="one for each"):
        summarize(variant, sent=20, base=base[:2])


def test_a_round_with_nothing_back_is_an_experiment_error() -> None:
    with pytest.raises(ExperimentError, match="no packet came back"):
        summarize([[0.1], []], sent=10)


def test_pairs_alternate_their_order_so_drift_weighs_on_both_alike() -> None:
    watch = next(v for v in VARIANTS if v.name == "watch")
    names = [v.name for v in order(3, watch)]
    assert names == ["base", "watch", "watch", "base", "base", "watch"]


def stats(median: float, mean: float | None = None) -> Stats:
    """A variant whose rounds' means are `median` and whose paired ratio is median over
    base's 0.1 (the tests' base)."""
    mean = median if mean is None else mean
    return Stats(100, 100, mean / 2, mean, mean, mean * 3, mean * 10, median, median / 0.1)


def test_verdicts_off_path_modes_within_goal_of_base_and_strong_slower_than_poll() -> None:
    rows = report_rows(
        {
            "base": stats(0.1, mean=0.2),
            "poll1000": stats(0.104),
            "poll100": stats(0.15),
            "watch": stats(0.1),
            "fenced": stats(0.106),
            "strong": stats(0.3),
        }
    )
    verdicts = {row.metric.split(", ")[1]: row.ok for row in rows}
    assert verdicts == {
        "base (no shared state": None,
        "poll1000": True,  # 1.04x
        "poll100": False,  # 1.5x
        "watch": True,
        "fenced": False,  # 1.06x: over the 1.05x goal
        "strong": True,
    }
    # Verdicts follow the paired ratios; the all-packet means are shown beside them.
    assert rows[1].vmbox.startswith(
        "1.040x by paired rounds (90% interval 1.000-1.000; round medians +0.004 ms); "
        "0.52x by all-packet"
    )
    assert rows[-1].vmbox.startswith("3.000x by paired rounds")
    assert rows[4].published == "not published; goal ≤ 1.05x base"


def test_strong_no_slower_than_a_poll_says_no() -> None:
    same = {name: stats(0.2) for name in ("poll1000", "poll100", "watch", "fenced", "strong")}
    rows = report_rows({"base": stats(0.1), **same})
    assert [row.ok for row in rows] == [None, False, False, False, False, False]


def test_scale_note_weighs_ratios_by_the_base() -> None:
    (note,) = scale_note({"base": stats(0.1), "strong": stats(0.95)})
    assert "this run's 0.100 ms" in note and "weighs 3.0x more" in note
    assert "strong's mean of 0.950 ms compares with the published ≈ 0.9 ms" in note


def test_the_median_interval_is_the_binomial_order_statistics() -> None:
    """For 24 rounds, P(Binomial(24, 1/2) < 8) = 0.032 <= 0.05 and P(< 9) = 0.076: the 8th
    and 17th smallest ratio; for 8 rounds the 2nd and 7th; too few for 90%: the range."""
    assert median_interval([float(x) for x in range(24, 0, -1)]) == (8.0, 17.0)
    assert median_interval([float(x) for x in range(1, 9)]) == (2.0, 7.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert median_interval([float(x) for x in range(1, 25)], confidence=0.5) == (10.0, 15.0)
    with pytest.raises(ValueError):
        median_interval([])


def test_paired_stats_carry_the_interval_of_their_rounds_ratios() -> None:
    base = [[0.1] * 3 for _ in range(8)]
    variant = [[0.1 * (1 + r / 100)] * 3 for r in range(8)]  # ratios 1.00 .. 1.07
    stats = summarize(variant, sent=24, base=base)
    assert stats.interval == pytest.approx((1.01, 1.06))
    assert summarize(base, sent=24).interval == (1.0, 1.0)
