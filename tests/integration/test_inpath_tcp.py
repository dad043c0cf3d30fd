"""TCP through the in-path firewall: GSO packets whole, at a useful share of the lab's speed.

A lab (tests/integration/labs.py), an iperf3 server in its server namespace
and iperf3 TCP from the client, with no queue rule and through a one-replica
`dataplane: nfqueue` service (real etcd, a real replica process). The queue
hands GSO super-packets over whole (NFQA_CFG_F_GSO, vmbox.dataplane.nfqueue),
so a verdict covers up to 64 KB; without it the kernel segments each in
software and queues every 1500-byte segment, and TCP ran at 1.3% of the lab.
What iperf3 measured is what counts (its server's receive side), not vmbox's
metrics; the replica's byte and packet counts only show that GSO packets came.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import running_service
from tests.integration.labs import lab_running
from vmbox.etcdserver import EtcdServer
from vmbox.lab import LabPlan, exec_argv
from vmbox.testbed import inpath_spec

SECONDS = 4
# The issue asks for half. Measured 0.63-0.79 of the lab in 5 runs (with GSO
# and batch verdicts); the per-segment path reached 0.013.
MIN_RATIO = 0.5
BYTES_LIMIT = 2_000_000  # bytes per second, for the `unit: bytes` rule
BYTES_SECONDS = 9


@pytest.fixture(scope="module")
def lab() -> Iterator[LabPlan]:
    with lab_running() as plan:
        yield plan


def iperf3(lab: LabPlan, seconds: int) -> dict[str, Any]:
    """iperf3 TCP from the client to the server (its server's own JSON included)."""
    server = str(lab.describe()["server"]["address"])
    argv = ["iperf3", "-c", server, "-t", str(seconds), "--json", "--get-server-output"]
    done = subprocess.run(
        exec_argv("client", argv, lab.prefix),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    assert "error" not in result, result.get("error")
    return result


def received_bps(result: dict[str, Any]) -> float:
    return float(result["end"]["sum_received"]["bits_per_second"])


def server_seconds(result: dict[str, Any]) -> list[float]:
    """Bytes per second the iperf3 server received, interval by interval."""
    intervals = result["server_output_json"]["intervals"]
    return [i["sum"]["bytes"] / i["sum"]["seconds"] for i in intervals if i["sum"]["seconds"] > 0.5]


@pytest.fixture(scope="module")
def iperf3_server(lab: LabPlan) -> Iterator[None]:
    server = subprocess.Popen(
        exec_argv("server", ["iperf3", "-s", "-J"], lab.prefix),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Listening once `ss` shows its port (a bounded wait).
        for _ in range(50):
            listening = subprocess.run(
                exec_argv("server", ["ss", "-Htln", "sport = :5201"], lab.prefix),
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if listening.stdout.strip():
                break
            time.sleep(0.1)
        yield
    finally:
        server.kill()
        server.wait()


def test_tcp_through_the_queue_keeps_a_share_of_the_lab(
    etcd: EtcdServer, lab: LabPlan, iperf3_server: None, tmp_path: Path
) -> None:
    """iperf3 TCP with no queue rule, then through a replica whose limit does not bind."""
    bare = received_bps(iperf3(lab, SECONDS))

    async def scenario() -> tuple[float, dict[str, float]]:
        spec = inpath_spec("tcpgso", lab, 1, limit=1_000_000_000)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            through = received_bps(await asyncio.to_thread(iperf3, lab, SECONDS))
            (metrics,) = (await svc.gauges()).values()
            return through, metrics

    through, metrics = asyncio.run(scenario())
    packets = metrics["vmbox_packets_received_total"]
    per_packet = metrics["vmbox_bytes_received_total"] / packets
    ratio = through / bare
    print(
        f"iperf3 TCP: no queue rule {bare / 1e9:.2f} Gbit/s, through the queue "
        f"{through / 1e9:.2f} Gbit/s, ratio {ratio:.2f}; {packets:.0f} verdicts "
        f"of {per_packet:.0f} bytes on average"
    )
    # GSO packets came whole: far more than an MTU per verdict.
    assert per_packet > 3 * 1500, per_packet
    assert ratio >= MIN_RATIO, (through, bare)


def test_a_bytes_rule_holds_tcp_goodput_to_its_limit(
    etcd: EtcdServer, lab: LabPlan, iperf3_server: None, tmp_path: Path
) -> None:
    """`unit: bytes` at B bytes/s: iperf3's goodput settles within 10% of B.

    With the token bucket, a policer TCP adapts to (0.96 of B measured). The
    fixed window admits B at each window's start and drops the rest: TCP
    backs off (its retransmission timer doubles) and misses part of the next
    window now and then, so its goodput settled near 0.83 of B.
    """
    rule = {"name": "all", "action": "ratelimit", "limit": BYTES_LIMIT, "unit": "bytes"}

    async def scenario() -> list[float]:
        spec = inpath_spec("tcpbytes", lab, 1, limit=None, rules=[rule], algorithm="token_bucket")
        async with running_service(etcd.endpoints, spec, tmp_path) as _svc:
            await asyncio.sleep(1.0)  # past the replica's first window, which admits nothing
            result = await asyncio.to_thread(iperf3, lab, BYTES_SECONDS)
            return server_seconds(result)

    seconds = asyncio.run(scenario())
    steady = seconds[2:]  # slow start and the first window's burst settle in two seconds
    mean = statistics.fmean(steady)
    print(
        f"unit: bytes, limit {BYTES_LIMIT:,} B/s: iperf3 server received/s "
        f"{[round(s) for s in seconds]}, steady mean {mean:,.0f} ({mean / BYTES_LIMIT:.3f} of B)"
    )
    assert len(steady) >= 5, seconds
    assert abs(mean - BYTES_LIMIT) <= 0.1 * BYTES_LIMIT, seconds
