"""`vmbox experiment controlplane --small`: etcd's cost against N and S, before and after.

One run (about a minute: N = 1, 4, 16 in both modes, S = 1, 10 after, each
point on a fresh private etcd) is shared by the module's tests, which read
its CSV files: every point was measured; after the aggregator, etcd's writes
and watch events grow at most linearly in N and in S, while before, watch
events grow as N^2 (the contrast); a new limit reached every replica within
1 s; every source's limit held within 5% in every measured window; one more
replica settled; and no worker process outlived the run.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.integration.harness import ExperimentRun, csv_rows, run_experiment
from vmbox.experiments import EXPERIMENTS

pytestmark = [pytest.mark.experiment, pytest.mark.timeout(400)]
WORKER = "vmbox.experiments.controlplane.worker"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentRun:
    entry = EXPERIMENTS.lookup("controlplane")
    assert entry is not None
    out = tmp_path_factory.mktemp("controlplane")
    started = time.monotonic()
    done = run_experiment(out, "controlplane", "--small", timeout=entry.small_budget + 120)
    print(f"controlplane --small took {time.monotonic() - started:.0f} s")
    return done


def points(run: ExperimentRun) -> list[dict[str, str]]:
    return csv_rows(run.out / "controlplane.csv")


def fits(run: ExperimentRun) -> dict[tuple[str, str, str], dict[str, str]]:
    rows = csv_rows(run.out / "controlplane_fits.csv")
    return {(r["series"], r["mode"], r["cost"]): r for r in rows}


def test_runs_and_writes_its_files(run: ExperimentRun) -> None:
    output = run.result.stdout + run.result.stderr
    assert "Traceback" not in output and "controlplane failed" not in output, output[-3000:]
    assert run.result.returncode == 0, output[-3000:]
    png = run.out / "controlplane.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if WORKER in (p.info["cmdline"] or [])]
    assert not left, f"worker processes outlived the run: {left}"


def test_every_point_was_measured(run: ExperimentRun) -> None:
    got = {(r["series"], r["x"], r["mode"]): r for r in points(run)}
    wanted = [("N", x, m) for x in ("1", "4", "16") for m in ("after", "before")]
    wanted += [("S", x, "after") for x in ("1", "10")]
    assert sorted(got) == sorted(wanted)
    for key, row in got.items():
        assert row["status"] in ("ok", "saturated", "crowded"), (key, row["reason"], row["errors"])
        assert float(row["writes_per_s"]) > 0 and float(row["requests_per_s"]) > 0, key
        print(key, row["writes_per_s"], row["watch_events_per_s"], row["status"])


def test_after_grows_linearly_and_before_quadratically(run: ExperimentRun) -> None:
    found = fits(run)
    for series in ("N", "S"):
        for cost in ("writes_per_s", "watch_events_per_s"):
            row = found[(series, "after", cost)]
            assert row["slope"] and float(row["slope"]) <= 1.3, (series, cost, row)
    before = found[("N", "before", "watch_events_per_s")]
    assert float(before["slope"]) >= 1.6 and before["order"] == "N^2", before
    at16 = {r["mode"]: float(r["watch_events_per_s"]) for r in points(run)
            if r["series"] == "N" and r["x"] == "16"}  # fmt: skip
    assert at16["after"] * 3 < at16["before"], at16


def test_limit_change_reaches_every_replica_within_a_second(run: ExperimentRun) -> None:
    for row in points(run):
        assert row["limit_missed"] == "0", row
        if row["mode"] == "after":
            assert row["limit_reach_s"] and float(row["limit_reach_s"]) <= 1.0, row


def test_the_limit_holds_and_a_one_flow_source_gets_close_to_it(run: ExperimentRun) -> None:
    for row in points(run):
        if row["mode"] != "after":
            continue
        assert float(row["all_max"]) <= 1.05, row
        assert float(row["heavy_mean"]) >= 0.9, row
        if row["series"] == "N" and row["status"] in ("ok", "crowded"):
            assert float(row["one_flow_mean"]) >= 0.9, row


def test_one_more_replica_settles(run: ExperimentRun) -> None:
    for row in points(run):
        assert row["settle_s"], (row["series"], row["x"], row["mode"], row["unsettled"])
        assert float(row["settle_s"]) < 3.0, row
