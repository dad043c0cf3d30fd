"""Live status of a service: replicas, shares, traffic, resource samples, recent events.

Used by `vmbox status`, the live view of `vmbox up` and `vmbox demo`. Traffic
rates come from two scrapes of each replica's Prometheus metrics; the tracker
keeps the previous scrape so a live view needs one scrape per refresh. Memory
and CPU come from the controller's monitor, which publishes its latest sample
of every replica at /vmbox/<service>/samples. Warm spares (standby/<id>) get a
row each after the members, marked `(spare)`: no share, no traffic.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.table import Table

from vmbox.control import events
from vmbox.control.monitor import Sample, read_samples
from vmbox.metrics import scrape
from vmbox.state import keys
from vmbox.state.health import FAIL_MODE_NAMES
from vmbox.state.membership import list_members
from vmbox.state.standby import list_standby
from vmbox.state.store import Store

RATES = ("packets_received_total", "packets_passed_total", "packets_dropped_total")


@dataclass
class ReplicaRow:
    replica: str
    pid: object
    metrics: str
    values: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    error: str = ""
    sample: Sample | None = None
    template: str = ""  # which spec it runs (vmbox.spec.changes.template_of)


@dataclass
class ServiceStatus:
    service: str
    desired: str
    replicas: list[ReplicaRow]
    events: list[events.Event]
    taken: float
    controller: str = ""  # the controller's metrics address, when one is running
    spares: list[ReplicaRow] = field(default_factory=list)  # warm spares standing by

    def total_rate(self, name: str) -> float:
        return sum(row.rates.get(name, 0.0) for row in self.replicas)


class RateTracker:
    """Per-second rates from successive scrapes of counters."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, dict[str, float]]] = {}

    def update(self, replica: str, values: dict[str, float], now: float) -> dict[str, float]:
        previous = self._last.get(replica)
        self._last[replica] = (now, values)
        if previous is None or now <= previous[0]:
            return {}
        span = now - previous[0]
        return {
            name: max(0.0, values.get(name, 0.0) - previous[1].get(name, 0.0)) / span
            for name in RATES
        }


async def _scrape_row(row: ReplicaRow) -> None:
    try:
        raw = await scrape(row.metrics, timeout=1.0)
        row.values = {name.removeprefix("vmbox_"): value for name, value in raw.items()}
    except Exception as exc:  # a replica that is starting or dying must not break status
        row.error = str(exc) or type(exc).__name__


async def _controller(store: Store, service: str) -> str:
    kv = await store.get(keys.controller_key(service))
    try:
        return str(json.loads(kv.value)["metrics"]) if kv is not None else ""
    except (ValueError, KeyError, TypeError):
        return ""


async def snapshot(
    store: Store, service: str, tracker: RateTracker, n_events: int = 8
) -> ServiceStatus:
    """Read members, desired count, samples and events; scrape every replica once."""
    desired_kv = await store.get(keys.desired_key(service))
    members = await list_members(store, service)
    samples = await read_samples(store, service)
    rows = [
        ReplicaRow(
            rid,
            m.info.get("pid", "?"),
            str(m.info.get("metrics", "")),
            sample=samples.get(rid),
            template=str(m.info.get("template", "")),
        )
        for rid, m in sorted(members.items())
    ]
    standby = await list_standby(store, service)
    spares = [
        ReplicaRow(rid, info.get("pid", "?"), str(info.get("metrics", "")))
        for rid, info in sorted(standby.items())
        if rid not in members  # a promoted spare, its standby key not yet removed
    ]
    await asyncio.gather(*(_scrape_row(row) for row in rows + spares))
    now = time.monotonic()
    for row in rows:
        if not row.error:
            row.rates = tracker.update(row.replica, row.values, now)
    recent = await events.recent(store, service, n_events)
    desired = desired_kv.value.decode(errors="replace") if desired_kv else "-"
    controller = await _controller(store, service)
    return ServiceStatus(service, desired, rows, recent, time.time(), controller, spares)


def render(status: ServiceStatus, title: str = "") -> RenderableType:
    """A kubectl-like table of replicas, then the recent events."""
    n = len(status.spares)
    spares = f", {n} warm spare{'s' if n != 1 else ''}" if n else ""
    table = Table(
        title=title
        or (
            f"service {status.service}: {len(status.replicas)} replicas "
            f"(desired {status.desired}){spares}"
        ),
        title_justify="left",
    )
    for column in (
        "REPLICA",
        "PID",
        "SHARE",
        "LIMIT",
        "RECEIVED/s",
        "PASSED/s",
        "DROPPED/s",
        "MEM",
        "MEM%",
        "CPU%",
        "STORE",
    ):
        table.add_column(column, justify="left" if column in {"REPLICA", "STORE"} else "right")
    for row in status.replicas:
        v, r = row.values, row.rates
        store_state = "error: " + row.error if row.error else store_column(v)
        table.add_row(
            row.replica,
            str(row.pid),
            _num(v.get("share")),
            _num(v.get("limit")),
            _num(r.get(RATES[0])),
            _num(r.get(RATES[1])),
            _num(r.get(RATES[2])),
            *_resources(row.sample),
            store_state,
        )
    for row in status.spares:
        state = "error: " + row.error if row.error else "standby, " + store_column(row.values)
        table.add_row(f"{row.replica} (spare)", str(row.pid), *["-"] * 8, state)
    notes = []
    if any(row.sample and not row.sample.source.startswith("cgroup") for row in status.replicas):
        notes.append("* resident set size read with psutil (no memory cgroup)")
    if status.controller:
        notes.append(f"controller metrics: http://{status.controller}/metrics")
    table.caption = "\n".join(notes) or None
    lines = Table.grid(padding=(0, 1))
    for ev in status.events:
        lines.add_row(time.strftime("%H:%M:%S", time.localtime(ev.time)), ev.kind, ev.message)
    return RichGroup(table, lines) if status.events else table


@dataclass(frozen=True)
class ListedService:
    """One line of `vmbox status` with no argument."""

    status: ServiceStatus
    host: str  # the `vmbox up` running it
    template: str  # what its stored spec has replicas run
    limit: str  # the spec's limit, or how many rules it has


def render_list(listed: list[ListedService]) -> RenderableType:
    """Every service one line each, as `kubectl get` lists: replicas ready of desired,
    up to date (running the stored spec: a rollout in progress shows here), limit, rates."""
    table = Table(title=f"{len(listed)} services", title_justify="left")
    for column in (
        "SERVICE",
        "READY",
        "UP-TO-DATE",
        "LIMIT",
        "RECEIVED/s",
        "PASSED/s",
        "DROPPED/s",
        "HOST",
    ):
        table.add_column(column, justify="left" if column in {"SERVICE", "HOST"} else "right")
    for item in listed:
        status = item.status
        ready = sum(1 for r in status.replicas if r.values.get("ready") == 1.0)
        fresh = sum(1 for r in status.replicas if r.template == item.template)
        live = [r.values["limit"] for r in status.replicas if "limit" in r.values]
        table.add_row(
            status.service,
            f"{ready}/{status.desired}",
            str(fresh),
            _num(max(live)) if live else item.limit,
            _num(status.total_rate(RATES[0])),
            _num(status.total_rate(RATES[1])),
            _num(status.total_rate(RATES[2])),
            item.host,
        )
    return table


def store_column(values: dict[str, float]) -> str:
    """The STORE column from a replica's gauges: ok, stale, down 2s, down 4s: closed."""
    down = values.get("store_down_seconds", 0.0)
    if values.get("fail_policy_active"):
        mode = FAIL_MODE_NAMES.get(int(values.get("fail_mode", 0)), "?")
        return f"down {down:.0f}s: {mode}"
    if down > 0:
        return f"down {down:.0f}s"
    return "stale" if values.get("store_stale") else "ok"


def _resources(sample: Sample | None) -> tuple[str, str, str]:
    """MEM (MiB, with where it was read), MEM% of the limit, CPU% of one core."""
    if sample is None:
        return "-", "-", "-"
    where = "" if sample.source.startswith("cgroup") else "*"  # * = RSS via psutil
    mem = f"{sample.memory_bytes / 2**20:.1f}Mi{where}"
    return mem, _num(sample.memory_percent), _num(sample.cpu_percent)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 or value >= 100 else f"{value:.1f}"
