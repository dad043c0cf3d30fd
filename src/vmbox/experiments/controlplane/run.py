"""The control-plane experiment's run: each point on a fresh private etcd, its phases in order.

Called through vmbox.experiments.controlplane (the registry's entry). A point
(points.py) runs as: a private etcd (testbed.private_etcd, auth on) and the
services' specs published as the controller publishes them; the worker
processes (workers.py) started, their replicas and traffic with them; once
every replica holds its share, the measured windows (etcd's /metrics and the
workers' CPU before and after, etcdmetrics.py); then a new limit written to
every service, and one more replica started in the first one; then the
workers stop and hand in what they counted (record.py). Every point is
bounded in time, and its processes and etcd are gone when it ends, whatever
happened. A series whose point broke (or, in the `before` mode, saturated the
machine) stops there: its larger points are recorded as not run, and why.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from vmbox.control.publish import publish
from vmbox.experiments.controlplane import etcdmetrics
from vmbox.experiments.controlplane.points import (
    LIMIT_AFTER,
    LIMIT_HOLD,
    NAME,
    READY_LEAD,
    RESIZE_AFTER,
    SIZES,
    SPAWN_MARGIN,
    TRAFFIC_LEAD,
    Point,
    Size,
    etcd_members,
    layout,
    new_limit,
    plans,
    point_budget,
    points,
    ready_timeout,
    service_name,
    service_spec,
    worker_count,
)
from vmbox.experiments.controlplane.record import (
    PointResult,
    accuracy,
    busy_share,
    crowding,
    limit_reach,
    merge_counts,
    saturation,
    settle_time,
    unsettled,
)
from vmbox.experiments.controlplane.summary import point_line, summarise
from vmbox.experiments.controlplane.workers import Workers
from vmbox.experiments.results import ExperimentResult, Scale, new_progress
from vmbox.state import access, keys
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import private_etcd, store_access

PUBLISH_AT_ONCE = 50  # specs published concurrently
FREEZE_TIMEOUT = 5.0  # s the workers get to stop feeding and watching


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    """Every point of the scale; controlplane*.csv and controlplane.png in `out_dir`."""
    size = SIZES[scale]
    work = Path(tempfile.mkdtemp(prefix="vmbox-controlplane-"))
    todo = points(size, "N") + points(size, "S")
    done: list[PointResult] = []
    stopped: dict[tuple[str, str], str] = {}
    try:
        with new_progress(console) as progress:
            bar = progress.add_task(NAME, total=len(todo))
            for p in todo:
                progress.update(bar, description=f"{NAME}: {p.label}")
                if (p.series, p.mode) in stopped:
                    done.append(PointResult(p, "skipped", stopped[(p.series, p.mode)]))
                else:
                    done.append(await measure(p, size, work / f"{p.series}{p.x}-{p.mode}"))
                    progress.console.print(point_line(done[-1]), highlight=False)
                    for mode in _stops(done[-1]):
                        stopped.setdefault((p.series, mode), _why(done[-1]))
                progress.advance(bar)
    finally:
        broke = any(r.status == "broke" for r in done)
        if not broke:
            shutil.rmtree(work, ignore_errors=True)
    result = summarise(done, size, out_dir, console)
    if broke:
        result.notes.append(f"The broken points' worker logs and results are in {work}.")
    return result


def _stops(result: PointResult) -> tuple[str, ...]:
    """The modes whose series stop at this point: a broken point's (the `before` one too
    when `after` broke: it costs more at every size), a saturated `before` point's."""
    p = result.point
    if result.status == "broke":
        return ("after", "before") if p.mode == "after" else ("before",)
    if result.status == "saturated" and p.mode == "before":
        return ("before",)
    return ()


def _why(result: PointResult) -> str:
    p = result.point
    return f"the series stopped at {p.label} ({result.status}: {result.reason})"


async def measure(p: Point, size: Size, out: Path) -> PointResult:
    """One point, bounded by its budget; a failure is a broken point, not an exception."""
    members = etcd_members(size, os.cpu_count() or 1)
    result = PointResult(p, members=members)
    started = time.monotonic()
    budget = point_budget(size, p)
    try:
        async with asyncio.timeout(budget):
            await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
            async with private_etcd(members) as (etcd, store):
                await _publish(store, p)
                await _phases(p, size, etcd.client_urls, store, out, result)
    except TimeoutError:
        result.status, result.reason = "broke", f"did not finish within {budget:.0f} s"
    except Exception as exc:  # the next points still run; the log keeps the traceback
        (out / "error.log").write_text(traceback.format_exc())
        result.status, result.reason = "broke", f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


async def _publish(store: EtcdStore, p: Point) -> None:
    """Each service's spec and limit, as the controller publishes them (vmbox.control.publish)."""
    for first in range(0, p.services, PUBLISH_AT_ONCE):
        last = min(p.services, first + PUBLISH_AT_ONCE)
        await asyncio.gather(*(publish(store, service_spec(s, p)) for s in range(first, last)))


async def _sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


async def _phases(
    p: Point, size: Size, urls: list[str], store: EtcdStore, out: Path, result: PointResult
) -> None:
    """Start, wait for every replica's share, measure, change the limit and resize, stop."""
    target = store_access(store.endpoints)
    settings = access.settings(target) if target is not None else {}
    lay = layout(p, worker_count(p.total, os.cpu_count() or 1))
    start_at = time.time() + SPAWN_MARGIN
    deadline = start_at + point_budget(size, p) - 10.0
    result.workers = lay.workers
    made = plans(p, lay, list(store.endpoints), settings, start_at, deadline, out)
    async with Workers(made, out) as w:
        machine = psutil.cpu_times()._asdict()
        everyone = set(range(lay.workers))
        ready = await w.until("ready", everyone, start_at - time.time() + ready_timeout(size, p))
        if len(ready) < lay.workers:
            await _not_ready(w, size, result, start_at, machine)
            return
        ready_at = max(float(e["at"]) for e in ready.values())
        result.ready = ready_at - start_at
        t1 = math.ceil(max(ready_at + READY_LEAD, start_at + TRAFFIC_LEAD))
        t2 = t1 + size.measure
        resize_at = t2 + RESIZE_AFTER
        w.send(cmd="schedule", measure=[t1, t2], resize_at=resize_at, limit=new_limit(p))
        await _measure(w, urls, t1, t2, result)
        await _sleep_until(t2 + LIMIT_AFTER)
        written = await _change_limits(store, p)
        involved = {k for k in everyone if any(s == 0 for s, _ in lay.mine[k])}
        watching = involved | {lay.spare_worker}
        await w.until("settled", watching, resize_at + size.resize_span - time.time())
        await w.until("limited", everyone, max(written.values()) + LIMIT_HOLD - time.time())
        w.send(cmd="freeze")  # all of them, before any replica leaves
        await w.until("frozen", everyone, FREEZE_TIMEOUT)
        results = await w.stop()
    _figures(result, results, written, range(t1, int(t2)), resize_at)


async def _not_ready(
    w: Workers, size: Size, result: PointResult, start_at: float, machine: dict[str, float]
) -> None:
    """A point whose replicas did not all hold their shares in time: broken, and how far."""
    busy = w.cpu_seconds() / max(0.1, time.time() - start_at)
    share = busy_share(machine, psutil.cpu_times()._asdict())
    results = await w.stop()
    holding = sum(int(r.get("holding", 0)) for r in results)
    result.status = "broke"
    result.reason = (
        f"{holding} of {result.point.total} replicas held their shares after "
        f"{ready_timeout(size, result.point):.0f} s (the workers used {busy:.1f} cores, "
        f"the machine was {share:.0%} busy)"
    )
    result.errors = _errors(results)


async def _measure(w: Workers, urls: list[str], t1: float, t2: float, r: PointResult) -> None:
    """etcd's counters, the workers' CPU and the machine's from t1 to t2."""
    await _sleep_until(t1)
    before, cpu0, m0 = await etcdmetrics.scrape(urls), w.cpu_each(), time.time()
    machine = psutil.cpu_times()._asdict()
    await _sleep_until(t2)
    after, cpu1, m1 = await etcdmetrics.scrape(urls), w.cpu_each(), time.time()
    r.machine = busy_share(machine, psutil.cpu_times()._asdict())
    r.rates = etcdmetrics.rates(before, after, m1 - m0)
    used = [(b - a) / (m1 - m0) for a, b in zip(cpu0, cpu1, strict=True)]
    r.worker_cpu, r.worker_cpu_max = sum(used), max(used, default=0.0)


async def _change_limits(store: EtcdStore, p: Point) -> dict[int, float]:
    """A new limit for every service, one write after the other; when each was written."""
    value = str(new_limit(p)).encode()
    written = {}
    for s in range(p.services):
        written[s] = time.time()
        await store.put(keys.state_key(service_name(s), "limit"), value)
    return written


def _errors(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        if r.get("error"):
            out.append(f"worker {r.get('index')}: {r['error']}")
        for error in r.get("errors") or ():
            out.append(f"worker {r.get('index')}: a replica failed: {error}")
    return out


def _figures(
    result: PointResult,
    results: list[dict[str, Any]],
    written: dict[int, float],
    windows: range,
    resize_at: float,
) -> None:
    p = result.point
    result.errors = _errors(results)
    result.accuracy = accuracy(merge_counts(results), p.model, windows)
    reach, result.limit_missed = limit_reach(results, written, new_limit(p), p.replicas)
    if reach:
        result.limit_reach = max(reach)
        result.limit_reach_median = sorted(reach)[len(reach) // 2]
    result.settle = settle_time(results, resize_at)
    result.unsettled = unsettled(results) if result.settle is None else ""
    lags = [r["lag"]["p95"] for r in results if r.get("lag")]
    result.lag_p95 = max(lags) if lags else None
    if result.errors:
        result.status, result.reason = "broke", result.errors[0]
    elif why := saturation(result, os.cpu_count() or 1):
        result.status, result.reason = "saturated", why
    elif why := crowding(result, os.cpu_count() or 1):
        result.status, result.reason = "crowded", why
