"""The pure parts of the lab's traffic measurements: tcpdump's lines as TCP segments, gaps,
the connections SYNs open, an iperf3 report as a StreamResult, and martian sources."""

from __future__ import annotations

from typing import Any

import pytest

from vmbox.lab import LabError, LabPlan
from vmbox.labtraffic import HttpDownload, TcpStream, ack_scan, empty_run, martian, stream_result
from vmbox.tools.tcpgaps import accepted, longest_gap, opened, parse

C, S = "198.18.0.10", "198.19.0.2"
LINES = [
    f"100.000000 IP {C}.40000 > {S}.5401: Flags [S], seq 1, win 64240, length 0",
    f"100.000100 IP {C}.40000 > {S}.5401: Flags [P.], seq 1:38, ack 1, length 37",
    f"100.001000 IP {C}.40002 > {S}.5401: Flags [S], seq 9, win 64240, length 0",
    f"100.300000 IP {C}.40002 > {S}.5401: Flags [S], seq 9, win 64240, length 0",  # again
    f"100.400000 IP {C}.40002 > {S}.5401: Flags [.], seq 1:65161, ack 1, length 65160",
    f"101.900000 IP {C}.40000 > {S}.5401: Flags [P.], seq 38:42, ack 2, length 4",
    f"102.000000 IP {C}.40002 > {S}.5401: Flags [P.], seq 65161:70000, ack 1, length 4839",
    "102.100000 IP6 2001:2:0:2::2.80 > 2001:2:0:1::a.5000: Flags [S.], seq 3, ack 1, length 0",
    f"102.200000 IP {S}.80 > {C}.5000: Flags [P.], seq 1:206, ack 80, length 205: HTTP: 200 OK",
    f"102.300000 IP {C} > {S}: ICMP echo request, id 1, seq 1, length 64",
]


def test_parse_reads_tcp_lines_of_both_families_and_skips_the_rest() -> None:
    segments = list(parse(LINES))
    assert len(segments) == len(LINES) - 1
    first, v6, http = segments[0], segments[7], segments[8]
    assert (first.at, first.src, first.sport, first.dport, first.length) == (
        100.0,
        C,
        40000,
        5401,
        0,
    )
    assert first.syn and not first.syn_ack
    assert (v6.src, v6.dst, v6.dport) == ("2001:2:0:2::2", "2001:2:0:1::a", 5000) and v6.syn_ack
    assert http.length == 205


def test_opened_counts_connections_not_retransmitted_syns() -> None:
    segments = list(parse(LINES))
    assert opened(segments) == [(C, 40000), (C, 40002)]
    assert accepted(segments) == [("2001:2:0:1::a", 5000)]


def test_longest_gap_counts_the_silence_up_to_until() -> None:
    assert longest_gap([3.0, 1.0, 1.5]) == 1.5
    assert longest_gap([1.0]) == 0.0 and longest_gap([]) == 0.0
    assert longest_gap([1.0, 1.5], until=4.0) == 2.5
    assert longest_gap([1.0, 3.0], until=2.0) == 2.0  # `until` before the last: ignored


def test_empty_run_adds_consecutive_empty_intervals() -> None:
    intervals = [(0.1, 5), (0.1, 0), (0.1, 0), (0.1, 7), (0.1, 0), (0.05, 0)]
    assert abs(empty_run(intervals) - 0.2) < 1e-9
    assert empty_run([(0.1, 1)]) == 0.0


def report(**extra: Any) -> dict[str, Any]:
    served = {"intervals": [{"sum": {"seconds": 0.1, "bytes": b}} for b in (10, 0, 0, 10)]}
    end = {"sum_received": {"bytes": 20, "bits_per_second": 1600.0}, "sum_sent": {"retransmits": 3}}
    return {"intervals": [], "end": end, "server_output_json": served, **extra}


def test_stream_result_takes_the_servers_intervals_and_leaves_out_the_control_connection() -> None:
    result = stream_result(report(), 0, "", list(parse(LINES[:7])), 103.0)
    assert result.completed and result.error == ""
    assert (result.bytes, result.intervals, result.retransmits) == (20, (10, 0, 0, 10), 3)
    assert abs(result.stall - 0.2) < 1e-9
    assert (result.connections, result.data_connections) == (2, 1)
    # The data packets only (port 40002): 100.4 and 102.0; the control's 101.9 is not one.
    assert result.capture_stall is not None and abs(result.capture_stall - 1.6) < 1e-6


def test_a_failed_stream_counts_the_silence_to_its_end() -> None:
    failed = stream_result(
        report(error="control socket has closed"), 1, "", list(parse(LINES[:7])), 105.0
    )
    assert not failed.completed and failed.error == "control socket has closed"
    assert failed.capture_stall is not None and abs(failed.capture_stall - 3.0) < 1e-6
    killed = stream_result({}, -9, "", [], 105.0)
    assert not killed.completed and killed.error == "iperf3 exited with -9"
    assert killed.capture_stall is None and killed.intervals == () and killed.connections == 0


def test_martian_sources_are_the_ones_a_router_drops() -> None:
    dropped = ["224.0.0.1", "239.1.2.3", "127.0.0.1", "0.0.0.0", "255.255.255.255"]
    assert all(martian(a) for a in dropped)
    forwarded = ["198.18.0.10", "1.2.3.4", "240.0.0.1", "10.0.0.1", "0.1.2.3"]
    assert not any(martian(a) for a in forwarded)


def test_runs_are_checked_before_anything_starts() -> None:
    plan = LabPlan("vmbox-unit")
    with pytest.raises(LabError, match="whole seconds"):
        TcpStream(plan, 1.5)  # type: ignore[arg-type]
    with pytest.raises(LabError, match="positive size"):
        HttpDownload(plan, 0, 1000)
    with pytest.raises(LabError, match="ports up to 65535"):
        ack_scan(plan, 100, first_port=65500)
