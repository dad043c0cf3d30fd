"""The memory rows of `make bench`: what one replica costs, read from its memory cgroup.

Replicas run exactly as the service runs them: `running_service` with the
local runtime and `replicas.memory_limit` (LIMIT), so as root each replica
lives in a memory cgroup of its own and starts with whatever environment and
allocator settings the runtime gives it. Every figure is that cgroup's working
set (`MemoryCgroup.working_set()`: usage minus inactive file pages, as kubelet
computes a pod's), and, where the files exist, its kernel memory
(v1 `memory.kmem.usage_in_bytes`: socket structures, slab; v2 `kernel`) and
anonymous memory (v1 `total_rss`, v2 `anon`) from memory.stat.

Two services, one after the other, one ratelimit replica each (a limit that
never binds, a limiter window of WINDOW s, `flow_idle_timeout` of IDLE_TIMEOUT s,
`max_flows` above N), each offered N new flows: client sockets that each send
one 64-byte datagram and close (like vmbox.tools.newflows), paced at RATE per
second and started at a window boundary, so every source of the run is in the
limiter's table at once:

- **one source**: N flows from one address (127.32.0.1), each from its own
  port, so flows multiply and sources do not (one entry in the table);
- **N sources**: N flows each from its own address (127.33.x.y), so each flow
  also adds a source to the table (the gauge `vmbox_sources` says how many).

Figures:

- idle: the working set once the replica is ready and settled (no traffic yet);
- bytes per flow: the one-source run's growth from just before the flows to
  when its `vmbox_flows` gauge has counted them, divided by that count;
- bytes per source: the N-source run's growth less its flows at the per-flow
  cost, divided by the tracked sources: what a source costs beyond its flow
  (the limiter's table entry, mostly);
- after idle-out: each run's working set once `vmbox_flows` is back at 0 and
  memory has settled, as % of the pod and in points from its idle; nothing
  else is sent, so the limiter still holds its last window's table (it drops
  it at the next window's first packet);
- after the next window (N sources): one datagram from a new source in the
  next window, which drops the table, then settled (that one flow is open).

Beside them, what the runtime gave the replica: its PYTHONMALLOC (read from
/proc/<pid>/environ) and how often it gave memory back (`vmbox_memory_trims`,
0 when the replica does not export it).
- flows in a 70 MiB pod (the reference design's limit, the yardstick): 70 MiB
  less idle, over bytes per flow.

Without root or a writable memory cgroup `why_not()` says why and the bench
skips these rows. One run's figures move by a few percent with the machine.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbox.runtime.cgroups import CgroupUnavailable, MemoryCgroup, find_hierarchy, parse_flat_keyed
from vmbox.runtime.local import open_cgroups
from vmbox.spec import Spec, parse_spec
from vmbox.spec.values import parse_size
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import Service, free_udp_port, running_service

MIB = 1024 * 1024
POD = 70 * MIB  # the reference design's pod limit, the yardstick
LIMIT = "256Mi"  # each replica's cgroup limit here: N flows and their sources fit
FLOWS = int(os.environ.get("BENCH_MEMORY_FLOWS", 15_000))
RATE = 10_000.0  # new flows offered per second
BATCH = 100  # flows sent between two looks at the clock
PAYLOAD = b"\0" * 64
ONE_SOURCE = "127.32.0.1"
PROBE = ("127.34.0.1", 0)  # the one datagram that starts a new window after idle-out
FIRST_PORT = 20_000  # the one-source run's ports: FIRST_PORT upwards
SETTLE_MIN, SETTLE_MAX, SETTLE_STEP = 1.0, 6.0, 0.5  # seconds
SETTLED = 128 * 1024  # two reads this close, SETTLE_STEP apart, are settled
COUNT_WAIT = 10.0  # seconds the gauge may take to count the flows after the last send
QUIET = 1.5  # seconds the flow gauge may stand still below N before it is taken as final
IDLE_WAIT = 15.0  # seconds beyond the idle timeout for every flow to idle out


class MeasurementError(RuntimeError):
    """A run whose figures would be wrong; str() says why."""


def idle_timeout(flows: int) -> float:
    """Long enough that no flow idles out before the last is counted."""
    return float(max(3, math.ceil(2 + 2 * flows / RATE)))


def window(flows: int) -> float:
    """The limiter's window: one holds a whole run's sources."""
    return idle_timeout(flows)


@dataclass(frozen=True)
class Snapshot:
    """One read of a replica's memory cgroup, in bytes (None: the kernel does not say)."""

    working_set: int
    kernel: int | None
    anon: int | None


@dataclass(frozen=True)
class Run:
    """One service's run: its replica's memory at each step, and what its gauges counted."""

    sources_offered: int  # distinct source addresses offered (1 or N)
    flows: int  # vmbox_flows when the loaded snapshot was taken
    sources: int  # vmbox_sources then (the limiter's table)
    idle: Snapshot  # ready and settled, before any traffic
    before: Snapshot  # just before the flows, at a window boundary
    loaded: Snapshot  # once the flows were counted
    after: Snapshot  # once every flow had idled out, settled
    # N sources only: after one datagram (a new source) in the next window, which
    # drops the limiter's table of the last one, settled
    next_window: Snapshot | None
    trims: int  # vmbox_memory_trims at the end: times the replica gave memory back (0: none)
    allocator: str  # PYTHONMALLOC in the replica's environment ("" when unset)
    pid: int
    cgroup: Path

    def growth(self, field: str) -> float | None:
        end, start = getattr(self.loaded, field), getattr(self.before, field)
        return None if end is None or start is None else float(end - start)


@dataclass(frozen=True)
class MemoryFigures:
    offered: int  # N: flows offered in each run
    one_source: Run
    many_sources: Run
    idle_timeout: float
    window: float

    @property
    def idle(self) -> int:
        return self.one_source.idle.working_set

    def per_flow(self, field: str = "working_set") -> float | None:
        grown = self.one_source.growth(field)
        return None if grown is None else grown / self.one_source.flows

    def per_source(self, field: str = "working_set") -> float | None:
        run, flow = self.many_sources, self.per_flow(field)
        grown = run.growth(field)
        if grown is None or flow is None:
            return None
        return (grown - run.flows * flow) / max(1, run.sources - 1)

    @property
    def fits_in_pod(self) -> int:
        flow = self.per_flow()
        return int((POD - self.idle) / flow) if flow else 0


def why_not() -> str | None:
    """Why the memory rows cannot run here, or None."""
    if os.geteuid() != 0:
        return "the memory rows need root (a memory cgroup per replica)"
    cgroups, note = open_cgroups(f"bench-memory-probe-{os.getpid()}", parse_size(LIMIT))
    if cgroups is None:
        return f"the memory rows need a writable memory cgroup: {note}"
    cgroups.sweep()
    return None


def _spec(service: str, flows: int) -> Spec:
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"limit": 1_000_000_000, "window": f"{window(flows):g}s"},
            "replicas": {"count": 1, "memory_limit": LIMIT},
            "max_flows": flows + 1_000,
            "flow_idle_timeout": f"{idle_timeout(flows):g}s",
        },
        f"bench {service}",
    )


def _cgroup_of(service: Service, pid: int, replica_id: str) -> MemoryCgroup:
    if not service.runtime.cgroup_note.startswith("cgroup"):
        raise MeasurementError(f"the replica has no memory cgroup: {service.runtime.cgroup_note}")
    try:
        hierarchy = find_hierarchy()
    except CgroupUnavailable as exc:
        raise MeasurementError(str(exc)) from None
    path = hierarchy.of_pid(pid)
    if path is None or path.name != replica_id:
        raise MeasurementError(f"replica {replica_id} (pid {pid}) is not in its own cgroup: {path}")
    return MemoryCgroup(path, hierarchy.version)


def snapshot(cgroup: MemoryCgroup) -> Snapshot:
    stat = parse_flat_keyed((cgroup.path / "memory.stat").read_text())
    if cgroup.version == 1:
        kmem = cgroup.path / "memory.kmem.usage_in_bytes"
        kernel = int(kmem.read_text()) if kmem.exists() else None
        anon = stat.get("total_rss")
    else:
        kernel, anon = stat.get("kernel"), stat.get("anon")
    return Snapshot(cgroup.working_set(), kernel, anon)


async def settled(cgroup: MemoryCgroup) -> Snapshot:
    """A read once two reads SETTLE_STEP apart agree within SETTLED (or SETTLE_MAX passed)."""
    await asyncio.sleep(SETTLE_MIN)
    deadline = time.monotonic() + SETTLE_MAX
    last = snapshot(cgroup)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_STEP)
        now = snapshot(cgroup)
        if abs(now.working_set - last.working_set) <= SETTLED:
            return now
        last = now
    return last


async def window_start(length: float) -> None:
    """Sleep until just past the next boundary of `length`-second windows (epoch-aligned)."""
    boundary = (math.floor(time.time() / length) + 1) * length
    await asyncio.sleep(max(0.0, boundary + 0.05 - time.time()))


async def send_flows(target: tuple[str, int], sources: Sequence[tuple[str, int]]) -> int:
    """One datagram from each (address, port), a fresh socket each, at RATE; how many went."""
    sent = 0
    start = time.monotonic()
    for index, source in enumerate(sources):
        if index % BATCH == 0:
            await asyncio.sleep(max(0.0, start + index / RATE - time.monotonic()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(source)
                sock.sendto(PAYLOAD, target)
                sent += 1
            except OSError:
                continue  # a port someone else holds: one flow fewer, counted by the gauge
    return sent


def one_source(flows: int) -> list[tuple[str, int]]:
    return [(ONE_SOURCE, FIRST_PORT + i) for i in range(flows)]


def many_sources(flows: int) -> list[tuple[str, int]]:
    return [(f"127.33.{i // 250}.{1 + i % 250}", 0) for i in range(flows)]


def _environment(pid: int) -> dict[str, str]:
    """The replica's environment as it was started (what the runtime gave it)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


async def _gauge(service: Service, name: str) -> float:
    for values in (await service.gauges()).values():
        return values.get(name, 0.0)
    raise MeasurementError(f"{service.spec.service}: the replica's metrics do not answer")


async def _counted(service: Service, wanted: int) -> int:
    """vmbox_flows once it reaches `wanted`, or stands still for QUIET s (bounded)."""
    deadline = time.monotonic() + COUNT_WAIT
    seen, since = -1, time.monotonic()
    while True:
        flows = int(await _gauge(service, "vmbox_flows"))
        if flows >= wanted:
            return flows
        if flows != seen:
            seen, since = flows, time.monotonic()
        elif time.monotonic() - since > QUIET or time.monotonic() > deadline:
            return flows
        await asyncio.sleep(0.1)


async def _idled_out(service: Service, within: float) -> None:
    deadline = time.monotonic() + within
    while await _gauge(service, "vmbox_flows") > 0:
        if time.monotonic() > deadline:
            raise MeasurementError(f"flows did not idle out within {within:.0f}s")
        await asyncio.sleep(0.2)


async def measure_run(
    store: EtcdStore,
    name: str,
    sources: Sequence[tuple[str, int]],
    log_dir: Path | None = None,
    *,
    probe: bool = False,
) -> Run:
    """Service `name`, one replica, `sources` as new flows; its replica's memory at each step."""
    flows = len(sources)
    async with running_service(store, lambda: _spec(name, flows), log_dir=log_dir) as service:
        (replica_id, member), *_ = (await service.members()).items()
        pid = int(member.info["pid"])
        cgroup = _cgroup_of(service, pid, replica_id)
        idle = await settled(cgroup)
        # Past the replica's first window (it admits nothing) and at a fresh one's start.
        await window_start(window(flows))
        before = snapshot(cgroup)
        sent = await send_flows(service.spec.relay.listen, sources)
        counted = await _counted(service, sent)
        if counted < 0.95 * flows:
            raise MeasurementError(f"{counted} of {flows} flows were opened ({sent} sent)")
        await asyncio.sleep(0.5)  # the replies in flight relayed
        tracked = int(await _gauge(service, "vmbox_sources"))
        loaded = snapshot(cgroup)
        if int(await _gauge(service, "vmbox_flows")) != counted:
            raise MeasurementError("flows idled out or came in while they were read")
        await _idled_out(service, idle_timeout(flows) + IDLE_WAIT)
        after = await settled(cgroup)
        next_window = None
        if probe:
            await window_start(window(flows))
            await send_flows(service.spec.relay.listen, [PROBE])
            next_window = await settled(cgroup)
            if await _gauge(service, "vmbox_sources") != 1:
                raise MeasurementError("the probe did not start a new window of the limiter")
        return Run(
            len({host for host, _ in sources}),
            counted,
            tracked,
            idle,
            before,
            loaded,
            after,
            next_window,
            int(await _gauge(service, "vmbox_memory_trims")),
            _environment(pid).get("PYTHONMALLOC", ""),
            pid,
            cgroup.path,
        )


async def measure(
    store: EtcdStore, log_dir: Path | None = None, flows: int = FLOWS
) -> MemoryFigures:
    """Both runs, one after the other, at `flows` new flows each."""
    one = await measure_run(store, "bench-memory-flows", one_source(flows), log_dir)
    many = await measure_run(
        store, "bench-memory-sources", many_sources(flows), log_dir, probe=True
    )
    return MemoryFigures(flows, one, many, idle_timeout(flows), window(flows))
