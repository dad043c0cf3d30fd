"""A fleet lab against the kernel: the router spreads many flows over every node, a node taken
out of the route in one replacement stops getting traffic while its flows move to the others
(none lost), `show --json` says which nodes are routed, and `down` removes any fleet, even a
half-built one. Also the load generator (vmbox.labload) against a real fleet."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.labs import host_network_state, require_lab, unique_prefix
from vmbox import labload, netns
from vmbox.lab import LabPlan, down, up
from vmbox.lab.netlab import pids_in, routed_nodes, set_nodes
from vmbox.lab.plan import NODE_CLIENT_IF
from vmbox.labclients import Flood

RATE, SECONDS = 2000, 1.5  # hping3 UDP, a new source port (a new flow) per packet
SLACK = 20  # packets: the lab's own ARP, neighbour discovery and MLD on the counted links


def vmbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbox", "lab", *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def fleet() -> Iterator[LabPlan]:
    """A fresh 4-node fleet with 4 client addresses; removed whatever happened (and `down`
    must leave none of its namespaces)."""
    require_lab()
    plan = LabPlan(unique_prefix(), 4, 4)
    try:
        up(plan, replace=True)
        yield plan
    finally:
        removed = down(plan.prefix)
    assert sorted(removed) == sorted(plan.namespaces)
    assert not any(netns.exists(ns) for ns in plan.every_namespace)


def node_rx(plan: LabPlan) -> list[int]:
    """Packets each node received on its client side, read inside the node."""
    return [
        labload.link_packets(plan.namespace(role))[NODE_CLIENT_IF][0] for role in plan.node_roles
    ]


def flood(plan: LabPlan) -> tuple[list[int], labload.Rates]:
    """RATE x SECONDS UDP packets over as many flows from one client address: what each node
    got (its own counter) and the lab's counters over the run."""
    before, start = node_rx(plan), labload.snapshot(plan)
    with Flood(plan, "udp", plan.client_addresses[0], RATE, SECONDS) as sender:
        deadline = time.monotonic() + SECONDS + 5
        while sender.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.1)
    after, end = node_rx(plan), labload.snapshot(plan)
    # One CI run saw [2, 0, 0, 0] here (passing alone and under load since): if it comes
    # back, hping3's own words say whether it sent at all.
    print(f"hping3 exited {sender.returncode}: {sender.said!r}")
    return [b - a for a, b in zip(before, after, strict=True)], labload.Rates.between(start, end)


def test_flows_spread_over_every_node_and_move_off_a_node_taken_out(fleet: LabPlan) -> None:
    sent = int(RATE * SECONDS)
    per_node, rates = flood(fleet)
    print("4 nodes in the route:", per_node)
    # Every node gets its share (a quarter, within what hashing 3000 flows leaves) ...
    assert all(n > sent / 4 * 0.6 for n in per_node), per_node
    # ... and the server gets all of them (slack for the lab's own ARP and neighbour discovery,
    # a few packets per link in a fresh lab).
    assert abs(sum(per_node) - sent) <= SLACK, per_node
    assert abs(rates.received * rates.seconds - sent) <= SLACK

    assert set_nodes(fleet, [1, 2, 4]) == [1, 2, 4]
    per_node, rates = flood(fleet)
    print("node 3 out of the route:", per_node)
    assert per_node[2] <= 3, per_node  # at most a stray neighbour probe
    assert all(per_node[i] > sent / 3 * 0.6 for i in (0, 1, 3)), per_node
    assert abs(rates.received * rates.seconds - sent) <= SLACK

    shown = vmbox("show", "--json", "--name", fleet.prefix)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == fleet.describe(in_route=[1, 2, 4])


def test_moving_flows_between_node_sets_loses_no_packet(fleet: LabPlan) -> None:
    """A flood runs while the route is replaced 8 times; the server receives every packet."""
    start = labload.snapshot(fleet)
    sets = [[1, 2], [1, 2, 3, 4], [4], [2, 3], [1, 2, 3, 4], [3], [1, 4], [1, 2, 3, 4]]
    with Flood(fleet, "udp", fleet.client_addresses[1], RATE, 2.0) as sender:
        time.sleep(0.2)
        for nodes in sets:
            assert set_nodes(fleet, nodes) == nodes
            time.sleep(0.15)
        deadline = time.monotonic() + 7
        while sender.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.1)
    rates = labload.Rates.between(start, labload.snapshot(fleet))
    offered, received = (round(r * rates.seconds) for r in (rates.offered, rates.received))
    print(f"offered {offered}, received {received}")
    assert offered >= 2 * RATE * 0.9
    assert abs(offered - received) <= SLACK


def test_route_from_the_command_line_and_no_node_at_all(fleet: LabPlan) -> None:
    done = vmbox("route", "--name", fleet.prefix, "2", "3")
    assert done.returncode == 0 and "node2, node3" in done.stdout, done.stderr
    assert routed_nodes(fleet) == {2, 3}
    done = vmbox("route", "--name", fleet.prefix, "--none")
    assert done.returncode == 0, done.stderr
    assert routed_nodes(fleet) == set()
    server = fleet.describe()["server"]["address"]
    ping = subprocess.run(
        ["ip", "netns", "exec", fleet.namespace("client"), "ping", "-n", "-c1", "-W1", server],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert ping.returncode != 0 and "Unreachable" in ping.stdout, ping.stdout
    done = vmbox("route", "--name", fleet.prefix, "1", "2", "3", "4")
    assert done.returncode == 0 and routed_nodes(fleet) == {1, 2, 3, 4}


def test_iperf3_senders_report_what_they_sent_and_the_server_counts_it(fleet: LabPlan) -> None:
    sources = fleet.client_addresses[:2]
    rates, sent = labload.measured(fleet, lambda: labload.iperf3_udp(fleet, sources, 2), 0.7, 1.0)
    print("iperf3:", sent, rates)
    assert [s.source for s in sent] == sources
    assert all(s.packets > 1000 and 1.5 < s.seconds < 3 for s in sent), sent
    assert rates.offered > 1000 and rates.received > 0.5 * rates.offered  # counted by the kernel
    assert sum(rates.nodes) == pytest.approx(rates.offered, rel=0.1)
    assert pids_in(fleet.namespace("server")) == pids_in(fleet.namespace("client")) == []


def test_down_removes_a_half_built_fleet_and_leaves_the_host_as_it_was() -> None:
    require_lab()
    before = host_network_state()
    prefix = unique_prefix()
    plan = LabPlan(prefix, 1, 8)
    # A fleet whose `up` died early: a router and two nodes, nothing else.
    for role in ("router", "node1", "node5"):
        subprocess.run(["ip", "netns", "add", plan.namespace(role)], check=True, timeout=10)
    try:
        shown = vmbox("show", "--name", prefix)
        assert shown.returncode == 1 and "incomplete" in shown.stderr
        done = vmbox("down", "--name", prefix)
        assert done.returncode == 0, done.stderr
        assert not any(netns.exists(ns) for ns in plan.every_namespace)
        made = vmbox("up", "--nodes", "8", "--name", prefix)
        assert made.returncode == 0, made.stderr
        assert all(netns.exists(ns) for ns in plan.namespaces)
        assert vmbox("down", "--name", prefix).returncode == 0
        assert not any(netns.exists(ns) for ns in plan.every_namespace)
    finally:
        down(prefix)
    assert host_network_state() == before


def test_hping3_floods_spread_over_every_node_and_report_their_counts(fleet: LabPlan) -> None:
    sources = fleet.client_addresses[2:4]
    start = labload.snapshot(fleet)
    sent = labload.hping3_flood(fleet, sources, 1.0)
    time.sleep(0.1)
    rates = labload.Rates.between(start, labload.snapshot(fleet))
    print("hping3:", sent, rates)
    assert [s.source for s in sent] == sources and all(s.packets > 1000 for s in sent), sent
    reported = sum(s.packets for s in sent)
    # What the senders say they sent is what left the client (ARP/ND aside) ...
    assert abs(rates.offered * rates.seconds - reported) <= SLACK + reported * 0.01
    # ... and a new source port per packet spreads it over all four nodes.
    assert min(rates.nodes) > 0.15 * sum(rates.nodes), rates.nodes
    assert pids_in(fleet.namespace("client")) == []
