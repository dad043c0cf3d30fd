"""Memory that returns: how a replica gives freed memory back to the kernel, and when.

A replica's memory grows with its flows (an upstream socket, a transport and
table entries each) and its sources (the limiter's table). When they idle
out, Python frees the objects, but the pages stay with the process: Python's
own small-object allocator (pymalloc) hands an arena back only when every
object in it is free, and glibc's malloc gives back only the top of its heap
on `free()`. The working set then keeps its high-water mark, and a monitor
that scales down on memory never sees it fall (the reference design's flaw).

Two measures (measured in DESIGN.md, "Memory that returns"):

1. `ENVIRONMENT`: the runtime starts replicas with `PYTHONMALLOC=malloc`,
   so Python's small objects come from glibc too and interleave with nothing
   that pins a whole arena; freed pages anywhere in the heap can then go back.
2. `MemoryReturn`: once enough of what the replica held (flows plus tracked
   sources) has been released since the last time, it runs the cyclic
   garbage collector (a flow and its transport refer to each other) and then
   glibc's `malloc_trim(0)`, which returns every free page in every arena to
   the kernel with MADV_DONTNEED: the pages leave the process's RSS and its
   memory cgroup's charge at once, on cgroup v1 and v2 alike.

`TrimPolicy` decides when (pure: `now` is passed in); `MemoryReturn` does it.
Off glibc (no `malloc_trim`), only the collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# What the runtime puts in a replica's environment (vmbox.runtime.local).
ENVIRONMENT = {"PYTHONMALLOC": "malloc"}


@dataclass
class TrimPolicy:
    """When to give memory back: after `min_released` items left, at most every `min_interval` s.

    `held` is what the replica holds now (flows plus tracked sources). The
    policy remembers the peak since the last trim; once `peak - held` reaches
    `min_released` and `min_interval` has passed since the last trim, a trim
    is due, and the peak starts again from `held`.

    Invariants: (1) no trim while nothing was released (held never fell
    `min_released` below its peak); (2) two trims are at least `min_interval`
    apart; (3) a release of `min_released` or more is trimmed within
    `min_interval` of the first check that sees it, whatever came before.
    """

    min_released: int = 256
    min_interval: float = 1.0
    peak: int = 0
    last: float = field(default=float("-inf"))

    def due(self, held: int, now: float) -> bool:
        self.peak = max(self.peak, held)
        if self.peak - held < self.min_released or now - self.last < self.min_interval:
            return False
        self.peak = held
        self.last = now
        return True


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        func = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_size_t]
    func.restype = ctypes.c_int
    return func


class MemoryReturn:
    """Runs the collector and `malloc_trim(0)` when `TrimPolicy` says so; counts what it did."""

    def __init__(self, policy: TrimPolicy | None = None) -> None:
        self.policy = policy if policy is not None else TrimPolicy()
        self._trim = _malloc_trim()
        self.trims = 0
        self.last_seconds = 0.0  # how long the last collection and trim blocked the loop

    @property
    def can_trim(self) -> bool:
        return self._trim is not None

    def check(self, held: int, now: float) -> bool:
        """Give memory back if due; returns whether it did."""
        if not self.policy.due(held, now):
            return False
        start = time.perf_counter()
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self.last_seconds = time.perf_counter() - start
        self.trims += 1
        return True

    def gauges(self) -> dict[str, float]:
        return {"memory_trims": float(self.trims), "memory_trim_seconds": self.last_seconds}
