"""Every registered fault at small scale: each row survived, lost no state, stayed in limit.

One run of all the faults (about a minute: each starts its own etcd, echo
server and replicas) is shared by the module's tests. `make faults` runs the
same faults at full scale (`python -m vmbox.faults`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import uvloop
from rich.console import Console

from vmbox.faults import NONE, FaultResult, available
from vmbox.faults.flood import MAX_SOURCES, RSS_BOUND
from vmbox.faults.runner import fault_table, run_all

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, FaultResult]]:
    rows = uvloop.run(run_all(available(), "small", print))
    Console(width=160).print(fault_table(rows, "faults (small scale)"))
    yield {row.fault: row for row in rows}


@pytest.mark.parametrize("name", [entry.name for entry in available()])
def test_every_fault_is_survived_without_losing_state(
    results: dict[str, FaultResult], name: str
) -> None:
    row = results[name]
    assert row.injected > 0, row
    assert row.survived, row.problems
    assert row.state_lost == NONE
    assert row.over_limit == 0
    assert row.problems == []
    assert row.ok


def test_the_flood_keeps_the_table_and_memory_bounded(results: dict[str, FaultResult]) -> None:
    figures = results["flood"].figures
    assert results["flood"].injected == 100_000
    assert 0 < figures["table_max"] <= MAX_SOURCES + 1
    assert figures["overflowed"] > 0
    assert figures["peak_rss"] < RSS_BOUND
    # Every datagram sent was either received by the replica or dropped by the kernel.
    assert abs(figures["unaccounted"]) <= 100


def test_each_corrupt_value_was_counted(results: dict[str, FaultResult]) -> None:
    row = results["corrupt etcd values"]
    assert row.injected == 5  # abc, '', a huge and a negative number, then abc again
