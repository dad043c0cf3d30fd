"""`vmbox demo`: the main job, the reference experiment end to end in one command.

A private etcd, an echo server as the protected service, a ratelimit service at
100 packets/s in front of it, and one client ramping from 10 to 300 packets/s
over 32 flows. The service is scaled 1 -> 2 -> 4 replicas during the run; the
live view shows the server's received rate staying near the limit, and a
summary table closes the run. Called by the CLI; everything it starts it stops.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmbox.spec import MiddleboxSpec, ReplicasSpec, Spec
from vmbox.state import keys
from vmbox.state.membership import list_members
from vmbox.state.store import Store
from vmbox.testbed import free_udp_port, private_store, running_service
from vmbox.tools.echo import EchoServer
from vmbox.tools.load import LoadPlan, run_load

LIMIT = 100
TRANSITION = 2  # seconds after a resize left out of the plateau figures


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

    def make_spec() -> Spec:
        return demo_spec(free_udp_port(), free_udp_port())

    # The replica logs are kept only when the demo failed, to explain why.
    async with (
        private_store() as store,
        running_service(store, make_spec, tick=0.5, metrics_port=0) as service,
    ):
        load_for = max(10.0, duration - (time.monotonic() - started) - 3.0)
        return await _drive(store, service.spec, service.echo, load_for, console)


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
        target=spec.relay.listen,
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
