"""Part 4 of the firewall experiment: a SYN flood from spoofed sources, and real clients in it.

Called by run.py. Three `state: shared` replicas whose `allow` lets anyone
open HTTP (a public web server: so every spoofed SYN becomes a half-open
connection, the worst case). hping3 sends SYNs from random source addresses
as fast as its pacing goes (vmbox.labtraffic.syn_flood); meanwhile curl makes
`legit` sequential requests (a new connection each) from a client address to
an HTTP server in the server's namespace, and the replicas' half-open counts
are scraped every SCRAPE s. A spoofed handshake never completes, so the flood
should leave no key in etcd: the keys under /vmbox/<service>/keyed/ are
counted after it (the legitimate connections' are told apart by their client
address), beside etcd's own db size and put count (its /metrics) and the
replicas' RSS, before and after.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbox.experiments.firewall.setup import etcd_metrics, firewall_spec, rss_mib
from vmbox.lab import LabPlan
from vmbox.lab.procs import finish, kill, spawn, wait_listening
from vmbox.labtraffic import HTTP_PORT, FloodResult, syn_flood
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import Service, running_service

REPLICAS = 3
RATE = 1_000_000.0  # asked of hping3: its shortest pacing interval (1 us), as fast as it goes
SCRAPE = 0.2  # s between looks at the replicas' half-open counts
LEGIT_AFTER = 0.2  # s into the flood when the legitimate requests start
CONNECT_TIMEOUT = 3.0  # s curl waits for each legitimate connection (a lost SYN: 1 s retry)
SETTLE = 0.5  # s after everything, for the write-behind batches (50 ms) and the counters
HALF_OPEN = "vmbox_firewall_half_open"
# Packets the kernel dropped on their way to a replica: its queue full, or its socket.
KERNEL_DROPS = ("vmbox_kernel_queue_drops_total", "vmbox_kernel_socket_drops_total")
FILE_SIZE = 10_000  # bytes of each legitimate download
_CURL_OUT = "%{http_code} %{size_download} %{time_connect}\\n"  # one line per request


@dataclass(frozen=True)
class Legit:
    """The legitimate requests made during the flood."""

    total: int
    ok: int  # answered 200 with the whole file
    connect_ms: tuple[float, ...]  # curl's time_connect of each answered one
    began: float  # s after the flood's start
    ended: float


@dataclass(frozen=True)
class ReplicaFlood:
    replica: str
    half_open_max: float  # the most half-open connections seen at a scrape
    evicted: float  # half-open connections evicted (the oldest, when full)
    writes: float  # the firewall's etcd writes over the whole part
    queue_drops: float  # packets the kernel dropped on their way to it (KERNEL_DROPS)
    rss_before: float  # MiB
    rss_after: float


@dataclass(frozen=True)
class FloodRun:
    flood: FloodResult
    bound: int  # max_half_open per replica
    replicas: tuple[ReplicaFlood, ...]
    legit: Legit
    keys_after: int  # under /vmbox/<service>/keyed/ once it was over
    flood_keys: int  # of those, not the legitimate client's
    etcd_before: dict[str, float]
    etcd_after: dict[str, float]
    etcd_seconds: float  # between those two readings


def _requests(lab: LabPlan, count: int, rate: float) -> tuple[int, list[float], float, float]:
    """`count` sequential GETs by one curl (`rate` a second, a new connection each: the
    server closes it) to a server started here: (answered, their connect ms, start, end
    as epoch)."""
    server = str(lab.describe()["server"]["address"])
    with tempfile.TemporaryDirectory(prefix="vmbox-fwflood-") as root:
        (Path(root) / "small").write_bytes(b"x" * FILE_SIZE)
        bound = count / rate + CONNECT_TIMEOUT + 20
        argv = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", server]
        listener = spawn(lab, "server", [*argv, "--directory", root], bound + 10)
        try:
            wait_listening(lab, "server", HTTP_PORT, listener)
            argv = ["curl", "-s", "--interface", lab.client_addresses[0]]
            argv += ["--rate", f"{rate * 60:.0f}/m", "-w", _CURL_OUT]
            argv += ["--connect-timeout", f"{CONNECT_TIMEOUT:g}", "--max-time", "5"]
            for _ in range(count):
                argv += [f"http://{server}:{HTTP_PORT}/small", "-o", "/dev/null"]
            began = time.time()
            curl = spawn(lab, "client", argv, bound)
            try:
                _, out, _ = finish(curl, time.monotonic() + bound + 4)
            finally:
                kill(curl)
            ended = time.time()
        finally:
            kill(listener)
    answered = [line.split() for line in out.splitlines()]
    good = [f for f in answered if len(f) == 3 and f[0] == "200" and int(f[1]) == FILE_SIZE]
    return len(good), [1000 * float(f[2]) for f in good], began, ended


async def _half_open_max(svc: Service, flooding: asyncio.Future[Any]) -> dict[str, float]:
    """The most half-open connections each replica showed until `flooding` is done, and
    once after (they outlive the flood by the SYN timeout)."""
    most: dict[str, float] = {}
    while True:
        done = flooding.done()
        for rid, metrics in (await svc.gauges()).items():
            most[rid] = max(most.get(rid, 0.0), metrics.get(HALF_OPEN, 0.0))
        if done:
            return most
        await asyncio.sleep(SCRAPE)


async def _during(
    svc: Service, lab: LabPlan, count: int, legit: int, legit_rate: float
) -> tuple[FloodResult, dict[str, float], Legit]:
    """The flood, the replicas' half-open counts watched meanwhile, the requests in it."""
    started = time.time()
    flooding = asyncio.ensure_future(asyncio.to_thread(syn_flood, lab, count, RATE))
    watching = asyncio.ensure_future(_half_open_max(svc, flooding))
    try:
        await asyncio.sleep(LEGIT_AFTER)
        ok, connects, began, ended = await asyncio.to_thread(_requests, lab, legit, legit_rate)
        result, most = await flooding, await watching
    finally:
        for task in (flooding, watching):
            task.cancel()
    return result, most, Legit(legit, ok, tuple(connects), began - started, ended - started)


def _replicas(
    pids: dict[str, int],
    most: dict[str, float],
    gauges: dict[str, dict[str, float]],
    rss: tuple[dict[int, float], dict[int, float]],
) -> tuple[ReplicaFlood, ...]:
    def value(rid: str, *names: str) -> float:
        return sum(gauges.get(rid, {}).get(name, 0.0) for name in names)

    return tuple(
        ReplicaFlood(
            rid,
            most.get(rid, 0.0),
            value(rid, "vmbox_firewall_evicted_half_open"),
            value(rid, "vmbox_firewall_writes"),
            value(rid, *KERNEL_DROPS),
            rss[0].get(pid, math.nan),
            rss[1].get(pid, math.nan),
        )
        for rid, pid in sorted(pids.items())
    )


async def flood(
    store: EtcdStore,
    etcd_endpoint: str,
    lab: LabPlan,
    count: int,
    legit: int,
    legit_rate: float,
    bound: int,
) -> FloodRun:
    """`count` spoofed SYNs through REPLICAS replicas holding `bound` half-open each, and
    `legit` requests at `legit_rate`/s during it."""
    spec = firewall_spec("fwflood", lab, "shared", REPLICAS, public_http=True, max_half_open=bound)
    async with running_service(store, spec) as svc:
        pids = {rid: int(m.info["pid"]) for rid, m in (await svc.members()).items()}
        rss_before, etcd_before = rss_mib(list(pids.values())), await etcd_metrics(etcd_endpoint)
        read_before = time.monotonic()
        result, most, made = await _during(svc, lab, count, legit, legit_rate)
        await asyncio.sleep(SETTLE)
        gauges = await svc.gauges()
        rss_after, etcd_after = rss_mib(list(pids.values())), await etcd_metrics(etcd_endpoint)
        read_after = time.monotonic()
        entries, _ = await store.get_prefix(keys.service_prefix(spec.service) + "keyed/")
    source = lab.client_addresses[0]
    return FloodRun(
        result,
        bound,
        _replicas(pids, most, gauges, (rss_before, rss_after)),
        made,
        len(entries),
        sum(f"-{source}-" not in e.key for e in entries),
        etcd_before,
        etcd_after,
        read_after - read_before,
    )
