"""`enforce: kernel` end to end: a fleet of nodes, one replica each, the limit held in the kernel.

A fleet lab (vmbox.lab: client - router - 2 nodes - server, the router's ECMP
route spreading flows over the nodes by their 5-tuple), a service with
`enforce: kernel` (real etcd, real replica processes, each keeping an nftables
table in its node at its share of the limit), and hping3 in the client, a new
flow per packet. What the server received is counted at the server by tcpdump;
no packet of the load crosses into Python.

The kernel's buckets start full: a node at share s admits up to s plus its
burst (5% of s, vmbox.enforce.rates) in the first second, and s per second from
then on; so each whole second at the server is within BURST_SLACK of the limit.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import running_service
from tests.integration.labs import require_lab, unique_prefix
from vmbox.enforce import nftables as nft
from vmbox.enforce.kernel import run_nft
from vmbox.enforce.nftables import Table
from vmbox.etcdserver import EtcdServer
from vmbox.lab import LabPlan, down, exec_argv, routed_nodes, up
from vmbox.lab.plan import CLIENT_IF, SERVER_IF
from vmbox.testbed import Service, kernel_spec
from vmbox.tools.capture import Capture, full_seconds, per_second

LIMIT = 100
OFFERED = 300  # packets/s from one client address, a new source port (flow) per packet
BURST_SLACK = 5  # what full buckets add in a second: 2 x 5% of a 50 share, and rounding


@pytest.fixture(scope="module")
def fleet() -> Iterator[LabPlan]:
    """A two-node fleet with one client address; removed whatever happened."""
    require_lab()
    plan = LabPlan(unique_prefix(), 1, 2)
    try:
        up(plan, replace=True)
        yield plan
    finally:
        down(plan.prefix)


def offer(lab: LabPlan, seconds: float) -> list[int]:
    """OFFERED/s of UDP for `seconds` from the client; what the server got in each whole
    second the client was sending (the seconds from its first packet to its last)."""
    client = lab.client_addresses[0]
    server = str(lab.describe()["server"]["address"])
    hping = [
        "hping3",
        "--udp",
        "-p",
        "9000",
        "-i",
        f"u{int(1_000_000 / OFFERED)}",
        "-c",
        str(int(OFFERED * seconds)),
        server,
    ]
    bpf = f"udp and src host {client}"
    at_server = Capture(lab.namespace("server"), SERVER_IF, bpf)  # the bridge: once each
    from_client = Capture(lab.namespace("client"), CLIENT_IF, bpf)
    with at_server as got, from_client as sent:
        done = subprocess.run(
            exec_argv("client", hping, lab.prefix),
            capture_output=True,
            text=True,
            timeout=seconds + 20,
            check=False,
        )
        time.sleep(0.3)
    assert "packets transmitted" in done.stderr + done.stdout, done.stderr[-300:]
    assert sent.packets, "tcpdump saw nothing leave the client"
    first, last = sent.packets[0][0], sent.packets[-1][0]
    return full_seconds(per_second(got.packets, client), first, last)


def tables_in(lab: LabPlan) -> list[list[str]]:
    """The names of the nftables tables in each node."""
    out = []
    for role in lab.node_roles:
        listing = asyncio.run(run_nft(lab.namespace(role), ["list", "tables"]))
        out.append([t["table"]["name"] for t in listing["nftables"] if "table" in t])
    return out


async def seen_by_node(svc: Service, lab: LabPlan) -> list[int]:
    """Packets each node's table has counted so far (its `seen` counter)."""
    table = Table(svc.spec.service, ())
    seen = []
    for role in lab.node_roles:
        listing = await run_nft(lab.namespace(role), nft.list_counters(table))
        seen.append(nft.parse_counters(listing)[nft.SEEN].packets)
    return seen


def test_two_nodes_hold_one_limit_and_one_node_holds_it_after_a_scale_down(
    fleet: LabPlan, etcd: EtcdServer, tmp_path: Path
) -> None:
    async def scenario() -> tuple[list[int], list[int], list[int], list[int], set[int]]:
        spec = kernel_spec("kern", fleet, replicas=2, limit=LIMIT)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(1.2)  # each table is installed at a window boundary
            two = await asyncio.to_thread(offer, fleet, 4.0)
            seen = await seen_by_node(svc, fleet)
            await svc.scale(1)
            (kept,) = (await svc.wait_ready(1, timeout=20.0)).values()
            await asyncio.sleep(1.0)
            routed = routed_nodes(fleet) ^ {int(kept.info["node"])}  # empty: only its node
            one = await asyncio.to_thread(offer, fleet, 4.0)
            gauges = await svc.gauges()
        received = [int(g.get("vmbox_packets_received_total", 0)) for g in gauges.values()]
        return two, one, seen, received, routed

    two, one, seen, received, routed = asyncio.run(scenario())
    print(
        f"2 nodes: {two}; seen by each node {seen}; then 1 node: {one}; replica counted {received}"
    )
    assert len(two) >= 3 and len(one) >= 3, (two, one)
    assert all(abs(count - LIMIT) <= BURST_SLACK for count in two), two
    # Each node carried its part: the router spread the flows over both.
    assert all(count > OFFERED for count in seen), seen
    # The controller took the leaver's node out of the route before it left; the node kept
    # holds the whole limit.
    assert routed == set(), routed
    assert all(LIMIT * 0.9 <= count <= LIMIT + BURST_SLACK for count in one), one
    assert received and all(count > 0 for count in received), received
    # The service is down: no table of it is left in any node, every node is in the route.
    assert all(not any(name.startswith("vmbox_") for name in t) for t in tables_in(fleet))
    assert routed_nodes(fleet) == {1, 2}
