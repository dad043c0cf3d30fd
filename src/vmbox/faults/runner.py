"""Run the registered faults one after another and print the fault table.

`python -m vmbox.faults [--small] [--only NAME ...]` (and so `make faults`)
calls `main`; tests/integration/test_faults.py calls `run_all` at small scale.
Each fault runs within its entry's time budget; a fault that raises or runs out
of time becomes a row that did not survive, with the cause in its notes, so
one broken fault never hides the others' rows. The exit code is 1 when any
row is not ok (not survived, state lost, packets over the limit, a failed check).
At small scale a few rows run side by side (TOGETHER); every other fault
runs alone.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmbox.faults import FAULTS, NONE, FaultResult, Say, Scale
from vmbox.registry import Entry, NotRunnable

MIB = 1024 * 1024


async def run_entry(entry: Entry, scale: Scale, say: Say) -> FaultResult:
    """Inject one fault within its budget; failures come back as a row that did not survive."""
    budget = entry.budget_for(scale)
    started = time.monotonic()
    try:
        fault = FAULTS.load(entry)
        async with asyncio.timeout(budget):
            result = await fault(scale, say)
    except TimeoutError:
        result = FaultResult(entry.name, problems=[f"did not finish within {budget:.0f} s"])
    except (NotRunnable, OSError, RuntimeError) as exc:  # the machine's or the setup's, one line
        result = FaultResult(entry.name, problems=[str(exc) or type(exc).__name__])
    except Exception as exc:  # a bug in one fault must not lose the other rows
        say(traceback.format_exc())
        result = FaultResult(entry.name, problems=[f"{type(exc).__name__}: {exc}"])
    result.seconds = time.monotonic() - started
    return result


# At small scale (the test suite's run) some rows run side by side, a group at the place
# of its first row; at full scale (`make faults`) every fault runs alone. Each row of a
# group has an etcd, a service (and a proxy or a lab) of its own, is light (a few hundred
# packets a second), and judges counts, or times with a margin no other row's load comes
# near, never a time that another row's load could stretch past its bound:
# - the bad input and bad state rows: what came back and in what share of the limit
#   (a floor of 80%; each reads 100%), errors and bad values counted;
# - replica churn and the controller restart: packets over the limit, each second's share
#   (floors of 25% and 80%; they read 69% and 98%), restarts, adoptions, events, leaks,
#   and a killed replica's member key gone within the 2 s TTL (0.02 s, measured);
# - the partition rows, one scenario under each fail policy: packets over the limit in
#   force, what the cut replica passed after the write returned, that it admits again
#   after the heal; and the kernel kill, whose seconds the kernel's table counts and
#   holds, not a process.
# In turn the nine took about 110 s of the suite; side by side about 10, 21 and 15 s,
# with the same figures. The rows that measure what another's load would move run alone: the
# flood (the replica's memory growth), etcd member loss (elections, lease keep-alives,
# the forwarding gap) and the in-path kill (a stream's gap, at most one TCP
# retransmission).
TOGETHER: dict[Scale, tuple[frozenset[str], ...]] = {
    "full": (),
    "small": (
        frozenset({"odd datagrams", "upstream vanished", "corrupt etcd values"}),
        frozenset({"replica churn", "controller restart"}),
        frozenset({"partition (static)", "partition (closed)", "partition (open)", "kernel kill"}),
    ),
}


def _stage_positions(entries: Sequence[Entry], scale: Scale) -> list[list[int]]:
    """Positions in `entries` by stage (see `stages`)."""
    out: list[list[int]] = []
    placed: dict[frozenset[str], list[int]] = {}
    for i, entry in enumerate(entries):
        group = next((g for g in TOGETHER[scale] if entry.name in g), None)
        if group is None:
            out.append([i])
        elif group in placed:
            placed[group].append(i)
        else:
            placed[group] = [i]
            out.append(placed[group])
    return out


def stages(entries: Sequence[Entry], scale: Scale) -> list[list[Entry]]:
    """The entries in stages run one after another: the entries of one TOGETHER set share
    the stage of the first of them (side by side), every other entry is a stage alone."""
    return [[entries[i] for i in stage] for stage in _stage_positions(entries, scale)]


async def run_all(entries: Sequence[Entry], scale: Scale, say: Say) -> list[FaultResult]:
    """Each fault in turn (they would compete for the cores side by side), but for the
    stages that TOGETHER runs side by side; the rows in the entries' order."""
    rows: dict[int, FaultResult] = {}
    for stage in _stage_positions(entries, scale):
        done = await asyncio.gather(*(run_entry(entries[i], scale, say) for i in stage))
        rows.update(zip(stage, done, strict=True))
    return [rows[i] for i in range(len(entries))]


def _yes_no(value: bool) -> Text:
    return Text("yes", style="green") if value else Text("no", style="bold red")


def fault_table(results: Sequence[FaultResult], title: str = "faults") -> Table:
    """fault, times injected, survived, packets over the limit, state lost, peak memory, notes."""
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("fault")
    table.add_column("times injected", justify="right")
    table.add_column("survived", justify="center")
    table.add_column("packets over the limit", justify="right")
    table.add_column("state lost")
    table.add_column("peak memory", justify="right")
    table.add_column("notes")
    for r in results:
        notes = Text("\n".join(r.notes))
        for problem in r.problems:
            notes.append(("\n" if notes else "") + problem, style="bold red")
        notes.append(("\n" if notes else "") + f"{r.seconds:.0f} s", style="dim")
        over = Text(f"{r.over_limit:,}", style="" if r.over_limit == 0 else "bold red")
        lost = Text(r.state_lost, style="" if r.state_lost == NONE else "bold red")
        peak = f"{r.peak_rss / MIB:.0f} MiB" if r.peak_rss else "-"
        table.add_row(r.fault, f"{r.injected:,}", _yes_no(r.survived), over, lost, peak, notes)
    return table


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vmbox.faults",
        description="Inject each fault into a private service and print the fault table.",
    )
    parser.add_argument("--small", action="store_true", help="the quick version the tests run")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        default=[],
        help="inject only this fault (repeatable); --list shows the names",
    )
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The runner's entry point; returns the exit code (0 every row ok, 1 not, 2 usage)."""
    import uvloop

    args = _arguments(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: room for the notes column
        console = Console(width=160)
    if args.list:
        for entry in FAULTS.available():
            console.print(f"{entry.name}: {entry.summary}", highlight=False)
        return 0
    entries = [FAULTS.lookup(name) for name in args.only] if args.only else FAULTS.available()
    unknown = [name for name, entry in zip(args.only, entries, strict=False) if entry is None]
    if unknown:
        names = ", ".join(entry.name for entry in FAULTS.available())
        console.print(f"error: no fault named {unknown[0]!r} (known: {names})", highlight=False)
        return 2
    chosen = [entry for entry in entries if entry is not None]
    scale: Scale = "small" if args.small else "full"

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    started = time.monotonic()
    results = uvloop.run(run_all(chosen, scale, say))
    title = f"faults ({scale} scale, {time.monotonic() - started:.0f} s)"
    console.print(fault_table(results, title))
    return 0 if all(result.ok for result in results) else 1
