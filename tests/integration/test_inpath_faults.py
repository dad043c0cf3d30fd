"""kill -9 of the replica carrying an iperf3 TCP stream, under each fail policy.

With `fail: open` the steering has --queue-bypass: the moment nobody listens on
the queue the kernel passes its packets, so the stream never stops. With
`fail: closed` the kernel drops them until the controller has restarted the
replica (same id, same queue), and TCP's retransmission carries the same
connection on afterwards. The gap is read from iperf3's own 100 ms intervals.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import running_service
from tests.integration.labs import lab_running
from vmbox.etcdserver import EtcdServer
from vmbox.lab import LabPlan, exec_argv
from vmbox.testbed import inpath_spec

INTERVAL = 0.1  # iperf3's report interval, seconds
SECONDS = 7
KILL_AT = 2.0


@pytest.fixture(scope="module")
def lab() -> Iterator[LabPlan]:
    with lab_running() as plan:
        yield plan


def longest_gap(report: dict[str, Any]) -> tuple[float, float]:
    """(longest run of intervals with nothing received, seconds), (bytes after it)."""
    intervals = [i["sum"] for i in report["intervals"]]
    longest = run = 0.0
    after = 0.0
    for item in intervals:
        if item["bytes"] == 0:
            run += item["seconds"]
            after = 0.0
        else:
            longest, run = max(longest, run), 0.0
            after += item["bytes"]
    return max(longest, run), after


async def stream_through_a_kill(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path, fail: str
) -> dict[str, Any]:
    spec = inpath_spec(f"kill{fail}", lab, 1, fail=fail, limit=10**9)
    server_ip = lab.describe()["server"]["address"]
    async with running_service(etcd.endpoints, spec, tmp_path) as svc:
        server = subprocess.Popen(  # noqa: ASYNC220 - a server for the block's length
            exec_argv("server", ["iperf3", "-s", "-1", "-p", "5301"], lab.prefix),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(0.5)
            client = await asyncio.create_subprocess_exec(
                *exec_argv(
                    "client",
                    [
                        "iperf3",
                        "-c",
                        server_ip,
                        "-p",
                        "5301",
                        "-t",
                        str(SECONDS),
                        "-b",
                        "50M",
                        "-i",
                        str(INTERVAL),
                        "-J",
                    ],
                    lab.prefix,
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(KILL_AT)
            (pid,) = [state.pid for state in svc.runtime.running().values()]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            out, _ = await asyncio.wait_for(client.communicate(), SECONDS + 30)
            report: dict[str, Any] = json.loads(out)
            report["vmbox_restarts"] = svc.controller.restarts
            return report
        finally:
            server.kill()
            server.wait(timeout=5)


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_a_killed_replica_under_a_tcp_stream(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path, fail: str
) -> None:
    report = asyncio.run(stream_through_a_kill(etcd, lab, tmp_path, fail))
    assert "error" not in report, report.get("error")
    gap, after = longest_gap(report)
    streams = report["start"]["connected"]
    print(
        f"fail: {fail}: longest gap {gap:.1f} s, {after / 1e6:.1f} MB after it, "
        f"{len(streams)} connection(s), restarts {report['vmbox_restarts']}"
    )
    assert report["vmbox_restarts"] == 1
    assert len(streams) == 1  # the same connection throughout: no reconnect
    if fail == "open":
        assert gap == 0, f"the stream stopped for {gap:.1f} s under fail: open"
    else:
        assert gap > 0, "under fail: closed the queue's packets must be dropped while it is gone"
        assert gap < 5.0
        assert after > 0, "the stream did not recover after the restart"
