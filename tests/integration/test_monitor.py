"""The monitor end to end: real etcd, a real replica in its own memory cgroup, real UDP.

A one-replica service with `replicas.memory_limit: 70Mi`: the replica must run
inside its cgroup with that limit, the monitor's samples must read that cgroup
and see the traffic offered, the cgroup must go when the service stops, and
without a limit (or without root) the samples say they come from psutil. The
cgroup parts are skipped, with the reason, where no writable memory cgroup
exists (they fail instead under CI: tests/integration/cgroup.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.cgroup import require_cgroups
from tests.integration.harness import make_spec, running_service
from vmbox.control.monitor import Monitor, Sample, publish, read_samples
from vmbox.etcdserver import EtcdServer
from vmbox.runtime import local
from vmbox.runtime.cgroups import MemoryCgroup, find_hierarchy
from vmbox.runtime.local import LocalRuntime
from vmbox.state import keys
from vmbox.state.etcd import connect
from vmbox.tools.load import LoadPlan, run_load

MIB = 1024 * 1024
LIMIT = 70 * MIB  # 73400320


async def sample_twice(monitor: Monitor, gap: float) -> tuple[Sample, Sample]:
    first = await monitor.sample()
    await asyncio.sleep(gap)
    second = await monitor.sample()
    (one,), (two,) = first.values(), second.values()
    return one, two


def test_replica_runs_in_its_cgroup_and_the_monitor_reads_it(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    require_cgroups()

    async def scenario() -> tuple[Path, Sample, Sample, int]:
        spec = make_spec("mon", 1, memory_limit="70Mi", limit=100_000)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            assert svc.runtime.cgroup_note.startswith("cgroup v")
            (member,) = (await svc.members()).values()
            pid = member.info["pid"]
            hierarchy = find_hierarchy()
            path = hierarchy.of_pid(pid)
            assert path is not None and path.name == "mon-1" and path.parent.name == "vmbox-mon"
            cgroup = MemoryCgroup(path, hierarchy.version)
            assert pid in cgroup.pids()
            limit_file = "memory.limit_in_bytes" if hierarchy.version == 1 else "memory.max"
            assert int((path / limit_file).read_text()) == LIMIT
            # A controller that starts again adopts the replica in the cgroup it is in.
            again = LocalRuntime(spec.service, [], tmp_path / "again", memory_limit=LIMIT)
            assert again.adopt("mon-1", pid) and path.exists()
            usage = again.usage("mon-1")
            assert usage is not None and usage.source == f"cgroup v{hierarchy.version}"
            monitor = Monitor(spec.service, svc.store, svc.runtime)
            plan = LoadPlan(target=spec.relay.listen, rate=400, flows=8, duration=4.0)
            load = asyncio.create_task(run_load(plan))
            await asyncio.sleep(1.0)
            first, second = await sample_twice(monitor, 2.0)
            result = await load
            rss = psutil.Process(pid).memory_info().rss
        print(f"working set {second.memory_bytes / MIB:.1f} MiB, RSS {rss / MIB:.1f} MiB")
        assert result.sent > 1000
        return path, first, second, hierarchy.version

    path, first, second, version = asyncio.run(scenario())
    assert second.source == f"cgroup v{version}" and second.memory_limit == LIMIT
    assert 0 < second.memory_bytes < LIMIT
    assert second.memory_percent == pytest.approx(second.memory_bytes / LIMIT * 100)
    assert first.pps_in is None  # a first sample has no rates
    assert second.pps_in is not None and 200 <= second.pps_in <= 600, second
    assert second.pps_out is not None and second.pps_out > 200
    assert second.bytes_in_per_s == pytest.approx(second.pps_in * 64, rel=0.01)
    assert second.drops_per_s == 0.0 and second.cpu_percent is not None
    assert not path.exists() and not path.parent.exists(), "cgroups left behind"


def test_without_a_memory_limit_samples_come_from_psutil(etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> tuple[str, Sample]:
        spec = make_spec("nolimit", 1)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            _, sample = await sample_twice(Monitor(spec.service, svc.store, svc.runtime), 0.3)
            return svc.runtime.cgroup_note, sample

    note, sample = asyncio.run(scenario())
    assert note == "psutil: no memory_limit in the spec"
    assert sample.source == "psutil" and sample.memory_bytes > 0  # RSS
    assert sample.memory_limit is None and sample.memory_percent is None
    assert sample.pps_in == 0.0


def test_without_root_the_limit_is_only_a_figure(
    etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "is_root", lambda: False)

    async def scenario() -> tuple[str, Sample]:
        spec = make_spec("noroot", 1, memory_limit="70Mi")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            (sample,) = (await Monitor(spec.service, svc.store, svc.runtime).sample()).values()
            return svc.runtime.cgroup_note, sample

    note, sample = asyncio.run(scenario())
    assert note == "psutil: not running as root"
    assert sample.source == "psutil" and sample.memory_limit == LIMIT
    assert sample.memory_percent == pytest.approx(sample.memory_bytes / LIMIT * 100)


def test_a_replica_killed_for_memory_is_reported_as_such(etcd: EtcdServer, tmp_path: Path) -> None:
    require_cgroups()
    # 16 MiB is less than a replica needs to import its modules.
    runtime = LocalRuntime("oomtest", etcd.endpoints, tmp_path, memory_limit=16 * MIB)
    runtime.start("oomtest-1")
    deadline = time.monotonic() + 20
    while not (exited := runtime.reap()) and time.monotonic() < deadline:
        time.sleep(0.05)
    runtime.stop_all()
    assert [e.last_log_line for e in exited] == [
        "killed by the OOM killer at the 16.0 MiB memory limit"
    ]
    assert exited[0].exit_code == -9


def test_samples_are_published_and_garbage_is_ignored(etcd: EtcdServer) -> None:
    sample = Sample("web-1", 1.0, 10, 20, 50.0, None, None, None, None, None, None, "psutil")

    async def scenario() -> tuple[dict[str, Sample], dict[str, Sample], dict[str, Sample]]:
        store = await connect(etcd.endpoints)
        try:
            await publish(store, "pubtest", {"web-1": sample})
            back = await read_samples(store, "pubtest")
            await store.put(keys.samples_key("pubtest"), b"{not json")
            garbage = await read_samples(store, "pubtest")
            await store.put(keys.samples_key("pubtest"), b'{"web-1": {"replica": 3}, "x": 1}')
            partial = await read_samples(store, "pubtest")
        finally:
            await store.delete_prefix(keys.service_prefix("pubtest"))
            await store.close()
        return back, garbage, partial

    back, garbage, partial = asyncio.run(scenario())
    assert back == {"web-1": sample}
    assert garbage == {} and partial == {}
