"""`vmbox demo`: the main job, the reference experiment end to end in one command.

A private etcd, an echo server as the protected service, a ratelimit service at
100 packets/s in front of it, and one client ramping from 10 to 300 packets/s
over 32 flows. The service is scaled 1 -> 2 -> 4 replicas during the run; the
live view shows the server's received rate staying near the limit, and a
summary table closes the run. Called by the CLI; everything it starts it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmbox.control.controller import Controller
from vmbox.etcdserver import EtcdServer
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import MiddleboxSpec, ReplicasSpec, Spec
from vmbox.state import keys
from vmbox.state.etcd import connect
from vmbox.state.membership import list_members
from vmbox.state.store import Store
from vmbox.tools.echo import EchoServer
from vmbox.tools.load import LoadPlan, run_load

LIMIT = 100
TRANSITION = 2  # seconds after a resize left out of the plateau figures


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A free UDP port below the kernel's ephemeral range (32768 up).

    A port the kernel handed out for port 0 can be handed out again, to one of
    the thousands of sockets a load generator or a replica's flows bind,
    between this pick and the service's bind; below the range it cannot.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20_000, 32_768)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Second:
    t: int
    offered: float
    received: int
    replicas: int


@dataclass
class DemoRun:
    seconds: list[Second] = field(default_factory=list)
    resized_at: dict[int, int] = field(default_factory=dict)  # second -> new replica count


async def wait_members(store: Store, service: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await list_members(store, service)) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service} did not reach {count} live replicas in {timeout:.0f}s")
        await asyncio.sleep(0.1)


def demo_spec(listen: int, upstream: int) -> Spec:
    return Spec(
        service="demo",
        listen=("127.0.0.1", listen),
        upstream=("127.0.0.1", upstream),
        middlebox=MiddleboxSpec(limit=LIMIT, consistency="watch"),
        replicas=ReplicasSpec(count=1, min=1, max=4),
    )


def live_table(run: DemoRun, total: float) -> Table:
    table = Table(
        title=f"vmbox demo: ratelimit {LIMIT} packets/s, client ramping 10 -> 300 "
        f"(run of {total:.0f}s)",
        title_justify="left",
    )
    for name in ("t (s)", "offered/s", "server received/s", "replicas", ""):
        table.add_column(name, justify="right" if name else "left")
    for s in run.seconds[-15:]:
        bar = "#" * int(min(s.received, 3 * LIMIT) / 10)
        marker = f"  <- scaled to {run.resized_at[s.t]}" if s.t in run.resized_at else ""
        table.add_row(str(s.t), f"{s.offered:.0f}", str(s.received), str(s.replicas), bar + marker)
    return table


def summary(run: DemoRun) -> Table:
    table = Table(
        title="summary: server received rate on the plateau (offered >= 150/s)",
        title_justify="left",
    )
    for name in (
        "replicas",
        "seconds",
        "mean offered/s",
        "mean received/s",
        "min",
        "max",
        "mean error",
        "within ±5%",
    ):
        table.add_column(name, justify="right")
    changes = sorted(run.resized_at)
    for count in sorted({s.replicas for s in run.seconds}):
        rows = [
            s
            for s in run.seconds
            if s.replicas == count
            and s.offered >= 1.5 * LIMIT
            and not any(0 <= s.t - c < TRANSITION for c in changes)
        ]
        if not rows:
            continue
        received = [s.received for s in rows]
        mean = statistics.fmean(received)
        table.add_row(
            str(count),
            str(len(rows)),
            f"{statistics.fmean(s.offered for s in rows):.0f}",
            f"{mean:.1f}",
            str(min(received)),
            str(max(received)),
            f"{abs(mean - LIMIT) / LIMIT:.1%}",
            "yes" if abs(mean - LIMIT) <= 0.05 * LIMIT else "no",
        )
    return table


async def run_demo(duration: float = 90.0, console: Console | None = None) -> DemoRun:
    """Run the demo for about `duration` seconds in all; returns what was measured."""
    console = console or Console()
    started = time.monotonic()
    spec = demo_spec(free_udp_port(), free_udp_port())
    server = EtcdServer()
    await asyncio.to_thread(server.start)
    try:
        store = await connect(server.endpoints)
        echo = EchoServer(spec.upstream)
        await echo.start()
        log_dir = Path(tempfile.mkdtemp(prefix="vmbox-demo-"))
        controller = Controller(
            spec,
            store,
            LocalRuntime(spec.service, server.endpoints, log_dir, adoptable=False),
            tick=0.5,
        )
        try:
            await controller.setup()
            reconcile = asyncio.create_task(controller.run())
            try:
                await wait_members(store, spec.service, 1)
                load_for = max(10.0, duration - (time.monotonic() - started) - 3.0)
                run = await _drive(store, spec, echo, load_for, console)
            finally:
                reconcile.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reconcile
        finally:
            await controller.shutdown()
            await echo.close()
            await store.close()
    finally:
        await asyncio.to_thread(server.stop)
    # The replica logs are kept only when the demo failed, to explain why.
    shutil.rmtree(log_dir, ignore_errors=True)
    return run


async def _record_seconds(
    run: DemoRun, store: Store, spec: Spec, echo: EchoServer, start: float, step: float
) -> None:
    """Append every wall-clock second that is over (plus a margin for the echo to count it)."""
    second = int(start) + 1 + len(run.seconds)  # the first whole second of the run, onwards
    counts = dict(echo.history)
    while second + 1.2 <= time.time():
        members = len(await list_members(store, spec.service))
        offered = min(300.0, 10.0 + step * (second + 0.5 - start))
        received = counts.get(second, 0)
        run.seconds.append(Second(second - int(start), offered, received, members))
        second += 1


async def _drive(
    store: Store, spec: Spec, echo: EchoServer, load_for: float, console: Console
) -> DemoRun:
    run = DemoRun()
    step = 290.0 / max(1.0, load_for / 4)  # reach 300/s a quarter of the way in
    plan = LoadPlan(
        target=spec.listen,
        rate=None,
        ramp=(10.0, 300.0, step),
        sources=1,
        flows=32,
        duration=load_for,
    )
    schedule = [(load_for / 3, 2), (2 * load_for / 3, 4)]
    start = time.time()
    load = asyncio.create_task(run_load(plan))
    try:
        with Live(live_table(run, load_for), console=console, refresh_per_second=2) as live:
            while not load.done():
                await _record_seconds(run, store, spec, echo, start, step)
                now = time.time()
                while schedule and now - start >= schedule[0][0]:
                    _, count = schedule.pop(0)
                    await store.put(keys.desired_key(spec.service), str(count).encode())
                    run.resized_at[int(now) - int(start)] = count
                live.update(live_table(run, load_for))
                await asyncio.sleep(0.2)
            await load
    finally:
        load.cancel()  # on an error or Ctrl-C the load stops with the demo
    console.print(summary(run))
    return run
