"""Load a lab as fast as this kernel's own tools can, and count what crossed it.

A Python sender cannot offer millions of packets per second, and this
kernel has no pktgen (/proc/net/pktgen is absent; `pktgen_available()` says
so at run time). What it has: iperf3 (`-u -l 64 -b 0`: one sendto(2) per
datagram, as fast as one core goes) and hping3 (`--flood`: raw socket, no
pacing). `iperf3_udp` starts one iperf3 client per client address (each to
its own one-shot iperf3 server on the server, port `base_port + i`) and
`hping3_flood` one hping3 per address, both bounded in time (the tools' own
duration plus a kill after `seconds + GRACE`), and each returns what every
sender reported as sent. `hping3_new_sources` floods from random source
addresses until the client has sent a given count: a flood of new sources.

What the kernel counted is the honest figure: `snapshot` reads the packet
counters of a lab's interfaces (`ip -j -s link` inside each namespace) and
`Rates.between` turns two snapshots into packets/s offered (the client's c0
transmitted), spread (the router's link to each node transmitted, in a fleet)
and received (the server's s0 received). Used by the fleet tests and the
line-rate measurements (DESIGN.md "Lab").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmbox.lab import LabError, LabPlan, exec_argv
from vmbox.lab.plan import CLIENT_IF, SERVER_IF, router_node_if

ONE_FLOW_PORT = 40000  # hping3's source port when a load is one flow
GRACE = 10.0  # seconds a sender may take past its run (start-up, the iperf3 result exchange)
PACED_TAIL = 0.5  # seconds a paced hping3 may run past its planned end (its pacing's drift)
BASE_PORT = 5201
_SENT = re.compile(r"(\d+) packets transmitted")

log = logging.getLogger(__name__)


def pktgen_available() -> bool:
    """Whether this kernel offers pktgen (its /proc interface exists once the module is in)."""
    return os.path.isdir("/proc/net/pktgen")


@dataclass(frozen=True, slots=True)
class Sent:
    """What one sender reported: its source address, packets sent, over how many seconds."""

    source: str
    packets: int
    seconds: float


def _server(plan: LabPlan) -> str:
    return str(plan.describe()["server"]["address"])


def _finish(procs: Sequence[subprocess.Popen[str]], deadline: float) -> list[str]:
    """Each process's stdout+stderr once it ends; those still running at `deadline` are killed."""
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out.append((stdout or "") + (stderr or ""))
    return out


def _stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


def _popen(plan: LabPlan, role: str, argv: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        exec_argv(role, argv, plan.prefix),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def iperf3_udp(
    plan: LabPlan,
    sources: Sequence[str],
    seconds: float,
    size: int = 64,
    base_port: int = BASE_PORT,
) -> list[Sent]:
    """One `iperf3 -u -l size -b 0` client per source for `seconds`, each to its own one-shot
    server; every process is gone on return (killed after `seconds + GRACE` if need be)."""
    if not sources or seconds <= 0:
        raise LabError("iperf3_udp: give at least one source and a positive duration")
    servers: list[subprocess.Popen[str]] = []
    clients: list[subprocess.Popen[str]] = []
    try:
        for i in range(len(sources)):
            argv = ["iperf3", "-s", "-1", "-p", str(base_port + i)]
            servers.append(_popen(plan, "server", argv))
        time.sleep(0.3)  # the servers listen (iperf3 has no readiness signal)
        for i, source in enumerate(sources):
            argv = ["iperf3", "-c", _server(plan), "-B", source, "-p", str(base_port + i), "-u"]
            argv += ["-l", str(size), "-b", "0", "-t", f"{seconds:g}", "-J"]
            clients.append(_popen(plan, "client", argv))
        reports = _finish(clients, time.monotonic() + seconds + GRACE)
    finally:
        _stop(clients)
        _stop(servers)
    sent = []
    for source, report in zip(sources, reports, strict=True):
        try:
            end = json.loads(report)["end"]["sum"]
            sent.append(Sent(source, int(end["packets"]), float(end["seconds"])))
        except (ValueError, KeyError, TypeError):
            sent.append(Sent(source, 0, 0.0))  # it never ran (refused, killed): nothing sent
    return sent


def hping3_flood(
    plan: LabPlan, sources: Sequence[str], seconds: float, port: int = 9000
) -> list[Sent]:
    """One `hping3 --udp --flood` per source (a new source port per packet) for `seconds`,
    stopped with SIGINT (hping3 prints its count then); every process is gone on return."""
    if not sources or seconds <= 0:
        raise LabError("hping3_flood: give at least one source and a positive duration")
    timeout = ["timeout", "-s", "INT", "-k", "2", f"{seconds:g}"]
    return _hping3(plan, sources, seconds, [*timeout, "hping3", "--udp", "--flood", "-q"], port)


def hping3_paced(
    plan: LabPlan,
    sources: Sequence[str],
    rate: float,
    seconds: float,
    port: int = 9000,
    *,
    one_flow: bool = False,
) -> list[Sent]:
    """One `hping3 --udp -i u<1e6/rate>` per source (a new source port per packet, or with
    `one_flow` one port throughout: `-s ONE_FLOW_PORT -k`) for `seconds`: `rate` packets/s
    each, as far as hping3's pacing goes (the kernel's counters say what it offered);
    every process is gone on return."""
    if not sources or seconds <= 0 or rate <= 0:
        raise LabError("hping3_paced: give at least one source, a positive rate and duration")
    pace = ["-i", f"u{max(1, int(1_000_000 / rate))}", "-c", str(max(1, int(rate * seconds)))]
    flow = ["-s", str(ONE_FLOW_PORT), "-k"] if one_flow else []
    # After its last packet hping3 waits up to 1 s for answers, which never come for the
    # packets a limit dropped: SIGINT (it prints its count then) once its run is over.
    timeout = ["timeout", "-s", "INT", "-k", "2", f"{seconds + PACED_TAIL:g}"]
    return _hping3(plan, sources, seconds, [*timeout, "hping3", "--udp", *pace, *flow], port)


def hping3_new_sources(
    plan: LabPlan, packets: int, within: float, port: int = 9000
) -> tuple[Sent, float]:
    """`hping3 --udp --flood --rand-source` from the client until its interface has sent
    `packets` more packets or `within` seconds have passed: a flood of new source
    addresses (random over IPv4; the router drops the martian ones). What hping3
    reported, and the seconds it ran. The spoofed packets stay in the lab: its
    namespaces have no route out."""
    if packets <= 0 or within <= 0:
        raise LabError("hping3_new_sources: give a positive count and time")
    client = plan.namespace("client")
    first = link_packets(client)[CLIENT_IF][1]
    argv = ["hping3", "--udp", "--flood", "--rand-source", "-q", "-p", str(port), _server(plan)]
    proc = _popen(plan, "client", argv)
    began = time.monotonic()
    try:
        while time.monotonic() - began < within and proc.poll() is None:
            time.sleep(0.1)
            if link_packets(client)[CLIENT_IF][1] - first >= packets:
                break
        ran = time.monotonic() - began
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # hping3 prints its count on SIGINT
        (report,) = _finish([proc], time.monotonic() + GRACE)
    finally:
        _stop([proc])
    found = _SENT.search(report)
    return Sent("random", int(found.group(1)) if found else 0, ran), ran


def _hping3(
    plan: LabPlan, sources: Sequence[str], seconds: float, command: list[str], port: int
) -> list[Sent]:
    """`command` from each source to the server's `port`, all at once; what each reported."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for source in sources:
            argv = [*command, "-a", source, "-p", str(port), _server(plan)]
            procs.append(_popen(plan, "client", argv))
        reports = _finish(procs, time.monotonic() + seconds + GRACE)
    finally:
        _stop(procs)
    sent = []
    for source, report in zip(sources, reports, strict=True):
        found = _SENT.search(report)
        count = int(found.group(1)) if found else 0
        if count == 0:
            # Twice in full test runs a lab's hping3 sent nothing, never alone: its own
            # words, so the next time says why.
            log.warning("hping3 from %s sent nothing; it said: %r", source, report[-2000:])
        sent.append(Sent(source, count, seconds))
    return sent


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Packet counters of a lab's interfaces at one moment (time.monotonic())."""

    at: float
    offered: int  # the client's c0 transmitted
    received: int  # the server's s0 received
    nodes: tuple[int, ...]  # the router's link to each node transmitted (a fleet; else empty)


def link_packets(ns: str) -> dict[str, tuple[int, int]]:
    """{ifname: (rx packets, tx packets)} inside namespace `ns`."""
    done = subprocess.run(
        ["ip", "-n", ns, "-j", "-s", "link", "show"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"`ip -n {ns} -j -s link` failed: {done.stderr.strip()}")
    links = json.loads(done.stdout)
    return {
        link["ifname"]: (link["stats64"]["rx"]["packets"], link["stats64"]["tx"]["packets"])
        for link in links
    }


def snapshot(plan: LabPlan) -> Snapshot:
    client = link_packets(plan.namespace("client"))
    server = link_packets(plan.namespace("server"))
    nodes: tuple[int, ...] = ()
    if plan.fleet:
        router = link_packets(plan.namespace("router"))
        nodes = tuple(router[router_node_if(i)][1] for i in range(1, plan.nodes + 1))
    return Snapshot(time.monotonic(), client[CLIENT_IF][1], server[SERVER_IF][0], nodes)


@dataclass(frozen=True, slots=True)
class Rates:
    """Packets/s between two snapshots: offered by the clients, received by the server, and
    sent to each node by the router (a fleet)."""

    seconds: float
    offered: float
    received: float
    nodes: tuple[float, ...]

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Rates:
        seconds = max(after.at - before.at, 1e-9)
        per_node = tuple((b - a) / seconds for a, b in zip(before.nodes, after.nodes, strict=True))
        return cls(
            seconds,
            (after.offered - before.offered) / seconds,
            (after.received - before.received) / seconds,
            per_node,
        )


STARTED_RATE = 1_000.0  # packets/s from the clients: sending, past any handshake
START_TIMEOUT = 10.0  # seconds to wait for that before measuring anyway


def measured(
    plan: LabPlan,
    load: Callable[[], list[Sent]],
    skip: float,
    window: float,
    started_rate: float = STARTED_RATE,
) -> tuple[Rates, list[Sent]]:
    """Run `load` (a call of iperf3_udp, hping3_flood or hping3_paced) in a thread and count
    the lab's interfaces over `window` seconds starting `skip` seconds after the senders
    began sending: the rates in steady state, and what the senders reported for their
    whole run.

    Sending begins when the clients' interface passes `started_rate` packets/s (below
    what the load offers), not at a fixed time: iperf3 shakes hands over TCP first, and
    on a loaded machine its start-up took over 1.7 s once, so a window at a fixed 0.7 s
    counted nothing.
    """
    result: list[list[Sent]] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            result.append(load())
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="lab-load", daemon=True)
    thread.start()
    began, last = time.monotonic(), snapshot(plan)
    while thread.is_alive() and time.monotonic() - began < START_TIMEOUT:
        time.sleep(0.05)
        now = snapshot(plan)
        if Rates.between(last, now).offered > started_rate:
            break
        last = now
    time.sleep(skip)
    before = snapshot(plan)
    time.sleep(window)
    after = snapshot(plan)
    thread.join()
    if failed:
        raise failed[0]
    return Rates.between(before, after), result[0]
