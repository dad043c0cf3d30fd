"""What every experiment's outcome is made of: the result type, CSV files, machine facts
and the progress display.

Called by the experiment modules (correctness, overhead and whichever others
the registry in vmbox.experiments lists), by report.py and by `vmbox experiment`.
The service an experiment measures comes from vmbox.testbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import os
import platform
import subprocess
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from vmbox.etcdserver import find_etcd

Scale = Literal["full", "small"]
T = TypeVar("T")


class ExperimentError(Exception):
    """An experiment that could not run to the end; str() is the one line to show."""


@dataclass(frozen=True)
class ReportRow:
    """One line of the report: a published figure beside vmbox's."""

    metric: str
    published: str
    vmbox: str
    ok: bool | None = None  # None: nothing published to judge against


@dataclass
class ExperimentResult:
    """What one experiment produced: files, report rows and notes."""

    name: str
    csvs: list[Path] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run, filled in by whoever ran it
    error: str | None = None  # set when the run failed or ran out of time

    @property
    def ok(self) -> bool:
        return self.error is None and all(row.ok is not False for row in self.rows)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write `rows` under `header`; floats get 4 decimals so the files diff well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])
    return path


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def etcd_version() -> str:
    try:
        out = subprocess.run(
            [find_etcd(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.split(":", 1)[1].strip() if ":" in first else first or "unknown"


def machine_info() -> dict[str, str]:
    """The facts a reader needs to weigh the figures, in report order."""
    try:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop = "none running"
    return {
        "cores": str(os.cpu_count() or "unknown"),
        "CPU": cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "etcd": etcd_version(),
        "event loop": loop,
    }


async def side_by_side(*runs: Coroutine[Any, Any, T]) -> list[T]:
    """Run `runs` at once; their results, in order. When one fails the others are cancelled
    and its exception is raised as it is, not in an ExceptionGroup, so that an expected
    failure (ExperimentError, an OSError) still ends the experiment in one line."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run) for run in runs]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def new_progress(console: Console) -> Progress:
    """The progress display every phase of every experiment uses."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (the load tool's definition)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval for the median of `values`: the order statistics
    x(k) and x(n+1-k) with the largest k such that P(Binomial(n, 1/2) < k) <= (1 - c)/2.

    Covers the true median with probability at least `confidence` whatever the
    values' distribution, as long as they are independent (each a round's ratio
    here). Too few values for that: the whole range (min, max)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    tail = (1.0 - confidence) / 2
    k, below = 0, 0.0  # below: P(X < k+1) for X ~ Binomial(n, 1/2)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


# The published shape of the consistency trade-off: polling costs about nothing, a
# per-packet read costs a store round trip. Judged relative to what the per-packet read
# adds, because this shared 2-core machine's noise (tens of microseconds between rounds)
# is a fifth of a loopback round trip: an absolute 10% bound failed on noise alone
# (poll 1.19x base by round medians in a full test run, +0.038 ms, strong about 5x).
POLL_SHARE = 0.2


def poll_about_free(base: float, poll: float, strong: float, share: float = POLL_SHARE) -> bool:
    """True when polling adds at most `share` of what a per-packet read adds to `base`."""
    return poll - base <= share * (strong - base)
