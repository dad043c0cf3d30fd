"""etcd's /metrics as the control-plane experiment reads them: parsed, combined, as rates."""

from __future__ import annotations

import pytest

from vmbox.experiments.controlplane.etcdmetrics import Snapshot, combine, parse, rates


def grpc(name: str, method: str, value: float, service: str = "etcdserverpb.KV") -> str:
    """One line of a grpc_server_* family, labelled as etcd labels it."""
    kind = "bidi_stream" if method == "Watch" else "unary"
    labels = f'grpc_method="{method}",grpc_service="{service}",grpc_type="{kind}"'
    return f"grpc_server_{name}_total{{{labels}}} {value:g}"


WATCH = "etcdserverpb.Watch"
TEXT = "\n".join(
    [
        "# HELP grpc_server_msg_received_total Total number of RPC stream messages received.",
        "# TYPE grpc_server_msg_received_total counter",
        grpc("msg_received", "Put", 11),
        grpc("msg_received", "Range", 4),
        grpc("msg_received", "Txn", 2),
        grpc("msg_received", "Watch", 5, WATCH),
        grpc("msg_received", "Watch", 1, "grpc.health.v1.Health"),
        grpc("msg_received", "Compact", 0),
        grpc("started", "Watch", 5, WATCH),
        grpc("msg_sent", "Watch", 55, WATCH),
        "etcd_debugging_mvcc_events_total 50",
        "etcd_debugging_mvcc_watcher_total 5",
        "etcd_network_client_grpc_received_bytes_total 472",
        "etcd_network_client_grpc_sent_bytes_total 3333",
        "etcd_server_proposals_committed_total 26",
        "etcd_mvcc_db_total_size_in_bytes 2.097152e+06",
        "process_cpu_seconds_total 0.05",
        "process_resident_memory_bytes 2.7910144e+07",
    ]
)


def test_parse_reads_requests_by_method_and_the_plain_counters() -> None:
    snap = parse(TEXT)
    assert snap.requests == {"Put": 11.0, "Range": 4.0, "Txn": 2.0, "Watch": 6.0}
    assert snap.streams == {"Watch": 5.0}
    assert snap.events == 50.0  # events delivered, not the 55 responses sent
    assert snap.sent_bytes == 3333.0 and snap.received_bytes == 472.0
    assert snap.cpu_seconds == 0.05 and snap.rss_bytes == 27910144.0
    assert snap.watchers == 5.0 and snap.proposals == 26.0 and snap.db_bytes == 2097152.0


def test_parse_tolerates_junk_and_missing_series() -> None:
    snap = parse('garbage line\nfoo{bar="1"} notanumber\n\n')
    assert snap == Snapshot()


def test_combine_sums_what_clients_did_and_takes_the_busiest_for_replicated_work() -> None:
    one = parse(TEXT)
    both = combine([one, one])
    assert both.requests["Put"] == 22.0 and both.events == 100.0 and both.cpu_seconds == 0.1
    assert both.proposals == 26.0 and both.db_bytes == one.db_bytes


def test_rates_are_per_second_and_writes_are_put_txn_deleterange() -> None:
    before = parse(TEXT)
    after = parse(
        TEXT.replace('"} 11', '"} 31').replace("events_total 50", "events_total 250")
        .replace("cpu_seconds_total 0.05", "cpu_seconds_total 1.05")
    )  # fmt: skip
    got = rates(before, after, 2.0)
    assert got.request("Put") == 10.0 and got.writes == 10.0 and got.total == 10.0
    assert got.events == 100.0 and got.cpu == pytest.approx(0.5)
    assert got.rss_mib == pytest.approx(26.6, abs=0.1) and got.request("Range") == 0.0
