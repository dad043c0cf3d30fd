"""vmbox.allocator: when freed memory goes back (TrimPolicy, pure), and that a trim runs."""

from __future__ import annotations

import itertools
import random

from vmbox.allocator import MemoryReturn, TrimPolicy


def test_nothing_released_no_trim() -> None:
    policy = TrimPolicy(min_released=100, min_interval=1.0)
    held = 0
    for second in range(60):
        held += 50  # only growing
        assert not policy.due(held, float(second))


def test_a_release_is_trimmed_once_then_again_only_after_another() -> None:
    policy = TrimPolicy(min_released=100, min_interval=1.0)
    assert not policy.due(5000, 0.0)
    assert policy.due(4000, 1.0)  # 1000 released
    assert not policy.due(4000, 2.0)  # nothing more since
    assert not policy.due(3950, 3.0)  # 50: under min_released
    assert policy.due(3900, 4.0)  # 100 since the last trim


def test_trims_are_spaced_and_a_release_waits_at_most_one_interval() -> None:
    rng = random.Random(3)
    policy = TrimPolicy(min_released=256, min_interval=2.0)
    now, held, trims = 0.0, 0, []
    pending_since: float | None = None
    for _ in range(5000):
        now += rng.choice((0.1, 0.5, 1.0))
        held = max(0, held + rng.randrange(-800, 800))
        released = policy.peak - held >= policy.min_released
        if policy.due(held, now):
            trims.append(now)
            pending_since = None
        elif not released:
            pending_since = None  # taken back: held rose again
        elif pending_since is None:
            pending_since = now
        if pending_since is not None:
            # Invariant 3: a due release waits for the interval, no longer.
            assert now - pending_since <= policy.min_interval + 1.0
    assert len(trims) > 100
    assert all(b - a >= policy.min_interval for a, b in itertools.pairwise(trims))


def test_memory_return_counts_what_it_did() -> None:
    memory = MemoryReturn(TrimPolicy(min_released=10, min_interval=0.0))
    assert memory.can_trim  # glibc here: malloc_trim exists
    assert not memory.check(100, 0.0)
    assert memory.check(50, 1.0)
    assert memory.gauges()["memory_trims"] == 1.0
    assert memory.gauges()["memory_trim_seconds"] > 0.0
