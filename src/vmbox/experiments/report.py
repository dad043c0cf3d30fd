"""The experiments' report: report.md for `vmbox experiment all`, a table for the terminal.

Called by vmbox.cli.experiment with the ExperimentResults of a run. Rendering
is pure (results, machine facts and a command line in, text or a rich Table
out), so it is unit-tested without running anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.table import Table

from vmbox.experiments.results import ExperimentResult, ReportRow


def verdict(ok: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[ok]


def _cell(text: str) -> str:
    """A markdown table cell: pipes escaped, line breaks flattened."""
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def figures_table(results: Sequence[ExperimentResult]) -> list[str]:
    """The markdown table of every result's rows, published beside vmbox."""
    lines = [
        "| experiment | metric | published | vmbox | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        rows = result.rows or [ReportRow("(no figures)", "-", result.error or "-", False)]
        for row in rows:
            cells = (result.name, row.metric, row.published, row.vmbox, verdict(row.ok))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _section(result: ExperimentResult, out_dir: Path) -> list[str]:
    lines = [f"## {result.name}", ""]
    if result.error:
        lines += [f"**Failed:** {result.error}", ""]
    lines += [f"![{result.name}]({_relative(png, out_dir)})" for png in result.pngs]
    if result.pngs:
        lines.append("")
    if result.csvs:
        files = ", ".join(f"[{p.name}]({_relative(p, out_dir)})" for p in result.csvs)
        lines += [f"Data: {files}. Ran in {_duration(result.seconds)}.", ""]
    lines += [f"- {note}" for note in result.notes]
    return [*lines, ""] if result.notes else lines


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return path.as_posix()


def render_report(
    results: Sequence[ExperimentResult],
    machine: Mapping[str, str],
    command: str,
    out_dir: Path,
    *,
    started: str,
    seconds: float,
    notes: Sequence[str] = (),
) -> str:
    """The whole report.md as text."""
    passed = sum(r.ok for r in results)
    lines = [
        "# vmbox experiments: the published figures reproduced",
        "",
        f"Run {started}, {_duration(seconds)} in all; {passed} of {len(results)} "
        "experiments match the published shape. To repeat it:",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Published figures beside vmbox's",
        "",
        *figures_table(results),
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
    ]
    for result in results:
        lines += _section(result, out_dir)
    lines += ["## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in machine.items()]
    return "\n".join(lines) + "\n"


def failures(results: Sequence[ExperimentResult]) -> list[str]:
    """What did not hold, one phrase each: runs that failed, then verdicts that said NO.

    Empty when every experiment ran and every verdict held (rows without a
    verdict, `ok` None, judge nothing). `vmbox experiment` exits 1 otherwise.
    """
    out = []
    for result in results:
        if result.error:
            out.append(f"{result.name} failed: {result.error}")
        out += [
            f"{result.name}: {row.metric}: {row.vmbox}" for row in result.rows if row.ok is False
        ]
    return out


def console_table(results: Sequence[ExperimentResult]) -> Table:
    """The same figures as a rich Table, for the end of a run."""
    table = Table(title="published figures beside vmbox's", title_justify="left")
    for name in ("experiment", "metric", "published", "vmbox", "ok"):
        table.add_column(name)
    for result in results:
        if result.error:
            table.add_row(result.name, "(failed)", "-", result.error, verdict(False))
        for row in result.rows:
            table.add_row(result.name, row.metric, row.published, row.vmbox, verdict(row.ok))
    return table
