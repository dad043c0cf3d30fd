"""Reproductions of the published evaluation, and the registry that lists them.

Each experiment is a module exposing

    NAME: str
    async def run(out_dir: Path, *, scale: str = "full", console: Console) -> ExperimentResult

(`scale` is "full", the real run, or "small", the quick version the tests run;
ExperimentResult is in vmbox.experiments.common). `REGISTRY` lists them in the
order `vmbox experiment all` runs them; an optional entry (a plug-in module that
may not be installed) is left out while its module is missing. Adding an
experiment is one entry here. Called by vmbox.cli.experiment.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # common imports the etcd client: not at `vmbox --help` time
    from rich.console import Console

    from vmbox.experiments.common import ExperimentResult, Scale


class RunFunction(Protocol):
    def __call__(
        self, out_dir: Path, *, scale: Scale = "full", console: Console
    ) -> Awaitable[ExperimentResult]: ...


@dataclass(frozen=True)
class Entry:
    """One experiment the CLI offers: where it lives and how long a run may take."""

    name: str
    module: str
    summary: str  # one line for `vmbox experiment --help`
    budget: float  # seconds a full run may take before it is stopped
    small_budget: float  # the same for --small
    optional: bool = False  # left out while its module is not installed


REGISTRY: tuple[Entry, ...] = (
    Entry(
        "correctness",
        "vmbox.experiments.correctness",
        "Ramp 10 -> 300 packets/s through a 100/s limit with 1, 2 and 4 replicas.",
        budget=300,
        small_budget=120,
    ),
    Entry(
        "overhead",
        "vmbox.experiments.overhead",
        "Per-packet latency at 1,000 packets/s: base, poll 1000/100 ms, watch, strong.",
        budget=300,
        small_budget=120,
    ),
    Entry(
        "scaling",
        "vmbox.experiments.scaling",
        "70 MiB replicas, idle then rising load: a replica per 60% memory crossing; "
        "then scale up and down on packet rate.",
        budget=420,
        small_budget=150,
    ),
    Entry(
        "skew",
        "vmbox.experiments.skew",
        "One heavy one-flow source (and 20 spread ones) on 4 replicas: even vs demand split.",
        budget=180,
        small_budget=90,
    ),
)


class NotAnExperiment(Exception):
    """A registered module that lacks NAME or an async run(); str() says which."""


def installed(entry: Entry) -> bool:
    """Whether the entry's module can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(entry.module) is not None
    except (ImportError, ValueError):  # a missing parent package; a __spec__-less module
        return False


def available() -> list[Entry]:
    """The entries that can run here, in registry order."""
    return [entry for entry in REGISTRY if not entry.optional or installed(entry)]


def lookup(name: str) -> Entry | None:
    return next((entry for entry in available() if entry.name == name), None)


def load(entry: Entry) -> RunFunction:
    """Import the entry's module and return its `run`, checking the agreed interface."""
    module = importlib.import_module(entry.module)
    name = getattr(module, "NAME", None)
    run = getattr(module, "run", None)
    if not isinstance(name, str) or not inspect.iscoroutinefunction(run):
        raise NotAnExperiment(
            f"{entry.module} must expose NAME: str and async def run(out_dir, *, scale, console)"
        )
    checked: RunFunction = run
    return checked
