"""The kernel fault: kill -9 of a node's replica under load; the node's table goes on enforcing.

Registered in vmbox.faults; needs root (a fleet of network namespaces,
nftables). A 2-node fleet and a `enforce: kernel` service with one replica per
node, limit 100 per source; one source sends 300 packets/s, a new flow per
packet, which the router spreads over both nodes. Replica 2 is killed with
SIGKILL under it (once at small scale, twice at full) and the controller
restarts it under the same id, which installs its table anew.

What must hold, counted at the server by tcpdump in every whole second of the
load: never more than the limit plus the buckets' bursts (a node whose replica
is dead keeps its table at its last share, which the other node's share still
counts: DESIGN.md "Kernel enforcement"), and no second below 90% of the
limit (the kernel needs no process to pass what the share allows: no gap).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from vmbox import labload
from vmbox.enforce.rates import FIXED_WINDOW_BURST, MIN_PACKETS_BURST
from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.service import fault_service
from vmbox.faults.snapshot import read_state
from vmbox.lab import LabPlan
from vmbox.lab import down as lab_down
from vmbox.lab import up as lab_up
from vmbox.labclients import ServerCount
from vmbox.spec import Spec
from vmbox.testbed import kernel_spec
from vmbox.tools.capture import full_seconds, per_second

LIMIT = 100
OFFERED = 3 * LIMIT
# What full buckets add in a second: each table starts every source with a full bucket
# (5% of its share, at least MIN_PACKETS_BURST; vmbox.enforce.rates) when installed anew.
SLACK = 2 * max(MIN_PACKETS_BURST, int(LIMIT / 2 * FIXED_WINDOW_BURST))
PLANS = {"small": (6.0, (2.0,)), "full": (12.0, (2.0, 7.0))}  # load seconds, kill times


async def kernel_kill(scale: Scale, say: Say) -> FaultResult:
    """kill -9 of a kernel-enforcing replica under 3x load: the limit holds, no gap."""
    if os.geteuid() != 0:
        raise PermissionError("the kernel fault needs root (network namespaces, nftables)")
    seconds, kills = PLANS[scale]
    result = FaultResult("kernel kill")
    lab = LabPlan(f"vk{os.getpid()}", 1, 2)
    await asyncio.to_thread(lab_up, lab, True)
    try:

        def spec() -> Spec:
            return kernel_spec("kernel-kill", lab, 2, limit=LIMIT)

        source = lab.client_addresses[0]
        async with fault_service(spec) as service:
            before = await read_state(service.store, service.spec.service)
            await asyncio.sleep(1.0)  # both tables at the settled share
            with ServerCount(lab, [source]) as count:
                sending = asyncio.create_task(
                    asyncio.to_thread(labload.hping3_paced, lab, [source], OFFERED, seconds)
                )
                started = time.time()
                for at in kills:
                    await asyncio.sleep(max(0.0, started + at - time.time()))
                    victim = service.runtime.running().get("kernel-kill-2")
                    if victim is not None and victim.pid:
                        os.kill(victim.pid, signal.SIGKILL)
                        result.injected += 1
                        say(f"kernel kill: kill -9 kernel-kill-2 (pid {victim.pid}) at {at:.0f} s")
                sent = await sending
                ended = started + seconds
                await asyncio.sleep(0.3)
            await service.wait_ready(2, timeout=20.0)  # the controller brought it back
            restarts = service.controller.restarts
            after = await read_state(service.store, service.spec.service)
    finally:
        await asyncio.to_thread(lab_down, lab.prefix)
    got = full_seconds(per_second(count.packets, source), started, ended)
    top, low = max(got, default=0), min(got, default=0)
    result.over_limit = sum(max(0, n - LIMIT - SLACK) for n in got)
    result.figures.update(sent=float(sum(s.packets for s in sent)), top=float(top), low=float(low))
    result.notes.append(
        f"{OFFERED}/s from one source over 2 nodes, limit {LIMIT}: per second at the server "
        f"{got}; {result.injected} kill(s), {restarts} restart(s)"
    )
    result.check(result.injected == len(kills), "the replica to kill was not running")
    result.check(
        restarts >= result.injected, f"{restarts} restart(s) for {result.injected} kill(s)"
    )
    result.check(len(got) >= seconds - 2, f"only {len(got)} whole seconds counted")
    result.check(low >= 0.9 * LIMIT, f"a second with {low} < 90% of the limit: a gap")
    result.survived = low >= 0.9 * LIMIT
    if before != after:
        result.state_lost = "the service's etcd state changed"
    return result
