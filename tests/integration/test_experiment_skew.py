"""`vmbox experiment skew --small`: even vs demand split under skewed traffic, checked for shape.

One run is shared by the module's tests: the one-flow source is held to about
a quarter of the limit under `even` (the flaw) and to the limit under
`demand`; in the mixed case every source gets its limit under `demand`.
"""

from __future__ import annotations

import statistics

import pytest

from tests.integration.harness import ExperimentRun, csv_rows, run_experiment

pytestmark = [pytest.mark.experiment, pytest.mark.timeout(300)]
SKIP = 2  # the experiment's own warm-up seconds


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentRun:
    out = tmp_path_factory.mktemp("skew")
    return run_experiment(out, "skew", "--small", timeout=240)


def means(run: ExperimentRun, case: str, split: str) -> dict[str, float]:
    rows = [r for r in csv_rows(run.out / "skew.csv") if r["case"] == case and r["split"] == split]
    by: dict[str, list[int]] = {}
    for row in rows:
        if int(row["second"]) >= SKIP:
            by.setdefault(row["source"], []).append(int(row["received"]))
    return {source: statistics.fmean(counts) for source, counts in by.items()}


def test_runs_and_writes_its_files(run: ExperimentRun) -> None:
    assert run.result.returncode == 0, run.result.stdout[-3000:] + run.result.stderr[-3000:]
    assert "Traceback" not in run.result.stdout + run.result.stderr
    png = run.out / "skew.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_one_flow_even_is_a_quarter_and_demand_is_the_limit(run: ExperimentRun) -> None:
    assert 15 <= means(run, "one flow", "even")["heavy"] <= 35
    assert 95 <= means(run, "one flow", "demand")["heavy"] <= 105


def test_mixed_demand_gives_every_source_its_limit(run: ExperimentRun) -> None:
    got = means(run, "mixed", "demand")
    assert len(got) == 21
    assert all(90 <= v <= 110 for v in got.values()), got
