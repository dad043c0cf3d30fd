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
    # When each replica first passed a packet, once per process behind its id
    # (an id comes back after a scale-down has let it go).
    first_pass: dict[str, list[float]] = field(default_factory=dict)
    passing_pid: dict[str, int] = field(default_factory=dict)
    started: list[tuple[float, str]] = field(default_factory=list)
    server: dict[int, int] = field(default_factory=dict)
    load_window: tuple[float, float] = (0.0, 0.0)
    # The spans the limited source ran, whose server seconds are judged: pps, its
    # load between pauses; memory, the probe beside the new flows, load and settle.
    load_spans: list[tuple[float, float]] = field(default_factory=list)

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

    def passed(self, rid: str, pid: int, at: float) -> None:
        """Replica `rid` (process `pid`) has passed packets, as seen at `at`."""
        if self.passing_pid.get(rid) != pid:
            self.passing_pid[rid] = pid
            self.first_pass.setdefault(rid, []).append(at)

    def reactions(self) -> list[tuple[events.Event, str, float | None]]:
        """Each scale-up, the replica it started (or promoted), and seconds from crossing
        to passing traffic."""
        out: list[tuple[events.Event, str, float | None]] = []
        started = sorted(self.started)
        for decision in (d for d in self.decisions if d.kind == "scale-up"):
            entry = next((e for e in started if e[0] >= decision.time - 0.01), None)
            rid = entry[1] if entry else ""
            if entry is not None:
                started.remove(entry)  # this start only: the id may come back later
            passes = [t for t in self.first_pass.get(rid, []) if entry and t >= entry[0] - 0.01]
            since = float(decision.data.get("since", decision.time))
            out.append((decision, rid, min(passes) - since if passes else None))
        return out


def server_seconds(run: PhaseRun) -> list[int]:
    """The server's count for each whole second while the load ran (the first two skipped).

    With pauses in the load, each span between them is taken alone. The memory
    phase's new flows are not counted (vmbox.tools.echo counts them apart).
    """
    spans = run.load_spans or [run.load_window]
    return [
        run.server.get(s, 0) for start, stop in spans for s in range(int(start) + 2, int(stop) - 1)
    ]
