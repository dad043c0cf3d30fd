"""How a cost grows: the log-log slope of cost against N (or S), and the order it names (pure).

Called by verdicts.py and csvs.py with a series' points, and by the unit tests.
A cost c ~ a * N^k is a line of slope k on log-log axes; the least-squares
slope over the points with N >= 4 (a single replica has no siblings to
watch, and fixed costs dominate tiny groups) names the order: below 0.5
constant ("1"), below 1.4 linear ("N"), from 1.6 quadratic ("N^2"), between
them the number itself.

The verdict on a cost that must grow at most linearly is slope <= 1.3. The
margin over 1 is noise: a cost measured to within +-10% at the ends of a
range (noise on this shared 2-core machine, and per-replica costs that are
not quite constant: demand reports are written only when they change) moves
the slope by log(1.1 / 0.9) / log(range), 0.14 over N = 4..16 (the small
run's range), 0.05 over 4..256; a cost that is linear plus a fixed part has
a slope below 1. N^2 is 2: 1.3 is well clear of it on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONSTANT_BELOW = 0.5
LINEAR_BELOW = 1.4
QUADRATIC_FROM = 1.6
AT_MOST_LINEAR = 1.3  # the verdict's bound (see the module's docstring)
FROM_N = 4  # the points a fit of the N series starts at
FROM_S = 1  # ... and of the S series (each service has 2 replicas already)


@dataclass(frozen=True)
class Fit:
    """A cost's slope on log-log axes over `points` points (None: fewer than two)."""

    slope: float | None
    points: int
    var: str = "N"

    @property
    def order(self) -> str:
        return order(self.slope, self.var)

    @property
    def at_most_linear(self) -> bool | None:
        """True within the verdict's bound, None when there is nothing to judge."""
        return None if self.slope is None else self.slope <= AT_MOST_LINEAR

    def shown(self) -> str:
        """'N (1.02)', 'N^2 (1.97)', or '-' with fewer than two points."""
        if self.slope is None:
            return "-"
        return f"{self.order} ({self.slope:.2f})"


def order(slope: float | None, var: str = "N") -> str:
    """The order a slope names: '1', 'N', 'N^2', or 'N^1.5' between linear and quadratic."""
    if slope is None:
        return "-"
    if slope < CONSTANT_BELOW:
        return "1"
    if slope < LINEAR_BELOW:
        return var
    if slope >= QUADRATIC_FROM:
        return f"{var}^2" if slope < 2.5 else f"{var}^{slope:.1f}"
    return f"{var}^{slope:.1f}"


def fit(xs: Sequence[float], ys: Sequence[float], *, from_x: float = FROM_N, var: str = "N") -> Fit:
    """The least-squares slope of log(y) on log(x) over the points with x >= from_x and
    y > 0 (a cost of 0 has no logarithm: nothing measured)."""
    pairs = [
        (math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x >= from_x and y > 0
    ]
    if len({lx for lx, _ in pairs}) < 2:
        return Fit(None, len(pairs), var)
    mx = sum(lx for lx, _ in pairs) / len(pairs)
    my = sum(ly for _, ly in pairs) / len(pairs)
    sxx = sum((lx - mx) ** 2 for lx, _ in pairs)
    sxy = sum((lx - mx) * (ly - my) for lx, ly in pairs)
    return Fit(sxy / sxx, len(pairs), var)
