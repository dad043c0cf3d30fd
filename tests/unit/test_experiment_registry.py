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


def test_the_published_figures_and_skew_are_registered_and_available() -> None:
    names = [e.name for e in EXPERIMENTS.entries]
    assert names == ["correctness", "overhead", "scaling", "skew"]
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
