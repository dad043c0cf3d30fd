"""A new `limit` written with etcdctl reaches replicas as their consistency mode promises."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer
from vmbox.metrics import scrape
from vmbox.state import keys
from vmbox.testbed import Service


def etcdctl_put(endpoint: str, key: str, value: str) -> None:
    subprocess.run(
        ["etcdctl", "--endpoints", endpoint, "put", key, value],
        check=True,
        capture_output=True,
        timeout=10,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )


async def limit_seen_after(svc: Service, endpoint: str, value: int, timeout: float) -> float:
    """Seconds from etcdctl's return to the replica reporting the new limit."""
    metrics = str(next(iter((await svc.members()).values())).info["metrics"])
    await asyncio.to_thread(
        etcdctl_put, endpoint, keys.state_key(svc.spec.service, "limit"), str(value)
    )
    written = time.monotonic()
    while time.monotonic() - written < timeout:
        if (await scrape(metrics)).get("vmbox_limit") == value:
            return time.monotonic() - written
        await asyncio.sleep(0.002)
    return float("inf")


@pytest.mark.parametrize(("mode", "bound"), [("watch", 0.2), ("poll", 0.1 + 0.15)])
def test_new_limit_reaches_watch_and_poll_replicas(
    etcd: EtcdServer, tmp_path: Path, mode: str, bound: float
) -> None:
    async def scenario() -> list[float]:
        spec = make_spec(f"prop-{mode}", 1, consistency=mode, poll_interval="100ms")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(0.3)
            return [await limit_seen_after(svc, etcd.endpoint, v, 2.0) for v in (50, 70, 90)]

    delays = asyncio.run(scenario())
    print(f"{mode}: new limit seen after {[round(d * 1000, 1) for d in delays]} ms")
    assert max(delays) < bound, delays


def test_local_replicas_ignore_the_store(etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> float:
        spec = make_spec("prop-local", 1, consistency="local")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            return await limit_seen_after(svc, etcd.endpoint, 50, 1.0)

    assert asyncio.run(scenario()) == float("inf")


def test_strong_replicas_use_the_new_limit_on_the_next_packet(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async def scenario() -> int:
        spec = make_spec("prop-strong", 1, consistency="strong")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(0.3)
            while time.time() % 1.0 > 0.3:  # keep the burst inside one window
                await asyncio.sleep(0.01)
            await asyncio.to_thread(
                etcdctl_put, etcd.endpoint, keys.state_key(spec.service, "limit"), "5"
            )
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.77", 0))  # a source the replica has not seen
            sock.setblocking(False)
            for i in range(20):
                sock.sendto(b"p%d" % i, spec.relay.listen)
            await asyncio.sleep(0.4)
            sock.close()
            return svc.echo.total

    assert asyncio.run(scenario()) == 5
