"""Part 2 of the firewall experiment: 1 -> 4 -> 1 replicas under one stream and a download.

Called by run.py, once per state. A fresh one-replica service; the stream and
the download start, then the desired count goes to 4 (Service.scale, as
`vmbox scale` does) and, once exactly four replicas are ready (the testbed's
readiness rule), after a hold, back to 1 (three are drained: their queues
leave the steering first). The steering's hash moves most flows at each step;
with `state: shared` a replica that gets a connection it has not seen reads it
once, with `state: local` it drops it. Each step's stall is the longest gap
between the stream's data packets at the server from its scale command until
the next one (the last: until its hold ended).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from vmbox.experiments.firewall.sessions import SessionRun, Traffic
from vmbox.experiments.firewall.setup import State, firewall_spec
from vmbox.experiments.firewall.witness import binned, window_gap
from vmbox.lab import LabPlan
from vmbox.labtraffic import GRACE
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import READY_TIMEOUT, running_service

LEAD = 1.0  # s of stream on one replica before the first step
COUNTS = (4, 1)  # the steps, from one replica


@dataclass(frozen=True)
class Step:
    change: str  # "1 -> 4"
    began: float  # epoch: the desired count written
    ready: float  # s until exactly that many replicas were ready
    stall: float  # s: the stream's longest gap at the server over the step


@dataclass(frozen=True)
class Resize:
    run: SessionRun
    steps: tuple[Step, ...]
    ended: float  # epoch: the last hold's end

    def timeline(self) -> list[tuple[float, int]]:
        """Bytes of the stream at the server per 0.1 s, s from the stream's start."""
        return binned(self.run.data, self.run.began, 0.0, self.ended - self.run.began + 0.5)


async def resize(
    store: EtcdStore, lab: LabPlan, state: State, seconds: int, hold: float, grace: float = GRACE
) -> Resize:
    """1 -> 4 -> 1 under `state`, holding each count `hold` s; the stream lasts `seconds`,
    its clients stopped `grace` s past that if they have not ended (sessions.Traffic)."""
    spec = firewall_spec(f"fwsize-{state}", lab, state, 1)
    marks: list[tuple[str, float, float]] = []
    async with running_service(store, spec) as svc:
        with Traffic(lab, seconds, grace) as traffic:
            traffic.start_stream()
            await traffic.download_on(svc, None, 0.0)
            await asyncio.sleep(LEAD)
            before = 1
            for count in COUNTS:
                began, clock = time.time(), time.monotonic()
                await svc.scale(count)
                await svc.wait_ready(count, timeout=READY_TIMEOUT)
                marks.append((f"{before} -> {count}", began, time.monotonic() - clock))
                before = count
                await asyncio.sleep(hold)
            ended = time.time()
            run = await traffic.results("resize", state)
    times = [s.at for s in run.data]
    # A window past the stream's planned end would count its end as a stall.
    ends = [min(began, run.ends) for _, began, _ in marks[1:]] + [min(ended, run.ends)]
    steps = tuple(
        Step(change, began, ready, window_gap(times, began, end))
        for (change, began, ready), end in zip(marks, ends, strict=True)
    )
    return Resize(run, steps, ended)
