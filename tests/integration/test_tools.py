"""The echo server, the load generator and the metrics endpoint over real loopback sockets."""

from __future__ import annotations

import asyncio
import csv
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from vmbox.dataplane.counters import Counters
from vmbox.dataplane.udp import AddressInUse, UdpRelay
from vmbox.metrics import ReplicaMetrics, ScrapeError, parse_metrics, scrape
from vmbox.packet import Packet, Verdict
from vmbox.tools.echo import EchoServer
from vmbox.tools.load import LoadPlan, SecondReport, run_load

LOOP = "127.0.0.1"


def run(coro: Coroutine[Any, Any, None], timeout: float = 15.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def test_load_through_a_relay_to_echo(tmp_path: Path) -> None:
    seen: set[tuple[str, int]] = set()

    def decide(packet: Packet, now: float) -> Verdict:
        seen.add((packet.src, packet.sport))
        return Verdict.PASS

    history: list[tuple[int, int]] = []

    async def main() -> None:
        echo = EchoServer((LOOP, 0), str(tmp_path / "echo.csv"))
        await echo.start()
        relay = UdpRelay((LOOP, 0), echo.local_address, decide)
        await relay.start()
        reports: list[SecondReport] = []
        plan = LoadPlan(relay.local_address, rate=200, sources=2, flows=4, duration=2.0)
        result = await run_load(plan, reports.append)
        await relay.close()
        await echo.close()

        assert result.sent == 400 and result.received >= 395
        assert [r.second for r in reports] == [0, 1] and all(r.sent == 200 for r in reports)
        assert result.seconds == reports and sum(r.received for r in reports) == result.received
        lat = result.latency
        assert lat is not None and 0 < lat.min_ms <= lat.p50_ms <= lat.p99_ms <= lat.max_ms
        assert lat.count == result.received and len(result.rtts_ms) == result.received
        assert {src for src, _ in seen} == {"127.0.0.2", "127.0.0.3"} and len(seen) == 4
        assert echo.total == relay.counters.passed == 400
        seconds = [s for s, _ in echo.history]
        assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))  # no gaps
        history.extend(echo.history)
        whole = echo.history[1:-1]  # the first and last seconds are partial
        if whole:
            mean = echo.rate_between(whole[0][0], whole[-1][0] + 1)
            assert mean == pytest.approx(sum(n for _, n in whole) / len(whole))

    run(main())
    with open(tmp_path / "echo.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["second", "received"]
    assert [(int(s), int(n)) for s, n in rows[1:]] == history


def test_ramp_follows_its_schedule() -> None:
    async def main() -> None:
        echo = EchoServer((LOOP, 0))
        await echo.start()
        plan = LoadPlan(echo.local_address, ramp=(50, 150, 50), flows=2, duration=3.0)
        result = await run_load(plan)
        await echo.close()
        assert [r.offered for r in result.seconds] == [50, 100, 150]
        assert [r.sent for r in result.seconds] == pytest.approx([50, 100, 150], abs=2)
        assert result.sent == 300 and result.received >= 295

    run(main())


def test_load_counts_errors_when_nothing_listens() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((LOOP, 0))
            gone = probe.getsockname()
        result = await run_load(LoadPlan(gone, rate=100, duration=0.3))
        assert result.sent == 30 and result.received == 0 and result.errors > 0
        assert result.latency is None

    run(main())


def test_metrics_are_served_and_parsed() -> None:
    counters = Counters(received=10, passed=7, dropped=3, bytes_received=1000, replies=6, flows=2)

    async def main() -> None:
        metrics = ReplicaMetrics("web", "r1", counters, lambda: {"share": 50.0, "members": 2})
        port = metrics.start(LOOP, 0)
        try:
            values = await scrape(f"{LOOP}:{port}")
            counters.received += 5
            later = await scrape(f"http://{LOOP}:{port}/metrics")
        finally:
            metrics.stop()
        assert values["vmbox_packets_received_total"] == 10
        assert values["vmbox_packets_passed_total"] == 7
        assert values["vmbox_packets_dropped_total"] == 3
        assert values["vmbox_bytes_received_total"] == 1000
        assert values["vmbox_replies_total"] == 6
        assert values["vmbox_upstream_errors_total"] == 0
        assert values["vmbox_flows"] == 2
        assert values["vmbox_share"] == 50 and values["vmbox_members"] == 2
        assert later["vmbox_packets_received_total"] == 15
        with pytest.raises(ScrapeError):
            await scrape(f"{LOOP}:{port}", timeout=0.5)  # stopped: refused, one line

    run(main())


def test_metrics_labels_and_busy_port() -> None:
    metrics = ReplicaMetrics("web", "r1", Counters(), dict)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOOP, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(AddressInUse, match="choose another `metrics port` port"):
            metrics.start(LOOP, port)
    text = 'vmbox_flows{service="web",replica="r1"} 2\nvmbox_flows{service="web",replica="r2"} 3\n'
    assert parse_metrics(text) == {"vmbox_flows": 5.0}
