"""The firewall in the packet path, end to end: a lab, the nfqueue driver, real clients.

A lab of namespaces (client - gateway - server, tests/integration/labs.py), a
service with `dataplane: nfqueue` in the gateway (real etcd, real replica
processes binding real netfilter queues), and clients nobody here wrote:
hping3 for floods of TCP and UDP segments, curl against `python3 -m
http.server`, iperf3, ping. What the server received is counted at the server
by tcpdump (vmbox.tools.capture), never by vmbox's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import running_service
from tests.integration.labs import in_lab, lab_running
from tests.integration.test_autoscale import PPS_STEP
from vmbox.control.inpath import PathSteering
from vmbox.dataplane import steering
from vmbox.etcdserver import EtcdServer
from vmbox.lab import LabPlan, exec_argv
from vmbox.lab.plan import SERVER_IF
from vmbox.labload import PACED_TAIL
from vmbox.metrics import scrape
from vmbox.spec import parse_spec
from vmbox.state.standby import list_standby
from vmbox.testbed import inpath_spec
from vmbox.tools.capture import Capture, full_seconds, per_second

LIMIT = 100
OFFERED = 300  # packets per second from one client address
LOAD_SECONDS = 5.0


@pytest.fixture(scope="module")
def lab() -> Iterator[LabPlan]:
    with lab_running(clients=2) as plan:
        yield plan


def server_address(lab: LabPlan) -> str:
    return str(lab.describe()["server"]["address"])


def hping(lab: LabPlan, proto: str, rate: float, seconds: float, port: int = 9000) -> list[str]:
    """hping3 from the first client address: a new source port per packet (one flow each).

    Stopped with SIGINT (it prints its count then) half a second past its planned end:
    after its last packet it waits up to 1 s for answers, which the packets the limit
    dropped never get (vmbox.labload.PACED_TAIL)."""
    flag = {"udp": ["--udp"], "tcp": ["-S"], "icmp": ["--icmp"]}[proto]
    count = int(rate * seconds)
    interval = f"u{int(1_000_000 / rate)}"
    stop = ["timeout", "-s", "INT", "-k", "2", f"{seconds + PACED_TAIL:g}"]
    argv = ["hping3", *flag, "-p", str(port), "-i", interval, "-c", str(count)]
    return exec_argv("client", [*stop, *argv, server_address(lab)], lab.prefix)


def offer(lab: LabPlan, proto: str, seconds: float = LOAD_SECONDS) -> tuple[list[int], float]:
    """OFFERED/s of `proto` for `seconds`; what the server received in each whole second."""
    client = lab.client_addresses[0]
    with Capture(lab.namespace("server"), SERVER_IF, f"{proto} and src host {client}") as cap:
        started = time.time()
        done = subprocess.run(
            hping(lab, proto, OFFERED, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 20,
            check=False,
        )
        ended = min(time.time(), started + seconds)  # hping3 waits a while after its last packet
        time.sleep(0.3)
    assert "packets transmitted" in done.stderr + done.stdout, done.stderr[-300:]
    counts = per_second(cap.packets, client)
    return full_seconds(counts, started, ended), ended - started


# 2 and 4 replicas, UDP and TCP, counted at the server the same way, are in the default
# run through `vmbox experiment correctness --dataplane nfqueue --small`
# (test_experiments_inpath.py); here 1 replica runs by default.
@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize(
    "replicas",
    [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)],
)
def test_the_limit_holds_at_the_server(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path, replicas: int, proto: str
) -> None:
    """300 packets/s from one client over hundreds of flows: the server gets 100 +- 5 a second."""

    async def scenario() -> tuple[list[int], list[float]]:
        spec = inpath_spec(f"hold{proto}{replicas}", lab, replicas)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(0.5)  # every replica has seen the others
            seconds, _ = await asyncio.to_thread(offer, lab, proto)
            shares = [g.get("vmbox_share", 0.0) for g in (await svc.gauges()).values()]
            return seconds, shares

    seconds, shares = asyncio.run(scenario())
    print(f"{proto}, {replicas} replicas: shares {sorted(shares)}, server received/s {seconds}")
    assert sum(shares) == LIMIT and len(shares) == replicas
    assert len(seconds) >= 3, seconds
    assert abs(statistics.fmean(seconds) - LIMIT) <= 5, seconds
    assert all(abs(count - LIMIT) <= 5 for count in seconds), seconds


def test_the_server_sees_each_clients_own_address(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path
) -> None:
    """curl to python3 -m http.server over IPv4 and IPv6, from both clients: the log names them."""
    described = lab.describe()
    server4, server6 = described["server"]["address"], described["server"]["address6"]
    log = tmp_path / "http.log"

    async def scenario() -> list[str]:
        spec = inpath_spec("whosees", lab, 2)
        async with running_service(etcd.endpoints, spec, tmp_path / "logs") as _svc:
            argv = ["python3", "-m", "http.server", "8080", "--bind", "::"]
            with log.open("wb") as out:
                server = subprocess.Popen(  # noqa: ASYNC220 - a server for the block's length
                    exec_argv("server", argv, lab.prefix), stdout=out, stderr=out
                )
                try:
                    await asyncio.sleep(1.0)
                    got = []
                    for index, (four, six) in enumerate(
                        zip(lab.client_addresses, lab.client_addresses6, strict=True)
                    ):
                        for source, url in (
                            (four, f"http://{server4}:8080/"),
                            (six, f"http://[{server6}]:8080/"),
                        ):
                            done = await asyncio.to_thread(
                                in_lab,
                                lab,
                                "client",
                                [
                                    "curl",
                                    "-sS",
                                    "-o",
                                    "/dev/null",
                                    "-w",
                                    "%{http_code}",
                                    "--interface",
                                    source,
                                    "--max-time",
                                    "5",
                                    url,
                                ],
                            )
                            got.append(f"{index}:{source}:{done.stdout}")
                    iperf = await asyncio.to_thread(iperf3_seen_from, lab, lab.client_addresses[1])
                    got.append(f"iperf3:{iperf}")
                    return got
                finally:
                    server.terminate()
                    server.wait(timeout=5)

    got = asyncio.run(scenario())
    assert all(line.endswith(":200") for line in got[:-1]), got
    # iperf3's server names the connection's peer: the second client, not the gateway.
    assert got[-1] == f"iperf3:{lab.client_addresses[1]}", got
    text = log.read_text()
    for source in [*lab.client_addresses, *lab.client_addresses6]:
        assert source in text, (source, text[-500:])


def iperf3_seen_from(lab: LabPlan, source: str) -> str:
    """The address an iperf3 server reports a 1-second TCP test from `source` came from."""
    server = subprocess.Popen(
        exec_argv("server", ["iperf3", "-s", "-1", "-p", "5201", "-J"], lab.prefix),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        target = str(lab.describe()["server"]["address"])
        in_lab(lab, "client", ["iperf3", "-c", target, "-B", source, "-t", "1", "-b", "10M"])
        out, _ = server.communicate(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    accepted = json.loads(out)["start"]["accepted_connection"]
    return str(accepted["host"])


RULES = [
    {"name": "no-ping-2", "match": {"proto": "icmp", "src": "198.18.0.11/32"}, "action": "drop"},
    {
        "name": "no-ping-2-v6",
        "match": {"proto": "icmp", "src": "2001:2:0:1::b/128"},
        "action": "drop",
    },
    {"name": "web", "match": {"proto": "tcp", "dport": 8080}, "action": "accept"},
    {
        "name": "udp-5k",
        "match": {"proto": "udp", "dport": "5000-5999"},
        "action": "ratelimit",
        "limit": 50,
    },
    {"name": "icmp", "match": {"proto": "icmp"}, "action": "accept"},
    {"name": "rest", "action": "drop"},
]


def test_each_rule_applies_to_exactly_the_traffic_it_matches(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path
) -> None:
    """accept, drop and ratelimit rules over TCP, UDP and ICMP, IPv4 and IPv6, in the path."""
    described = lab.describe()
    server4, server6 = described["server"]["address"], described["server"]["address6"]
    (one, two), (one6, two6) = lab.client_addresses, lab.client_addresses6

    def ping(source: str, target: str) -> bool:
        done = in_lab(
            lab, "client", ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", source, target]
        )
        return done.returncode == 0

    def curl(source: str, url: str) -> bool:
        argv = ["curl", "-sS", "-o", "/dev/null", "--interface", source, "--max-time", "2", url]
        return in_lab(lab, "client", argv).returncode == 0

    def reachability() -> dict[str, bool]:
        """Every probe at once: each is its own flow and waits for its own answer (a dropped
        one times out: 1 s for ping, 2 s for curl), so in turn they took about 8 s."""
        probes: dict[str, Callable[[], bool]] = {
            "ping v4 from 1": lambda: ping(one, server4),
            "ping v6 from 1": lambda: ping(one6, server6),
            "ping v4 from 2": lambda: ping(two, server4),
            "ping v6 from 2": lambda: ping(two6, server6),
            "tcp 8080 v4": lambda: curl(one, f"http://{server4}:8080/"),
            "tcp 8080 v6": lambda: curl(one6, f"http://[{server6}]:8080/"),
            "tcp 9090 v4": lambda: curl(one, f"http://{server4}:9090/"),
            "tcp 9090 v6": lambda: curl(one6, f"http://[{server6}]:9090/"),
        }
        with ThreadPoolExecutor(len(probes)) as pool:
            running = {name: pool.submit(probe) for name, probe in probes.items()}
        return {name: future.result() for name, future in running.items()}

    async def scenario() -> tuple[dict[str, bool], list[int], list[int]]:
        spec = inpath_spec("rules", lab, 2, limit=None, rules=RULES)
        async with running_service(etcd.endpoints, spec, tmp_path / "logs"):
            http = subprocess.Popen(  # noqa: ASYNC220 - a server for the block's length
                exec_argv(
                    "server", ["python3", "-m", "http.server", "8080", "--bind", "::"], lab.prefix
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            other = subprocess.Popen(  # noqa: ASYNC220
                exec_argv(
                    "server", ["python3", "-m", "http.server", "9090", "--bind", "::"], lab.prefix
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await asyncio.sleep(1.5)
                # At once too: the probes, the limited port and the closed one are each
                # matched by a rule of their own and counted apart at the server.
                seen, limited, closed = await asyncio.gather(
                    asyncio.to_thread(reachability),
                    asyncio.to_thread(offer_udp, lab, 5001),
                    asyncio.to_thread(offer_udp, lab, 7000),
                )
                return seen, limited, closed
            finally:
                for proc in (http, other):
                    proc.terminate()
                    proc.wait(timeout=5)

    seen, limited, closed = asyncio.run(scenario())
    print(seen, "udp 5001/s:", limited, "udp 7000/s:", closed)
    assert seen == {
        "ping v4 from 1": True,
        "ping v6 from 1": True,
        "ping v4 from 2": False,
        "ping v6 from 2": False,
        "tcp 8080 v4": True,
        "tcp 8080 v6": True,
        "tcp 9090 v4": False,
        "tcp 9090 v6": False,
    }
    assert all(abs(count - 50) <= 3 for count in limited), limited
    assert closed and not any(closed), closed


def offer_udp(lab: LabPlan, port: int) -> list[int]:
    """150/s of UDP to `port` for 3 s from the first client: what the server got each second
    (two whole seconds at least)."""
    client = lab.client_addresses[0]
    bpf = f"udp and dst port {port} and src host {client}"
    with Capture(lab.namespace("server"), SERVER_IF, bpf) as cap:
        started = time.time()
        subprocess.run(hping(lab, "udp", 150, 3.0, port), capture_output=True, timeout=30)
        ended = started + 3.0
        time.sleep(0.3)
    return full_seconds(per_second(cap.packets, client), started, ended)


@pytest.mark.parametrize(
    ("spread", "split", "expected"),
    [
        ("addresses", "even", 50),  # one client, one address pair: one replica, which has limit / 2
        ("addresses", "demand", 100),  # the replica it reaches is given the whole limit for it
        ("flow", "even", 100),  # the 5-tuple spreads its flows over both replicas
    ],
)
def test_how_flows_spread_decides_which_split_holds_the_limit(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path, spread: str, split: str, expected: int
) -> None:
    async def scenario() -> list[int]:
        spec = inpath_spec(f"spread{spread[0]}{split[0]}", lab, 2, spread=spread, split=split)
        async with running_service(etcd.endpoints, spec, tmp_path):
            await asyncio.sleep(0.5)
            seconds, _ = await asyncio.to_thread(offer, lab, "udp")
            return seconds

    seconds = asyncio.run(scenario())
    print(f"spread {spread}, split {split}: server received/s {seconds}")
    # demand: the first second or two follow the reports in; judge the rest
    steady = seconds[2:] if split == "demand" else seconds
    assert steady and all(abs(count - expected) <= 5 for count in steady), seconds


def test_autoscaling_follows_the_packet_rate_in_the_path(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path
) -> None:
    """400 packets/s from one client: 1 -> 3 replicas on the pps metric, the limit held at
    the server, then back to 1 when the load stops (drained, steering rewritten first)."""

    async def scenario() -> tuple[list[int], int, int, list[str]]:
        data = inpath_spec("auto", lab).model_dump(mode="json")
        data["autoscale"] = PPS_STEP  # 400/s: over the line on 1 and 2 replicas, not on 3
        spec = parse_spec(data)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            client = lab.client_addresses[0]
            bpf = f"udp and src host {client}"
            with Capture(lab.namespace("server"), SERVER_IF, bpf) as cap:
                started = time.time()
                load = asyncio.create_task(
                    asyncio.to_thread(
                        subprocess.run, hping(lab, "udp", 400, 12.0), capture_output=True
                    )
                )
                await svc.wait_ready(3, timeout=15.0)
                peak = len(await svc.members())
                await load
                ended = started + 12.0
            await svc.wait_ready(1, timeout=20.0)
            after = len(await svc.members())
            chain = steering.current(lab.namespace("gateway"), steering.chain_name("auto"))
            return full_seconds(per_second(cap.packets, client), started, ended), peak, after, chain

    seconds, peak, after, chain = asyncio.run(scenario())
    print(f"autoscaled in-path: peak {peak}, after {after}, server received/s {seconds}")
    assert peak == 3 and after == 1
    assert chain == ["-A VMBOX-auto -j NFQUEUE --queue-num 0"], chain
    # Every whole second at the server, the resizes' included, within the limit.
    assert all(count <= 100 for count in seconds), seconds
    assert statistics.fmean(seconds) >= 90, seconds


def test_a_warm_spare_is_out_of_the_path_until_promoted(
    etcd: EtcdServer, lab: LabPlan, tmp_path: Path
) -> None:
    """An in-path spare binds no queue and is in no steering; a scale-up promotes it (the
    same process binds its queue and the chain takes it in) while the server sees 100/s."""

    async def scenario() -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        spec = inpath_spec("inspare", lab, 1)
        spec = spec.model_copy(update={"replicas": spec.replicas.model_copy(update={"warm": 1})})
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            spares: dict[str, Any] = {}
            for _ in range(200):
                spares = await list_standby(svc.store, spec.service)
                if spares:
                    break
                await asyncio.sleep(0.05)
            (rid, info), *_ = spares.items()
            path = svc.controller.path
            assert isinstance(path, PathSteering)
            for _ in range(100):  # the pass after web-1 bound its queue steers to it
                if path.written is not None and path.written.queues:
                    break
                await asyncio.sleep(0.05)
            assert path.written is not None
            before = {"queues": path.written.queues}
            offering = asyncio.create_task(asyncio.to_thread(offer, lab, "udp", 6.0))
            await asyncio.sleep(2.0)
            standing = await scrape(str(info["metrics"]))
            await svc.scale(2)
            members = await svc.wait_ready(2)
            seconds, _ = await offering
            after = {
                "queues": path.written.queues,
                "pid": members[rid].info["pid"],
                "queue": members[rid].info.get("queue"),
                "standing": standing,
                "gauges": (await svc.gauges())[rid],
            }
            return seconds, before | {"pid": info["pid"]}, after

    seconds, before, after = asyncio.run(scenario())
    print(f"in-path promotion: server received/s {seconds}, queues {before} -> {after['queues']}")
    assert len(before["queues"]) == 1 and after["queue"] is not None
    assert after["pid"] == before["pid"]  # the spare itself, promoted
    assert sorted(after["queues"]) == sorted([*before["queues"], after["queue"]])
    assert after["standing"]["vmbox_packets_received_total"] == 0.0
    assert after["gauges"]["vmbox_packets_passed_total"] > 0
    assert len(seconds) >= 4 and all(abs(count - LIMIT) <= 5 for count in seconds), seconds
