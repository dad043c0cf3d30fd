"""Live status of a service: replicas, shares, traffic, resource samples, recent events.

Used by `vmbox status`, the live view of `vmbox up` and `vmbox demo`. Traffic
rates come from two scrapes of each replica's Prometheus metrics; the tracker
keeps the previous scrape so a live view needs one scrape per refresh. Memory
and CPU come from the controller's monitor, which publishes its latest sample
of every replica at /vmbox/<service>/samples. Warm spares (standby/<id>) get a
row each after the members, marked `(spare)`: no share, no traffic. A chain or a
firewall adds a table of each function's verdicts per replica and in total, and
a line of the firewall's connections and drops by reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from vmbox.control import events
from vmbox.control.monitor import Sample, read_samples
from vmbox.metrics import scrape
from vmbox.state import keys
from vmbox.state.health import FAIL_MODE_NAMES
from vmbox.state.membership import list_members
from vmbox.state.standby import list_standby
from vmbox.state.store import Store

RATES = ("packets_received_total", "packets_passed_total", "packets_dropped_total")
# A chain's vmbox_function_packets_total{function,verdict}, one value per label set:
# "function_packets_total/<function>/<verdict>" (vmbox.metrics.parse_metrics keeps them apart).
FUNCTION_PREFIX = "function_packets_total/"
VERDICTS = ("pass", "drop", "held")
FIREWALL_DROPPED = "firewall_dropped_"  # + reason: the firewall's drop counts (gauges)


def function_key(function: str, verdict: str) -> str:
    return f"{FUNCTION_PREFIX}{function}/{verdict}"


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
        counted = RATES + tuple(
            name for name in values if name.startswith((FUNCTION_PREFIX, FIREWALL_DROPPED))
        )
        return {
            name: max(0.0, values.get(name, 0.0) - previous[1].get(name, 0.0)) / span
            for name in counted
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
    """A kubectl-like table of replicas, a chain's or firewall's verdicts, the recent events."""
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
    leading = [row.replica for row in status.replicas if row.values.get("aggregator_leading")]
    if leading:  # vmbox.state.aggregator: two for a moment while one has lost its lease
        notes.append(f"aggregator (demand and ack summaries): {', '.join(leading)}")
    table.caption = "\n".join(notes) or None
    parts: list[RenderableType] = [table, *render_functions(status)]
    if status.events:
        lines = Table.grid(padding=(0, 1))
        for ev in status.events:
            lines.add_row(time.strftime("%H:%M:%S", time.localtime(ev.time)), ev.kind, ev.message)
        parts.append(lines)
    return RichGroup(*parts) if len(parts) > 1 else table


def render_functions(status: ServiceStatus) -> list[RenderableType]:
    """A chain's or a firewall's verdicts: a table of PASS/s, DROP/s and HELD/s per function
    and replica (with a total), then the firewall's line; nothing for a plain ratelimit."""
    names, chained = _functions(status)
    if not names:
        return []
    firewall = "firewall" in names
    table = Table(title="functions: " + " → ".join(names), title_justify="left")
    for column in ("FUNCTION", "REPLICA", "PASS/s", "DROP/s", "HELD/s"):
        table.add_column(column, justify="left" if column in {"FUNCTION", "REPLICA"} else "right")
    if firewall:
        table.add_column("CONNS", justify="right")
        table.add_column("HALF-OPEN", justify="right")
    rows = [row for row in status.replicas if not row.error]
    for name in names:
        cells = [_function_cells(row, name, chained)[: 5 if firewall else 3] for row in rows]
        for row, numbers in zip(rows, cells, strict=True):
            table.add_row(name, row.replica, *map(_num, numbers))
        if len(rows) > 1:
            table.add_row(
                name, "total", *(_num(_sum(column)) for column in zip(*cells, strict=True))
            )
        if table.rows:
            table.rows[-1].end_section = True
    line = firewall_line(status)
    return [table, Text(line)] if line else [table]


def firewall_line(status: ServiceStatus) -> str:
    """firewall: 12 connections (3 half-open); dropped/s: not_allowed 4, no_connection 120.

    The counts add up each replica's table: a connection whose packets moved to another
    replica counts in both until the first forgets it."""
    rows = [row for row in status.replicas if "firewall_connections" in row.values]
    if not rows:
        return ""
    conns = sum(row.values["firewall_connections"] for row in rows)
    half_open = sum(row.values.get("firewall_half_open", 0.0) for row in rows)
    reasons = sorted(
        {name for row in rows for name in row.values if name.startswith(FIREWALL_DROPPED)}
    )
    if not any(row.rates for row in rows):
        dropped = "-"  # one scrape so far: rates need two
    else:
        totals = {name: sum(row.rates.get(name, 0.0) for row in rows) for name in reasons}
        shown = [
            f"{name.removeprefix(FIREWALL_DROPPED)} {_num(rate)}"
            for name, rate in totals.items()
            if rate > 0
        ]
        dropped = ", ".join(shown) or "none"
    return (
        f"firewall: {_num(conns)} connections ({_num(half_open)} half-open); dropped/s: {dropped}"
    )


def _functions(status: ServiceStatus) -> tuple[list[str], bool]:
    """The functions in chain order, and whether their verdicts are counted apart (a chain).
    A firewall alone decides every packet: its verdicts are the replica's PASSED and DROPPED."""
    names: dict[str, None] = {}
    for row in status.replicas:
        for key in row.values:
            if key.startswith(FUNCTION_PREFIX):
                names.setdefault(key.split("/")[1], None)
    if names:
        return list(names), True
    alone = any("firewall_connections" in row.values for row in status.replicas)
    return (["firewall"], False) if alone else ([], False)


def _function_cells(row: ReplicaRow, name: str, chained: bool) -> list[float | None]:
    """PASS/s, DROP/s, HELD/s, then CONNS and HALF-OPEN for the firewall."""
    r = row.rates
    if not r:
        rates: list[float | None] = [None] * 3  # one scrape so far
    elif chained:
        rates = [r.get(function_key(name, verdict)) for verdict in VERDICTS]
    else:
        rates = [r.get(RATES[1]), r.get(RATES[2]), None]
    if name != "firewall":
        return [*rates, None, None]
    return [*rates, row.values.get("firewall_connections"), row.values.get("firewall_half_open")]


def _sum(values: tuple[float | None, ...]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


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
