"""A chain of middleboxes: a replica runs each function in order, and a packet passes only
if every one passes it (pure).

`middlebox:` in a spec is one function or a list of them (`ratelimit` then
`firewall`, as the reference design would combine containers in one pod).
Each stage is a Middlebox built by its own Function from its own section: it
keeps its own state items (each kept fresh in its own stage's consistency
mode), its own keyed tables, and its own counters of what it passed and
dropped, which the replica exports per function.

A stage may answer a `Wait` (vmbox.keyed) instead of a verdict: it needs a
keyed entry read, or a write made durable, before it can decide. `process`
then returns a `Held` naming the stage; the replica's driver holds that
packet alone, does what the Wait asks, and calls `resume` from that stage,
so the stages before it, which already counted the packet, are not asked
again. Invariants: a packet is counted once by each stage that decided it;
a stage after one that dropped it never sees it; `resume(packet, now, i)`
asks stage i and those after it only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmbox.group import Group
from vmbox.keyed import KeyedTable, Wait
from vmbox.middlebox import Middlebox, StateItem
from vmbox.packet import Packet, Verdict

PASS, DROP = Verdict.PASS, Verdict.DROP


@dataclass(frozen=True, slots=True)
class Held:
    """A packet stage `stage` could not decide yet, and what it waits for."""

    stage: int
    wait: Wait


@dataclass(slots=True)
class StageCounts:
    """Packets a stage decided (monotonic; read by the metrics thread)."""

    passed: int = 0
    dropped: int = 0
    held: int = 0


class Chain:
    """The functions a replica runs, in order."""

    def __init__(self, stages: Sequence[tuple[str, Middlebox]]) -> None:
        if not stages:
            raise ValueError("a chain needs at least one function")
        names = [name for name, _ in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a chain holds each function once, got {', '.join(names)}")
        self.names = tuple(names)
        self.stages = tuple(middlebox for _, middlebox in stages)
        self.counts = tuple(StageCounts() for _ in stages)
        self._owner: dict[str, Middlebox] = {}
        for name, middlebox in stages:
            for item in middlebox.items:
                if item.name in self._owner:
                    raise ValueError(f"state item {item.name!r} of {name} is declared twice")
                self._owner[item.name] = middlebox
        self.tables: dict[str, KeyedTable] = {}
        for name, middlebox in stages:
            for table in middlebox.tables.values():
                if table.name in self.tables:
                    raise ValueError(f"keyed table {table.name!r} of {name} is declared twice")
                self.tables[table.name] = table

    @property
    def items(self) -> tuple[StateItem, ...]:
        """Every stage's state items, in chain order."""
        return tuple(item for middlebox in self.stages for item in middlebox.items)

    def stage_of(self, item: str) -> int:
        """The index of the stage that declares state item `item`."""
        return self.stages.index(self._owner[item])

    def first(self, kind: type[Any]) -> Any:
        """The first stage that is an instance of `kind`, or None."""
        return next((m for m in self.stages if isinstance(m, kind)), None)

    def process(self, packet: Packet, now: float) -> Verdict | Held:
        """Decide `packet` through every stage, or say which stage holds it."""
        return self.resume(packet, now, 0)

    def resume(self, packet: Packet, now: float, start: int) -> Verdict | Held:
        """Decide `packet` from stage `start` on (the stages before it passed it)."""
        stages, counts = self.stages, self.counts
        for index in range(start, len(stages)):
            verdict = stages[index].process(packet, now)
            if verdict is PASS:
                counts[index].passed += 1
            elif verdict is DROP:
                counts[index].dropped += 1
                return DROP
            elif isinstance(verdict, Wait):
                counts[index].held += 1
                return Held(index, verdict)
        return PASS

    def update(self, values: Mapping[str, Any] | None = None, group: Group | None = None) -> None:
        """Hand each stage its own new values, and every stage a new group."""
        if values:
            by_stage: dict[int, dict[str, Any]] = {}
            for name, value in values.items():
                by_stage.setdefault(self.stage_of(name), {})[name] = value
            for index, part in by_stage.items():
                self.stages[index].update(values=part, group=group)
            rest = [m for i, m in enumerate(self.stages) if i not in by_stage]
        else:
            rest = list(self.stages)
        for middlebox in rest:
            middlebox.update(group=group)

    def start(self, now: float) -> None:
        for middlebox in self.stages:
            middlebox.start(now)

    def idle(self, now: float) -> None:
        for middlebox in self.stages:
            middlebox.idle(now)

    def gauges(self) -> dict[str, float]:
        """Every stage's gauges (a later stage's name wins a clash; the names differ)."""
        merged: dict[str, float] = {}
        for middlebox in self.stages:
            merged.update(middlebox.gauges())
        return merged

    def rule_counters(self) -> dict[str, dict[str, int]]:
        merged: dict[str, dict[str, int]] = {}
        for middlebox in self.stages:
            merged.update(middlebox.rule_counters())
        return merged

    def verdicts(self) -> dict[str, dict[str, int]]:
        """Packets each function passed, dropped and held, by function name."""
        return {
            name: {"pass": c.passed, "drop": c.dropped, "held": c.held}
            for name, c in zip(self.names, self.counts, strict=True)
        }
