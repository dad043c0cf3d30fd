"""Part 3 of the firewall experiment: what passes and what does not, on every replica count.

Called by run.py. One `state: shared` service scaled up through the counts
(Service.scale, then the testbed's readiness rule); on each count: a
connection the server side opens (no `allow` entry lets it: dropped as
not_allowed, vmbox.labtraffic.server_opens), a one-second iperf3 stream from
the client side (allowed: its replies must pass too, so it completes), and an
ACK scan (hping3 -A to ports nobody uses: packets of connections that never
existed, so none may reach the server; each is a miss the replica may read
etcd for, within its fetch budget). The firewall's counters, summed over the
replicas, are read before and after the three.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmbox.experiments.firewall.setup import firewall_counters, firewall_spec, minus
from vmbox.lab import LabPlan
from vmbox.labtraffic import (
    OpenResult,
    ScanResult,
    StreamResult,
    ack_scan,
    server_opens,
    tcp_stream,
)
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import READY_TIMEOUT, running_service

OPEN_TIMEOUT = 1.5  # s the server side's curl waits for its connection
STREAM_SECONDS = 1
SCAN_RATE = 1000.0  # ACKs/s


@dataclass(frozen=True)
class PolicyCheck:
    replicas: int
    opened: OpenResult  # the server side's connection
    stream: StreamResult  # the client side's
    scan: ScanResult
    counters: dict[str, float]  # the firewall's counters over the three, summed

    @property
    def held(self) -> bool:
        return not self.opened.connected and self.stream.completed and self.scan.reached == 0


async def policy(
    store: EtcdStore,
    lab: LabPlan,
    counts: Sequence[int],
    scan_count: int,
    advance: Callable[[], None] = lambda: None,
) -> list[PolicyCheck]:
    """The three checks on each of `counts` replicas (rising), one service throughout."""
    spec = firewall_spec("fwpolicy", lab, "shared", counts[0])
    out = []
    async with running_service(store, spec) as svc:
        for count in counts:
            await svc.scale(count)
            await svc.wait_ready(count, timeout=READY_TIMEOUT)
            before = firewall_counters(await svc.gauges())
            opened = await asyncio.to_thread(server_opens, lab, timeout=OPEN_TIMEOUT)
            stream = await asyncio.to_thread(tcp_stream, lab, STREAM_SECONDS)
            scan = await asyncio.to_thread(ack_scan, lab, scan_count, rate=SCAN_RATE)
            after = firewall_counters(await svc.gauges())
            out.append(PolicyCheck(count, opened, stream, scan, minus(after, before)))
            advance()
    return out
