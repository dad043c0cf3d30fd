"""The aggregator's summaries as values (vmbox.state.summary): the cut, the formats, the acks."""

from __future__ import annotations

import random

from vmbox import sharing
from vmbox.state.epoch import Ack, ResizeGuard
from vmbox.state.summary import (
    AckSummary,
    DemandSummary,
    as_acks,
    complete_sets,
    encode_acks,
    encode_demand,
    heaviest,
    parse_acks,
    parse_demand,
)


def test_reports_that_fit_pass_whole() -> None:
    reports = {"r1": {"a": 5, "b": 1}, "r2": {"a": 3}, "r3": {}}
    assert heaviest(reports, 3) == {"r1": {"a": 5, "b": 1}, "r2": {"a": 3}}


def test_the_cut_keeps_whole_sources_heaviest_first() -> None:
    reports = {"r1": {"a": 5, "b": 9, "c": 1}, "r2": {"a": 6, "c": 1}, "r3": {"c": 1, "d": 2}}
    # totals: a 11 (2 pairs), b 9 (1), c 3 (3), d 2 (1); room for 4 pairs
    assert heaviest(reports, 4) == {"r1": {"a": 5, "b": 9}, "r2": {"a": 6}, "r3": {"d": 2}}
    assert heaviest(reports, 0) == {}


def test_the_cut_never_splits_a_source_so_every_replica_divides_it_alike() -> None:
    rng = random.Random(7)
    for _ in range(200):
        reports = {
            f"r{i}": {f"s{rng.randrange(30)}": rng.randint(1, 50) for _ in range(rng.randrange(8))}
            for i in range(rng.randint(1, 6))
        }
        cut = heaviest(reports, rng.randint(0, 20))
        for replica, report in cut.items():
            for source, count in report.items():
                assert reports[replica][source] == count
        kept = {s for report in cut.values() for s in report}
        for source in kept:  # all of it or none of it
            assert {r for r, rep in reports.items() if source in rep} == {
                r for r, rep in cut.items() if source in rep
            }


def test_shares_from_a_cut_still_add_up_to_the_limit() -> None:
    """A source cut from the summary takes the even share everywhere: still L in all."""
    reports = {"r1": {"a": 90, "b": 3}, "r2": {"b": 4, "c": 2}, "r3": {"c": 80}}
    members = ("r1", "r2", "r3")
    cut = heaviest(reports, 2)
    for source in "abc":
        total = 0
        for me in members:
            shares = sharing.demand_shares(100, cut, members, me, 0.05)
            total += shares.get(source, sharing.even(100, members, me))
        assert total == 100, source


def test_demand_summaries_round_trip_and_garbage_is_none() -> None:
    summary = DemandSummary(42, {"r2": {"b": 1, "a": 2}, "r1": {"z": 3}})
    raw = encode_demand(summary)
    assert raw.startswith(b'{"rev":42,"reports":{"r1":')  # sorted: equal summaries, equal bytes
    assert parse_demand(raw) == summary
    for bad in (
        b"",
        b"[]",
        b'{"rev":-1,"reports":{}}',
        b'{"rev":1,"reports":{"r":{"a":0}}}',
        b'{"rev":true,"reports":{}}',
        b'{"rev":1,"reports":[]}',
        b"\xff",
    ):
        assert parse_demand(bad) is None, bad


def acks(**sets: tuple[str, int | None]) -> dict[str, Ack]:
    return {r: Ack(frozenset(m.split(",")), 1, w) for r, (m, w) in sets.items()}


def test_a_set_is_complete_only_when_every_member_acked_it() -> None:
    seen = acks(a=("a,b", 7), b=("a,b", 8), c=("a,b,c", 8))
    assert complete_sets(seen) == ((frozenset("ab"), 8),)  # c's set lacks a's and b's acks
    assert complete_sets(acks(a=("a,b", 7))) == ()
    assert complete_sets(acks(a=("a,b", 7), b=("a,b", None))) == ((frozenset("ab"), None),)
    assert complete_sets(acks(a=("a", 0))) == ((frozenset("a"), 0),)


def _complete_by_every_member(
    acks: dict[str, Ack],
) -> tuple[tuple[frozenset[str], int | None], ...]:
    """complete_sets as first written: every member of every acked set looked up."""
    out = []
    for members in {ack.members for ack in acks.values()}:
        if members and all((a := acks.get(m)) and a.members == members for m in members):
            windows = [w for m in members if (w := acks[m].window) is not None]
            out.append((members, max(windows) if len(windows) == len(members) else None))
    return tuple(sorted(out, key=lambda item: sorted(item[0])))


def test_complete_sets_grouped_by_acker_are_those_found_member_by_member() -> None:
    rng = random.Random(11)
    names = "abcdefg"
    for _ in range(2000):
        snapshot = {
            r: Ack(
                frozenset(n for n in names if rng.random() < 0.5),  # may lack r, or be empty
                1,
                rng.choice([None, rng.randint(0, 3)]),
            )
            for r in names
            if rng.random() < 0.9
        }
        # Half the time most of them agree, as after a resize.
        if rng.random() < 0.5 and snapshot:
            agreed = frozenset(rng.sample(names, rng.randint(1, len(names))))
            for r in agreed & set(snapshot):
                snapshot[r] = Ack(agreed, 1, snapshot[r].window)
        assert complete_sets(snapshot) == _complete_by_every_member(snapshot)


def test_ack_summaries_round_trip_and_garbage_is_none() -> None:
    summary = AckSummary(9, ((frozenset("ab"), 8), (frozenset("c"), None)))
    assert parse_acks(encode_acks(summary)) == summary
    for bad in (
        b"{}",
        b'{"rev":1,"sets":[{"members":"ab"}]}',
        b'{"rev":1,"sets":[{"members":["a"],"window":-2}]}',
        b'{"rev":1,"sets":[3]}',
    ):
        assert parse_acks(bad) is None, bad


def test_a_guard_fed_the_summary_decides_as_one_fed_every_ack() -> None:
    """Random ack snapshots: the guard that sees them whole and the one that sees
    their summary hold the same groups at every step."""
    rng = random.Random(3)
    names = "abcd"
    for trial in range(300):
        direct, summarised = ResizeGuard("a", 1.0), ResizeGuard("a", 1.0)
        now = 100.0
        for step in range(12):
            now += rng.random() * 0.7
            if rng.random() < 0.4:
                view = {"a"} | {n for n in names if rng.random() < 0.5}
                direct.see_members(view, step, now)
                summarised.see_members(view, step, now)
            snapshot = {
                r: Ack(
                    frozenset({r} | {n for n in names if rng.random() < 0.6})
                    if rng.random() < 0.5
                    else frozenset(direct.view | {r}),
                    step,
                    rng.choice([None, int(now) + rng.randint(-1, 1)]),
                )
                for r in names
                if rng.random() < 0.8
            }
            direct.see_acks(
                {r: ack.members for r, ack in snapshot.items()},
                now,
                {r: ack.window for r, ack in snapshot.items() if ack.window is not None},
            )
            summary_acks, summary_windows = as_acks(AckSummary(step, complete_sets(snapshot)))
            summarised.see_acks(summary_acks, now, summary_windows)
            direct.tick(now)
            summarised.tick(now)
            assert direct.group == summarised.group, (trial, step)
