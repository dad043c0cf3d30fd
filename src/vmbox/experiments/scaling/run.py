"""The scaling experiment's run: each phase a fresh service whose controller runs here.

Called through vmbox.experiments.scaling (the registry's entry). Records every
sample the autoscaler saw, every decision and each replica's first passed
packet into a PhaseRun (record.py), then hands the runs to summary.py. The
phases run in the stages phases.stages gives: in turn, except the two
packet-rate phases at small scale, which run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from vmbox.control import events
from vmbox.control.controller import Controller
from vmbox.experiments.results import ExperimentResult, Scale, new_progress, side_by_side
from vmbox.experiments.scaling.phases import MEMORY_LIMIT, PROBE_RATE, PhasePlan, phase_spec, stages
from vmbox.experiments.scaling.record import PhaseRun
from vmbox.experiments.scaling.summary import summarise
from vmbox.metrics import scrape
from vmbox.runtime.local import open_cgroups
from vmbox.spec import Spec, parse_size
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import list_members
from vmbox.testbed import free_udp_port, private_store, running_service
from vmbox.tools.load import LoadPlan, run_load
from vmbox.tools.newflows import new_flows

NAME = "scaling"


def _listener(run: PhaseRun) -> Callable[[events.Event], None]:
    return run.note  # decisions, starts and promotions (a warm spare's)


async def _record(controller: Controller, run: PhaseRun) -> None:
    """Every sample the autoscaler sees, and each replica's first passed packet."""
    seen: object = None
    while True:
        stats = controller.scaler.stats
        if stats.samples and stats.samples is not seen:
            seen = stats.samples
            now = time.time() - run.t0
            for rid, sample in stats.samples.items():
                run.samples.append((now, rid, sample.to_dict()))
            run.counts.append((now, len(stats.samples)))
        await _first_passes(controller, run)
        await asyncio.sleep(0.05)


async def _first_passes(controller: Controller, run: PhaseRun) -> None:
    members = await list_members(controller.store, run.spec.service)
    for rid, member in members.items():
        pid = int(member.info.get("pid", 0))
        if run.passing_pid.get(rid) == pid:
            continue
        with contextlib.suppress(Exception):
            metrics = await scrape(str(member.info["metrics"]), timeout=0.5)
            if metrics.get("vmbox_packets_passed_total", 0.0) > 0:
                run.passed(rid, pid, time.time())


async def _drive(controller: Controller, run: PhaseRun, on_tick: Any) -> None:
    """Idle, load, then watch the way down; `on_tick(seconds)` moves the progress bar."""
    plan = run.plan
    await asyncio.sleep(plan.idle)
    on_tick(plan.idle)
    start = time.time()
    probe: asyncio.Task[Any] | None = None
    if plan.kind == "memory":
        load: Any = new_flows(run.spec.relay.listen, plan.rate_at, plan.load_for)
        probe = asyncio.create_task(_one_source(run.spec, PROBE_RATE, plan.load_for + plan.settle))
    else:
        load = _steps(run)
    task = asyncio.create_task(load)
    while not task.done():
        await asyncio.sleep(1.0)
        on_tick(1.0)
    await task
    run.load_window = (start, time.time())
    deadline = time.monotonic() + plan.settle
    while time.monotonic() < deadline:
        back = controller.desired == run.spec.replicas.min
        if back and (plan.kind == "pps" or any(d.kind == "scale-down" for d in run.decisions)):
            await asyncio.sleep(2.0)  # a late decision would show here
            break
        await asyncio.sleep(1.0)
        on_tick(1.0)
    if probe is not None:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        run.load_spans.append((start, time.time()))


async def _one_source(spec: Spec, rate: float, seconds: float) -> None:
    """One source over 64 flows at `rate`: what the limit must hold to 100/s."""
    await run_load(LoadPlan(spec.relay.listen, rate=rate, sources=1, flows=64, duration=seconds))


async def _steps(run: PhaseRun) -> None:
    began: float | None = None
    for rate, seconds in run.plan.steps:
        if rate <= 0:
            if began is not None:
                run.load_spans.append((began, time.time()))
                began = None
            await asyncio.sleep(seconds)  # a pause: the way down, then up again
            continue
        began = time.time() if began is None else began
        await _one_source(run.spec, rate, seconds)
    if began is not None:
        run.load_spans.append((began, time.time()))


async def run_phase(store: EtcdStore, plan: PhasePlan, progress: Progress) -> PhaseRun:
    """One phase on a fresh service of its own; its bar on `progress` (one display for all
    the phases, which may run side by side)."""
    cgroups, _ = open_cgroups(f"scaling-{plan.name}", parse_size(MEMORY_LIMIT))

    def make_spec() -> Spec:
        return phase_spec(plan, free_udp_port(), free_udp_port(), cgroup=cgroups is not None)

    run = PhaseRun(plan, make_spec())
    bar = progress.add_task(f"{plan.name}: starting", total=plan.total)
    async with running_service(store, make_spec, on_event=_listener(run)) as service:
        run.spec = service.spec
        run.memory_source = service.runtime.cgroup_note
        run.t0 = time.time()
        recorder = asyncio.create_task(_record(service.controller, run))
        try:
            progress.update(bar, description=f"{plan.name}: idle, then load, then settle")
            await _drive(service.controller, run, lambda s: progress.advance(bar, s))
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
    run.server = dict(service.echo.history)
    progress.update(bar, completed=plan.total, description=f"{plan.name}: done")
    return run


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    result = ExperimentResult(NAME)
    runs: list[PhaseRun] = []
    async with private_store() as store:
        with new_progress(console) as progress:
            for stage in stages(scale):
                # A stage's phases side by side (phases.SIDE_BY_SIDE), kept in their order.
                runs += await side_by_side(*(run_phase(store, p, progress) for p in stage))
    summarise(runs, out_dir, result, console)
    return result
