"""Per-replica samples of resource use and traffic, for the autoscaler and `vmbox status`.

The controller runs a `Monitor` every interval (default 1 s): for each replica
that is both registered in etcd and running in the runtime it reads memory and
CPU from the runtime (a cgroup's working set against its limit, as a pod's
metrics would be read, or psutil) and scrapes the replica's own Prometheus
counters for packets, bytes and drops. Rates come from the previous sample of
the same replica process, so they are None on its first sample. `publish`
stores the latest samples in etcd; `read_samples` gives them back to
`vmbox status`. Policy lives elsewhere: vmbox.control.autoscale reads
`Sample.value(metric)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from vmbox.metrics import scrape
from vmbox.runtime.base import Runtime, Usage
from vmbox.state import keys
from vmbox.state.membership import list_members
from vmbox.state.store import Store

log = logging.getLogger(__name__)

# Sample field -> the replica counters whose per-second sum it is.
TRAFFIC = {
    "pps_in": ("vmbox_packets_received_total",),
    "pps_out": ("vmbox_packets_passed_total",),
    "bytes_in_per_s": ("vmbox_bytes_received_total",),
    "bytes_out_per_s": ("vmbox_bytes_passed_total",),
    "drops_per_s": ("vmbox_packets_dropped_total", "vmbox_queue_drops_total"),
}
METRICS = {
    "memory": "memory_percent",
    "cpu": "cpu_percent",
    "pps": "pps_in",
    "bandwidth": "bytes_in_per_s",
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One replica at one moment; rates are per second, None until it was seen twice."""

    replica: str
    time: float  # wall clock
    memory_bytes: int
    memory_limit: int | None
    memory_percent: float | None
    cpu_percent: float | None  # percent of one core
    pps_in: float | None  # packets received from clients
    pps_out: float | None  # packets passed upstream
    bytes_in_per_s: float | None
    bytes_out_per_s: float | None
    drops_per_s: float | None  # dropped by the middlebox plus queue drops
    source: str  # "cgroup v1", "cgroup v2" or "psutil"

    def value(self, metric: str) -> float | None:
        """The figure an autoscale `metric` (memory, cpu, pps, bandwidth) is judged on."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
        value = getattr(self, METRICS[metric])
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """The inverse of to_dict; ValueError for anything that is not one."""
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
        except KeyError as exc:
            raise ValueError(f"not a sample: no {exc}") from None
        for name, value in values.items():
            if not _field_ok(name, value):
                raise ValueError(f"not a sample: {name} is {value!r}")
        return cls(**values)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field_ok(name: str, value: object) -> bool:
    """Whether `value` (from JSON) has the type of Sample field `name`."""
    if name in ("replica", "source"):
        return isinstance(value, str)
    if name in ("memory_bytes", "memory_limit"):
        whole = isinstance(value, int) and not isinstance(value, bool)
        return whole or (value is None and name == "memory_limit")
    return _number(value) or (value is None and name != "time")


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the previous sample of one replica process read, for rates."""

    pid: int | None
    at: float  # monotonic
    cpu_seconds: float | None
    counters: dict[str, float] | None


def _rate(now: float, then: float | None, span: float) -> float | None:
    if then is None or span <= 0 or now < then:
        return None  # a first sample, or the counters restarted
    return (now - then) / span


def _traffic(now: dict[str, float] | None, seen: _Seen | None, span: float) -> dict[str, Any]:
    rates: dict[str, float | None] = dict.fromkeys(TRAFFIC)
    if now is None or seen is None or seen.counters is None:
        return rates
    for name, counters in TRAFFIC.items():
        current = sum(now.get(c, 0.0) for c in counters)
        before = sum(seen.counters.get(c, 0.0) for c in counters)
        rates[name] = _rate(current, before, span)
    return rates


class Monitor:
    """Samples every replica of one service: runtime usage plus scraped traffic."""

    def __init__(
        self,
        service: str,
        store: Store,
        runtime: Runtime,
        *,
        scrape_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.store = store
        self.runtime = runtime
        self.scrape_timeout = scrape_timeout
        self.clock = clock  # for rates; Sample.time is the wall clock
        self._seen: dict[str, _Seen] = {}

    async def sample(self) -> dict[str, Sample]:
        """One sample per replica that is registered and running; never raises for one replica."""
        members = await list_members(self.store, self.service)
        running = self.runtime.running()
        wanted = sorted(set(members) & set(running))
        self._seen = {rid: seen for rid, seen in self._seen.items() if rid in wanted}
        results = await asyncio.gather(
            *(self._one(rid, running[rid].pid, members[rid].info) for rid in wanted)
        )
        return {sample.replica: sample for sample in results if sample is not None}

    async def _one(self, rid: str, pid: int | None, info: dict[str, Any]) -> Sample | None:
        usage, counters = await asyncio.gather(
            asyncio.to_thread(self.runtime.usage, rid), self._scrape(rid, info)
        )
        if usage is None:
            return None  # it exited between listing and reading
        at = self.clock()
        seen = self._seen.get(rid)
        if seen is not None and seen.pid != pid:
            seen = None  # a restarted replica: its counters began again
        self._seen[rid] = _Seen(pid, at, usage.cpu_seconds, counters)
        span = at - seen.at if seen is not None else 0.0
        cpu = _rate(usage.cpu_seconds, seen.cpu_seconds if seen else None, span)
        return Sample(
            replica=rid,
            time=time.time(),
            memory_bytes=usage.memory_bytes,
            memory_limit=usage.memory_limit,
            memory_percent=_percent(usage),
            cpu_percent=None if cpu is None else cpu * 100.0,
            source=usage.source,
            **_traffic(counters, seen, span),
        )

    async def _scrape(self, rid: str, info: dict[str, Any]) -> dict[str, float] | None:
        address = info.get("metrics")
        if not isinstance(address, str):
            return None
        try:
            return await scrape(address, timeout=self.scrape_timeout)
        except Exception as exc:  # a replica starting or dying must not stop the others
            log.debug("monitor: cannot scrape %s: %s", rid, exc)
            return None


def _percent(usage: Usage) -> float | None:
    if not usage.memory_limit:
        return None
    return usage.memory_bytes / usage.memory_limit * 100.0


async def publish(store: Store, service: str, samples: dict[str, Sample]) -> None:
    """Store the latest samples as one JSON object under /vmbox/<service>/samples."""
    body = {rid: sample.to_dict() for rid, sample in sorted(samples.items())}
    await store.put(keys.samples_key(service), json.dumps(body).encode())


async def read_samples(store: Store, service: str) -> dict[str, Sample]:
    """The samples `publish` stored; {} when there are none or they do not parse."""
    kv = await store.get(keys.samples_key(service))
    if kv is None:
        return {}
    try:
        data = json.loads(kv.value)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    samples = {}
    for rid, item in data.items():
        if isinstance(item, dict):
            try:
                samples[str(rid)] = Sample.from_dict(item)
            except ValueError:
                continue
    return samples
