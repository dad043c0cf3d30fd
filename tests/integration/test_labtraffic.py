"""vmbox.labtraffic against a plain lab (no firewall): what each real client measures is right
there (a stream and a download are one connection with no stall, every ACK and SYN reaches the
server, the server side can open a connection, UDP comes back), and a stand-in firewall (an
iptables DROP in the gateway's namespace) shows in the same measurements. After each test no
process is left in the lab, and the host's network state is as it was."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests.integration.cgroup import in_ci
from tests.integration.labs import host_network_state, in_lab, lab_running
from vmbox import labtraffic
from vmbox.lab import GATEWAY_CLIENT_IF, LabPlan
from vmbox.lab.netlab import pids_in
from vmbox.lab.plan import GATEWAY_SERVER_IF

TOOLS = ("iperf3", "hping3", "curl", "tcpdump", "ss", "timeout", "iptables")
NO_STALL = 0.5  # seconds: an idle lab's longest gap is tens of milliseconds


@pytest.fixture(scope="module")
def lab() -> Iterator[LabPlan]:
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        if in_ci():
            pytest.fail(f"CI must run the lab traffic tests, but {missing} are not installed")
        pytest.skip(f"{', '.join(missing)} not installed (make tools)")
    before = host_network_state()
    with lab_running() as plan:
        yield plan
    assert host_network_state() == before


@pytest.fixture(autouse=True)
def nothing_left(lab: LabPlan) -> Iterator[None]:
    yield
    for role in lab.roles:
        assert pids_in(lab.namespace(role)) == [], f"a process was left in {role}"


def gateway_drop(lab: LabPlan, verb: str, interface: str, ports: str) -> None:
    """Insert (-I) or delete (-D) a rule in the gateway that drops TCP to `ports`."""
    rule = ["FORWARD", "-i", interface, "-p", "tcp", "--dport", ports, "-j", "DROP"]
    done = in_lab(lab, "gateway", ["iptables", "-w", verb, *rule])
    assert done.returncode == 0, done.stderr


def test_a_tcp_stream_is_one_data_connection_with_no_stall(lab: LabPlan) -> None:
    result = labtraffic.tcp_stream(lab, 2)
    print(
        f"stream: {result.bits_per_second / 1e6:.1f} Mbit/s, stall {result.stall:.2f} s, "
        f"longest gap at the server {result.capture_stall} s, {result.retransmits} retransmits"
    )
    assert result.completed, result.error
    assert (result.connections, result.data_connections) == (2, 1)
    assert len(result.intervals) >= 19 and result.stall < NO_STALL
    assert result.capture_stall is not None and result.capture_stall < NO_STALL
    assert abs(result.bytes - 50e6 / 8 * 2.0) < 0.2 * 50e6 / 8 * 2.0  # STREAM_RATE for 2 s


def test_a_gap_made_mid_stream_shows_and_the_stream_carries_on(lab: LabPlan) -> None:
    """1 s of drops in the gateway, in the middle of a stream started in the background."""
    port = str(labtraffic.STREAM_PORT)
    with labtraffic.TcpStream(lab, 4) as stream:
        assert stream.running()
        time.sleep(1.0)
        gateway_drop(lab, "-I", GATEWAY_CLIENT_IF, port)
        try:
            time.sleep(1.0)
        finally:
            gateway_drop(lab, "-D", GATEWAY_CLIENT_IF, port)
        result = stream.result()
    print(f"1 s of drops: stall {result.stall:.1f} s, at the server {result.capture_stall} s")
    assert result.completed, result.error
    assert result.data_connections == 1
    # The drops, plus the retransmission timeout's backoff (0.2, 0.4, 0.8 s ...).
    assert result.capture_stall is not None and 0.9 <= result.capture_stall <= 3.5
    assert result.stall >= 0.7 and result.retransmits >= 1


def test_a_paced_download_is_one_connection_with_no_stall(lab: LabPlan) -> None:
    with labtraffic.HttpDownload(lab, 1_000_000, 500_000) as download:
        assert download.running()
        result = download.result()
    print(f"download: {result.seconds:.2f} s, longest gap at the server {result.stall} s")
    assert result.completed, result.error
    assert (result.http_code, result.size) == (200, 1_000_000)
    assert result.num_connects == 1 and result.accepted == 1
    assert 1.5 <= result.seconds <= 4.0  # paced: size / rate = 2 s
    assert result.stall is not None and result.stall < NO_STALL


def test_acks_to_ports_nobody_uses_all_reach_the_server(lab: LabPlan) -> None:
    result = labtraffic.ack_scan(lab, 100, rate=2000)
    assert (result.sent, result.reached, result.answered) == (100, 100, 100)


def test_a_syn_flood_from_random_sources_reaches_the_server(lab: LabPlan) -> None:
    result = labtraffic.syn_flood(lab, 1000, 2000)
    print(
        f"SYN flood: {result.sent} sent at {result.offered_rate:.0f}/s, "
        f"{result.reached} of {result.routable} routable reached the server "
        f"from {result.sources} sources"
    )
    assert result.sent == result.offered == 1000
    # Random over IPv4: the gateway drops the martian sources (multicast, 127/8: ~6.6%)
    # and forwards every other one.
    assert result.reached == result.routable and result.routable >= 800
    assert result.sources >= 0.95 * result.reached
    assert result.offered_rate > 500


def test_the_server_side_opens_a_connection(lab: LabPlan) -> None:
    result = labtraffic.server_opens(lab)
    assert result.connected, result.error
    assert result.seconds < 1.0


def test_a_udp_exchange_gets_the_servers_datagrams_back(lab: LabPlan) -> None:
    result = labtraffic.udp_exchange(lab, 1)
    assert result.completed, result.error
    assert result.packets >= 240 and result.lost == 0  # 1 Mbit/s of 500 bytes: 250/s


def test_a_stand_in_firewall_shows_in_the_measurements(lab: LabPlan) -> None:
    """ACKs that open nothing and connections the server side opens, dropped in the gateway."""
    scan_ports = f"{labtraffic.SCAN_PORT}:{labtraffic.SCAN_PORT + 99}"
    open_port = str(labtraffic.OPEN_PORT)
    gateway_drop(lab, "-I", GATEWAY_CLIENT_IF, scan_ports)
    gateway_drop(lab, "-I", GATEWAY_SERVER_IF, open_port)
    try:
        scan = labtraffic.ack_scan(lab, 20)
        opened = labtraffic.server_opens(lab, timeout=1.0)
    finally:
        gateway_drop(lab, "-D", GATEWAY_CLIENT_IF, scan_ports)
        gateway_drop(lab, "-D", GATEWAY_SERVER_IF, open_port)
    assert (scan.sent, scan.reached, scan.answered) == (20, 0, 0)
    assert not opened.connected and opened.exit_code == 28, opened  # curl: timed out
