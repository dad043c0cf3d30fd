"""The monitor's arithmetic (vmbox.control.monitor): memory store, fake runtime, fake scrape.

No etcd and no sockets: members are keys of the memory store, usage comes from
a table the test edits, and `scrape` is replaced by a function returning counters. The real
thing runs in tests/integration/test_monitor.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from vmbox.control import monitor
from vmbox.control.monitor import Monitor, Sample
from vmbox.runtime.base import ReplicaState, Usage
from vmbox.state import keys
from vmbox.state.memory import MemoryStore


def registered(members: dict[str, dict[str, Any]]) -> MemoryStore:
    store = MemoryStore()
    for rid, info in members.items():
        asyncio.run(store.put(keys.member_key("web", rid), json.dumps(info).encode()))
    return store


class FakeRuntime:
    def __init__(self) -> None:
        self.usages: dict[str, Usage] = {}
        self.pids: dict[str, int] = {}

    def running(self) -> dict[str, ReplicaState]:
        return {rid: ReplicaState(rid, pid, running=True) for rid, pid in self.pids.items()}

    def usage(self, replica_id: str) -> Usage | None:
        return self.usages.get(replica_id)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(monkeypatch: pytest.MonkeyPatch) -> tuple[Monitor, FakeRuntime, dict[str, Any], Clock]:
    store = registered({"web-1": {"pid": 11, "metrics": "m1:1"}, "web-2": {"pid": 12}})
    runtime = FakeRuntime()
    runtime.pids = {"web-1": 11, "web-2": 12, "web-3": 13}  # web-3 has not registered yet
    counters: dict[str, Any] = {"m1:1": {}}
    clock = Clock()

    async def fake_scrape(address: str, timeout: float = 1.0) -> dict[str, float]:
        value = counters[address]
        if isinstance(value, Exception):
            raise value
        return dict(value)

    monkeypatch.setattr(monitor, "scrape", fake_scrape)
    mon = Monitor("web", store, runtime, clock=clock)  # type: ignore[arg-type]  # FakeRuntime
    return mon, runtime, counters, clock


def test_rates_come_from_the_previous_sample_of_the_same_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mon, runtime, counters, clock = setup(monkeypatch)
    runtime.usages = {r: Usage(35 * 2**20, 70 * 2**20, 1.0, "cgroup v1") for r in runtime.pids}
    counters["m1:1"] = {"vmbox_packets_received_total": 100.0, "vmbox_queue_drops_total": 1.0}
    first = asyncio.run(mon.sample())
    assert sorted(first) == ["web-1", "web-2"]  # registered and running only
    assert first["web-1"].memory_percent == 50.0 and first["web-1"].pps_in is None
    assert first["web-1"].cpu_percent is None

    clock.now += 2.0
    runtime.usages["web-1"] = Usage(35 * 2**20, 70 * 2**20, 1.5, "cgroup v1")
    counters["m1:1"] = {
        "vmbox_packets_received_total": 700.0,
        "vmbox_packets_passed_total": 500.0,
        "vmbox_packets_dropped_total": 3.0,
        "vmbox_queue_drops_total": 5.0,
    }
    second = asyncio.run(mon.sample())["web-1"]
    assert second.pps_in == 300.0 and second.pps_out == 250.0
    assert second.drops_per_s == 3.5  # (3 + 5 - 1) / 2
    assert second.cpu_percent == pytest.approx(25.0)
    assert second.value("pps") == 300.0 and second.value("memory") == 50.0
    assert asyncio.run(mon.sample())["web-2"].pps_in is None  # no metrics address


def test_a_replica_that_fails_to_scrape_still_gets_memory_and_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mon, runtime, counters, _ = setup(monkeypatch)
    runtime.usages = {"web-1": Usage(1000, None, 2.0, "psutil")}
    counters["m1:1"] = OSError("refused")
    sample = asyncio.run(mon.sample())["web-1"]
    assert sample.memory_bytes == 1000 and sample.memory_percent is None
    assert sample.pps_in is None and sample.source == "psutil"


def test_a_restarted_replica_starts_its_rates_over(monkeypatch: pytest.MonkeyPatch) -> None:
    mon, runtime, counters, clock = setup(monkeypatch)
    runtime.usages = {"web-1": Usage(1000, None, 2.0, "psutil")}
    counters["m1:1"] = {"vmbox_packets_received_total": 900.0}
    asyncio.run(mon.sample())
    runtime.pids["web-1"] = 99
    clock.now += 1.0
    counters["m1:1"] = {"vmbox_packets_received_total": 10.0}
    assert asyncio.run(mon.sample())["web-1"].pps_in is None


def sample(**changes: Any) -> Sample:
    values: dict[str, Any] = {
        "replica": "web-1",
        "time": 1.0,
        "memory_bytes": 10,
        "memory_limit": 20,
        "memory_percent": 50.0,
        "cpu_percent": 3.0,
        "pps_in": 4.0,
        "pps_out": 5.0,
        "bytes_in_per_s": 6.0,
        "bytes_out_per_s": 7.0,
        "drops_per_s": 0.0,
        "source": "psutil",
    } | changes
    return Sample(**values)


def test_samples_survive_json_and_map_metric_names() -> None:
    original = sample()
    assert Sample.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    assert [original.value(m) for m in ("memory", "cpu", "pps", "bandwidth")] == [50, 3, 4, 6]
    assert sample(cpu_percent=None).value("cpu") is None
    with pytest.raises(ValueError, match="unknown metric"):
        original.value("disk")


@pytest.mark.parametrize(
    "garbage",
    [{}, {**sample().to_dict(), "memory_bytes": "lots"}, {**sample().to_dict(), "time": None}],
)
def test_garbage_is_not_a_sample(garbage: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not a sample"):
        Sample.from_dict(garbage)
