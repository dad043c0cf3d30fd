"""Part 1 of the firewall experiment: `kill -9` of the replica carrying a TCP stream.

Called by run.py, once per state and round. Three replicas (a fresh service
each time), an iperf3 stream and a curl download started again until its
connection lands on the stream's replica (sessions.py); that replica is found
by its passed packets growing fastest (setup.carrier) and killed with SIGKILL.
Its queue leaves the steering, its flows re-hash onto the survivors, and
with `state: shared` they read each connection once from etcd and carry it
on; with `state: local` they have never seen it and drop its packets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

from vmbox.experiments.firewall.sessions import SessionRun, Traffic
from vmbox.experiments.firewall.setup import State, carrier, firewall_spec
from vmbox.experiments.firewall.witness import binned, stall_over
from vmbox.lab import LabPlan
from vmbox.labtraffic import GRACE
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import running_service

REPLICAS = 3
LEAD = 1.0  # s of stream before its replica is looked for
BEFORE_KILL = 0.5  # s of the download flowing before the kill
AFTER_KILL = 3.0  # s of stream at least after the kill
SHOWN = (-1.0, 3.0)  # s around the kill in the picture and the timeline


@dataclass(frozen=True)
class Failover:
    run: SessionRun
    round: int
    killed: str  # the replica killed
    killed_at: float  # epoch
    rates: dict[str, float]  # each replica's passed packets/s just before: who carried it

    @property
    def stall(self) -> float:
        """The stream's longest time without data at the server from its last packet
        before the kill until its planned end."""
        return stall_over([s.at for s in self.run.data], self.killed_at, self.run.ends)

    def timeline(self) -> list[tuple[float, int]]:
        """Bytes of the stream at the server per 0.1 s, s from the kill."""
        return binned(self.run.data, self.killed_at, *SHOWN)


async def failover(
    store: EtcdStore,
    lab: LabPlan,
    state: State,
    seconds: int,
    round_: int = 1,
    grace: float = GRACE,
) -> Failover:
    """One kill of the stream's replica under `state`; the stream lasts `seconds`, its
    clients stopped `grace` s past that if they have not ended (sessions.Traffic)."""
    spec = firewall_spec(f"fwkill-{state}{round_}", lab, state, REPLICAS)
    async with running_service(store, spec) as svc:
        with Traffic(lab, seconds, grace) as traffic:
            started = traffic.start_stream()
            await asyncio.sleep(LEAD)
            rid, pid, rates = await carrier(svc)
            latest = started + seconds - AFTER_KILL - BEFORE_KILL
            on_killed = await traffic.download_on(svc, rid, latest)
            await asyncio.sleep(BEFORE_KILL)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)  # a replica this run's runtime started
            run = await traffic.results("failover", state, on_killed)
    return Failover(run, round_, rid, killed_at, rates)
