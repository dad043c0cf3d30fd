"""A flood of new source addresses keeps a replica's memory bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import psutil

from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer

SOURCES = 100_000


def flood(target: tuple[str, int], count: int, rate: float = 20_000) -> None:
    """One datagram from each of `count` distinct 127.x.y.z source addresses.

    Paced at `rate` (still twice the table's bound per window) so what is
    measured is the replica's table, not the kernel dropping a burst.
    """
    start = time.monotonic()
    for i in range(count):
        if i % 500 == 0:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        src = f"127.{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255 or 1}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((src, 0))
            sock.sendto(b"x", target)


def test_100k_sources_keep_memory_bounded(etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int, dict[str, float]]:
        spec = make_spec("flood", 1, max_sources=10_000)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            member = next(iter((await svc.members()).values()))
            proc = psutil.Process(int(member.info["pid"]))
            before = proc.memory_info().rss
            await asyncio.to_thread(flood, spec.listen, SOURCES)
            await asyncio.sleep(1.0)
            after = proc.memory_info().rss
            gauges = next(iter((await svc.gauges()).values()))
            return before, after, gauges

    before, after, gauges = asyncio.run(scenario())
    print(
        f"replica RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB after "
        f"{SOURCES} sources; gauges {gauges}"
    )
    assert gauges["vmbox_packets_received_total"] >= 0.9 * SOURCES
    assert gauges["vmbox_overflowed_sources"] > 0
    assert gauges["vmbox_sources"] <= 10_001
    assert gauges["vmbox_flows"] <= 16_384
    assert after - before < 96 * 2**20
