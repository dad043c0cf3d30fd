"""What one phase of the scaling experiment recorded (PhaseRun), and the figures drawn from it.

Filled by run.py while a phase runs; read by summary.py and plot.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmbox.control import events
from vmbox.experiments.scaling.phases import PhasePlan
from vmbox.spec import Spec


@dataclass
class PhaseRun:
    """What one phase recorded."""

    plan: PhasePlan
    spec: Spec
    memory_source: str = ""
    t0: float = 0.0
    samples: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    counts: list[tuple[float, int]] = field(default_factory=list)
    decisions: list[events.Event] = field(default_factory=list)
    first_pass: dict[str, float] = field(default_factory=dict)
    started: list[tuple[float, str]] = field(default_factory=list)
    server: dict[int, int] = field(default_factory=dict)
    load_window: tuple[float, float] = (0.0, 0.0)
    probe_window: tuple[float, float] = (0.0, 0.0)  # memory: the limited source's span

    def note(self, event: events.Event) -> None:
        """Keep the controller's decisions and the replicas each scale-up brought in.

        A new replica is a start, or a warm spare's promotion (paired by when it was
        decided: its event comes once the spare is a member); a spare's own start
        brings nothing in."""
        rid = str(event.data.get("replica", ""))
        if event.kind.startswith("scale-"):
            self.decisions.append(event)
        elif event.kind == "start" and not event.data.get("standby"):
            self.started.append((event.time, rid))
        elif event.kind == "promote":
            decided = event.data.get("decided_at")
            at = float(decided) if isinstance(decided, int | float) else event.time
            self.started.append((at, rid))

    def reactions(self) -> list[tuple[events.Event, str, float | None]]:
        """Each scale-up, the replica it started (or promoted), and seconds from crossing
        to passing traffic."""
        out: list[tuple[events.Event, str, float | None]] = []
        started = sorted(self.started)
        for decision in (d for d in self.decisions if d.kind == "scale-up"):
            rid = next((r for t, r in started if t >= decision.time - 0.01), "")
            started = [(t, r) for t, r in started if r != rid]
            passed = self.first_pass.get(rid)
            since = float(decision.data.get("since", decision.time))
            out.append((decision, rid, None if passed is None else passed - since))
        return out


def probe_seconds(run: PhaseRun) -> list[int]:
    """The memory phase's server count per whole second of its limited source (first 2 skipped).

    The new flows' own datagrams are not in it (vmbox.tools.echo counts them apart).
    """
    start, stop = run.probe_window
    return [run.server.get(s, 0) for s in range(int(start) + 2, int(stop) - 1)]


def server_seconds(run: PhaseRun) -> list[int]:
    """The server's count for each whole second while the load ran (the first two skipped)."""
    start, stop = run.load_window
    return [run.server.get(s, 0) for s in range(int(start) + 2, int(stop) - 1)]
