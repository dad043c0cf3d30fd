"""The autoscaling policy, pure: per-replica values in, desired replica count out.

Called by the controller's autoscale loop (vmbox.control.controller) once per
monitor interval with each replica's value of the spec's metric, and by unit
tests with a fake clock. No I/O and no clock reads: time is passed in.

Two modes (spec `autoscale.mode`):
- threshold: one replica more after `up_for` consecutive samples at or above
  `scale_up_at`; one fewer after `down_for` consecutive samples at or below
  `scale_down_at`, and only if the value spread over one replica fewer would
  stay below `scale_up_at` (otherwise the removal would trigger the next add).
- proportional: Kubernetes' rule, desired = ceil(n * value / target), left
  alone inside the tolerance band; it scales up to the smallest of the last
  `up_for` recommendations and down to the largest of the last `down_for`
  (the horizontal autoscaler's stabilisation window), at most doubling at once.
Both wait `cooldown` seconds after a change before the next, and stay within
`replicas.min`..`replicas.max`. Samples taken during a cooldown do not count
toward the next decision: they show the service before the change took effect.

When samples are taken (`next_sample_in`): each one ends `lead` seconds
before a multiple of the interval in epoch time, so with an interval that
divides the rate limiter's window every window boundary has a sample ending
just before it. A joining replica takes nothing in the window it joins (its
shares are fixed when the window begins), so a decision made just before a
boundary puts a warm spare to work at that boundary, not up to a window later.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmbox.spec import Spec


@dataclass(frozen=True, slots=True)
class Policy:
    metric: str
    mode: str
    scale_up_at: float
    scale_down_at: float
    target: float
    tolerance: float
    aggregate: str
    up_for: int
    down_for: int
    cooldown: float
    minimum: int
    maximum: int

    @classmethod
    def from_spec(cls, spec: Spec) -> Policy:
        auto = spec.autoscale
        if auto is None:
            raise ValueError(f"service {spec.service} has no autoscale section")
        return cls(
            metric=auto.metric,
            mode=auto.mode,
            scale_up_at=auto.scale_up_at or 0.0,
            scale_down_at=auto.scale_down_at or 0.0,
            target=auto.target or 0.0,
            tolerance=auto.tolerance,
            aggregate=auto.how,
            up_for=auto.up_for,
            down_for=auto.down_for,
            cooldown=auto.cooldown,
            minimum=spec.replicas.min,
            maximum=spec.replicas.max,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """A change of the desired count, with what caused it (recorded as an event)."""

    current: int
    desired: int
    value: float  # the aggregated metric value that decided
    values: tuple[float, ...]  # each replica's value in that sample
    reason: str
    since: float  # when the first sample of the streak that decided was taken

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down"


def aggregate(values: Sequence[float], how: str) -> float:
    return max(values) if how == "max" else sum(values) / len(values)


def next_sample_in(now: float, interval: float, lead: float, took: float) -> float:
    """Seconds to wait so that the next sample, taking `took` s, ends `lead` s before a tick.

    Ticks are the multiples of `interval` since the epoch (`now` is epoch
    time). The next sample ends at the first tick - `lead` that leaves at
    least a tenth of an interval free after this one; the wait lies between
    0 and 1.1 intervals (tests/unit/test_autoscale.py).
    """
    gap = interval / 10
    end = math.ceil((now + took + lead + gap) / interval) * interval - lead
    return max(0.0, end - took - now)


def floor(metric: str, values: Sequence[float]) -> float:
    """What every replica holds whatever its load: memory's idle working set, else 0.

    A replica's memory never falls below its interpreter, libraries and
    buffers (about 53% of 70 MiB), and that part does not move to the others
    when one is removed; the least loaded replica is the closest to it. Packet
    rate, bandwidth and CPU have no such part (0).
    """
    return min(values) if metric == "memory" and values else 0.0


def recommend(current: int, value: float, target: float, tolerance: float) -> int:
    """Kubernetes' proportional rule: ceil(n * value / target), unchanged within tolerance."""
    ratio = value / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(max(1, current) * ratio - 1e-9)


class Autoscaler:
    """Decides, sample by sample, whether the desired count should change."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.up_streak = 0
        self.down_streak = 0
        self.last_change: float | None = None
        self.streak_since: float | None = None
        self.recommendations: deque[int] = deque(maxlen=max(policy.up_for, policy.down_for))

    def cooling(self, now: float) -> bool:
        return self.last_change is not None and now - self.last_change < self.policy.cooldown

    def observe(self, now: float, current: int, values: Sequence[float]) -> Decision | None:
        """Feed one sample (one value per replica); a Decision when the count should change."""
        if not values or self.cooling(now):
            self._reset()
            return None
        value = aggregate(values, self.policy.aggregate)
        before = (self.up_streak, self.down_streak)
        if self.policy.mode == "proportional":
            desired, reason = self._proportional(current, value)
        else:
            desired, reason = self._threshold(current, value, floor(self.policy.metric, values))
        desired = max(self.policy.minimum, min(self.policy.maximum, desired))
        self._track_streak(now, current, before)
        if desired == current:
            return None
        since = self.streak_since if self.streak_since is not None else now
        self.last_change = now
        self._reset()
        return Decision(current, desired, value, tuple(values), reason, since)

    def _track_streak(self, now: float, current: int, before: tuple[int, int]) -> None:
        """Remember when the current run of agreeing samples began (for reaction times)."""
        up, down = self.up_streak, self.down_streak
        if self.policy.mode == "proportional":
            if self.recommendations[-1] == current:
                self.streak_since = None
            elif self.streak_since is None:
                self.streak_since = now
        elif (up == 1 and before[0] == 0) or (down == 1 and before[1] == 0):
            self.streak_since = now
        elif up == 0 and down == 0:
            self.streak_since = None

    def _reset(self) -> None:
        self.up_streak = self.down_streak = 0
        self.recommendations.clear()
        self.streak_since = None

    def _threshold(self, current: int, value: float, base: float) -> tuple[int, str]:
        p = self.policy
        shown = f"{p.aggregate} {p.metric} {value:.1f}"
        if value >= p.scale_up_at and current < p.maximum:
            self.up_streak, self.down_streak = self.up_streak + 1, 0
            if self.up_streak >= p.up_for:
                return current + 1, f"{shown} >= {p.scale_up_at:g} for {p.up_for} samples"
            return current, ""
        self.up_streak = 0
        # The same load over one replica fewer must not cross the upper threshold;
        # only what lies above each replica's fixed base is re-divided.
        fits = (
            current > p.minimum and base + (value - base) * current / (current - 1) < p.scale_up_at
        )
        if value <= p.scale_down_at and fits:
            self.down_streak += 1
            if self.down_streak >= p.down_for:
                return current - 1, f"{shown} <= {p.scale_down_at:g} for {p.down_for} samples"
            return current, ""
        self.down_streak = 0
        return current, ""

    def _proportional(self, current: int, value: float) -> tuple[int, str]:
        p = self.policy
        self.recommendations.append(recommend(current, value, p.target, p.tolerance))
        recent = list(self.recommendations)
        shown = f"{p.aggregate} {p.metric} {value:.1f} against target {p.target:g}"
        if len(recent) >= p.up_for:
            up = min(recent[-p.up_for :])
            if up > current:
                return min(up, 2 * current), f"{shown}: {up} replicas for {p.up_for} samples"
        if len(recent) >= p.down_for:
            down = max(recent[-p.down_for :])
            if down < current:
                return down, f"{shown}: {down} replicas for {p.down_for} samples"
        return current, ""


def choose_removals(candidates: Sequence[str], count: int, load: Mapping[str, float]) -> list[str]:
    """The `count` replicas to remove: least loaded first, newest (highest id) on ties."""

    def key(rid: str) -> tuple[float, int, str]:
        suffix = rid.rsplit("-", 1)[-1]
        return (load.get(rid, 0.0), -int(suffix) if suffix.isdigit() else 0, rid)

    return sorted(candidates, key=key)[: max(0, count)]


def free_ids(service: str, taken: set[str], count: int) -> list[str]:
    """The `count` lowest-numbered replica ids not in `taken` (service-1, service-2, ...)."""
    ids: list[str] = []
    index = 1
    while len(ids) < count:
        rid = f"{service}-{index}"
        if rid not in taken:
            ids.append(rid)
        index += 1
    return ids
