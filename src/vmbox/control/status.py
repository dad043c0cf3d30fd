"""Live status of a service: replicas, shares, per-second traffic, recent events.

Used by `vmbox status`, the live view of `vmbox up` and `vmbox demo`. Traffic
rates come from two scrapes of each replica's Prometheus metrics; the tracker
keeps the previous scrape so a live view needs one scrape per refresh.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.table import Table

from vmbox.control import events
from vmbox.metrics import scrape
from vmbox.state import keys
from vmbox.state.membership import list_members
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


@dataclass
class ServiceStatus:
    service: str
    desired: str
    replicas: list[ReplicaRow]
    events: list[events.Event]
    taken: float

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


async def snapshot(
    store: Store, service: str, tracker: RateTracker, n_events: int = 5
) -> ServiceStatus:
    """Read members, desired count and events; scrape every replica once."""
    desired_kv = await store.get(keys.desired_key(service))
    members = await list_members(store, service)
    rows = [
        ReplicaRow(rid, m.info.get("pid", "?"), str(m.info.get("metrics", "")))
        for rid, m in sorted(members.items())
    ]
    await asyncio.gather(*(_scrape_row(row) for row in rows))
    now = time.monotonic()
    for row in rows:
        if not row.error:
            row.rates = tracker.update(row.replica, row.values, now)
    recent = await events.recent(store, service, n_events)
    desired = desired_kv.value.decode(errors="replace") if desired_kv else "-"
    return ServiceStatus(service, desired, rows, recent, time.time())


def render(status: ServiceStatus, title: str = "") -> RenderableType:
    """A kubectl-like table of replicas, then the recent events."""
    table = Table(
        title=title
        or f"service {status.service}: {len(status.replicas)} replicas (desired {status.desired})",
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
        "STORE",
    ):
        table.add_column(column, justify="left" if column in {"REPLICA", "STORE"} else "right")
    for row in status.replicas:
        v, r = row.values, row.rates
        store_state = (
            "error: " + row.error if row.error else ("stale" if v.get("store_stale") else "ok")
        )
        table.add_row(
            row.replica,
            str(row.pid),
            _num(v.get("share")),
            _num(v.get("limit")),
            _num(r.get(RATES[0])),
            _num(r.get(RATES[1])),
            _num(r.get(RATES[2])),
            store_state,
        )
    lines = Table.grid(padding=(0, 1))
    for ev in status.events:
        lines.add_row(time.strftime("%H:%M:%S", time.localtime(ev.time)), ev.kind, ev.message)
    return RichGroup(table, lines) if status.events else table


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 or value >= 100 else f"{value:.1f}"
