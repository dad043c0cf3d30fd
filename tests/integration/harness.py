"""A whole service on loopback for integration tests: real etcd, real processes, real sockets.

`running_service` starts an echo server (the protected service), writes a spec
to the test's etcd, runs the controller with the local runtime, and waits until
the requested replicas are registered. Everything it starts it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbox.control.controller import Controller
from vmbox.demo import free_udp_port
from vmbox.metrics import scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec, parse_spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import MemberInfo, list_members
from vmbox.tools.echo import EchoServer


@dataclass
class Service:
    spec: Spec
    store: EtcdStore
    controller: Controller
    runtime: LocalRuntime
    echo: EchoServer

    async def members(self) -> dict[str, MemberInfo]:
        return await list_members(self.store, self.spec.service)

    async def wait_members(
        self, count: int, timeout: float = 20.0, exclude_pids: set[int] | None = None
    ) -> dict[str, MemberInfo]:
        deadline = time.monotonic() + timeout
        while True:
            members = await self.members()
            pids = {m.info.get("pid") for m in members.values()}
            if len(members) == count and not (exclude_pids and pids & exclude_pids):
                return members
            if time.monotonic() > deadline:
                raise TimeoutError(f"wanted {count} members, have {sorted(members)}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, count: int, timeout: float = 20.0) -> None:
        """Until `count` replicas report vmbox_ready (registered, holding their share)."""
        deadline = time.monotonic() + timeout
        while True:
            gauges = await self.gauges()
            if sum(g.get("vmbox_ready", 0.0) == 1.0 for g in gauges.values()) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"wanted {count} ready replicas, have {sorted(gauges)}")
            await asyncio.sleep(0.05)

    async def gauges(self) -> dict[str, dict[str, float]]:
        """Each live replica's metrics, scraped now."""
        out = {}
        for rid, member in (await self.members()).items():
            with contextlib.suppress(Exception):
                out[rid] = await scrape(str(member.info["metrics"]))
        return out

    async def scale(self, count: int) -> None:
        await self.store.put(keys.desired_key(self.spec.service), str(count).encode())


def make_spec(
    service: str = "web", replicas: int = 1, *, memory_limit: str | None = None, **middlebox: Any
) -> Spec:
    limit = {"memory_limit": memory_limit} if memory_limit else {}
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"function": "ratelimit", "limit": 100} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": 4} | limit,
            "lease_ttl": 2,
        }
    )


@asynccontextmanager
async def running_service(
    endpoints: list[str], spec: Spec, log_dir: Path, wait: bool = True
) -> AsyncIterator[Service]:
    store = await connect(endpoints)
    echo = EchoServer(spec.upstream)
    await echo.start()
    runtime = LocalRuntime(
        spec.service, endpoints, log_dir, memory_limit=spec.replicas.memory_limit
    )
    controller = Controller(spec, store, runtime, tick=0.2)
    service = Service(spec, store, controller, runtime, echo)
    task: asyncio.Task[None] | None = None
    try:
        await controller.setup()
        task = asyncio.create_task(controller.run())
        if wait:
            await service.wait_members(spec.replicas.count)
            await service.wait_ready(spec.replicas.count)
        yield service
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await controller.shutdown()
        await echo.close()
        await store.delete_prefix(keys.service_prefix(spec.service))
        await store.close()


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file an experiment wrote, as dicts by column."""
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@dataclass
class ExperimentRun:
    """One `vmbox experiment ...` run in a subprocess: where it wrote, what it printed."""

    out: Path
    result: subprocess.CompletedProcess[str]


def run_experiment(out: Path, *args: str, timeout: float) -> ExperimentRun:
    """Run `vmbox experiment ARGS --out OUT` as an operator would, bounded in time."""
    result = subprocess.run(
        [sys.executable, "-m", "vmbox", "experiment", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return ExperimentRun(out, result)
