"""One lazy registry of named, runnable entries: the experiments and the faults use it.

An `Entry` names a module and an async function in it, with a one-line
summary and the time a run may take at each scale. The module is imported
only when the entry is run (`Registry.load`), so listing the entries
(`vmbox experiment --help`, `python -m vmbox.faults --list`) imports neither
etcd clients nor matplotlib. An entry marked `optional` (a plug-in module
that may not be installed) is left out while its module is missing.

vmbox.experiments holds `EXPERIMENTS`, vmbox.faults holds `FAULTS`; their
callers (vmbox.cli.experiment, vmbox.faults.runner) only look up, list and
load.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, cast

Scale = Literal["full", "small"]
F = TypeVar("F")


@dataclass(frozen=True)
class Entry:
    """One runnable entry: where it lives and how long a run may take."""

    name: str
    module: str
    function: str
    summary: str  # one line for the listing
    budget: float  # seconds a full run may take before it is stopped
    small_budget: float  # the same for the small scale
    optional: bool = False  # left out while its module is not installed

    def budget_for(self, scale: Scale) -> float:
        return self.small_budget if scale == "small" else self.budget

    def installed(self) -> bool:
        """Whether the module can be imported (checked without importing it)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a missing parent package; a __spec__-less module
            return False


class NotRunnable(Exception):
    """A registered entry whose function is missing or not async; str() says which."""


class Registry(Generic[F]):
    """Entries in the order `all` runs them; `F` is the type of their functions."""

    def __init__(self, entries: Sequence[Entry], signature: str) -> None:
        self.entries = tuple(entries)
        self.signature = signature  # how the function is called, for NotRunnable's message

    def available(self) -> list[Entry]:
        """The entries that can run here, in registry order."""
        return [entry for entry in self.entries if not entry.optional or entry.installed()]

    def lookup(self, name: str) -> Entry | None:
        return next((entry for entry in self.available() if entry.name == name), None)

    def load(self, entry: Entry) -> F:
        """Import the entry's module and return its function, checking that it is async."""
        module = importlib.import_module(entry.module)
        function = getattr(module, entry.function, None)
        if not inspect.iscoroutinefunction(function):
            raise NotRunnable(
                f"{entry.module}.{entry.function} must be an async def {self.signature}"
            )
        return cast(F, function)
