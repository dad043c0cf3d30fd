"""The experiments' registry: optional entries join when their module exists and fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vmbox.cli import main
from vmbox.experiments import EXPERIMENTS
from vmbox.registry import Entry, NotRunnable

GOOD = '''"""A stand-in experiment."""
NAME = "fake"


async def run(out_dir, *, scale="full", console):
    return None
'''


def entry(module: str) -> Entry:
    return Entry("fake", module, "run", "a fake", budget=1, small_budget=1, optional=True)


def test_the_published_figures_skew_and_kernel_are_registered_and_available() -> None:
    names = [e.name for e in EXPERIMENTS.entries]
    assert names == [
        "correctness",
        "overhead",
        "scaling",
        "skew",
        "kernel",
        "firewall",
        "controlplane",
    ]
    assert all(not e.optional and e.installed() for e in EXPERIMENTS.entries)
    assert EXPERIMENTS.available() == list(EXPERIMENTS.entries)
    assert all(callable(EXPERIMENTS.load(e)) for e in EXPERIMENTS.entries)


def test_a_module_with_the_interface_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmbox_fake_experiment.py").write_text(GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = entry("vmbox_fake_experiment")
    assert fake.installed()
    assert callable(EXPERIMENTS.load(fake))
    monkeypatch.setattr(EXPERIMENTS, "entries", (*EXPERIMENTS.entries, fake))
    assert fake in EXPERIMENTS.available()


def test_a_missing_or_misshapen_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not entry("vmbox_no_such_experiment").installed()
    assert not entry("no_such_package.sub").installed()
    (tmp_path / "vmbox_bad_experiment.py").write_text('NAME = "bad"\n\ndef run(): ...\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(NotRunnable, match=r"vmbox_bad_experiment\.run must be an async def run"):
        EXPERIMENTS.load(entry("vmbox_bad_experiment"))


def test_cli_lists_the_experiments_and_explains_each() -> None:
    runner = CliRunner()
    listing = runner.invoke(main, ["experiment", "--help"])
    assert listing.exit_code == 0
    for name in ("correctness", "overhead", "all"):
        assert f"  {name} " in listing.output
    detail = runner.invoke(main, ["experiment", "overhead", "--help"])
    assert detail.exit_code == 0
    assert "What keeping shared state fresh costs each packet." in detail.output
    assert "--small" in detail.output and "--out DIR" in detail.output
    assert runner.invoke(main, ["experiment", "nope"]).exit_code == 2


def test_an_unwritable_out_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["experiment", "correctness", "--out", str(blocker / "x")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: cannot write to --out")
    assert len(result.output.strip().splitlines()) == 1


VERDICTS = '''"""A stand-in experiment whose verdicts are {verdicts}."""
from vmbox.experiments.results import ExperimentResult, ReportRow


async def run(out_dir, *, scale="full", console):
    rows = [ReportRow(f"figure {{i}}", "published", f"measured {{i}}", ok)
            for i, ok in enumerate({verdicts})]
    return ExperimentResult("fake", rows=rows)
'''


@pytest.mark.parametrize("command", ["fake", "all"])
@pytest.mark.parametrize(
    ("verdicts", "code"), [([True, None], 0), ([True, False, None], 1)], ids=["held", "NO"]
)
def test_the_exit_status_says_whether_every_verdict_held(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    verdicts: list[bool | None],
    code: int,
) -> None:
    module = f"vmbox_verdict_experiment_{code}"  # one per case: imported modules are cached
    (tmp_path / f"{module}.py").write_text(VERDICTS.format(verdicts=verdicts))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(EXPERIMENTS, "entries", (entry(module),))
    result = CliRunner().invoke(main, ["experiment", command, "--out", str(tmp_path / "out")])
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if code:
        assert errors == ["error: did not hold: fake: figure 1: measured 1"]
    else:
        assert errors == []
    assert (tmp_path / "out" / "report.md").exists() == (command == "all")
