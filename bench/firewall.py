"""The firewall rows of `make bench`: what `function: firewall` costs a packet and a connection.

Four paths, each a lab of its own (vmbox.lab, names of their own, always
removed) with an iperf3 server and a tiny HTTP server (port 80, a 2-byte
answer, it closes first) in its server namespace: no queue rule (the lab
forwarding alone), and one-replica `dataplane: nfqueue` services running
ratelimit alone (a limit far above the load), firewall alone, and ratelimit
then firewall (a chain), all running at once. Every service leaves
`gateway.interface` unset, so its replica sees both directions (the firewall
needs them), and ratelimit alone is the fair yardstick.

Latency is measured in ROUNDS rounds, as the relay rows are: in each round
every path carries one slice, in an order that rotates from round to round,
so a burst of the shared machine's noise lands in one slice of one round;
a ratio is the median over the rounds of the slice medians' ratio in the
same round, with its 90% interval.

- established packets: `ping -i 0.002`, PINGS round trips per path. The
  firewall's reads (`fetches`) and, for the chain, the packets it held
  (`vmbox_function_packets_total{verdict="held"}`) meanwhile show whether
  an established packet ever waited for etcd (it should not: only a
  handshake's ACK, and what follows it before the write is in, waits).
- throughput: `iperf3 -t TCP_SECONDS` TCP through each path in turn, once
  (offered: what its sender sent per second; received: what its receiver got).
- new connections: CONNECTIONS sequential HTTP requests per path (slices of
  one curl process each: a new TCP connection per request, the server
  closes it), curl's `time_connect` (the SYN's round trip: the firewall's
  durable write comes after it) and `time_starttransfer` (first byte: the
  handshake's ACK and the request wait for that write); the firewall's etcd
  writes per connection (its `vmbox_firewall_writes` gauge before and after)
  and the connections' keys under /vmbox/<service>/keyed/conns/ right after
  and again after the throughput runs (TIME_WAIT is TIME_WAIT s here, so the
  entries' leases end within about 7 s).

Without root (a lab needs it) `why_not()` says why and the bench skips these rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vmbox.experiments.results import median_interval
from vmbox.lab import LabPlan, exec_argv
from vmbox.labclients import lab_for, ping_rtts, server_address, unique_prefix
from vmbox.spec import Spec, parse_spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import Service, running_service

ROUNDS = 10  # the 90% interval of a median of 10 ratios: their 2nd to 9th smallest
PINGS, PING_INTERVAL = 1000, 0.002
CONNECTIONS = int(os.environ.get("BENCH_FW_CONNECTIONS", 200))
TCP_SECONDS = 2
HTTP_PORT, IPERF_PORT = 80, 5201
TIME_WAIT = 1.0  # s: the firewall's tcp_time_wait, so the bench sees its entries leave etcd
KEYS_WAIT = 9.0  # s after the last connection: TIME_WAIT + a 5 s lease slot + etcd's lateness
BARE, YARDSTICK = "no queue rule", "ratelimit"
PATHS = (BARE, YARDSTICK, "firewall", "ratelimit+firewall")
# split: even, the yardstick as it was measured (demand, the default, adds its reports).
RATELIMIT = {"function": "ratelimit", "limit": 1_000_000_000, "split": "even"}
FIREWALL = {
    "function": "firewall",
    "allow": [
        {"proto": "tcp", "src": "198.18.0.0/24", "dport": HTTP_PORT},
        {"proto": "tcp", "src": "198.18.0.0/24", "dport": IPERF_PORT},
        {"proto": "icmp", "src": "198.18.0.0/24"},
        {"proto": "udp", "src": "198.18.0.0/24"},
    ],
    "timeouts": {"tcp_time_wait": TIME_WAIT},
}
MIDDLEBOX: dict[str, Any] = {
    "ratelimit": RATELIMIT,
    "firewall": FIREWALL,
    "ratelimit+firewall": [RATELIMIT, FIREWALL],
}
HELD = {"function": "firewall", "verdict": "held"}  # a chain's firewall stage waited
# Answers every connection with 2 bytes and closes it; exits after 2 idle minutes.
HTTP_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {HTTP_PORT}))
s.listen(512)
s.settimeout(120)
while True:
    c, _ = s.accept()
    with c:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
"""


@dataclass
class Meter:
    """A replica's firewall counters at one moment (None: not exported for this path)."""

    writes: float | None = None
    fetches: float | None = None
    held: float | None = None  # the firewall stage's held packets (a chain's metric only)

    def minus(self, before: Meter) -> Meter:
        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        return Meter(
            diff(self.writes, before.writes),
            diff(self.fetches, before.fetches),
            diff(self.held, before.held),
        )


@dataclass
class PathFigures:
    pings: list[list[float]] = field(default_factory=list)  # round trips (ms) per round
    connects: list[list[float]] = field(default_factory=list)  # curl time_connect (ms)
    first_bytes: list[list[float]] = field(default_factory=list)  # time_starttransfer (ms)
    offered_bps: float = 0.0  # iperf3 TCP, its sender
    received_bps: float = 0.0  # its receiver
    pinged: Meter = field(default_factory=Meter)  # during the pings: established packets
    streamed: Meter = field(default_factory=Meter)  # during iperf3: two handshakes, then data
    opened: Meter = field(default_factory=Meter)  # during the connections
    keys_after: int | None = None  # the connections' keys right after them
    keys_later: int | None = None  # and after the throughput runs
    later_s: float = 0.0  # that many seconds after the last connection

    @property
    def rtts(self) -> list[float]:
        return [ms for one in self.pings for ms in one]

    @property
    def connect_ms(self) -> list[float]:
        return [ms for one in self.connects for ms in one]

    @property
    def first_byte_ms(self) -> list[float]:
        return [ms for one in self.first_bytes for ms in one]

    def per_connection(self, value: float | None) -> float | None:
        n = len(self.connect_ms)
        return None if value is None or not n else value / n


def cut(values: list[float], q: int) -> float:
    """The q-th percentile (statistics.quantiles' exclusive method)."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def paired(mine: list[list[float]], theirs: list[list[float]]) -> tuple[float, float, float]:
    """The median over the rounds of my slice's median over theirs, and its 90% interval."""
    ratios = [
        statistics.median(a) / statistics.median(b)
        for a, b in zip(mine, theirs, strict=True)
        if a and b
    ]
    return (statistics.median(ratios), *median_interval(ratios, 0.9))


def why_not() -> str | None:
    """Why the firewall rows cannot run here, or None."""
    if os.geteuid() != 0:
        return "the firewall rows need root (a lab of network namespaces)"
    for tool in ("ip", "iperf3", "ping", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"the firewall rows need `{tool}` (make setup installs it)"
    return None


def spec(path: str, plan: LabPlan) -> Spec:
    return parse_spec(
        {
            "service": f"bench-fw-{path.replace('+', '-')}",
            "dataplane": "nfqueue",
            "gateway": {"namespace": plan.namespace("gateway")},  # no interface: both ways
            "middlebox": MIDDLEBOX[path],
            "replicas": {"count": 1, "min": 1, "max": 1},
            "lease_ttl": 2,
        },
        f"bench {path}",
    )


def tcp(plan: LabPlan) -> tuple[float, float]:
    """iperf3 TCP for TCP_SECONDS: bits/s its sender sent and its receiver got."""
    argv = ["iperf3", "-c", server_address(plan), "-p", str(IPERF_PORT)]
    done = subprocess.run(
        exec_argv("client", [*argv, "-t", str(TCP_SECONDS), "--json"], plan.prefix),
        capture_output=True,
        text=True,
        timeout=TCP_SECONDS + 30,
        check=False,
    )
    end = json.loads(done.stdout)
    if "error" in end:
        raise RuntimeError(f"iperf3: {end['error']}")
    sent, received = end["end"]["sum_sent"], end["end"]["sum_received"]
    return float(sent["bits_per_second"]), float(received["bits_per_second"])


def connections(plan: LabPlan, count: int) -> tuple[list[float], list[float]]:
    """`count` sequential requests from one curl: time_connect and first byte (ms) of each
    that was answered."""
    url = f"http://{server_address(plan)}:{HTTP_PORT}/"
    argv = ["curl", "-s", "--connect-timeout", "2", "--max-time", "3"]
    argv += ["-w", "%{http_code} %{time_connect} %{time_starttransfer}\\n"]
    for _ in range(count):
        argv += [url, "-o", "/dev/null"]
    done = subprocess.run(
        exec_argv("client", argv, plan.prefix),
        capture_output=True,
        text=True,
        timeout=count * 0.5 + 20,
        check=False,
    )
    connect, first = [], []
    for line in done.stdout.splitlines():
        code, at_connect, at_first = line.split()
        if code == "200":
            connect.append(1000 * float(at_connect))
            first.append(1000 * float(at_first))
    if len(connect) < count // 2:
        raise RuntimeError(f"curl: {len(connect)} of {count} answered")
    return connect, first


def pings(plan: LabPlan, count: int) -> list[float]:
    rtts = ping_rtts(plan, count, PING_INTERVAL)
    if len(rtts) < count // 2:
        raise RuntimeError(f"ping: {len(rtts)} of {count} answered")
    return rtts


def meter_of(text: str) -> Meter:
    """The firewall's counters in a replica's /metrics text (labels kept, unlike scrape)."""
    meter = Meter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vmbox_firewall_writes":
                meter.writes = s.value
            elif s.name == "vmbox_firewall_fetches":
                meter.fetches = s.value
            elif s.name == "vmbox_function_packets_total" and s.labels.items() >= HELD.items():
                meter.held = s.value
    return meter


@dataclass
class Lane:
    """One path: its lab, its service (None: no queue rule), its figures."""

    plan: LabPlan
    service: Service | None
    figures: PathFigures = field(default_factory=PathFigures)

    async def meter(self) -> Meter:
        if self.service is None:
            return Meter()
        (member,) = (await self.service.members()).values()
        address = str(member.info["metrics"]).removeprefix("http://")

        def get() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as answer:
                return str(answer.read().decode())

        return meter_of(await asyncio.to_thread(get))

    async def conn_keys(self, store: EtcdStore) -> int:
        """The HTTP connections' entries in the firewall's keyed table `conns`."""
        assert self.service is not None, "no queue rule: no firewall"
        name = keys.keyed_prefix(self.service.spec.service, "conns")
        entries, _ = await store.get_prefix(name)
        return sum(e.key.endswith(f"-{server_address(self.plan)}-{HTTP_PORT}") for e in entries)


async def rounds(lanes: dict[str, Lane], slice_of: Callable[[Lane], None]) -> None:
    """ROUNDS rounds of one slice through every lane, in an order rotating by round."""
    names = list(lanes)
    for r in range(ROUNDS):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            await asyncio.to_thread(slice_of, lanes[name])


async def metered(
    lanes: dict[str, Lane], phase: Callable[[], Awaitable[None]], settle: float = 0.0
) -> dict[str, Meter]:
    """Run `phase`; each lane's firewall counters over it (after `settle` s)."""
    before = {name: await lane.meter() for name, lane in lanes.items()}
    await phase()
    await asyncio.sleep(settle)
    return {name: (await lane.meter()).minus(before[name]) for name, lane in lanes.items()}


async def measure_lanes(store: EtcdStore, lanes: dict[str, Lane]) -> None:
    """Pings, then connections, then throughput, then the connections' keys again."""

    def ping_slice(lane: Lane) -> None:
        lane.figures.pings.append(pings(lane.plan, PINGS // ROUNDS))

    def curl_slice(lane: Lane) -> None:
        connect, first = connections(lane.plan, CONNECTIONS // ROUNDS)
        lane.figures.connects.append(connect)
        lane.figures.first_bytes.append(first)

    for name, m in (await metered(lanes, lambda: rounds(lanes, ping_slice))).items():
        lanes[name].figures.pinged = m
    # The FINs' writes are behind the packets (50 ms batches): settle before reading.
    for name, m in (await metered(lanes, lambda: rounds(lanes, curl_slice), 0.5)).items():
        lanes[name].figures.opened = m
        if m.writes is not None:  # a firewall
            lanes[name].figures.keys_after = await lanes[name].conn_keys(store)
    last = time.monotonic() - 0.5
    for lane in lanes.values():
        before = await lane.meter()
        f = lane.figures
        f.offered_bps, f.received_bps = await asyncio.to_thread(tcp, lane.plan)
        f.streamed = (await lane.meter()).minus(before)
    for lane in lanes.values():
        if lane.figures.pinged.writes is None:
            continue  # no firewall
        while (n := await lane.conn_keys(store)) and time.monotonic() < last + KEYS_WAIT:
            await asyncio.sleep(0.5)
        lane.figures.keys_later, lane.figures.later_s = n, time.monotonic() - last


def servers(stack: contextlib.ExitStack, plan: LabPlan) -> None:
    """The iperf3 and HTTP servers in `plan`'s server namespace, killed with `stack`."""
    for argv in (["iperf3", "-s", "-p", str(IPERF_PORT)], [sys.executable, "-c", HTTP_SERVER]):
        proc = subprocess.Popen(
            exec_argv("server", argv, plan.prefix),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(proc.wait)
        stack.callback(proc.kill)


async def measure(store: EtcdStore, log_dir: Path) -> dict[str, PathFigures]:
    """Every path's figures: its lab made, its service run, and both removed here."""
    with contextlib.ExitStack() as labs:
        plans = {
            path: labs.enter_context(lab_for(unique_prefix(f"vbf{i}"), 1))
            for i, path in enumerate(PATHS)
        }
        for plan in plans.values():
            servers(labs, plan)
        async with contextlib.AsyncExitStack() as services:  # stopped before the labs go
            lanes: dict[str, Lane] = {}
            for path, plan in plans.items():
                service = None
                if path != BARE:
                    running = running_service(store, spec(path, plan), log_dir=log_dir)
                    service = await services.enter_async_context(running)
                lanes[path] = Lane(plan, service)
            await asyncio.sleep(1.0)  # past a ratelimit's first window, which admits nothing
            for lane in lanes.values():
                await asyncio.to_thread(ping_rtts, lane.plan, 3, 0.2)  # warm up ARP/ND
            await measure_lanes(store, lanes)
        return {path: lane.figures for path, lane in lanes.items()}
