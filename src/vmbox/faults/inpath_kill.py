"""The in-path fault: kill -9 of the replica carrying an iperf3 TCP stream, per fail policy.

Registered in vmbox.faults; needs root (a lab of network namespaces, netfilter
queues). For `fail: open` and then `fail: closed`, a lab and a one-replica
in-path service whose limit does not bind carry one iperf3 TCP stream from the
client to the server namespace; the replica is killed with SIGKILL under it
(once at small scale, three times at full), and the controller restarts it
under the same id, which binds the same queue. From iperf3's own 100 ms
intervals: the longest run with nothing received (the gap), whether the
stream carried on afterwards, and that it stayed one connection. Under `open`
the steering's --queue-bypass passes the packets while nobody listens, so the
stream must not stop (no empty interval); under `closed` the kernel drops them
until the restart, so there must be a gap, bounded, and the same connection
must carry on after it.

What `open` cannot save: the packets already queued to the killed replica
(read or not) are dropped by the kernel when its socket closes, and so are
those that arrive while the dying process is torn down; TCP retransmits them.
A quiet machine shows no empty interval at all; a full test run beside it
showed one gap of 0.2 s (one retransmission timeout). So `open` must stay
within OPEN_GAP_BOUND and below the `closed` gap, which also waits for the
restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from typing import Any

from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.service import fault_service
from vmbox.faults.snapshot import read_state
from vmbox.lab import LabPlan, exec_argv
from vmbox.lab import down as lab_down
from vmbox.lab import up as lab_up
from vmbox.spec import Spec
from vmbox.testbed import inpath_spec

INTERVAL = 0.1  # iperf3's report interval, seconds
PORT = 5301
RATE = "50M"  # the stream's pace: enough packets for a gap to show, little CPU
CLOSED_GAP_BOUND = 5.0  # seconds: a restart (backoff 0.2 s, start, bind) fits well inside
OPEN_GAP_BOUND = 0.5  # seconds: the dying process's teardown and one TCP retransmission
PLANS = {"small": (7, (2.0,)), "full": (14, (2.0, 6.0, 10.0))}  # stream seconds, kill times


def longest_gap(intervals: list[dict[str, Any]]) -> tuple[float, float]:
    """(longest run of intervals with nothing received, in seconds; bytes after the last run)."""
    longest = run = after = 0.0
    for item in intervals:
        if item["bytes"] == 0:
            run += item["seconds"]
            after = 0.0
        else:
            longest, run = max(longest, run), 0.0
            after += item["bytes"]
    return max(longest, run), after


async def _stream_through_kills(lab: LabPlan, fail: str, scale: Scale, say: Say) -> dict[str, Any]:
    seconds, kills = PLANS[scale]

    def spec() -> Spec:
        return inpath_spec(f"inpath-kill-{fail}", lab, 1, fail=fail, limit=10**9)

    server_ip = lab.describe()["server"]["address"]
    async with fault_service(spec) as service:
        before = await read_state(service.store, service.spec.service)
        # subprocess.Popen in a thread, not the loop's subprocess support: uvloop runs
        # Python's at-fork hooks in the child, which crashed beside gRPC's threads (a
        # segfault seen in a full test run), as faults/flood.py found for its senders.
        server = await asyncio.to_thread(
            subprocess.Popen,
            exec_argv("server", ["iperf3", "-s", "-1", "-p", str(PORT)], lab.prefix),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(0.5)
            argv = ["iperf3", "-c", server_ip, "-p", str(PORT), "-t", str(seconds), "-b", RATE]
            client = await asyncio.to_thread(
                subprocess.Popen,
                exec_argv("client", [*argv, "-i", str(INTERVAL), "-J"], lab.prefix),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            started = asyncio.get_running_loop().time()
            for at in kills:
                await asyncio.sleep(max(0.0, started + at - asyncio.get_running_loop().time()))
                pids = [s.pid for s in service.runtime.running().values() if s.pid]
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                say(f"in-path kill, fail: {fail}: kill -9 pid {pids} at {at:.0f} s")
            try:
                out, _ = await asyncio.to_thread(client.communicate, timeout=seconds + 30)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
        report: dict[str, Any] = json.loads(out or b"{}")
        report["vmbox_restarts"] = service.controller.restarts
        report["vmbox_kills"] = len(kills)
        after_state = await read_state(service.store, service.spec.service)
        report["vmbox_state_same"] = before == after_state
    return report


def _judge(result: FaultResult, fail: str, report: dict[str, Any]) -> None:
    if "error" in report or "intervals" not in report:
        result.check(False, f"fail: {fail}: iperf3 failed: {report.get('error', 'no report')}")
        return
    gap, after = longest_gap([i["sum"] for i in report["intervals"]])
    connections = len(report["start"]["connected"])
    kills = int(report["vmbox_kills"])
    result.injected += kills
    result.figures[f"gap_{fail}"] = gap
    result.figures[f"after_{fail}"] = after
    result.figures[f"restarts_{fail}"] = report["vmbox_restarts"]
    result.notes.append(
        f"fail: {fail}: {kills} kill(s), longest gap {gap:.1f} s, {after / 1e6:.1f} MB after it, "
        f"{connections} connection(s), {report['vmbox_restarts']} restart(s)"
    )
    result.check(report["vmbox_restarts"] == kills, f"fail: {fail}: restarts != kills")
    result.check(connections == 1, f"fail: {fail}: the stream was not one connection")
    result.check(after > 0, f"fail: {fail}: the stream did not carry on after the last kill")
    if fail == "open":
        result.check(gap <= OPEN_GAP_BOUND, f"fail: open: the stream stopped for {gap:.1f} s")
    else:
        result.check(gap > 0, "fail: closed: no gap, so packets passed with nobody deciding")
        result.check(gap < CLOSED_GAP_BOUND, f"fail: closed: a gap of {gap:.1f} s")
        opened = result.figures.get("gap_open", 0.0)
        result.check(opened < gap, f"fail: open stopped {opened:.1f} s, closed only {gap:.1f} s")
    if not report["vmbox_state_same"]:
        result.state_lost = f"fail: {fail}: the service's etcd state changed"


async def inpath_kill(scale: Scale, say: Say) -> FaultResult:
    """kill -9 of an in-path replica under an iperf3 TCP stream, fail: open, then closed."""
    if os.geteuid() != 0:
        raise PermissionError("the in-path fault needs root (network namespaces, netfilter queues)")
    result = FaultResult("in-path kill")
    lab = LabPlan(f"vf{os.getpid()}", 1)
    await asyncio.to_thread(lab_up, lab, True)
    try:
        for fail in ("open", "closed"):
            _judge(result, fail, await _stream_through_kills(lab, fail, scale, say))
    finally:
        await asyncio.to_thread(lab_down, lab.prefix)
    result.survived = result.figures.get("after_open", 0) > 0 and (
        result.figures.get("after_closed", 0) > 0
    )
    return result
