"""`make bench`: the data plane's cost, as ratios against a plain relay measured in the same run.

Each variant runs in its own process on uvloop, between the same load
generator (this process) and the same echo server (its own process):

- `plain`: the UDP relay forwarding everything, no middlebox, no store;
- `local`, `poll`, `watch`, `strong`, `fenced`: a real replica running
  ratelimit with a limit far above the offered load, its `limit` kept fresh
  in that mode against a private etcd (`fenced` also acks and probes its
  lease, as a fenced item's writer needs).

As root, the in-path rows (bench/inpath.py): a lab of namespaces, 64-byte UDP
from `iperf3 -u -l 64 -b 0` and `ping` round trips with no queue rule and
through a one-replica `dataplane: nfqueue` service, as ratios, and the
driver's packets/s against the relay's; without root the bench says why and
prints the relay table alone.

As root, the kernel rows (bench/kernel.py): a fleet of BENCH_NODES (4) nodes
enforcing in the kernel (`enforce: kernel`), hping3 floods with no table, a
non-binding limit on every node, and one node against the Python in-path
driver, offered beside passed.

As root, the firewall rows (bench/firewall.py): a lab per path, with no
queue rule, ratelimit alone, firewall alone and the chain ratelimit then
firewall (one replica each, both directions queued); ping round trips (in
rotating rounds, as the relay's latency) and iperf3 TCP through each, as
ratios against no queue rule and ratelimit alone; then sequential new TCP
connections (curl): connect and first-byte times, the firewall's etcd writes
per connection, and its entries in etcd after. About 30 s.

As root with a writable memory cgroup, the memory rows (bench/memory.py): one
replica run as the service runs it, in its own memory cgroup, its working set
idle, per open flow and per tracked source (from BENCH_MEMORY_FLOWS new flows,
15,000 by default) and after the flows idled out, against the reference
design's 70 MiB pod.

All the relay variants run at once. Throughput is measured one variant at a
time (a saturating blast). Latency is measured in LATENCY_ROUNDS rounds; in each
round every variant carries one slice of ROUND_PACKETS packets at 1,000/s, in
an order that rotates from round to round, so a burst of the shared machine's
noise lands in one slice of one round rather than in one variant's whole run.

Printed: one table, throughput (datagrams passed per second at a saturating
offer, the offer in the title) and per-packet round-trip latency at 1,000
packets/s, each beside the plain relay's as a ratio, and the latency beside
`local`'s (what keeping shared state fresh costs a packet; the goal for
`poll`, `watch` and `fenced` is within 1.05x). The latency ratios are paired:
the median over the rounds of the variant's slice mean over the other's slice
mean in the same round, and beside `x local` the 90% interval of that median
(the 8th to 17th smallest of 24 ratios). Then the in-path and the memory tables
when they ran.
`--csv PATH` also writes the same figures as CSV
(the memory and firewall rows, whose columns differ, to PATH's stem +
`-memory.csv` and `-firewall.csv`; the firewall's ping rows also in PATH).
`--only PART` (repeatable: relay, inpath, kernel, memory, firewall) runs those
parts alone.
Progress goes to stderr while the variants run.
The machine is shared and noisy, so only the ratios of one run mean
anything; run it twice before believing a difference under 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from firewall import (
    CONNECTIONS,
    PING_INTERVAL,
    PINGS,
    ROUNDS,
    TCP_SECONDS,
    TIME_WAIT,
    Meter,
    PathFigures,
    cut,
    paired,
)
from firewall import measure as measure_firewall
from firewall import why_not as why_not_firewall
from inpath import InpathFigures, why_not
from inpath import measure as measure_inpath
from kernel import measure as measure_kernel
from kernel import why_not as why_not_kernel
from memory import MIB, POD, MemoryFigures
from memory import measure as measure_memory
from memory import why_not as why_not_memory

from vmbox import allocator
from vmbox.experiments.kernel import Point
from vmbox.experiments.results import median_interval
from vmbox.spec import parse_spec
from vmbox.state import keys
from vmbox.state.access import replica_flags
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import free_udp_port, private_store, store_access, wait_ready
from vmbox.tools.load import LoadPlan, run_load

HERE = Path(__file__).parent
MODES = ("local", "poll", "watch", "strong", "fenced")
BLAST_RATE, BLAST_SECONDS = float(os.environ.get("BENCH_RATE", 100_000)), 3.0
LATENCY_RATE, LATENCY_PACKETS = 1_000.0, 3_000


# 24 rounds: the 90% interval of a median over 24 ratios is their 8th to 17th smallest,
# about +-4% on this machine; 12 rounds read fenced at 1.09x and 0.86x in two runs.
LATENCY_ROUNDS, ROUND_PACKETS = 24, 250


@dataclass
class Figures:
    throughput: float
    rounds: list[list[float]] = field(default_factory=list)  # round trips (ms) per round

    @property
    def rtts(self) -> list[float]:
        return [ms for one in self.rounds for ms in one]

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.rtts)

    @property
    def p50_ms(self) -> float:
        return percentile(self.rtts, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.rtts, 0.99)

    def ratios(self, other: Figures) -> list[float]:
        """Per round, this slice's mean over `other`'s in the same round."""
        return [
            statistics.fmean(mine) / statistics.fmean(theirs)
            for mine, theirs in zip(self.rounds, other.rounds, strict=True)
            if mine and theirs
        ]

    def paired(self, other: Figures) -> float:
        """The median over the rounds of this slice's mean over `other`'s in the same round."""
        return statistics.median(self.ratios(other))

    def interval(self, other: Figures) -> tuple[float, float]:
        """Where that median lies with 90% confidence (order statistics of the rounds)."""
        return median_interval(self.ratios(other), 0.9)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def throughput(target: tuple[str, int]) -> Figures:
    """Warm up, then blast: datagrams passed per second at BLAST_RATE."""
    await run_load(LoadPlan(target, rate=500.0, flows=8, duration=1.0))
    blast = await run_load(LoadPlan(target, rate=BLAST_RATE, flows=16, duration=BLAST_SECONDS))
    return Figures(blast.received / BLAST_SECONDS)


async def latency_round(targets: dict[str, tuple[str, int]], results: dict[str, Figures]) -> None:
    """One slice of ROUND_PACKETS at LATENCY_RATE through each target, in the given order."""
    for name, target in targets.items():
        plan = LoadPlan(target, rate=LATENCY_RATE, flows=4, duration=ROUND_PACKETS / LATENCY_RATE)
        paced = await run_load(plan)
        assert paced.rtts_ms, f"no packet came back through {name}: is it running?"
        results[name].rounds.append(paced.rtts_ms)


async def measure(targets: dict[str, tuple[str, int]]) -> dict[str, Figures]:
    """Every target's throughput in turn, then LATENCY_ROUNDS rounds of latency slices."""
    results = {name: await throughput(target) for name, target in targets.items()}
    names = list(targets)
    for r in range(LATENCY_ROUNDS):
        shift = r % len(names)
        turn = names[shift:] + names[:shift]
        await latency_round({name: targets[name] for name in turn}, results)
    return results


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """A variant's process, with the allocator a replica gets from the runtime (all alike)."""
    return subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | allocator.ENVIRONMENT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def plain(stack: contextlib.AsyncExitStack, upstream: tuple[str, int]) -> tuple[str, int]:
    """The plain relay in its process, stopped with `stack`; where it listens."""
    listen = ("127.0.0.1", free_udp_port())
    proc = spawn(
        [str(HERE / "plain_relay.py"), f"{listen[0]}:{listen[1]}", f"{upstream[0]}:{upstream[1]}"]
    )
    stack.callback(stop, proc)
    await asyncio.sleep(1.0)
    return listen


async def replica(
    stack: contextlib.AsyncExitStack, store: EtcdStore, mode: str, upstream: tuple[str, int]
) -> tuple[str, int]:
    """A replica in `mode` in its process, ready, stopped with `stack`; where it listens."""
    service = f"bench-{mode}"
    spec = parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"{upstream[0]}:{upstream[1]}",
            # split: even, so each row is its mode's cost alone: demand, the default,
            # would add its per-packet count and its reports to every row.
            "middlebox": {
                "limit": 1_000_000_000,
                "consistency": mode,
                "poll_interval": "100ms",
                "split": "even",
            },
        }
    )
    await store.put(keys.spec_key(service), spec.to_json().encode())
    await store.put(keys.state_key(service, "limit"), b"1000000000")
    proc = spawn(
        [
            "-m",
            "vmbox",
            "replica",
            "--service",
            service,
            "--id",
            "r1",
            "--etcd",
            ",".join(store.endpoints),
            *replica_flags(store_access(store.endpoints)),  # the private etcd's user and file
        ]
    )

    async def gone() -> None:
        stop(proc)
        await store.delete_prefix(keys.service_prefix(service))

    stack.push_async_callback(gone)

    async def replica_runs() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"replica for {mode} exited with {proc.returncode}")

    await wait_ready(store, service, 1, check=replica_runs)
    return spec.relay.listen


def report(results: dict[str, Figures]) -> Table:
    base = results["plain"]
    table = Table(
        title=f"vmbox bench: throughput at an offer of {BLAST_RATE:.0f}/s, latency "
        f"(round trip) at {LATENCY_RATE:.0f}/s; ratios against the plain relay",
        title_justify="left",
    )
    columns = (
        "variant",
        "passed/s",
        "x plain",
        "mean ms",
        "x plain",
        "x local",
        "x local 90%",
        "p50 ms",
    )
    for name in (*columns, "p99 ms"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for name, f in results.items():
        table.add_row(
            name,
            f"{f.throughput:,.0f}",
            f"{f.throughput / base.throughput:.2f}",
            f"{f.mean_ms:.3f}",
            "" if f is base else f"{f.paired(base):.2f}",
            x_local(results, f),
            x_local_interval(results, f),
            f"{f.p50_ms:.3f}",
            f"{f.p99_ms:.3f}",
        )
    return table


def x_local(results: dict[str, Figures], f: Figures, digits: int = 2) -> str:
    """A replica's round trip over `local`'s by paired rounds: what keeping the limit fresh
    costs a packet."""
    local = results.get("local")
    return "" if local is None or f is local else f"{f.paired(local):.{digits}f}"


def x_local_interval(results: dict[str, Figures], f: Figures, digits: int = 2) -> str:
    """`x_local`'s 90% interval: how far this run's noise lets the ratio be trusted."""
    local = results.get("local")
    if local is None or f is local:
        return ""
    low, high = f.interval(local)
    return f"{low:.{digits}f}-{high:.{digits}f}"


def report_inpath(results: dict[str, Figures], inpath: dict[str, InpathFigures]) -> Table:
    bare, nfq = inpath["no queue rule"], inpath["nfqueue"]
    table = Table(
        title="in-path: a lab, 64-byte UDP from iperf3 -u -l 64 -b 0 (offered beside each), "
        "ping -i 0.002 round trips; one replica; ratios against no queue rule",
        title_justify="left",
    )
    for name in ("path", "offered/s", "passed/s", "x no rule", "p50 ms", "p99 ms", "+p50", "+p99"):
        table.add_column(name, justify="left" if name == "path" else "right")
    for name, f in inpath.items():
        table.add_row(
            name,
            f"{f.offered:,.0f}",
            f"{f.passed:,.0f}",
            f"{f.passed / bare.passed:.2f}",
            f"{f.p50_ms:.3f}",
            f"{f.p99_ms:.3f}",
            f"{f.p50_ms - bare.p50_ms:+.3f}",
            f"{f.p99_ms - bare.p99_ms:+.3f}",
        )
    for relay in ("plain", "local"):
        if relay in results:
            table.add_row(
                f"nfqueue / relay {relay}",
                f"{nfq.offered:,.0f} / {BLAST_RATE:,.0f}",
                f"{nfq.passed:,.0f} / {results[relay].throughput:,.0f}",
                f"{nfq.passed / results[relay].throughput:.2f}",
                f"{nfq.p50_ms:.3f} / {results[relay].p50_ms:.3f}",
                f"{nfq.p99_ms:.3f} / {results[relay].p99_ms:.3f}",
                "",
                "",
            )
    return table


def report_kernel(points: list[Point]) -> Table:
    """The fleet's floods: offered beside passed, and the two ratios the issue sets goals for."""
    by = {p.part: p for p in points}
    nodes = max(p.nodes for p in points)
    table = Table(
        title=f"kernel: a fleet of {nodes} nodes, hping3 --flood from 4 client addresses, "
        "64-byte UDP, a new flow per packet; the kernel's own counters",
        title_justify="left",
    )
    for name in ("path", "nodes", "offered/s", "passed/s", "ratio", "against"):
        table.add_column(name, justify="left" if name in ("path", "against") else "right")
    against = {
        "kernel": ("no table", "no table (goal >= 0.9)"),
        "python, 1 node": ("kernel, 1 node", "the kernel, 1 node (goal: kernel >= 10x)"),
    }
    for p in points:
        base, what = against.get(p.part, (None, ""))
        ratio = p.received / by[base].received if base in by else None
        table.add_row(
            p.part,
            str(p.nodes),
            f"{p.offered:,.0f}",
            f"{p.received:,.0f}",
            "" if ratio is None else f"{ratio:.2f}",
            what,
        )
    return table


NOTES = {
    "bytes per flow": "one source, a port per flow",
    "bytes per source": "beyond its flow: a source per flow",
}


MemoryRow = tuple[str, float, str, float | None, float | None, str]


def memory_rows(m: MemoryFigures) -> list[MemoryRow]:
    """(figure, value, unit, % of the 70 MiB pod, points from idle, note) for each memory row."""

    def pct(size: float) -> float:
        return 100 * size / POD

    idle = m.idle
    one, many = m.one_source, m.many_sources
    rows: list[MemoryRow] = [
        ("idle working set", idle / MIB, "MiB", pct(idle), None, "ready, no traffic yet"),
        (
            f"at {one.flows:,} flows, one source",
            one.loaded.working_set / MIB,
            "MiB",
            pct(one.loaded.working_set),
            pct(one.loaded.working_set) - pct(one.idle.working_set),
            "",
        ),
    ]
    for name, per in (("bytes per flow", m.per_flow), ("bytes per source", m.per_source)):
        rows.append((name, per() or 0.0, "B", None, None, NOTES[name]))
        for part, note in (("kernel", "sockets, slab"), ("anon", "the heap")):
            if (value := per(part)) is not None:
                rows.append((f"  of which {part}", value, "B", None, None, note))
    afters = [
        ("after idle-out, one source", one, one.after, "every flow idled out"),
        (f"after idle-out, {many.sources:,} sources", many, many.after, "the limiter's table too"),
    ]
    if many.next_window is not None:
        afters.append(
            ("after the next window", many, many.next_window, "1 datagram: table dropped")
        )
    for name, run, snap, note in afters:
        size, pts = snap.working_set, pct(snap.working_set) - pct(run.idle.working_set)
        rows.append((name, size / MIB, "MiB", pct(size), pts, f"{note}; trims {run.trims}"))
    rows.append(("flows in a 70 MiB pod", float(m.fits_in_pod), "flows", None, None, ""))
    return rows


def report_memory(m: MemoryFigures) -> Table:
    table = Table(
        title=f"memory per replica: its cgroup's working set (usage - inactive file), "
        f"{m.offered:,} new flows offered per run (one source, then one source each), "
        f"idle timeout {m.idle_timeout:g} s, PYTHONMALLOC={m.one_source.allocator or 'unset'}; "
        "yardstick the reference design's 70 MiB pod",
        title_justify="left",
    )
    for name in ("figure", "value", "% of 70 MiB", "pts from idle", "note"):
        table.add_column(name, justify="left" if name in ("figure", "note") else "right")
    for name, value, unit, pct, pts, note in memory_rows(m):
        shown = f"{value:,.1f} {unit}" if unit == "MiB" else f"{value:,.0f} {unit}"
        table.add_row(
            name,
            shown,
            "" if pct is None else f"{pct:.1f}%",
            "" if pts is None else f"{pts:+.1f}",
            note,
        )
    return table


def write_memory_csv(path: Path, m: MemoryFigures) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["figure", "value", "unit", "pct_of_70mib", "pts_from_idle", "note"])
        for name, value, unit, pct, pts, note in memory_rows(m):
            writer.writerow(
                [
                    name,
                    f"{value:.3f}",
                    unit,
                    "" if pct is None else f"{pct:.2f}",
                    "" if pts is None else f"{pts:.2f}",
                    note,
                ]
            )


def memory_csv_path(path: Path) -> Path:
    """Beside the main CSV: bench.csv -> bench-memory.csv (other columns than the relay's)."""
    return path.with_name(f"{path.stem}-memory{path.suffix or '.csv'}")


def write_csv(
    path: Path,
    results: dict[str, Figures],
    inpath: dict[str, InpathFigures] | None = None,
    kernel: list[Point] | None = None,
    firewall: dict[str, PathFigures] | None = None,
) -> None:
    base = results.get("plain")
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            [
                "variant",
                "offered_per_s",
                "passed_per_s",
                "throughput_x_plain",
                "mean_ms",
                "mean_x_plain",
                "mean_x_local",
                "mean_x_local_90",
                "p50_ms",
                "p99_ms",
            ]
        )
        for name, f in results.items():
            writer.writerow(
                [
                    name,
                    f"{BLAST_RATE:.0f}",
                    f"{f.throughput:.0f}",
                    "" if base is None else f"{f.throughput / base.throughput:.3f}",
                    f"{f.mean_ms:.4f}",
                    "" if base is None or f is base else f"{f.paired(base):.3f}",
                    x_local(results, f, 3),
                    x_local_interval(results, f, 3),
                    f"{f.p50_ms:.4f}",
                    f"{f.p99_ms:.4f}",
                ]
            )
        if inpath:
            # throughput_x_plain: against the lab with no queue rule; no mean.
            bare = inpath["no queue rule"]
            for name, g in inpath.items():
                writer.writerow(
                    [
                        f"inpath {name}",
                        f"{g.offered:.0f}",
                        f"{g.passed:.0f}",
                        f"{g.passed / bare.passed:.3f}",
                        "",
                        "",
                        "",
                        "",
                        f"{g.p50_ms:.4f}",
                        f"{g.p99_ms:.4f}",
                    ]
                )
        if kernel:
            # throughput_x_plain: against the fleet with no table; no latency.
            fleet = next((p for p in kernel if p.part == "no table"), None)
            for p in kernel:
                ratio = p.received / fleet.received if fleet else 0.0
                row = [f"kernel {p.part}", f"{p.offered:.0f}", f"{p.received:.0f}"]
                writer.writerow([*row, f"{ratio:.3f}", "", "", "", "", "", ""])
        if firewall:
            # The ping round trips alone (the rest, in other units, in the -firewall.csv).
            for name, fig in firewall.items():
                mean = statistics.fmean(fig.rtts)
                p50, p99 = cut(fig.rtts, 50), cut(fig.rtts, 99)
                row = [f"firewall {name}", "", "", "", f"{mean:.4f}", "", "", ""]
                writer.writerow([*row, f"{p50:.4f}", f"{p99:.4f}"])


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "" if a is None or not b else f"{a / b:.{digits}f}"


def shown(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def waits(m: Meter) -> str:
    """What the firewall read from etcd, and (a chain) the packets it held, in one phase."""
    if m.fetches is None:
        return ""
    return f"{m.fetches:.0f} / {'-' if m.held is None else f'{m.held:.0f}'}"


def by_rounds(f: PathFigures, other: PathFigures, what: str, digits: int = 2) -> tuple[str, str]:
    """`what`'s (pings, connects, first_bytes) paired ratio over `other`'s, and its interval;
    blank against itself."""
    if f is other:
        return "", ""
    mid, low, high = paired(getattr(f, what), getattr(other, what))
    return f"{mid:.{digits}f}", f"{low:.{digits}f}-{high:.{digits}f}"


def report_firewall(fw: dict[str, PathFigures]) -> Table:
    """Established packets: ping and iperf3 TCP per path, against no rule and ratelimit."""
    bare, rl = fw["no queue rule"], fw["ratelimit"]
    table = Table(
        title=f"firewall, established packets: ping -i {PING_INTERVAL:g}, {PINGS} round trips "
        f"per path in {ROUNDS} rotating rounds (ratios: median of the rounds' p50 ratios, "
        f"90% interval); iperf3 TCP -t {TCP_SECONDS} once per path, offered (its sender) "
        "beside received; one replica, both directions queued",
        title_justify="left",
    )
    columns: tuple[str, ...] = ("path", "p50 ms", "p99 ms", "x no rule", "x ratelimit")
    columns += ("x rl 90%", "offered Gb/s", "recv Gb/s", "x no rule", "x ratelimit")
    columns += ("ping fetch/held", "tcp fetch/held")
    for name in columns:
        table.add_column(name, justify="left" if name == "path" else "right")
    for name, f in fw.items():
        x_rl, x_rl_90 = by_rounds(f, rl, "pings") if f is not bare else ("", "")
        table.add_row(
            name,
            f"{cut(f.rtts, 50):.3f}",
            f"{cut(f.rtts, 99):.3f}",
            by_rounds(f, bare, "pings")[0],
            x_rl,
            x_rl_90,
            f"{f.offered_bps / 1e9:.2f}",
            f"{f.received_bps / 1e9:.2f}",
            "" if f is bare else ratio(f.received_bps, bare.received_bps),
            "" if f is bare or f is rl else ratio(f.received_bps, rl.received_bps),
            waits(f.pinged),
            waits(f.streamed),
        )
    return table


def report_connections(fw: dict[str, PathFigures]) -> Table:
    """New connections: curl's connect and first-byte times, etcd writes, keys left."""
    rl = fw["ratelimit"]
    table = Table(
        title=f"firewall, new connections: {CONNECTIONS} sequential HTTP requests per path from "
        f"curl in {ROUNDS} rotating rounds (a TCP connection each, the server closes), ms; "
        "ratios against ratelimit alone by rounds; the firewall's etcd writes and held packets "
        f"per connection; its keys right after and later (TIME_WAIT {TIME_WAIT:g} s)",
        title_justify="left",
    )
    columns: tuple[str, ...] = ("path", "conns", "connect p50", "p90", "x rl", "x rl 90%")
    columns += ("1st byte p50", "p90", "x rl", "x rl 90%", "writes/conn", "held/conn")
    columns += ("keys after", "keys later")
    for name in columns:
        table.add_column(name, justify="left" if name == "path" else "right")
    for name, f in fw.items():
        later = "" if f.keys_later is None else f"{f.keys_later} at {f.later_s:.1f} s"
        table.add_row(
            name,
            str(len(f.connect_ms)),
            f"{cut(f.connect_ms, 50):.3f}",
            f"{cut(f.connect_ms, 90):.3f}",
            *by_rounds(f, rl, "connects"),
            f"{cut(f.first_byte_ms, 50):.3f}",
            f"{cut(f.first_byte_ms, 90):.3f}",
            *by_rounds(f, rl, "first_bytes"),
            shown(f.per_connection(f.opened.writes), 2),
            shown(f.per_connection(f.opened.held), 2),
            "" if f.keys_after is None else str(f.keys_after),
            later,
        )
    return table


FIREWALL_COLUMNS = (
    "path",
    "ping_p50_ms",
    "ping_p99_ms",
    "ping_x_no_rule",
    "ping_x_ratelimit",
    "ping_x_ratelimit_90",
    "tcp_offered_bps",
    "tcp_received_bps",
    "tcp_x_no_rule",
    "tcp_x_ratelimit",
    "ping_fetches",
    "ping_held",
    "tcp_fetches",
    "tcp_held",
    "connections",
    "connect_p50_ms",
    "connect_p90_ms",
    "connect_x_ratelimit",
    "connect_x_ratelimit_90",
    "first_byte_p50_ms",
    "first_byte_p90_ms",
    "first_byte_x_ratelimit",
    "first_byte_x_ratelimit_90",
    "writes_per_connection",
    "held_per_connection",
    "keys_after",
    "keys_later",
    "later_s",
)


def firewall_row(f: PathFigures, bare: PathFigures, rl: PathFigures) -> list[object]:
    """One path's figures after its name, in FIREWALL_COLUMNS' order."""
    return [
        f"{cut(f.rtts, 50):.4f}",
        f"{cut(f.rtts, 99):.4f}",
        by_rounds(f, bare, "pings", 3)[0],
        *(by_rounds(f, rl, "pings", 3) if f is not bare else ("", "")),
        f"{f.offered_bps:.0f}",
        f"{f.received_bps:.0f}",
        "" if f is bare else ratio(f.received_bps, bare.received_bps, 3),
        "" if f is bare or f is rl else ratio(f.received_bps, rl.received_bps, 3),
        shown(f.pinged.fetches, 0),
        shown(f.pinged.held, 0),
        shown(f.streamed.fetches, 0),
        shown(f.streamed.held, 0),
        len(f.connect_ms),
        f"{cut(f.connect_ms, 50):.4f}",
        f"{cut(f.connect_ms, 90):.4f}",
        *by_rounds(f, rl, "connects", 3),
        f"{cut(f.first_byte_ms, 50):.4f}",
        f"{cut(f.first_byte_ms, 90):.4f}",
        *by_rounds(f, rl, "first_bytes", 3),
        shown(f.per_connection(f.opened.writes), 3),
        shown(f.per_connection(f.opened.held), 3),
        "" if f.keys_after is None else f.keys_after,
        "" if f.keys_later is None else f.keys_later,
        "" if f.keys_later is None else f"{f.later_s:.1f}",
    ]


def write_firewall_csv(path: Path, fw: dict[str, PathFigures]) -> None:
    bare, rl = fw["no queue rule"], fw["ratelimit"]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(FIREWALL_COLUMNS)
        for name, f in fw.items():
            writer.writerow([name, *firewall_row(f, bare, rl)])


def firewall_csv_path(path: Path) -> Path:
    """Beside the main CSV: bench.csv -> bench-firewall.csv."""
    return path.with_name(f"{path.stem}-firewall{path.suffix or '.csv'}")


PARTS = ("relay", "inpath", "kernel", "memory", "firewall")


@dataclass
class Results:
    relay: dict[str, Figures] = field(default_factory=dict)
    inpath: dict[str, InpathFigures] | None = None
    memory: MemoryFigures | None = None
    kernel: list[Point] | None = None
    firewall: dict[str, PathFigures] | None = None


async def run_relay(store: EtcdStore, progress: Console) -> dict[str, Figures]:
    upstream = ("127.0.0.1", free_udp_port())
    echo = spawn(["-m", "vmbox", "echo", "--listen", f"{upstream[0]}:{upstream[1]}"])
    try:
        async with contextlib.AsyncExitStack() as stack:
            with progress.status("starting the plain relay and a replica in each mode"):
                targets = {"plain": await plain(stack, upstream)}
                for mode in MODES:
                    targets[mode] = await replica(stack, store, mode, upstream)
            with progress.status(
                f"measuring throughput one by one, then latency in {LATENCY_ROUNDS} rounds"
            ):
                return await measure(targets)
    finally:
        stop(echo)


async def run_all(parts: tuple[str, ...] = PARTS) -> Results:
    progress = Console(stderr=True)
    out = Results()
    skips = {
        "inpath": why_not(),
        "kernel": why_not_kernel(),
        "memory": why_not_memory(),
        "firewall": why_not_firewall(),
    }
    run = {part: part in parts and skips.get(part) is None for part in PARTS}
    async with private_store() as store:
        if run["relay"]:
            out.relay = await run_relay(store, progress)
        if run["inpath"]:
            with (
                progress.status("measuring in-path: a lab, no queue rule, then nfqueue"),
                tempfile.TemporaryDirectory(prefix="vmbox-bench-") as logs,
            ):
                out.inpath = await measure_inpath(store, Path(logs))
        if run["kernel"]:
            with progress.status("measuring the kernel rows: a fleet, floods through it"):
                out.kernel = await measure_kernel(store)
        if run["memory"]:
            with progress.status("measuring memory: idle, then new flows, then idle-out"):
                out.memory = await measure_memory(store)
        if run["firewall"]:
            with (
                progress.status(
                    "measuring the firewall: a lab, no rule, ratelimit, firewall, both"
                ),
                tempfile.TemporaryDirectory(prefix="vmbox-bench-") as logs,
            ):
                out.firewall = await measure_firewall(store, Path(logs))
    for part, skip in skips.items():
        if part in parts and skip is not None:
            progress.print(f"{part} rows skipped: {skip}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, metavar="PATH", help="also write the figures as CSV")
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        metavar="PART",
        help=f"run this part alone (repeatable; one of {', '.join(PARTS)}; default all)",
    )
    args = parser.parse_args()
    got = uvloop.run(run_all(tuple(args.only or PARTS)))
    console = Console(width=max(Console().width, 120))
    if got.relay:
        console.print(report(got.relay))
    if got.inpath is not None:
        console.print(report_inpath(got.relay, got.inpath))
    if got.kernel is not None:
        console.print(report_kernel(got.kernel))
    if got.memory is not None:
        console.print(report_memory(got.memory))
    if got.firewall is not None:
        wide = Console(width=max(Console().width, 170))  # 12 and 14 columns
        wide.print(report_firewall(got.firewall))
        wide.print(report_connections(got.firewall))
    if args.csv:
        write_csv(args.csv, got.relay, got.inpath, got.kernel, got.firewall)
        if got.memory is not None:
            write_memory_csv(memory_csv_path(args.csv), got.memory)
        if got.firewall is not None:
            write_firewall_csv(firewall_csv_path(args.csv), got.firewall)


if __name__ == "__main__":
    main()
