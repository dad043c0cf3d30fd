"""The control-plane experiment's growth fit: log-log slopes and the orders they name."""

from __future__ import annotations

import pytest

from vmbox.experiments.controlplane.fit import AT_MOST_LINEAR, Fit, fit, order

NS = [1.0, 4.0, 16.0, 64.0, 256.0]


def test_a_linear_cost_is_order_n() -> None:
    found = fit(NS, [10 * n + 5 for n in NS])
    assert found.slope == pytest.approx(1.0, abs=0.05)
    assert found.order == "N" and found.at_most_linear and found.points == 4  # N >= 4 only


def test_a_quadratic_cost_is_order_n_squared() -> None:
    found = fit(NS, [10 * n * n for n in NS])
    assert found.slope == pytest.approx(2.0)
    assert found.order == "N^2" and found.at_most_linear is False


def test_a_constant_and_an_in_between_cost() -> None:
    assert fit(NS, [7.0] * 5).order == "1"
    assert fit(NS, [n**1.5 for n in NS]).order == "N^1.5"
    assert fit([1.0, 10.0, 100.0], [3.0, 30.0, 300.0], from_x=1, var="S").order == "S"


def test_too_few_points_or_nothing_measured_judges_nothing() -> None:
    assert fit([1.0, 4.0], [1.0, 2.0]).slope is None  # only N = 4 is >= 4
    assert fit(NS, [0.0] * 5).slope is None
    nothing = Fit(None, 1)
    assert nothing.order == "-" and nothing.at_most_linear is None and nothing.shown() == "-"


def test_noise_on_a_linear_cost_stays_within_the_bound_and_quadratic_never_does() -> None:
    # +-10% at the ends of the small run's range (N = 4..16), the worst way round.
    noisy = fit([4.0, 16.0], [40 * 0.9, 160 * 1.1])
    assert noisy.slope is not None and 1.0 < noisy.slope <= AT_MOST_LINEAR
    squeezed = fit([4.0, 16.0], [16 * 1.1, 256 * 0.9])
    assert squeezed.at_most_linear is False


def test_orders_at_the_boundaries() -> None:
    assert order(1.39) == "N" and order(1.5) == "N^1.5" and order(1.6) == "N^2"
    assert order(0.49) == "1" and order(None) == "-" and order(3.0) == "N^3.0"
