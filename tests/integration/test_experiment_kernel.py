"""`vmbox experiment kernel --small`: the limit enforced in the kernel of a fleet, for shape.

One run (about a minute and a half, root) is shared by the module's tests: one
source at 3x its limit held within 5% (100/s at 1, 2 and 4 nodes, 10,000/s at
4), the throughput rows
present with their offered rates (their ratios are performance, judged by the
experiment's own verdicts, not here), no second of the 1 -> 4 -> 1 resize over
the limit plus the buckets' bursts (seconds under it are expected while a
joiner settles), one flow through 4 nodes given its limit within 5% by
`split: demand`, a flood of new sources held to each node's set size, and no
lab left behind.
"""

from __future__ import annotations

import os

import pytest

from tests.integration.harness import ExperimentRun, csv_rows, run_experiment
from tests.integration.labs import require_lab
from vmbox.experiments import EXPERIMENTS

pytestmark = [pytest.mark.experiment, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentRun:
    require_lab()
    before = set(os.listdir("/run/netns"))
    entry = EXPERIMENTS.lookup("kernel")
    assert entry is not None
    budget = entry.small_budget + 60
    out = tmp_path_factory.mktemp("kernel")
    done = run_experiment(out, "kernel", "--small", timeout=budget)
    left = {ns for ns in os.listdir("/run/netns") if ns.startswith("vxk")} - before
    assert not left, f"the experiment left its lab behind: {left}"
    return done


def test_runs_and_writes_its_files(run: ExperimentRun) -> None:
    output = run.result.stdout + run.result.stderr
    assert "Traceback" not in output and run.result.returncode in (0, 1), output[-3000:]
    png = run.out / "kernel.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (run.out / "kernel.csv").exists() and (run.out / "kernel_resize.csv").exists()


def test_one_source_is_held_to_its_limit_on_every_node_count(run: ExperimentRun) -> None:
    rows = [r for r in csv_rows(run.out / "kernel.csv") if r["part"] == "limit"]
    assert {(r["nodes"], r["limit"]) for r in rows} == {
        ("1", "100"),
        ("2", "100"),
        ("4", "100"),
        ("4", "10000"),
    }
    for row in rows:
        limit, offered, received = (
            float(row[k]) for k in ("limit", "offered_per_s", "received_per_s")
        )
        if offered >= 1.5 * limit:  # hping3 --flood reaches 10,000 x 1.5 here; say so if not
            assert abs(received - limit) <= 0.05 * limit, row
        else:
            print(f"not binding here: {row}")


def test_one_flow_through_four_nodes_gets_its_limit_under_the_demand_split(
    run: ExperimentRun,
) -> None:
    """ECMP takes the one flow to one node; split: demand gives that node the limit but
    the floor the other three keep (96.4%): within 5% of it at the server."""
    (row,) = [r for r in csv_rows(run.out / "kernel.csv") if r["part"] == "skew"]
    assert (row["nodes"], row["limit"]) == ("4", "100") and "one flow" in row["load"]
    offered, received = float(row["offered_per_s"]), float(row["received_per_s"])
    assert offered >= 150, row
    assert abs(received - 100) <= 5, row


def test_throughput_rows_say_what_was_offered(run: ExperimentRun) -> None:
    rows = {
        r["part"]: r for r in csv_rows(run.out / "kernel.csv") if r["part"] not in ("limit", "skew")
    }
    assert set(rows) == {"no table", "kernel"}  # one node against Python: full scale, bench
    for row in rows.values():
        assert float(row["offered_per_s"]) > 1_000 and float(row["received_per_s"]) > 0, row
    print({part: (r["offered_per_s"], r["received_per_s"]) for part, r in rows.items()})


def test_a_flood_of_new_sources_fills_each_nodes_set_to_its_size_and_no_further(
    run: ExperimentRun,
) -> None:
    """10^5 packets from random sources through one node against a set of 4,096: the set at
    its bound, not over it."""
    rows = csv_rows(run.out / "kernel_sources.csv")
    assert len(rows) == 1, rows
    for row in rows:
        assert int(row["size"]) == 4096 and int(row["sent"]) >= 90_000, row
        assert 4000 <= int(row["elements"]) <= 4096, row
    print([row["elements"] for row in rows], rows[0]["offered_per_s"])


def test_no_second_of_a_resize_under_load_passes_more_than_the_limit_and_bursts(
    run: ExperimentRun,
) -> None:
    seconds = csv_rows(run.out / "kernel_resize.csv")
    counts = [int(r["received"]) for r in seconds]
    assert len(counts) >= 6 and {r["nodes"] for r in seconds} >= {"1", "4"}, seconds
    # The bound the experiment states: the limit and, at 4 nodes, a full bucket of 3 on each.
    assert max(counts) <= 100 + 4 * 3, counts
    assert sum(count >= 95 for count in counts) >= 3, counts  # the limit met between resizes
