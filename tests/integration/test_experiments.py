"""`vmbox experiment all --small`: every experiment at small scale, checked for its shape.

One run (about a minute) is shared by the module's tests: its CSV columns, the
plateau near the limit for 1, 2 and 4 replicas, `strong` slower than `poll`,
non-empty pictures and a report with the published figures beside vmbox's.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.harness import ExperimentRun, run_experiment
from tests.integration.harness import csv_rows as rows
from vmbox.experiments import EXPERIMENTS
from vmbox.experiments.correctness import COLUMNS, LIMIT, TOLERANCE, Second, accuracy, plateau
from vmbox.experiments.overhead import OFF_PATH, SUMMARY_COLUMNS, VARIANTS

pytestmark = [pytest.mark.experiment, pytest.mark.timeout(600)]
MINE = ("correctness", "overhead")
OFF_PATH_VARIANTS = [v.name for v in VARIANTS if v.consistency in OFF_PATH]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentRun:
    # Other experiments (scaling, skew) have tests of their own; this run is about these two.
    skip = [arg for e in EXPERIMENTS.entries if e.name not in MINE for arg in ("--skip", e.name)]
    budget = sum(entry.small_budget for entry in EXPERIMENTS.entries if entry.name in MINE) + 60
    out = tmp_path_factory.mktemp("results")
    return run_experiment(out, "all", "--small", *skip, timeout=budget)


# Judged at 1.05x of base by paired rounds (issue 15), which the small run's 8 short
# rounds on a shared two-core machine cannot always settle. The report and the exit
# status give the verdict; this test asks for the figure, and that every other verdict
# held.
OFF_PATH_ROWS = tuple(f"round trip, {v}, as a ratio to base" for v in OFF_PATH_VARIANTS)


def test_all_completes_and_writes_the_report(run: ExperimentRun) -> None:
    # Both ran and every verdict held (exit 0), or exit 1 names only off-path ratios.
    failed = " ".join(line for line in run.result.stderr.splitlines() if "did not hold" in line)
    assert run.result.returncode == (1 if failed else 0), run.result.stdout[-3000:]
    phrases = re.findall(rf"(?:did not hold: |; )(?:{'|'.join(MINE)})(?: failed)?: ", failed)
    allowed = "|".join(map(re.escape, OFF_PATH_ROWS))
    assert len(phrases) == len(re.findall(rf"overhead: (?:{allowed}): ", failed)), failed
    assert "Traceback" not in run.result.stdout + run.result.stderr
    report = (run.out / "report.md").read_text()
    assert "| experiment | metric | published | vmbox | ok |" in report
    assert f"vmbox experiment all --out {run.out} --small" in report
    assert "scaling: left out (--skip scaling)." in report
    for fact in ("| cores |", "| CPU |", "| kernel |", "| python |", "| etcd | 3."):
        assert fact in report
    assert "![correctness](correctness.png)" in report
    assert "![overhead](overhead.png)" in report
    # The same verdicts as the exit status, as the report prints them: one row per
    # replica count and per variant, and every judged one held.
    figures = [
        line for line in report.splitlines() if line.startswith(tuple(f"| {m} |" for m in MINE))
    ]
    judged = [line for line in figures if not any(row in line for row in OFF_PATH_ROWS)]
    verdicts = [line.rsplit(" | ", 1)[1] for line in judged]
    assert verdicts.count("yes |") == 4 and "NO |" not in verdicts, figures  # 3 counts, strong
    off_path = [line for line in figures if any(row in line for row in OFF_PATH_ROWS)]
    assert len(off_path) == len(OFF_PATH_ROWS), figures
    for line in off_path:  # the ratio, its verdict at 1.05x
        assert "x by paired rounds" in line and line.endswith(("| yes |", "| NO |")), line


def test_correctness_plateau_is_near_the_limit_for_each_replica_count(run: ExperimentRun) -> None:
    table = rows(run.out / "correctness.csv")
    assert tuple(table[0]) == COLUMNS
    seconds = [
        Second(
            int(r["replicas"]),
            int(r["second"]),
            float(r["offered"]),
            int(r["sent"]),
            int(r["received"]),
            int(r["client_received"]),
        )
        for r in table
    ]
    assert {s.replicas for s in seconds} == {1, 2, 4}
    for n in (1, 2, 4):
        acc = accuracy(plateau([s for s in seconds if s.replicas == n], LIMIT), LIMIT)
        assert acc is not None and acc.seconds >= 4, n
        # The report's verdict: mean |received - limit| / limit within TOLERANCE (5%).
        assert acc.ok and acc.mean_error <= TOLERANCE, (n, acc)
        # Below the limit, what is offered comes through (the first second is left out, as
        # on the plateau: a replica may still be learning of its last sibling).
        low = [s for s in seconds if s.replicas == n and s.second >= 1 and s.offered <= LIMIT / 2]
        assert low and all(s.received >= 0.8 * s.sent for s in low), low


def test_overhead_strong_is_slower_than_poll(run: ExperimentRun) -> None:
    table = {r["variant"]: r for r in rows(run.out / "overhead.csv")}
    assert tuple(next(iter(table.values()))) == SUMMARY_COLUMNS
    assert list(table) == ["base", "poll1000", "poll100", "watch", "fenced", "strong"]
    mean = {name: float(r["mean_ms"]) for name, r in table.items()}
    assert mean["strong"] > max(mean["poll1000"], mean["poll100"], mean["fenced"])
    for r in table.values():
        assert int(r["received"]) >= 0.95 * int(r["sent"]) > 0, r
        assert float(r["min_ms"]) <= float(r["p50_ms"]) <= float(r["p99_ms"]) <= float(r["max_ms"])
    samples = rows(run.out / "overhead_rtts.csv")
    assert tuple(samples[0]) == ("variant", "round", "rtt_ms")
    assert len(samples) == sum(int(r["received"]) for r in table.values())


def test_pictures_are_real_pngs(run: ExperimentRun) -> None:
    for name in ("correctness.png", "overhead.png"):
        data = (run.out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
