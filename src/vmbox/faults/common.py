"""What every fault shares: a private service, a watch on its replicas, its etcd state,
the over-limit count, kernel drops and etcdctl.

Called by the fault modules (vmbox.faults.flood, bad_input, bad_state, and those
to come). The service is the experiments' (vmbox.experiments.common): a private
etcd, an echo server as the upstream, a controller and its replicas as local
processes, all on loopback and all stopped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import psutil

from vmbox.demo import free_udp_port
from vmbox.etcdserver import find_etcd
from vmbox.experiments.common import Service, private_store, running_service
from vmbox.faults import NONE, FaultResult, processes
from vmbox.metrics import ScrapeError, scrape
from vmbox.spec import Spec, parse_spec
from vmbox.state import keys
from vmbox.state.membership import list_members
from vmbox.state.store import Store
from vmbox.tools.load import LoadPlan, LoadResult, run_load

MIB = 1024 * 1024
LIMIT = 100  # packets per second per source, as in the demo


def fault_spec(service: str, replicas: int = 1, **middlebox: Any) -> Spec:
    """A ratelimit service on fresh loopback ports (below the ephemeral range)."""
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"function": "ratelimit", "limit": LIMIT} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": 4},
            "lease_ttl": 2,
        },
        f"fault {service}",
    )


@asynccontextmanager
async def fault_service(make_spec: Callable[[], Spec]) -> AsyncIterator[Service]:
    """A private etcd and a running service on it, its replicas registered; all gone after."""
    async with private_store() as store, running_service(store, make_spec) as service:
        yield service


# -- etcd state --------------------------------------------------------------


async def read_state(store: Store, service: str) -> dict[str, bytes]:
    """The state a fault must not lose: spec, desired count and every state item."""
    prefix = keys.service_prefix(service)
    kept = {keys.spec_key(service), keys.desired_key(service)}
    items = keys.state_key(service, "")
    kvs, _ = await store.get_prefix(prefix)
    return {
        kv.key.removeprefix(prefix): kv.value
        for kv in kvs
        if kv.key in kept or kv.key.startswith(items)
    }


def _short(value: bytes | None) -> str:
    if value is None:
        return "missing"
    text = value.decode(errors="replace")
    return repr(text if len(text) <= 24 else text[:21] + "...")


def state_lost(
    before: Mapping[str, bytes], after: Mapping[str, bytes], written: Mapping[str, bytes] = {}
) -> str:
    """NONE, or each key whose value is not what it was (or what the fault wrote last)."""
    expected = dict(before) | dict(written)
    lost = [
        f"{key}: {_short(expected.get(key))} -> {_short(after.get(key))}"
        for key in sorted(expected.keys() | after.keys())
        if expected.get(key) != after.get(key)
    ]
    return "; ".join(lost) or NONE


# -- the replicas while a fault runs ------------------------------------------


class Watch:
    """Samples the replicas' RSS and metrics while a fault runs; tells whether they survived.

    A replica survived when the process that was serving at the start still
    runs (same pid, same start time) and the controller restarted nothing.
    """

    def __init__(
        self, service: Service, rss_every: float = 0.05, scrape_every: float = 0.2
    ) -> None:
        self.service = service
        self.rss_every = rss_every
        self.scrape_every = scrape_every
        self.procs: dict[str, psutil.Process] = {}
        self.metrics: dict[str, str] = {}
        self.idle_rss = 0  # the highest replica RSS before the fault
        self.peak_rss = 0
        self.highest: dict[str, float] = {}  # metric -> highest value any replica showed
        self.last: dict[str, dict[str, float]] = {}  # replica -> its latest scrape
        self.gone: list[str] = []  # what dead() said when the watch ended
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        members = await list_members(self.service.store, self.service.spec.service)
        for rid, member in members.items():
            self.procs[rid] = psutil.Process(int(member.info["pid"]))
            self.metrics[rid] = str(member.info["metrics"])
        self.idle_rss = self.peak_rss = self._rss()
        await self.scrape()
        self._tasks = [
            asyncio.create_task(self._sampling()),
            asyncio.create_task(self._scraping()),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sample_rss()
        await self.scrape()
        self.gone = self.dead()

    def _rss(self) -> int:
        total = 0
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                total = max(total, proc.memory_info().rss)
        return total

    def _sample_rss(self) -> None:
        self.peak_rss = max(self.peak_rss, self._rss())

    async def _sampling(self) -> None:
        while True:
            await asyncio.sleep(self.rss_every)
            self._sample_rss()

    async def _scraping(self) -> None:
        while True:
            await asyncio.sleep(self.scrape_every)
            await self.scrape()

    async def scrape(self) -> None:
        """Read every replica's metrics now, keeping the highest of each."""
        for rid, address in self.metrics.items():
            with contextlib.suppress(ScrapeError):
                values = await scrape(address)
                self.last[rid] = values
                for name, value in values.items():
                    self.highest[name] = max(self.highest.get(name, value), value)

    def total(self, name: str) -> float:
        """A metric summed over the replicas' latest scrapes."""
        return sum(values.get(name, 0.0) for values in self.last.values())

    async def until_every(
        self, test: Callable[[dict[str, float]], bool], within: float
    ) -> float | None:
        """Scrape until every replica's metrics pass `test`: the seconds it took, or None."""
        started = time.monotonic()
        while True:
            await self.scrape()
            if len(self.last) == len(self.metrics) and all(map(test, self.last.values())):
                return time.monotonic() - started
            if time.monotonic() - started > within:
                return None
            await asyncio.sleep(0.05)

    def dead(self) -> list[str]:
        """Replicas whose original process is gone, and restarts, one line each."""
        gone = [
            f"replica {rid} (pid {proc.pid}) died"
            for rid, proc in self.procs.items()
            if not processes.alive(proc)
        ]
        if self.service.controller.restarts:
            gone.append(f"the controller restarted {self.service.controller.restarts} replica(s)")
        return gone


# -- traffic -------------------------------------------------------------------


def over_limit(
    history: Iterable[tuple[int, int]], allowed: Callable[[int], int | None], carry: bool = True
) -> int:
    """Packets the upstream received above `allowed(second)` in the measured seconds.

    `history` is an echo server's (epoch second, received) list; a second for
    which `allowed` returns None is not measured. The limiter's windows are
    epoch-aligned seconds too, so each second is one window. A packet admitted
    late in a window can reach the upstream early in the next (a new client's
    upstream socket is created first), so what a window left of its allowance
    carries into the next one, and no further (unless `carry` is False).
    """
    over = spare = 0
    for second, received in sorted(history):
        cap = allowed(second)
        if cap is None:
            spare = 0
            continue
        excess = received - cap
        over += max(0, excess - spare)
        spare = max(0, -excess) if carry else 0
    return over


def received_between(history: Iterable[tuple[int, int]], first: int, last: int) -> list[int]:
    """The echo's counts of the whole seconds first..last (inclusive), in order."""
    counts = dict(history)
    return [counts.get(second, 0) for second in range(first, last + 1)]


async def steady_load(
    target: tuple[str, int], sources: int, duration: float, flows: int = 4
) -> LoadResult:
    """Each of `sources` offers 1.5 x LIMIT packets/s over `flows` flows for `duration` s.

    With several replicas, more flows per source spread each source more
    evenly: under the even split a replica passes at most its share of a
    source's limit, so a source whose flows all hash to one replica gets only
    that share through.
    """
    plan = LoadPlan(
        target,
        rate=1.5 * LIMIT * sources,
        sources=sources,
        flows=flows * sources,
        duration=duration,
    )
    return await run_load(plan)


def socket_drops(address: tuple[str, int]) -> int:
    """Datagrams the kernel dropped at the sockets bound to `address` (a full receive buffer).

    Read from /proc/net/udp, whose last column counts drops per socket; the
    service's SO_REUSEPORT sockets are those bound to its address and
    connected nowhere. 0 where /proc is not readable.
    """
    host, port = address
    local = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    drops = 0
    with contextlib.suppress(OSError), open("/proc/net/udp") as table:
        for line in table:
            parts = line.split()
            if len(parts) > 12 and parts[1] == local and parts[2] == "00000000:0000":
                drops += int(parts[12])
    return drops


async def etcdctl(endpoints: Iterable[str], *args: str, timeout: float = 10.0) -> str:
    """Run the real etcdctl (v3 API) against `endpoints`; RuntimeError with its output.

    subprocess.run in a thread: uvloop's own subprocesses fork beside gRPC's threads.
    """
    binary = find_etcd().removesuffix("etcd") + "etcdctl"
    command = [binary, "--endpoints", ",".join(endpoints), *args]
    shown = " ".join(args)[:60]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"ETCDCTL_API": "3"},
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"etcdctl {shown} took over {timeout:g}s") from None
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {shown} failed: {out.strip()}")
    return out


async def until_mid_second(at: float = 0.5) -> None:
    """Sleep until `at` seconds into the next wall-clock second (a window's middle)."""
    now = time.time()
    target = int(now) + at if now % 1.0 < at else int(now) + 1 + at
    await asyncio.sleep(target - now)


def finish(
    result: FaultResult,
    watch: Watch,
    before: Mapping[str, bytes],
    after: Mapping[str, bytes],
    written: Mapping[str, bytes] = {},
) -> FaultResult:
    """Fill in survival, state lost and peak memory from a fault's watch and snapshots."""
    result.survived = not watch.gone and result.survived
    result.problems.extend(watch.gone)
    result.state_lost = state_lost(before, after, written)
    result.peak_rss = watch.peak_rss
    return result
