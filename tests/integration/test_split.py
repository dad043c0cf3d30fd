"""The limit holds whatever the spread of a source's flows, with either algorithm.

Real etcd (the session fixture), real replica processes, real UDP on loopback.
One source on ONE flow reaches one replica of four: `even` holds it to that
replica's quarter (documenting why `demand` exists), `demand` to the limit
within a report interval or two. A heavy one-flow source beside 20 spread ones:
each gets its limit. The token bucket holds the rate under both splits and lets
at most `burst` through at once after idling. And a real one-flow client,
iperf3's UDP stream, through a spec that names no split (demand, the default,
since issue 18): its limit within 5% through 2 and 4 replicas, counted by the
iperf3 server behind the relay. Timing bounds are generous: other tests may
share the two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aio, until
from tests.integration.cgroup import in_ci
from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer
from vmbox.spec import parse_spec
from vmbox.state.demandsync import DemandReporter, watch_demand
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import Membership
from vmbox.testbed import Service, free_udp_port
from vmbox.tools.load import LoadPlan, LoadResult, run_load

LIMIT = 100
REPORT_INTERVAL = 0.1


async def settled(svc: Service) -> None:
    """Wait until every replica holds a share.

    A fresh group holds none until the resize guard lifts, at a window boundary
    after every member acknowledged the group.
    """
    deadline = time.monotonic() + 5.0
    count = svc.spec.replicas.count
    while time.monotonic() < deadline:
        gauges = await svc.gauges()
        if len(gauges) == count and all(g.get("vmbox_share", 0) > 0 for g in gauges.values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"replicas hold no share after 5 s: {gauges}")


def per_second(history: list[tuple[int, int]], first: int, seconds: int) -> list[int]:
    """The echo server's counts for the epoch seconds first .. first + seconds - 1."""
    counts = dict(history)
    return [counts.get(s, 0) for s in range(first, first + seconds)]


def test_reports_are_on_the_member_lease_and_watched(store: EtcdStore, aio: Aio) -> None:
    """A report is one key per replica, seen by the watch, gone with the replica's lease."""

    async def scenario() -> list[dict[str, dict[str, int]]]:
        member = Membership(store, "t", "r1", {}, ttl=2)
        running = asyncio.create_task(member.run())
        seen: list[dict[str, dict[str, int]]] = []

        async def follow() -> None:
            async for reports in watch_demand(store, "t"):
                seen.append(reports)

        watching = asyncio.create_task(follow())
        try:
            await asyncio.wait_for(member.registered.wait(), 5)
            offered = {"10.0.0.1": 30, "10.0.0.2": 4}
            reporter = DemandReporter(
                store, "t", "r1", lambda: offered, lambda: member.lease, max_sources=1
            )
            assert await reporter.report()
            await until(lambda: seen[-1] == {"r1": {"10.0.0.1": 30}}, 2.0)
            await member.leave()  # the lease goes, and the report with it
            await until(lambda: seen[-1] == {}, 2.0)
            return seen
        finally:
            for task in (running, watching):
                task.cancel()
            await asyncio.gather(running, watching, return_exceptions=True)

    seen = aio.run(scenario())
    assert seen[0] == {} and {"r1": {"10.0.0.1": 30}} in seen


class _Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.times: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.times.append(time.time())


async def one_flow(
    target: tuple[str, int], rate: float, duration: float
) -> tuple[float, list[float]]:
    """Send `rate`/s from one socket (one flow); return the start time and each reply's time."""
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(
        _Replies, local_addr=("127.0.0.2", 0), remote_addr=target
    )
    try:
        start, sent = time.time(), 0
        while (elapsed := time.time() - start) < duration:
            while sent < int(elapsed * rate) + 1:
                transport.sendto(b"%16d" % sent)
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)  # the last replies
    finally:
        transport.close()
    return start, replies.times


@pytest.mark.parametrize("split", ["even", "demand"])
def test_one_flow_on_four_replicas(etcd: EtcdServer, tmp_path: Path, split: str) -> None:
    """even: the one replica that gets the flow passes its quarter; demand: the whole limit."""

    async def scenario() -> tuple[float, list[float], list[int]]:
        spec = make_spec(f"oneflow-{split}", 4, split=split)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            # Start just after a window begins, so the first 0.3 s lie in one window.
            await asyncio.sleep(1.02 - time.time() % 1.0)
            started, replies = await one_flow(spec.relay.listen, 300, 4.3)
            await asyncio.sleep(1.0)
            return started, replies, per_second(svc.echo.history, int(started), 4)

    started, replies, seconds = asyncio.run(scenario())
    # Past the even share (25) means the demand share has arrived.
    past_even = replies[25] - started if len(replies) > 25 else float("inf")
    print(
        f"one flow, 4 replicas, {split}: server received/s {seconds}; "
        f"reply 26 came {past_even * 1000:.0f} ms after the start"
    )
    if split == "even":
        assert all(20 <= c <= 30 for c in seconds), seconds  # the flaw: 100 / 4
    else:
        # A source new in a window takes the even share until the window ends (raising
        # it within the window could pass more than the limit when a source's traffic
        # moves, DESIGN.md "Which summary a window divides by"); from the next window
        # on, the demand split's 97 of 100 with 4 replicas.
        assert seconds[0] <= 26, seconds
        assert past_even <= 1.0 + 0.1, past_even
        assert all(95 <= c <= 100 for c in seconds[1:]), seconds


def test_mixed_heavy_and_spread_sources_each_get_the_limit(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """One source at 300/s on one flow plus 20 at 150/s over 4 flows each: each gets ~100/s."""

    async def scenario() -> list[list[int]]:
        spec = make_spec("mixed", 4, split="demand")
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            plans = [LoadPlan(spec.relay.listen, rate=300, sources=1, flows=1, duration=6.0)]
            plans += [
                LoadPlan(
                    spec.relay.listen, rate=150, sources=1, flows=4, duration=6.0, source_offset=i
                )
                for i in range(1, 21)
            ]
            results: list[LoadResult] = await asyncio.gather(*(run_load(p) for p in plans))
            return [[s.received for s in r.seconds] for r in results]

    received = asyncio.run(scenario())
    means = [statistics.fmean(r[2:6]) for r in received]
    print(
        f"mixed: heavy source {received[0]}; per-source means over seconds 2-5: "
        f"{[round(m, 1) for m in means]}"
    )
    assert all(abs(m - LIMIT) <= 0.1 * LIMIT for m in means), means


def blast(target: tuple[str, int], count: int, source: str = "127.0.0.2") -> None:
    """`count` datagrams at once, each from its own flow (a fresh source port)."""
    socks = []
    try:
        for _ in range(min(count, 64)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            socks.append(sock)
        for i in range(count):
            socks[i % len(socks)].sendto(b"x" * 16, target)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("replicas", "split"), [(1, "even"), (1, "demand"), (4, "even"), (4, "demand")]
)
def test_token_bucket_holds_the_limit_and_the_burst(
    etcd: EtcdServer, tmp_path: Path, replicas: int, split: str
) -> None:
    """300/s over 64 flows: 100 ± 5 per second; after idling, a blast passes at most `burst`."""
    burst = 50

    async def scenario() -> tuple[list[int], int, list[float]]:
        spec = make_spec(
            f"tb{replicas}-{split}", replicas, algorithm="token_bucket", burst=burst, split=split
        )
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await settled(svc)
            plan = LoadPlan(spec.relay.listen, rate=300, sources=1, flows=64, duration=5.0)
            started = time.time()
            await run_load(plan)
            # Idle long enough for every bucket to fill (0.5 s), then blast as a second begins.
            idle = 1.0 - time.time() % 1.0
            await asyncio.sleep(idle if idle >= 0.7 else idle + 1.0)
            caps = [g.get("vmbox_burst_share", 0.0) for g in (await svc.gauges()).values()]
            blasted = int(time.time())
            blast(spec.relay.listen, 4 * burst)
            await asyncio.sleep(1.15 - time.time() % 1.0)  # the echo server closed that second
            return (
                per_second(svc.echo.history, int(started) + 1, 3),
                per_second(svc.echo.history, blasted, 1)[0],
                caps,
            )

    seconds, passed, caps = asyncio.run(scenario())
    print(
        f"token bucket, {replicas} replicas, {split}: server received/s {seconds}; "
        f"after idling, a blast of {4 * burst} passed {passed} (burst {burst}, caps {caps})"
    )
    assert abs(statistics.fmean(seconds) - LIMIT) <= 5, seconds
    assert all(abs(c - LIMIT) <= 15 for c in seconds), seconds
    # + what refills while the blast is relayed: the replicas take it in within
    # milliseconds on a quiet machine (+2), up to 50 ms when the full suite loads both
    # cores (55 seen with 4 replicas); a bucket that ignored its burst would pass 200.
    assert passed <= burst + LIMIT // 10, passed
    assert passed >= burst * 0.6, passed  # the buckets were full: a burst does pass


# -- one iperf3 UDP flow, and no `split:` in the spec (issue 18) -----------------

IPERF_LIMIT = 1000
IPERF_RATE = 2500  # datagrams/s, 2.5x the limit: issue 18's figures
IPERF_LENGTH = 100  # bytes of payload a datagram
IPERF_SECONDS = 7  # the client's run: 1 s to start, 5 steady, the last left out
IPERF_BOUND = 30.0  # seconds either iperf3 may run at all (then SIGINT, SIGKILL 5 s later)
HOST = "127.0.0.1"


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    """A TCP socket listens on HOST:`port` (/proc/net/tcp: local address, state 0A)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(line.split()[1] == local and line.split()[3] == "0A" for line in list(table)[1:])


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def control_relay(target: int) -> tuple[asyncio.Server, int]:
    """iperf3's TCP control connection goes to the port its UDP goes to: a TCP forwarder
    on a port whose UDP side is free (the relay's), to the iperf3 server's `target`."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, target)
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    for _ in range(20):
        port = free_udp_port(HOST)
        try:
            return await asyncio.start_server(connection, HOST, port), port
        except OSError:
            continue
    raise AssertionError("no port free for both TCP and UDP")


async def iperf3(*args: str) -> asyncio.subprocess.Process:
    """iperf3 `args`, bounded by coreutils' timeout, in a process group of its own."""
    return await asyncio.create_subprocess_exec(
        *("timeout", "-s", "INT", "-k", "5", f"{IPERF_BOUND:g}", "iperf3", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


async def report(proc: asyncio.subprocess.Process, what: str) -> dict[str, Any]:
    out, err = await asyncio.wait_for(proc.communicate(), IPERF_BOUND + 10)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}: {err.decode()[-300:]}"
    result: dict[str, Any] = json.loads(out)
    return result


def per_interval(result: dict[str, Any], key: str) -> list[float]:
    """Datagrams a second in each whole interval of an iperf3 JSON report."""
    return [
        i["sum"][key] / i["sum"]["seconds"] / (IPERF_LENGTH if key == "bytes" else 1)
        for i in result["intervals"]
        if i["sum"]["seconds"] >= 0.9
    ]


@pytest.mark.parametrize("replicas", [2, 4])
def test_one_iperf3_udp_flow_gets_the_limit_with_no_split_in_the_spec(
    etcd: EtcdServer, tmp_path: Path, replicas: int
) -> None:
    """Issue 18: one iperf3 UDP stream at 2.5x its limit of 1,000/s reaches one replica; under
    the default split (demand) it gets the limit within 5% through 2 and 4 replicas (976/s
    and 964/s measured; `split: even` gave it 500/s and 250/s). Counted by the iperf3
    server behind the relay, the offer by its client."""
    if shutil.which("iperf3") is None:
        if in_ci():
            pytest.fail("CI must run the iperf3 split test, but iperf3 is not installed")
        pytest.skip("iperf3 not installed (make tools)")

    async def scenario() -> tuple[list[float], list[float]]:
        server_port = free_udp_port(HOST)
        while not _tcp_free(server_port):
            server_port = free_udp_port(HOST)
        control, port = await control_relay(server_port)
        data = {
            "service": f"iperf{replicas}",
            "listen": f"{HOST}:{port}",
            "upstream": f"{HOST}:{server_port}",
            "middlebox": {"function": "ratelimit", "limit": IPERF_LIMIT},  # no split:
            "replicas": {"count": replicas, "min": 1, "max": 4},
            "lease_ttl": 2,
        }
        spec = parse_spec(data)
        assert spec.limiter.split == "demand"
        processes: list[asyncio.subprocess.Process] = []
        async with control, running_service(etcd.endpoints, spec, tmp_path, echo=False) as svc:
            try:
                await settled(svc)
                server = await iperf3("-s", "-B", HOST, "-p", str(server_port), "-1", "-J")
                processes.append(server)
                deadline = time.monotonic() + 10.0
                while not _listening(server_port):
                    assert server.returncode is None and time.monotonic() < deadline, (
                        "the iperf3 server did not listen"
                    )
                    await asyncio.sleep(0.05)
                # Start when a second is 0.4 old: iperf3's intervals then begin about
                # mid-window, so each holds the passes of one window whole.
                await asyncio.sleep((1.4 - time.time() % 1.0) % 1.0)
                client = await iperf3(
                    *("-c", HOST, "-p", str(port), "-u", "-J", "-t", str(IPERF_SECONDS)),
                    *("-b", str(IPERF_RATE * IPERF_LENGTH * 8), "-l", str(IPERF_LENGTH)),
                )
                processes.append(client)
                sent = await report(client, "the iperf3 client")
                got = await report(server, "the iperf3 server")
            finally:  # before the control forwarder closes: nothing of theirs outlives it
                for proc in processes:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        await proc.wait()
        return per_interval(sent, "packets"), per_interval(got, "bytes")

    offered, received = asyncio.run(scenario())
    assert len(received) >= IPERF_SECONDS - 1 and len(offered) >= IPERF_SECONDS - 1, received
    steady = slice(1, IPERF_SECONDS - 1)  # the first second starts the flow; the last ends it
    offer, got = statistics.fmean(offered[steady]), statistics.fmean(received[steady])
    print(
        f"one iperf3 UDP flow, {replicas} replicas, no split: (demand): offered/s "
        f"{[round(o) for o in offered]}, received/s {[round(r) for r in received]}; "
        f"steady: offered {offer:.0f}/s, received {got:.1f}/s of {IPERF_LIMIT}"
    )
    assert offer >= 2 * IPERF_LIMIT, offered  # the load was offered, at well past the limit
    assert abs(got - IPERF_LIMIT) <= 0.05 * IPERF_LIMIT, received
    assert max(received[steady]) <= 1.05 * IPERF_LIMIT, received
