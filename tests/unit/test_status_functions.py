"""`vmbox status` of a chain or a firewall: each function's verdicts, the firewall's line.

Scraped values are made up (or exported by a real ReplicaMetrics); rates come from
two RateTracker updates one second apart, as the live view takes them.
"""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from rich.console import Console, RenderableType
from rich.table import Table

from vmbox.control.status import (
    FUNCTION_PREFIX,
    RateTracker,
    ReplicaRow,
    ServiceStatus,
    _scrape_row,
    firewall_line,
    function_key,
    render,
)
from vmbox.dataplane.counters import Counters
from vmbox.metrics import ReplicaMetrics, parse_metrics

CHAIN = ("ratelimit", "firewall")


def _text(renderable: RenderableType) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def _line(text: str, *words: str) -> list[str]:
    """The cells of the one line holding every word (box characters dropped)."""
    lines = [line for line in text.splitlines() if all(word in line.split() for word in words)]
    assert len(lines) == 1, (words, text)
    return [cell for cell in lines[0].replace("│", " ").replace("┃", " ").split() if cell]


def _chain_values(scale: float, conns: float, half_open: float) -> dict[str, float]:
    """One scrape of a replica running ratelimit then firewall; counters grow with scale."""
    values = {
        "packets_received_total": 1000 * scale,
        "packets_passed_total": 700 * scale,
        "packets_dropped_total": 300 * scale,
        "share": 50.0,
        "limit": 100.0,
        "firewall_connections": conns,
        "firewall_half_open": half_open,
        "firewall_dropped_not_allowed": 20 * scale,
        "firewall_dropped_no_connection": 80 * scale,
        "firewall_dropped_table_full": 0.0,
    }
    verdicts = {
        "ratelimit": {"pass": 800, "drop": 200, "held": 0},
        "firewall": {"pass": 700, "drop": 100, "held": 10},
    }
    for function, counts in verdicts.items():
        for verdict, count in counts.items():
            values[function_key(function, verdict)] = count * scale
    return values


def _rated(rid: str, first: dict[str, float], second: dict[str, float]) -> ReplicaRow:
    tracker = RateTracker()
    tracker.update(rid, first, 10.0)
    return ReplicaRow(rid, 1, "127.0.0.1:1", second, tracker.update(rid, second, 11.0))


def test_metrics_keep_each_function_apart() -> None:
    """The real exposition of a chain's replica parses into one value per function and verdict."""
    counters = Counters(received=10, passed=6, dropped=4)
    verdicts = {"ratelimit": {"pass": 8, "drop": 2, "held": 0}, "firewall": {"pass": 6, "drop": 2}}
    gauges = {"firewall_connections": 3.0, "firewall_dropped_invalid": 1.0}
    metrics = ReplicaMetrics("web", "r1", counters, lambda: gauges, functions=lambda: verdicts)
    raw = parse_metrics(generate_latest(metrics.registry).decode())
    values = {name.removeprefix("vmbox_"): value for name, value in raw.items()}
    assert values[function_key("ratelimit", "pass")] == 8
    assert values[function_key("ratelimit", "drop")] == 2
    assert values[function_key("firewall", "drop")] == 2
    assert values["function_packets_total"] == 18  # the sum, as scrape() gives it
    assert values["packets_received_total"] == 10 and values["firewall_connections"] == 3
    assert values["firewall_dropped_invalid"] == 1
    functions = [key.split("/")[1] for key in values if key.startswith(FUNCTION_PREFIX)]
    assert functions == ["ratelimit"] * 3 + ["firewall"] * 2  # in chain order


def test_rates_of_functions_and_firewall_drops() -> None:
    row = _rated("r1", _chain_values(1, 5, 1), _chain_values(2, 5, 1))
    assert row.rates[function_key("firewall", "pass")] == 700
    assert row.rates[function_key("firewall", "held")] == 10
    assert row.rates["firewall_dropped_no_connection"] == 80
    assert "firewall_connections" not in row.rates  # a gauge, not a count
    # A plain ratelimit's rates are the three they always were.
    plain = {"packets_received_total": 1.0, "share": 2.0}
    assert set(_rated("r2", plain, plain).rates) == {
        "packets_received_total",
        "packets_passed_total",
        "packets_dropped_total",
    }


def test_status_of_a_chain_shows_each_function_per_replica_and_in_total() -> None:
    rows = [
        _rated("web-1", _chain_values(1, 12, 3), _chain_values(2, 12, 3)),
        _rated("web-2", _chain_values(1, 4, 0), _chain_values(1.5, 4, 0)),
    ]
    text = _text(render(ServiceStatus("web", "2", rows, [], 0.0)))
    assert "functions: ratelimit → firewall" in text
    header = _line(text, "FUNCTION", "REPLICA")
    assert header == ["FUNCTION", "REPLICA", "PASS/s", "DROP/s", "HELD/s", "CONNS", "HALF-OPEN"]
    assert _line(text, "ratelimit", "web-1") == ["ratelimit", "web-1", "800", "200", "0", "-", "-"]
    assert _line(text, "ratelimit", "web-2") == ["ratelimit", "web-2", "400", "100", "0", "-", "-"]
    assert _line(text, "ratelimit", "total") == ["ratelimit", "total", "1200", "300", "0", "-", "-"]
    assert _line(text, "firewall", "web-1") == ["firewall", "web-1", "700", "100", "10", "12", "3"]
    assert _line(text, "firewall", "web-2") == ["firewall", "web-2", "350", "50", "5", "4", "0"]
    assert _line(text, "firewall", "total") == ["firewall", "total", "1050", "150", "15", "16", "3"]
    # Functions in chain order, and the firewall's line after the table.
    assert text.index("│ ratelimit ") < text.index("│ firewall ") < text.index("firewall:")
    expected = (
        "firewall: 16 connections (3 half-open); dropped/s: no_connection 120, not_allowed 30"
    )
    assert expected in text
    assert "table_full" not in text  # no drops for that reason: not listed


def test_first_scrape_shows_counts_without_rates() -> None:
    row = ReplicaRow("web-1", 1, "127.0.0.1:1", _chain_values(1, 7, 2))
    text = _text(render(ServiceStatus("web", "1", [row], [], 0.0)))
    assert _line(text, "firewall", "web-1") == ["firewall", "web-1", "-", "-", "-", "7", "2"]
    assert "total" not in text  # one replica: no total row
    assert "firewall: 7 connections (2 half-open); dropped/s: -" in text


def test_a_lone_firewall_decides_what_the_replica_passes_and_drops() -> None:
    """No chain, no per-function counters: the firewall's verdicts are the replica's."""
    first = {"packets_passed_total": 0.0, "packets_dropped_total": 0.0, "firewall_connections": 2.0}
    second = first | {"packets_passed_total": 90.0, "packets_dropped_total": 9.0}
    row = _rated("fw-1", first, second | {"firewall_half_open": 1.0})
    failed = ReplicaRow("fw-2", 2, "127.0.0.1:2", error="127.0.0.1:2: Connection refused")
    status = ServiceStatus("fw", "2", [row, failed], [], 0.0)
    text = _text(render(status))
    assert "functions: firewall" in text
    assert _line(text, "firewall", "fw-1") == ["firewall", "fw-1", "90", "9", "-", "2", "1"]
    assert not any("firewall" in line and "fw-2" in line for line in text.splitlines())
    assert firewall_line(status) == "firewall: 2 connections (1 half-open); dropped/s: none"


def test_a_plain_ratelimit_shows_no_function_table() -> None:
    row = _rated("web-1", {"packets_received_total": 1.0}, {"packets_received_total": 5.0})
    status = ServiceStatus("web", "1", [row], [], 0.0)
    assert isinstance(render(status), Table)  # the replicas table alone, as before
    assert "FUNCTION" not in _text(render(status)) and firewall_line(status) == ""


def test_status_scrapes_function_labels_from_a_replica() -> None:
    verdicts = {"ratelimit": {"pass": 3, "drop": 1, "held": 0}, "firewall": {"pass": 2, "drop": 1}}
    metrics = ReplicaMetrics("web", "r1", Counters(received=4), dict, functions=lambda: verdicts)

    async def main() -> tuple[ReplicaRow, ReplicaRow]:
        port = metrics.start("127.0.0.1", 0)
        try:
            row = ReplicaRow("r1", 1, f"127.0.0.1:{port}")
            await _scrape_row(row)
        finally:
            metrics.stop()
        gone = ReplicaRow("r1", 1, f"127.0.0.1:{port}")
        await _scrape_row(gone)
        return row, gone

    row, gone = asyncio.run(asyncio.wait_for(main(), 15.0))
    assert row.error == "" and row.values["packets_received_total"] == 4
    assert row.values[function_key("firewall", "drop")] == 1
    assert gone.error.startswith("127.0.0.1:") and "\n" not in gone.error


def test_status_names_the_aggregator() -> None:
    rows = [
        _rated(rid, {"aggregator_leading": lead}, {"aggregator_leading": lead})
        for rid, lead in (("web-1", 0.0), ("web-2", 1.0))
    ]
    text = _text(render(ServiceStatus("web", "2", rows, [], 0.0)))
    assert "aggregator (demand and ack summaries): web-2" in text
