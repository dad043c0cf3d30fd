"""report.md and the terminal table, rendered from results without running anything."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vmbox.experiments.report import console_table, failures, figures_table, render_report
from vmbox.experiments.results import ExperimentResult, ReportRow

OUT = Path("/tmp/results")
MACHINE = {"cores": "2", "CPU": "Test CPU | 2 GHz", "kernel": "Linux 6.1", "etcd": "3.4.23"}


def results() -> list[ExperimentResult]:
    good = ExperimentResult(
        "correctness",
        csvs=[OUT / "correctness.csv"],
        pngs=[OUT / "correctness.png"],
        rows=[ReportRow("received, 1 replica", "100/s", "99.5/s |err| 1%", True)],
        notes=["plateau: offered >= 120/s"],
        seconds=125.0,
    )
    failed = ExperimentResult("overhead", error="did not finish within 300 s")
    return [good, failed]


def test_figures_table_escapes_pipes_and_lists_failures() -> None:
    lines = figures_table(results())
    assert lines[0] == "| experiment | metric | published | vmbox | ok |"
    assert lines[2] == "| correctness | received, 1 replica | 100/s | 99.5/s \\|err\\| 1% | yes |"
    assert lines[3] == "| overhead | (no figures) | - | did not finish within 300 s | NO |"
    assert all(line.count(" | ") == 4 for line in lines[2:])


def test_report_has_table_pictures_data_machine_and_command() -> None:
    text = render_report(
        results(),
        MACHINE,
        "vmbox experiment all --out results",
        OUT,
        started="2030-01-01 12:00:00 UTC",
        seconds=200.0,
        notes=["scaling: not available yet"],
    )
    assert "3 min 20 s in all; 1 of 2 experiments match the published shape" in text
    assert "```sh\nvmbox experiment all --out results\n```" in text
    assert "![correctness](correctness.png)" in text
    assert "Data: [correctness.csv](correctness.csv). Ran in 2 min 5 s." in text
    assert "- plateau: offered >= 120/s" in text
    assert "**Failed:** did not finish within 300 s" in text
    assert "- scaling: not available yet" in text
    assert "| CPU | Test CPU \\| 2 GHz |" in text
    assert (
        text.index("## Published figures") < text.index("## correctness") < text.index("## Machine")
    )


def test_console_table_shows_rows_and_failures() -> None:
    console = Console(record=True, width=200)
    console.print(console_table(results()))
    out = console.export_text()
    assert "99.5/s |err| 1%" in out and "yes" in out
    assert "(failed)" in out and "did not finish within 300 s" in out


def test_failures_name_failed_runs_and_verdicts_that_did_not_hold() -> None:
    assert failures(results()[:1]) == []  # one verdict, held
    unjudged = ExperimentResult("skew", rows=[ReportRow("even split", "n/a", "25/s", None)])
    assert failures([unjudged]) == []  # nothing published to judge against
    missed = ExperimentResult(
        "scaling",
        rows=[
            ReportRow("memory trigger", "60%", "0 scale-ups", False),
            ReportRow("reaction", "15 s", "2 s", True),
        ],
    )
    assert failures([*results(), missed]) == [
        "overhead failed: did not finish within 300 s",
        "scaling: memory trigger: 0 scale-ups",
    ]
