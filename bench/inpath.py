"""The in-path rows of `make bench`: a lab, the nfqueue driver, clients written in C.

One lab of namespaces (vmbox.lab, a prefix of its own, always removed), an
iperf3 server in its server namespace, and each figure measured twice in the
same run: with no queue rule (the lab forwarding alone) and through a
one-replica `dataplane: nfqueue` ratelimit service whose limit does not bind
(a real replica process on the bench's private etcd):

- packets/s: `iperf3 -u -l 64 -b 0` (64-byte UDP payloads, as fast as its C
  loop sends) for SECONDS; offered is what iperf3 sent per second, passed
  what its server received (sent minus lost). One replica, so passed/s is
  the driver's packets/s per replica.
- latency: `ping -i 0.002 -c PINGS` round trips, p50 and p99.

Without root (a lab needs it) `why_not()` says why and the bench skips these rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmbox.lab import LabPlan, down, exec_argv, up
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import inpath_spec, running_service

SECONDS = 3
PINGS = 1000
_RTT = re.compile(r"time=([\d.]+) ms")


@dataclass
class InpathFigures:
    offered: float  # packets/s iperf3 sent
    passed: float  # packets/s its server received
    p50_ms: float
    p99_ms: float


def why_not() -> str | None:
    """Why the in-path rows cannot run here, or None."""
    if os.geteuid() != 0:
        return "the in-path rows need root (a lab of network namespaces)"
    for tool in ("ip", "iperf3", "ping", "iptables"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode:
            return f"the in-path rows need `{tool}` (make setup installs it)"
    return None


def _udp_blast(plan: LabPlan, server: str) -> tuple[float, float]:
    argv = ["iperf3", "-c", server, "-u", "-l", "64", "-b", "0", "-t", str(SECONDS), "--json"]
    done = subprocess.run(
        exec_argv("client", argv, plan.prefix),
        capture_output=True,
        text=True,
        timeout=SECONDS + 30,
        check=False,
    )
    total = json.loads(done.stdout)["end"]["sum"]
    seconds = float(total["seconds"])
    sent, lost = int(total["packets"]), int(total["lost_packets"])
    return sent / seconds, (sent - lost) / seconds


def _pings(plan: LabPlan, server: str) -> tuple[float, float]:
    argv = ["ping", "-n", "-i", "0.002", "-c", str(PINGS), "-W", "1", server]
    done = subprocess.run(
        exec_argv("client", argv, plan.prefix),
        capture_output=True,
        text=True,
        timeout=PINGS * 0.002 + 30,
        check=False,
    )
    rtts = sorted(float(m) for m in _RTT.findall(done.stdout))
    if len(rtts) < PINGS // 2:
        raise RuntimeError(f"ping: {len(rtts)} of {PINGS} answered: {done.stderr[-200:]}")
    cuts = statistics.quantiles(rtts, n=100)
    return cuts[49], cuts[98]


def _measure(plan: LabPlan, server: str) -> InpathFigures:
    subprocess.run(
        exec_argv("client", ["ping", "-c", "3", "-i", "0.2", server], plan.prefix),
        capture_output=True,
        timeout=10,
        check=False,
    )  # warm up ARP/ND
    offered, passed = _udp_blast(plan, server)
    p50, p99 = _pings(plan, server)
    return InpathFigures(offered, passed, p50, p99)


async def measure(store: EtcdStore, log_dir: Path) -> dict[str, InpathFigures]:
    """`no queue rule` and `nfqueue` figures, in one lab made and removed here."""
    plan = LabPlan(f"vb{os.getpid()}", 1)
    server_proc = None
    try:
        await asyncio.to_thread(up, plan, replace=True)
        server = str(plan.describe()["server"]["address"])
        server_proc = subprocess.Popen(  # noqa: ASYNC220 - the iperf3 server for the block
            exec_argv("server", ["iperf3", "-s"], plan.prefix),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)
        results = {"no queue rule": await asyncio.to_thread(_measure, plan, server)}
        # split: even: the driver's cost, without demand's reports (the default's).
        spec = inpath_spec("bench-inpath", plan, 1, limit=1_000_000_000, split="even")
        async with running_service(store, spec, log_dir=log_dir):
            await asyncio.sleep(1.0)  # past the replica's first window, which admits nothing
            results["nfqueue"] = await asyncio.to_thread(_measure, plan, server)
        return results
    finally:
        if server_proc is not None:
            server_proc.kill()
            server_proc.wait()
        await asyncio.to_thread(down, plan.prefix)
