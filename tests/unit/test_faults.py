"""The fault machinery without sockets: registry, over-limit count, state comparison, table, runner.

The faults themselves run (at small scale) in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from rich.console import Console

from vmbox.faults import FAULTS, NONE, FaultResult, Say, Scale, runner
from vmbox.faults.runner import fault_table, main, run_all, run_entry, stages
from vmbox.faults.sender import _Seconds, source_address
from vmbox.faults.snapshot import state_lost
from vmbox.faults.traffic import over_limit
from vmbox.middlebox import MAX_STATE_INT, StateValueError, parse_positive_int
from vmbox.registry import Entry, NotRunnable

FAKE = '''"""Stand-in faults."""
import asyncio

from vmbox.faults import FaultResult


async def slow(scale, say):
    say("start")
    await asyncio.sleep(0.05)
    say("end")
    return FaultResult("slow", injected=1, survived=True)


async def fine(scale, say):
    say("fine: injected")
    return FaultResult("fine", injected=3, survived=True)


async def broken(scale, say):
    raise RuntimeError("the setup failed")


async def lossy(scale, say):
    return FaultResult("lossy", injected=1, survived=True, state_lost="desired: '2' -> missing")


def not_async(scale, say):
    return None
'''


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Entry]:
    (tmp_path / "vmbox_fake_faults.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("fine", "broken", "lossy", "not_async", "slow")
    return {n: Entry(n, "vmbox_fake_faults", n, "a fake", budget=5, small_budget=5) for n in names}


def test_the_issue_6_faults_are_registered_and_load() -> None:
    names = [entry.name for entry in FAULTS.entries]
    assert names[:4] == ["flood", "odd datagrams", "upstream vanished", "corrupt etcd values"]
    assert len(set(names)) == len(names)
    assert all(entry.installed() for entry in FAULTS.entries)
    assert all(callable(FAULTS.load(entry)) for entry in FAULTS.available())


def test_an_optional_fault_without_its_module_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = Entry("etcd member kill", "vmbox.faults.not_there", "kill", "", 1, 1, optional=True)
    shipped = FAULTS.entries
    monkeypatch.setattr(FAULTS, "entries", (*shipped, missing))
    assert missing not in FAULTS.available()
    assert [e.name for e in FAULTS.available()] == [e.name for e in shipped]


def test_a_fault_must_be_async(fakes: dict[str, Entry]) -> None:
    with pytest.raises(NotRunnable, match="must be an async def"):
        FAULTS.load(fakes["not_async"])


def test_run_entry_turns_failures_into_rows(fakes: dict[str, Entry]) -> None:
    lines: list[str] = []
    fine = asyncio.run(run_entry(fakes["fine"], "small", lines.append))
    broken = asyncio.run(run_entry(fakes["broken"], "small", lines.append))
    assert fine.ok and fine.seconds >= 0 and lines == ["fine: injected"]
    assert not broken.survived and broken.problems == ["the setup failed"] and not broken.ok


def test_run_entry_bounds_a_fault_by_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    async def stuck(scale: Scale, say: Say) -> FaultResult:
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    monkeypatch.setattr(FAULTS, "load", lambda entry: stuck)
    entry = Entry("stuck", "x", "stuck", "", budget=60, small_budget=0.1)
    row = asyncio.run(run_entry(entry, "small", print))
    assert row.problems == ["did not finish within 0 s"] and not row.survived


def test_at_small_scale_only_the_light_count_judged_rows_run_side_by_side() -> None:
    entries = FAULTS.available()
    for scale in ("small", "full"):
        staged = stages(entries, scale)
        assert sorted(e.name for stage in staged for e in stage) == sorted(e.name for e in entries)
    together = [[e.name for e in stage] for stage in stages(entries, "small") if len(stage) > 1]
    assert together == [
        ["odd datagrams", "upstream vanished", "corrupt etcd values"],
        ["replica churn", "controller restart"],
        ["partition (static)", "partition (closed)", "partition (open)", "kernel kill"],
    ]
    alone = [stage[0].name for stage in stages(entries, "small") if len(stage) == 1]
    assert alone == ["flood", "etcd member loss", "in-path kill"]  # in registry order
    assert all(len(stage) == 1 for stage in stages(entries, "full"))


def test_run_all_runs_a_stage_side_by_side_and_keeps_the_rows_in_order(
    fakes: dict[str, Entry], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (Entry(n, "vmbox_fake_faults", "slow", "", 5, 5) for n in ("a", "b"))
    monkeypatch.setattr(runner, "TOGETHER", {"small": (frozenset({"a", "b"}),), "full": ()})
    # b comes after fine: it runs beside a, at a's place, and its row stays where it was.
    entries = [first, fakes["fine"], second, fakes["lossy"]]
    lines: list[str] = []
    rows = asyncio.run(run_all(entries, "small", lines.append))
    assert [row.fault for row in rows] == ["slow", "fine", "slow", "lossy"]
    assert lines == ["start", "start", "end", "end", "fine: injected"]  # a and b together
    lines.clear()
    asyncio.run(run_all(entries, "full", lines.append))
    assert lines == ["start", "end", "fine: injected", "start", "end"]  # in turn


def test_the_runner_exits_1_when_a_row_is_not_ok(
    fakes: dict[str, Entry], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(FAULTS, "entries", (fakes["fine"], fakes["lossy"]))
    assert main(["--small", "--only", "fine"]) == 0
    assert main(["--small"]) == 1  # lossy lost state
    out = capsys.readouterr().out
    assert "packets over the limit" in out and "desired: '2' -> missing" in out
    assert main(["--only", "nope"]) == 2
    assert "no fault named 'nope' (known: fine, lossy)" in capsys.readouterr().out
    assert main(["--list"]) == 0
    assert "fine: a fake" in capsys.readouterr().out


def test_the_table_has_the_issue_columns() -> None:
    rows = [
        FaultResult(
            "flood",
            injected=1_000_000,
            survived=True,
            peak_rss=98 * 2**20,
            notes=["table <= 10,001"],
        ),
        FaultResult("bad", injected=2, survived=False, over_limit=7, problems=["replica r1 died"]),
    ]
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(fault_table(rows))
    text = console.export_text()
    for column in ("fault", "times injected", "survived", "packets over the limit", "state lost"):
        assert column in text
    assert "1,000,000" in text and "98 MiB" in text and "replica r1 died" in text
    assert rows[0].ok and not rows[1].ok


def test_over_limit_counts_each_window_and_carries_one_windows_spare() -> None:
    def cap(second: int) -> int | None:
        return 100 if 10 <= second <= 14 else None

    assert over_limit([(10, 100), (11, 90), (12, 100)], cap) == 0
    assert over_limit([(10, 120), (11, 100)], cap) == 20
    # 10 admitted late in second 11 arrive in 12: the spare of 11 absorbs them, once.
    assert over_limit([(11, 90), (12, 110), (13, 100)], cap) == 0
    assert over_limit([(11, 90), (12, 110), (13, 110)], cap) == 10
    assert over_limit([(9, 5000), (15, 5000)], cap) == 0  # not measured
    assert over_limit([(12, 150), (11, 0)], cap) == 0  # order does not matter
    assert over_limit([(11, 90), (12, 110)], cap, carry=False) == 10


def test_over_limit_lets_late_packets_follow_one_another_through_full_windows() -> None:
    """Each window admits exactly its cap and one packet of each reaches the next second."""

    def cap(second: int) -> int | None:
        return 100 if 10 <= second <= 14 else None

    assert over_limit([(10, 99), (11, 100), (12, 100), (13, 100), (14, 101)], cap) == 0
    assert over_limit([(10, 100), (11, 100), (12, 101)], cap) == 1
    # A packet is carried one window at most: 10's allowance cannot reach 12.
    assert over_limit([(10, 0), (11, 0), (12, 300)], cap) == 100
    # Late packets are at most what arrived: 11 took 50 of 10's, and its own 100 may
    # all have come late.
    assert over_limit([(10, 50), (11, 50), (12, 200)], cap) == 0
    assert over_limit([(10, 50), (11, 50), (12, 201)], cap) == 1


def test_state_lost_names_what_changed() -> None:
    before = {"spec": b"{}", "desired": b"2", "state/limit": b"100"}
    assert state_lost(before, dict(before)) == NONE
    assert state_lost(before, before | {"state/limit": b"60"}, {"state/limit": b"60"}) == NONE
    assert state_lost(before, {"spec": b"{}", "state/limit": b"100"}) == "desired: '2' -> missing"
    assert state_lost(before, before | {"state/limit": b"x" * 40}) == (
        "state/limit: '100' -> 'xxxxxxxxxxxxxxxxxxxxx...'"
    )


def test_flood_sources_are_distinct_loopback_addresses() -> None:
    addresses = [source_address(i) for i in range(100_000)]
    assert len(set(addresses)) == 100_000
    assert addresses[0] == "127.10.1.1"
    for address in addresses[::997]:
        octets = [int(part) for part in address.split(".")]
        assert octets[0] == 127 and all(1 <= o <= 254 for o in octets[2:])


def test_sender_seconds_count_datagrams_sources_and_the_most_from_one() -> None:
    seconds = _Seconds()
    for second, source in [(5, 1), (5, 2), (5, 1), (6, 3)]:
        seconds.add(second, source)
    seconds.close()
    assert seconds.stats == {5: [3, 2, 2], 6: [1, 1, 1]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"abc", "not an integer"),
        (b"", "not an integer"),
        (b"-5", "must be a positive integer, got -5"),
        (b"0", "must be a positive integer, got 0"),
        (b"99999999999999999999", f"must be at most {MAX_STATE_INT}"),
        (b"9" * 5000, "(5000 digits)"),
        (b"1_000", "not an integer"),
        (b"\xff\xfe", "not an integer"),
    ],
)
def test_a_stored_limit_that_is_not_one_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(StateValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_positive_int(raw)


def test_a_stored_limit_parses() -> None:
    assert [parse_positive_int(raw) for raw in (b"100", b" 7\n", b"+5", b"0010")] == [100, 7, 5, 10]
    assert parse_positive_int(str(MAX_STATE_INT).encode()) == MAX_STATE_INT
