"""`vmbox experiment kernel`: the limit enforced in the kernel of a fleet of nodes.

A fleet lab of its own (`vmbox lab up --nodes N`: a router spreading flows over
N nodes by ECMP, vmbox.lab) and services with `enforce: kernel` (one replica
per node, each keeping an nftables table at its share; the controller keeps
the route to the nodes that enforce). Five parts, every figure from the
kernel's own counters (the client's and the server's interfaces, vmbox.labload)
with the offered rate beside it. Every part but the skew names `split: even`,
the reference design's split its figures were published under (demand, the
default, would add a report reading each node's table every 0.5 s: a cost of
its own, and under part 5's flood a read of the whole set):

1. **Limit across nodes.** One source, a new flow per packet (hping3), at 3x
   the limit (paced) or as fast as hping3 goes (`--flood`) where 3x is more
   than it can pace; limits 100, 10,000 and 100,000/s, each at 1, 2, 4 and 8
   nodes (small: 100 at 1, 2 and 4 nodes, 10,000 at 4). Received at the
   server over a window that starts after the buckets' first burst: ok within
   5% of the limit; a point whose offer was under 1.5x the limit is shown and
   not judged.
2. **Throughput.** hping3 floods from every client address through the fleet:
   with no vmbox table, with a non-binding limit (ratio, goal >= 0.9), and
   through one node enforced in the kernel against the same node with the
   Python in-path driver (`dataplane: nfqueue`, one replica; goal >= 10x).
3. **Resize under load.** One source paced at 3x the limit of 100 while the
   service goes 1 -> 4 -> 1 nodes; what the server received in each second
   (tcpdump), against the limit plus the buckets' bursts.
4. **Skew.** One source in one flow (hping3 `-k`: one source port), so ECMP
   takes all of it to one node, at 3x its limit through SKEW_NODES nodes with
   `split: demand`: the node that sees it takes the limit but the floor the
   others keep (vmbox.sharing: 96.4% at 4 nodes and a floor of 5%), so the
   server gets the limit within 5% (with `split: even` it would get a quarter).
5. **A flood of new sources.** hping3 `--rand-source` through one node until
   the client has sent `Size.sources` packets (10^6 at full scale), each from
   a random address: the node's set stays within its size (the rest share the
   overflow bucket), and the kernel's slab memory (SUnreclaim, which holds the
   set's elements) and the replica's RSS are reported before, at the end of
   the flood and after the table went. One node, since spread over eight the
   sources reached each set slower (2,600 new ones a second a node, 21k/s
   offered: every element's insertion is the cost) than its 10 s timeout
   lets them leave, and no set reached its size.

Writes kernel.csv (every point), kernel_resize.csv (the seconds of part 3),
kernel_sources.csv (part 5, a row per node) and kernel.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console

from vmbox import labload
from vmbox.enforce import nftables
from vmbox.enforce.kernel import run_nft_blocking
from vmbox.enforce.rates import FIXED_WINDOW_BURST, MIN_PACKETS_BURST
from vmbox.experiments import plots
from vmbox.experiments.results import (
    ExperimentError,
    ExperimentResult,
    ReportRow,
    Scale,
    new_progress,
    write_csv,
)
from vmbox.lab import LabError, LabPlan, routed_nodes, set_nodes
from vmbox.lab.plan import NODE_CLIENT_IF
from vmbox.labclients import ServerCount, lab_for, require_inpath, unique_prefix
from vmbox.spec import Spec, parse_spec
from vmbox.state.etcd import EtcdStore
from vmbox.testbed import Service, kernel_spec, private_store, running_service
from vmbox.tools.capture import full_seconds, per_second

NAME = "kernel"
TOLERANCE = 0.05
NON_BINDING = 10**9  # a limit no flood here reaches
PACED_MAX = 3_000.0  # hping3 paces reliably up to about this; beyond, --flood
THROUGHPUT_GOAL, PYTHON_GOAL = 0.9, 10.0
SATURATED = 0.99  # received/offered at or above this: the path passed all it was offered
RESIZE_LIMIT = 100
SKEW_NODES = 4
FLOOD_LIMIT = 100  # part 5: every new source may pass its first packets
FLOOD_WITHIN = 40.0  # seconds part 5's flood may take at most
SMALL_SET = 4_096  # part 5 at small scale: a set this size, so its bound is met
COLUMNS = ("part", "nodes", "limit", "load", "offered_per_s", "received_per_s", "seconds")


@dataclass(frozen=True)
class Size:
    limits: tuple[tuple[int, tuple[int, ...]], ...]  # each limit and the node counts it runs at
    clients: int
    skip: float  # seconds of load before the window: the buckets' first burst
    window: float
    resize_hold: float  # seconds at each node count of part 3
    skew: tuple[int, ...]  # the limits part 4 runs at, one flow through SKEW_NODES nodes
    sources: int  # packets of part 5's flood, each from a random source address
    one_node: bool = True  # part 2 also compares one node with the Python driver

    @property
    def nodes(self) -> int:
        """The fleet's size: the most nodes any point uses."""
        return max(n for _, counts in self.limits for n in counts)


EVERY = (1, 2, 4, 8)
SIZES = {
    "full": Size(
        ((100, EVERY), (10_000, EVERY), (100_000, EVERY)), 8, 1.5, 4.0, 4.0, (100, 1_000), 10**6
    ),
    # The suite's run: the small limit across 1, 2 and 4 nodes, the large one across 4;
    # the fleet's throughput against no table (one node against Python: full, make bench).
    "small": Size(
        ((100, (1, 2, 4)), (10_000, (4,))), 4, 1.2, 1.5, 2.5, (100,), 10**5, one_node=False
    ),
}


@dataclass(frozen=True)
class Point:
    part: str  # "limit", "skew", or one of throughput's
    nodes: int
    limit: int | None  # None: no vmbox table
    load: str  # what offered it
    offered: float  # packets/s, the client's interface
    received: float  # packets/s, the server's interface
    seconds: float


def python_spec(name: str, lab: LabPlan, node: int, limit: int) -> Spec:
    """The Python in-path driver on one node (its namespace as the gateway)."""
    return parse_spec(
        {
            "service": name,
            "dataplane": "nfqueue",
            "gateway": {"namespace": lab.namespace(f"node{node}"), "interface": NODE_CLIENT_IF},
            "middlebox": {"function": "ratelimit", "limit": limit, "split": "even"},
            "replicas": {"count": 1, "min": 1, "max": 1},
            "lease_ttl": 2,
        },
        f"experiment {name}",
    )


@contextlib.contextmanager
def fleet(clients: int, nodes: int) -> Iterator[LabPlan]:
    """A fleet of its own, removed whatever happens; one line when it cannot be built."""
    try:
        require_inpath("vmbox experiment kernel")
        with lab_for(unique_prefix("vxk"), clients, nodes) as plan:
            yield plan
    except LabError as exc:
        raise ExperimentError(str(exc)) from None


def _load(
    lab: LabPlan, sources: list[str], rate: float | None, seconds: float, one_flow: bool = False
) -> tuple[Callable[[], list[labload.Sent]], str, float]:
    """The load: paced hping3 at `rate` each (`one_flow`: one source port), or --flood
    (rate None); its name and the rate at which `measured` sees it start."""
    if rate is not None and (rate <= PACED_MAX or one_flow):
        load = lambda: labload.hping3_paced(lab, sources, rate, seconds, one_flow=one_flow)  # noqa: E731
        flow = ", one flow" if one_flow else ""
        return load, f"hping3 -i (paced {rate:.0f}/s{flow})", rate / 2
    flood = lambda: labload.hping3_flood(lab, sources, seconds)  # noqa: E731
    return flood, "hping3 --flood", labload.STARTED_RATE


async def _measure(
    lab: LabPlan, sources: list[str], rate: float | None, size: Size, one_flow: bool = False
) -> tuple[labload.Rates, str]:
    load, name, started = _load(lab, sources, rate, size.skip + size.window + 1.0, one_flow)
    rates, _ = await asyncio.to_thread(labload.measured, lab, load, size.skip, size.window, started)
    return rates, name


async def _settle(svc: Service, lab: LabPlan, nodes: int) -> set[int]:
    """`nodes` replicas ready and the route over exactly their nodes (which ones a
    scale-down keeps is the controller's choice); those nodes."""
    await svc.scale(nodes)
    await svc.wait_ready(nodes, timeout=30.0)
    deadline = time.monotonic() + 10.0
    while True:
        members = await svc.members()
        theirs = {int(m.info["node"]) for m in members.values() if "node" in m.info}
        routed = await asyncio.to_thread(routed_nodes, lab)
        if len(members) == len(theirs) == nodes and routed == theirs:
            break
        if time.monotonic() > deadline:
            raise ExperimentError(f"the route is over nodes {routed}, its replicas' are {theirs}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # a window boundary: every table at the settled share
    return theirs


async def limits(
    store: EtcdStore, lab: LabPlan, size: Size, advance: Callable[[], None]
) -> list[Point]:
    points = []
    source = lab.client_addresses[0]
    for limit, counts in size.limits:
        spec = kernel_spec(f"klim{limit}", lab, 1, limit=limit, split="even")
        async with running_service(store, spec) as svc:
            for nodes in counts:
                await _settle(svc, lab, nodes)
                rates, load = await _measure(lab, [source], 3.0 * limit, size)
                points.append(
                    Point("limit", nodes, limit, load, rates.offered, rates.received, rates.seconds)
                )
                advance()
    return points


async def skew(
    store: EtcdStore, lab: LabPlan, size: Size, advance: Callable[[], None]
) -> list[Point]:
    """Part 4: one source in one flow through SKEW_NODES nodes under `split: demand`."""
    points = []
    source = lab.client_addresses[0]
    for limit in size.skew:
        spec = kernel_spec(f"kskew{limit}", lab, SKEW_NODES, limit=limit, split="demand")
        async with running_service(store, spec) as svc:
            await _settle(svc, lab, SKEW_NODES)
            rates, load = await _measure(lab, [source], 3.0 * limit, size, one_flow=True)
        points.append(
            Point("skew", SKEW_NODES, limit, load, rates.offered, rates.received, rates.seconds)
        )
        advance()
    return points


@dataclass(frozen=True)
class SourcesFlood:
    """Part 5: a flood of new source addresses through every node."""

    nodes: int
    sent: int  # what hping3 reported
    seconds: float
    offered: float  # packets/s, the client's interface
    received: float  # packets/s, the server's interface
    size: int  # each node's set holds at most this many sources
    elements: tuple[int, ...]  # each node's set at the end of the flood
    overflow: int  # packets the overflow bucket dropped, over the nodes
    slab_kib: tuple[int, int, int]  # SUnreclaim before, at the end, after the tables went
    rss_mib: tuple[float, float]  # the replicas' RSS, summed, before and at the end


def slab_kib() -> int:
    """The kernel's unreclaimable slab (where nftables keeps set elements), machine-wide."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("SUnreclaim:"):
                return int(line.split()[1])
    return 0


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def _node_table(namespace: str, table: str) -> tuple[int, int]:
    """The elements of a node's catch-all set (its newest generation) and its overflow
    drops, from one listing of the table."""
    listing = run_nft_blocking(namespace, ["list", "table", "inet", table], timeout=60.0)
    sets = nftables.parse_sets(listing)
    elements = max((len(e) for name, e in sets.items() if name.endswith("v4")), default=0)
    overflow = nftables.parse_counters(listing).get(nftables.counter_names(0)["overflow"])
    return elements, overflow.packets if overflow else 0


async def new_sources(
    store: EtcdStore, lab: LabPlan, size: Size, advance: Callable[[], None]
) -> SourcesFlood:
    """Part 5: hping3 --rand-source through one node until `size.sources` were sent."""
    nodes = 1
    bound = SMALL_SET if size.sources < 10**6 else None
    extra = {} if bound is None else {"max_sources": bound}
    spec = kernel_spec("kflood", lab, nodes, limit=FLOOD_LIMIT, split="even", **extra)
    table = "vmbox_" + spec.service.replace("-", "_")
    before_slab = slab_kib()
    async with running_service(store, spec) as svc:
        await _settle(svc, lab, nodes)
        pids = [int(m.info["pid"]) for m in (await svc.members()).values()]
        rss_before = _rss_mib(pids)
        first = await asyncio.to_thread(labload.snapshot, lab)
        sent, ran = await asyncio.to_thread(
            labload.hping3_new_sources, lab, size.sources, FLOOD_WITHIN
        )
        last = await asyncio.to_thread(labload.snapshot, lab)
        end_slab, rss_end = slab_kib(), _rss_mib(pids)
        tables = [
            await asyncio.to_thread(_node_table, lab.namespace(f"node{i}"), table)
            for i in range(1, nodes + 1)
        ]
    await asyncio.sleep(1.0)  # the tables' elements are freed after an RCU grace period
    rates = labload.Rates.between(first, last)
    advance()
    limiter = spec.ratelimit
    assert limiter is not None, "a kernel-enforced service runs a ratelimit"
    return SourcesFlood(
        nodes,
        sent.packets,
        ran,
        rates.offered,
        rates.received,
        limiter.max_sources,
        tuple(e for e, _ in tables),
        sum(o for _, o in tables),
        (before_slab, end_slab, slab_kib()),
        (rss_before, rss_end),
    )


async def throughput(
    store: EtcdStore, lab: LabPlan, size: Size, advance: Callable[[], None]
) -> list[Point]:
    sources = lab.client_addresses
    out = []

    async def flood(part: str, nodes: int, limit: int | None) -> None:
        rates, load = await _measure(lab, sources, None, size)
        out.append(Point(part, nodes, limit, load, rates.offered, rates.received, rates.seconds))
        advance()

    every = lab.nodes
    await asyncio.to_thread(set_nodes, lab, range(1, every + 1))
    await flood("no table", every, None)
    fast = kernel_spec("kfast", lab, every, limit=NON_BINDING, split="even")
    async with running_service(store, fast) as svc:
        await _settle(svc, lab, every)
        await flood("kernel", every, NON_BINDING)
        if not size.one_node:
            return out
        (node,) = await _settle(svc, lab, 1)
        await flood("kernel, 1 node", 1, NON_BINDING)
    await asyncio.to_thread(set_nodes, lab, [node])
    async with running_service(store, python_spec("kpy", lab, node, NON_BINDING)):
        await asyncio.sleep(1.5)  # its queue bound at a window boundary, the steering in place
        await flood("python, 1 node", 1, NON_BINDING)
    await asyncio.to_thread(set_nodes, lab, range(1, every + 1))
    return out


async def resize(
    store: EtcdStore, lab: LabPlan, size: Size
) -> tuple[list[tuple[int, int, int]], int]:
    """Part 3: (epoch second, nodes routed at its start, received) and the bound."""
    source = lab.client_addresses[0]
    steps = (1, lab.nodes, 1)
    seconds = size.resize_hold * len(steps) + 6.0
    timeline: list[tuple[float, int]] = []
    spec = kernel_spec("kresize", lab, 1, limit=RESIZE_LIMIT, split="even")
    async with running_service(store, spec) as svc:
        await _settle(svc, lab, 1)
        load, _, _ = _load(lab, [source], 3.0 * RESIZE_LIMIT, seconds)
        with ServerCount(lab, [source]) as count:
            sending = asyncio.create_task(asyncio.to_thread(load))
            started = time.time()
            for nodes in steps:
                await svc.scale(nodes)
                await svc.wait_ready(nodes, timeout=30.0)
                timeline.append((time.time(), nodes))
                await asyncio.sleep(size.resize_hold)
            ended = time.time()
            await sending
            await asyncio.sleep(0.3)
    counts = per_second(count.packets, source)
    got = full_seconds(counts, started + 1.0, ended)
    first = int(started + 1.0) + 1
    rows = []
    for i, received in enumerate(got):
        second = first + i
        routed = max((n for t, n in timeline if t <= second), default=1)
        rows.append((second, routed, received))
    # Every rate change starts each source with a full bucket on each node (5% of the
    # node's share, at least MIN_PACKETS_BURST: vmbox.enforce.rates).
    bound = RESIZE_LIMIT + max(
        n * max(MIN_PACKETS_BURST, int(RESIZE_LIMIT / n * FIXED_WINDOW_BURST)) for n in steps
    )
    return rows, bound


async def run(out_dir: Path, *, scale: Scale = "full", console: Console) -> ExperimentResult:
    """The three parts in a fleet of its own; kernel.csv, kernel_resize.csv, kernel.png."""
    size = SIZES[scale]
    most = size.nodes
    with fleet(size.clients, most) as lab, new_progress(console) as progress:
        total = sum(len(counts) for _, counts in size.limits) + (4 if size.one_node else 2)
        total += 1 + len(size.skew) + 1
        task = progress.add_task("kernel: limits across nodes", total=total)

        def advance() -> None:
            progress.advance(task)

        async with private_store() as store:
            points = await limits(store, lab, size, advance)
            progress.update(task, description="kernel: throughput")
            points += await throughput(store, lab, size, advance)
            progress.update(task, description="kernel: 1 -> N -> 1 nodes under load")
            rows, bound = await resize(store, lab, size)
            advance()
            progress.update(task, description="kernel: one flow, split: demand")
            points += await skew(store, lab, size, advance)
            progress.update(task, description="kernel: a flood of new sources")
            flood = await new_sources(store, lab, size, advance)
    csv_path = write_csv(
        out_dir / "kernel.csv",
        COLUMNS,
        (
            (
                p.part,
                p.nodes,
                "" if p.limit is None else p.limit,
                p.load,
                f"{p.offered:.0f}",
                f"{p.received:.0f}",
                f"{p.seconds:.2f}",
            )
            for p in points
        ),
    )
    resize_csv = write_csv(out_dir / "kernel_resize.csv", ("second", "nodes", "received"), rows)
    flood_csv = write_csv(out_dir / "kernel_sources.csv", FLOOD_COLUMNS, flood_rows(flood))
    png = kernel_png(points, rows, bound, out_dir / "kernel.png")
    return ExperimentResult(
        NAME,
        [csv_path, resize_csv, flood_csv],
        [png],
        report_rows(points, rows, bound) + flood_report(flood),
        notes(size),
    )


FLOOD_COLUMNS = ("node", "sent", "seconds", "offered_per_s", "received_per_s", "size", "elements")


def flood_rows(f: SourcesFlood) -> list[tuple[object, ...]]:
    """One row per node: its set's elements at the end of the flood, beside the flood."""
    return [
        (i, f.sent, f"{f.seconds:.2f}", f"{f.offered:.0f}", f"{f.received:.0f}", f.size, n)
        for i, n in enumerate(f.elements, 1)
    ]


def flood_report(f: SourcesFlood) -> list[ReportRow]:
    before, end, gone = f.slab_kib
    grown = (end - before) / 1024
    per = (end - before) * 1024 / max(sum(f.elements), 1)
    return [
        ReportRow(
            f"a flood of {f.sent:,} packets from random sources through {f.nodes} node(s): "
            "the most elements in a node's set",
            f"<= {f.size:,} (its size)",
            f"{max(f.elements):,} (per node: {', '.join(f'{n:,}' for n in f.elements)}; "
            f"offered {f.offered:,.0f}/s for {f.seconds:.1f} s, received {f.received:,.0f}/s; "
            f"overflow drops {f.overflow:,})",
            max(f.elements) <= f.size,
        ),
        ReportRow(
            "that flood: kernel slab (SUnreclaim, machine-wide) and the replicas' RSS",
            "",
            f"slab +{grown:.1f} MiB at the end (about {per:.0f} B per element held), "
            f"{(gone - before) / 1024:+.1f} MiB once the tables went; replicas' RSS "
            f"{f.rss_mib[0]:.1f} -> {f.rss_mib[1]:.1f} MiB in all",
            None,
        ),
    ]


def report_rows(
    points: list[Point], resized: list[tuple[int, int, int]], bound: int
) -> list[ReportRow]:
    out = []
    ok: bool | None
    for p in (p for p in points if p.part in ("limit", "skew")):
        assert p.limit is not None
        shown = f"{p.received:,.0f}/s (offered {p.offered:,.0f}/s, {p.load})"
        binding = p.offered >= 1.5 * p.limit
        ok = abs(p.received - p.limit) <= TOLERANCE * p.limit if binding else None
        if not binding:
            shown += ": the offer is under 1.5x the limit, not judged"
        metric = f"limit {p.limit:,}/s across {p.nodes} node(s)"
        if p.part == "skew":
            metric = f"one flow, split: demand: limit {p.limit:,}/s through {p.nodes} nodes"
        out.append(ReportRow(metric, f"{p.limit:,}/s", shown, ok))
    by = {p.part: p for p in points if p.part not in ("limit", "skew")}
    bare, fast = by.get("no table"), by.get("kernel")
    if bare and fast:
        ratio = fast.received / max(bare.received, 1.0)
        out.append(
            ReportRow(
                f"throughput with a non-binding limit / no table, {fast.nodes} nodes",
                f">= {THROUGHPUT_GOAL:g}x",
                f"{ratio:.2f}x ({fast.received:,.0f} / {bare.received:,.0f} packets/s; offered "
                f"{fast.offered:,.0f} / {bare.offered:,.0f})",
                ratio >= THROUGHPUT_GOAL,
            )
        )
    kernel, python = by.get("kernel, 1 node"), by.get("python, 1 node")
    if kernel and python:
        ratio = kernel.received / max(python.received, 1.0)
        shown = (
            f"{ratio:.1f}x ({kernel.received:,.0f} / {python.received:,.0f}; offered "
            f"{kernel.offered:,.0f} / {python.offered:,.0f})"
        )
        ok = ratio >= PYTHON_GOAL
        if kernel.received >= SATURATED * kernel.offered and not ok:
            # The kernel passed all it was offered: the senders, on the same cores, are
            # the limit here, not the node; the ratio is a floor, not a verdict.
            shown += ": the kernel passed all it was offered (the senders are the limit)"
            ok = None
        out.append(
            ReportRow(
                "one node: kernel / Python in-path driver, packets/s passed",
                f">= {PYTHON_GOAL:g}x",
                shown,
                ok,
            )
        )
    if resized:
        counts = [r for _, _, r in resized]
        out.append(
            ReportRow(
                f"1 -> N -> 1 nodes under 3x load: the busiest second ({len(resized)} s)",
                f"<= {RESIZE_LIMIT} + bursts = {bound}",
                f"{max(counts)} (seconds: {', '.join(str(r) for r in counts)})",
                max(counts) <= bound,
            )
        )
        out.append(
            ReportRow(
                "1 -> N -> 1 nodes: the least second (a joiner takes nothing until the "
                "group has settled, while the others already hold their smaller shares)",
                "",
                f"{min(counts)}",
                None,
            )
        )
    return out


def notes(size: Size) -> list[str]:
    return [
        f"A fleet lab of {size.nodes} nodes behind one ECMP route (5-tuple hash), "
        f"`enforce: kernel`: each replica's nftables table in its node, the route steered "
        f"to the nodes whose table is in place. Offered = the client's interface, received "
        f"= the server's, over {size.window:g} s after {size.skip:g} s of load (the buckets' "
        f"first burst is spent by then).",
        f"Loads: hping3 paced at 3x the limit up to {PACED_MAX:,.0f}/s, else hping3 --flood "
        f"(as fast as one process sends on this machine: the offered column says what it "
        f"reached); a new source port, so a new flow, per packet.",
        "Throughput: hping3 --flood from every client address; a non-binding limit is "
        f"{NON_BINDING:,}/s. The Python driver runs one replica on the node the kernel's "
        "1-node figure kept, with only that node routed.",
    ]


def kernel_png(
    points: list[Point], resized: list[tuple[int, int, int]], bound: int, path: Path
) -> Path:
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    limited = [p for p in points if p.part == "limit"]
    for limit in sorted({p.limit for p in limited if p.limit is not None}):
        rows = sorted((p for p in limited if p.limit == limit), key=lambda p: p.nodes)
        left.plot(
            [p.nodes for p in rows],
            [p.received / limit for p in rows],
            marker="o",
            label=f"limit {limit:,}/s",
        )
    left.axhline(1.0, color="0.5", ls="--", lw=1)
    left.set_xlabel("nodes")
    left.set_ylabel("received / limit")
    left.set_ylim(0, 1.5)
    left.set_title("one source at 3x its limit")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if resized:
        xs = list(range(len(resized)))
        right.plot(xs, [r for _, _, r in resized], marker=".", label="received")
        right.step(xs, [n * 10 for _, n, _ in resized], where="post", label="nodes x 10")
        right.axhline(bound, color="r", ls=":", lw=1, label=f"limit + bursts ({bound})")
        right.axhline(RESIZE_LIMIT, color="0.5", ls="--", lw=1, label="limit")
    right.set_xlabel("second")
    right.set_ylabel("packets/s at the server")
    right.set_title("1 -> N -> 1 nodes under load")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(plt, fig, path)
