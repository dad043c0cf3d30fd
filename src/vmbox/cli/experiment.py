"""`vmbox experiment`: reproduce the published evaluation, one figure or all of them.

A click group registered by vmbox.cli.main. Its subcommands come from the registry
in vmbox.experiments (one per experiment whose module is there, plus `all`),
and each one's --help is its module's docstring, read without importing it so
help stays fast. Every run is bounded by its entry's time budget; a run that
cannot finish ends in one line, not a traceback. The exit status says whether
the published shape was reproduced (EXIT_HELP): a verdict that does not hold
fails the command as an error does, so a script or CI can rely on it.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import re
import shlex
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from vmbox.cli.errors import fail, run
from vmbox.experiments import EXPERIMENTS, INPATH_EXPERIMENTS
from vmbox.registry import Entry, NotRunnable, Registry

if TYPE_CHECKING:  # results (and what it imports) only once an experiment runs
    from vmbox.experiments.results import ExperimentResult, Scale

OUT_HELP = "Directory for the CSV files, PNG pictures (and report.md for `all`)."
SMALL_HELP = "The quick version (shorter runs, as the test suite does); figures are rougher."
EXIT_HELP = (
    "Exit status: 0 when every experiment ran and every verdict (the report's ok column) "
    "held; 1 when an experiment failed to run or a verdict did not hold (one line on stderr "
    "says which); 2 for bad usage."
)


def _docstring(entry: Entry) -> str:
    """The module's docstring, parsed from its source rather than imported."""
    try:
        spec = importlib.util.find_spec(entry.module)
        if spec is None or spec.origin is None:
            return entry.summary
        text = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    except (ImportError, OSError, SyntaxError):
        return entry.summary
    # "`vmbox experiment x`: what it shows." reads as "What it shows." under its own usage line.
    text = re.sub(r"^`vmbox experiment [\w-]+`:\s*", "", text)
    return text[:1].upper() + text[1:] if text else entry.summary


async def run_entry(
    entry: Entry, out_dir: Path, scale: Scale, console: Console
) -> ExperimentResult:
    """Run one experiment within its budget; failures come back as a result with `error`."""
    from vmbox.dataplane.sockets import BindError
    from vmbox.experiments.results import ExperimentError, ExperimentResult
    from vmbox.state.store import StoreError

    # Failures a user or the machine can cause, shown as one line; others are bugs.
    expected = (ExperimentError, NotRunnable, StoreError, BindError, OSError, RuntimeError)
    budget = entry.budget_for(scale)
    started = time.monotonic()
    console.rule(f"experiment {entry.name} ({scale})")
    try:
        experiment_run = EXPERIMENTS.load(entry)
        async with asyncio.timeout(budget):
            result = await experiment_run(out_dir, scale=scale, console=console)
    except TimeoutError:
        result = ExperimentResult(entry.name, error=f"did not finish within {budget:.0f} s")
    except expected as exc:
        result = ExperimentResult(entry.name, error=str(exc) or type(exc).__name__)
    except Exception as exc:  # a bug in one experiment must not lose the others' figures
        console.print(traceback.format_exc(), markup=False, highlight=False)
        result = ExperimentResult(entry.name, error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result


def _prepare(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".vmbox-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        fail(f"cannot write to --out {out}: {exc.strerror or exc}", 2)
    return path


def _show(result: ExperimentResult, console: Console) -> None:
    from vmbox.experiments.report import console_table

    console.print(console_table([result]))
    for note in result.notes:
        console.print(f"- {note}", highlight=False)
    for path in [*result.csvs, *result.pngs]:
        console.print(f"wrote {path}", highlight=False)


def _exit_on_failures(results: list[ExperimentResult]) -> None:
    """Exit 1 with one line naming what did not hold, if anything did not (EXIT_HELP)."""
    from vmbox.experiments.report import failures

    if problems := failures(results):
        fail("did not hold: " + "; ".join(problems))


class ExperimentGroup(click.Group):
    """A group whose commands are the registry's available entries, then `all`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [entry.name for entry in EXPERIMENTS.available()] + super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = EXPERIMENTS.lookup(cmd_name)
        if entry is not None:
            return _single_command(entry)
        return super().get_command(ctx, cmd_name)


DATAPLANE_HELP = (
    "relay: the UDP relay on loopback. nfqueue (root): the service in the packet path of a "
    "lab of network namespaces built for the run and removed after it "
    f"({', '.join(e.name for e in INPATH_EXPERIMENTS.entries)})."
)


def _registry(dataplane: str) -> Registry[Any]:
    return INPATH_EXPERIMENTS if dataplane == "nfqueue" else EXPERIMENTS


def _options(func: Any) -> Any:
    func = click.option("--small", is_flag=True, help=SMALL_HELP)(func)
    func = click.option(
        "--dataplane",
        type=click.Choice(["relay", "nfqueue"]),
        default="relay",
        show_default=True,
        help=DATAPLANE_HELP,
    )(func)
    return click.option(
        "--out", default="results", show_default=True, metavar="DIR", help=OUT_HELP
    )(func)


def _single_command(entry: Entry) -> click.Command:
    @click.command(
        name=entry.name, help=_docstring(entry), short_help=entry.summary, epilog=EXIT_HELP
    )
    @_options
    def command(out: str, small: bool, dataplane: str) -> None:
        chosen = _registry(dataplane).lookup(entry.name)
        if chosen is None:
            names = ", ".join(e.name for e in INPATH_EXPERIMENTS.available())
            fail(f"{entry.name} has no --dataplane {dataplane} version (those: {names})", 2)
        out_dir = _prepare(out)
        console = Console()
        scale: Scale = "small" if small else "full"
        result = run(lambda: run_entry(chosen, out_dir, scale, console))
        if result.error:
            fail(f"{result.name}: {result.error}")
        _show(result, console)
        _exit_on_failures([result])

    return command


@click.group(cls=ExperimentGroup, epilog=EXIT_HELP)
def experiment() -> None:
    """Reproduce the published evaluation, with CSV files, pictures and a report.

    \b
    Quick look:  vmbox experiment all --small --out /tmp/results
    The real run: vmbox experiment all --out results   (a few minutes)

    Each experiment starts its own private etcd, echo server and replicas on
    loopback; nothing needs starting by hand.
    """


@experiment.command(name="all", epilog=EXIT_HELP)
@_options
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice([entry.name for entry in EXPERIMENTS.entries]),
    help="Leave this experiment out (repeatable).",
)
def all_(out: str, small: bool, dataplane: str, skip: tuple[str, ...]) -> None:
    """Run every experiment, then write report.md beside their CSVs and PNGs.

    The report puts vmbox's figures beside the published ones, says whether
    each matches the published shape, names the machine it ran on and gives
    the command line to repeat it. The report is written even when something
    failed; the exit status then says so.
    """
    out_dir = _prepare(out)
    console = Console()
    scale: Scale = "small" if small else "full"
    command = shlex.join(
        ["vmbox", "experiment", "all", "--out", out]
        + (["--small"] if small else [])
        + (["--dataplane", dataplane] if dataplane != "relay" else [])
        + [arg for name in skip for arg in ("--skip", name)]
    )
    registry = _registry(dataplane)
    results = run(lambda: _run_all(out_dir, scale, set(skip), command, console, registry))
    _exit_on_failures(results)


def _left_out(skip: set[str], registry: Registry[Any]) -> tuple[list[Entry], list[str]]:
    """The entries to run, and a note for each one left out."""
    entries, notes = [], []
    for entry in registry.entries:
        if entry.name in skip:
            notes.append(f"{entry.name}: left out (--skip {entry.name}).")
        elif entry not in registry.available():
            notes.append(f"{entry.name}: not available yet ({entry.module} is not installed).")
        else:
            entries.append(entry)
    return entries, notes


async def _run_all(
    out_dir: Path,
    scale: Scale,
    skip: set[str],
    command: str,
    console: Console,
    registry: Registry[Any] = EXPERIMENTS,
) -> list[ExperimentResult]:
    """Every available experiment in registry order, then report.md; their results."""
    from vmbox.experiments.report import console_table, render_report
    from vmbox.experiments.results import machine_info

    started, wall = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    entries, left_out = _left_out(skip, registry)
    results = [await run_entry(entry, out_dir, scale, console) for entry in entries]
    text = render_report(
        results,
        machine_info(),
        command,
        out_dir,
        started=wall,
        seconds=time.monotonic() - started,
        notes=left_out,
    )
    report = out_dir / "report.md"
    report.write_text(text)
    console.print(console_table(results))
    console.print(f"wrote {report} ({time.monotonic() - started:.0f} s in all)", highlight=False)
    return results
