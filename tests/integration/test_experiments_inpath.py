"""`vmbox experiment all --small --dataplane nfqueue`: the in-path experiments, checked for shape.

One run (about two minutes, root) is shared by the module's tests: the limit
held at the server for UDP and TCP with 1, 2 and 4 replicas, ping's round trip
ordered none < local <= poll < strong, the skew cases, and no lab left behind.
"""

from __future__ import annotations

import os
import statistics

import pytest

from tests.integration.harness import ExperimentRun, csv_rows, run_experiment
from tests.integration.labs import require_lab
from vmbox.experiments import INPATH_EXPERIMENTS

pytestmark = [pytest.mark.experiment, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentRun:
    require_lab()
    before = set(os.listdir("/run/netns"))
    budget = sum(entry.small_budget for entry in INPATH_EXPERIMENTS.entries) + 60
    out = tmp_path_factory.mktemp("inpath")
    done = run_experiment(out, "all", "--small", "--dataplane", "nfqueue", timeout=budget)
    # The experiments' labs are named vx<name><pid>; other tests' labs may come and go.
    left = {ns for ns in os.listdir("/run/netns") if ns.startswith("vx")} - before
    assert not left, f"an experiment left its lab behind: {left}"
    return done


def test_all_in_path_completes_and_every_verdict_holds(run: ExperimentRun) -> None:
    assert run.result.returncode == 0, run.result.stdout[-3000:] + run.result.stderr
    assert "Traceback" not in run.result.stdout + run.result.stderr
    report = (run.out / "report.md").read_text()
    assert "vmbox experiment all --out" in report and "--dataplane nfqueue" in report
    for name in ("correctness-nfqueue", "overhead-nfqueue", "skew-nfqueue"):
        assert f"## {name}" in report, name


def test_correctness_the_server_got_the_limit(run: ExperimentRun) -> None:
    rows = csv_rows(run.out / "correctness_nfqueue.csv")
    for n in ("1", "2", "4"):
        for proto in ("udp", "tcp"):
            top = [
                int(r["received"])
                for r in rows
                if (r["replicas"], r["proto"]) == (n, proto) and float(r["offered"]) >= 150
            ]
            assert len(top) >= 4 and abs(statistics.fmean(top) - 100) <= 5, (n, proto, top)
            low = [
                int(r["received"])
                for r in rows
                if (r["replicas"], r["proto"]) == (n, proto) and float(r["offered"]) == 50
            ]
            assert low and all(45 <= x <= 55 for x in low), (n, proto, low)


def test_overhead_orders_the_variants(run: ExperimentRun) -> None:
    table = {r["variant"]: r for r in csv_rows(run.out / "overhead_nfqueue.csv")}
    assert list(table) == ["none", "local", "poll", "strong"]
    p50 = {name: float(r["p50_ms"]) for name, r in table.items()}
    assert p50["none"] < p50["local"] and max(p50["local"], p50["poll"]) < p50["strong"], p50
    for r in table.values():
        assert int(r["received"]) >= 0.95 * int(r["sent"]) > 0, r


def test_skew_even_is_a_quarter_and_demand_the_limit(run: ExperimentRun) -> None:
    rows = csv_rows(run.out / "skew_nfqueue.csv")

    def mean(case: str, split: str, source: str) -> float:
        got = [
            int(r["received"])
            for r in rows
            if (r["case"], r["split"], r["source"]) == (case, split, source)
            and int(r["second"]) >= 2
        ]
        return statistics.fmean(got)

    assert 15 <= mean("one flow", "even", "heavy") <= 35
    assert 95 <= mean("one flow", "demand", "heavy") <= 105
    assert 90 <= mean("mixed", "demand", "spread-1") <= 110
