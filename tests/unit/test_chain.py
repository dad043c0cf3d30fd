"""A chain of middleboxes as pure logic (vmbox.chain): order, counts, held packets, routing.

The stages are small fakes of vmbox.middlebox.Middlebox that answer what they
are told and remember what they were asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from vmbox.chain import Chain, Held
from vmbox.group import Group
from vmbox.keyed import KeyedItem, KeyedTable, Wait
from vmbox.middlebox import Middlebox, StateItem, encode_int, parse_positive_int
from vmbox.packet import Packet, Verdict

PASS, DROP = Verdict.PASS, Verdict.DROP
GROUP = Group(("r1",), "r1")
T0 = 1_700_000_000.0


def item(name: str) -> StateItem:
    return StateItem(name, name, parse_positive_int, encode_int)


class Fixed(Middlebox):
    """Answers `verdict` (or, while `waits` is set, that Wait) and remembers what it saw."""

    def __init__(
        self,
        verdict: Verdict = PASS,
        items: tuple[StateItem, ...] = (),
        tables: tuple[str, ...] = (),
        gauge: str | None = None,
    ) -> None:
        super().__init__({i.config_key: 1 for i in items}, GROUP, items)
        self.verdict = verdict
        self.waits: Wait | None = None
        self.seen: list[tuple[Packet, float]] = []
        self.updates: list[tuple[dict[str, Any] | None, Group | None]] = []
        self.gauge = gauge
        for name in tables:
            keyed = KeyedItem(name, bytes.decode, lambda v: str(v).encode())
            self.tables[name] = KeyedTable(keyed)

    def process(self, packet: Packet, now: float) -> Verdict | Wait:
        self.seen.append((packet, now))
        return self.waits if self.waits is not None else self.verdict

    def update(self, values: Mapping[str, Any] | None = None, group: Group | None = None) -> None:
        self.updates.append((None if values is None else dict(values), group))
        super().update(values=values, group=group)

    def gauges(self) -> dict[str, float]:
        return {} if self.gauge is None else {self.gauge: float(len(self.seen))}


class Other(Fixed):
    """A second kind, for `first`."""


def packet(n: int = 0) -> Packet:
    return Packet("10.0.0.1", 1000 + n, 64)


# -- verdicts -----------------------------------------------------------------------------


def test_a_packet_passes_only_if_every_stage_passes_it() -> None:
    for verdicts in [
        (PASS, PASS, PASS),
        (DROP, PASS, PASS),
        (PASS, DROP, PASS),
        (PASS, PASS, DROP),
    ]:
        stages = [Fixed(v) for v in verdicts]
        chain = Chain([(f"f{i}", s) for i, s in enumerate(stages)])
        expected = PASS if all(v is PASS for v in verdicts) else DROP
        assert chain.process(packet(), T0) is expected


def test_a_stage_after_one_that_dropped_never_sees_the_packet() -> None:
    first, second, third = Fixed(PASS), Fixed(DROP), Fixed(PASS)
    chain = Chain([("a", first), ("b", second), ("c", third)])
    assert chain.process(packet(), T0) is DROP
    assert [p for p, _ in first.seen] == [packet()]
    assert [p for p, _ in second.seen] == [packet()]
    assert third.seen == []


def test_each_stage_counts_what_it_decided() -> None:
    gate, limit = Fixed(PASS), Fixed(PASS)
    chain = Chain([("firewall", gate), ("ratelimit", limit)])
    for n in range(5):
        chain.process(packet(n), T0)
    limit.verdict = DROP
    for n in range(3):
        chain.process(packet(n), T0)
    gate.verdict = DROP
    for n in range(2):
        chain.process(packet(n), T0)
    assert chain.verdicts() == {
        "firewall": {"pass": 8, "drop": 2, "held": 0},
        "ratelimit": {"pass": 5, "drop": 3, "held": 0},
    }
    assert chain.names == ("firewall", "ratelimit")


def test_every_stage_sees_the_time_it_was_given() -> None:
    stages = [Fixed(), Fixed()]
    chain = Chain([("a", stages[0]), ("b", stages[1])])
    chain.process(packet(), T0 + 3.5)
    assert [now for s in stages for _, now in s.seen] == [T0 + 3.5, T0 + 3.5]


# -- held packets ---------------------------------------------------------------------------


def test_a_wait_holds_the_packet_at_its_stage_and_resume_starts_there() -> None:
    first, second, third = Fixed(), Fixed(tables=("conn",)), Fixed()
    chain = Chain([("a", first), ("b", second), ("c", third)])
    wait = Wait("conn", "10.0.0.1:1000")
    second.waits = wait
    assert chain.process(packet(), T0) == Held(1, wait)
    assert len(first.seen) == 1 and len(second.seen) == 1 and third.seen == []
    second.waits = None  # what the stage waited for is in memory now
    assert chain.resume(packet(), T0 + 0.01, 1) is PASS
    assert len(first.seen) == 1  # not asked twice
    assert len(second.seen) == 2 and len(third.seen) == 1
    assert chain.verdicts() == {
        "a": {"pass": 1, "drop": 0, "held": 0},
        "b": {"pass": 1, "drop": 0, "held": 1},
        "c": {"pass": 1, "drop": 0, "held": 0},
    }


def test_a_resumed_packet_can_be_held_again_and_then_dropped() -> None:
    first, second = Fixed(), Fixed()
    chain = Chain([("a", first), ("b", second)])
    read, commit = Wait("conn", "k"), Wait("conn", "k", commit=True)
    second.waits = read
    assert chain.process(packet(), T0) == Held(1, read)
    second.waits = commit
    assert chain.resume(packet(), T0, 1) == Held(1, commit)
    second.waits, second.verdict = None, DROP
    assert chain.resume(packet(), T0, 1) is DROP
    assert len(first.seen) == 1
    assert chain.verdicts()["b"] == {"pass": 0, "drop": 1, "held": 2}


def test_resume_from_a_later_stage_asks_only_that_stage_and_those_after() -> None:
    stages = [Fixed() for _ in range(4)]
    chain = Chain([(f"f{i}", s) for i, s in enumerate(stages)])
    assert chain.resume(packet(), T0, 2) is PASS
    assert [len(s.seen) for s in stages] == [0, 0, 1, 1]


def test_a_wait_from_a_real_keyed_table_is_held_then_decided_on_what_was_read() -> None:
    class Lookup(Middlebox):
        def __init__(self) -> None:
            super().__init__({}, GROUP)
            self.tables["conn"] = KeyedTable(KeyedItem("conn", bytes.decode, str.encode))

        def process(self, packet: Packet, now: float) -> Verdict | Wait:
            answer = self.tables["conn"].get(packet.src, now)
            if isinstance(answer, Wait):
                return answer
            return PASS if answer == "open" else DROP

    lookup = Lookup()
    chain = Chain([("before", Fixed()), ("lookup", lookup)])
    table = chain.tables["conn"]
    assert table is lookup.tables["conn"]
    held = chain.process(packet(), T0)
    assert held == Held(1, Wait("conn", "10.0.0.1"))
    table.loaded("10.0.0.1", b"open")  # the driver read it
    assert chain.resume(packet(), T0, 1) is PASS


# -- state items, tables, routing -----------------------------------------------------------


def test_update_routes_each_value_to_the_stage_that_declares_it() -> None:
    first = Fixed(items=(item("limit"), item("burst")))
    second = Fixed(items=(item("rules.0.limit"),))
    third = Fixed()
    chain = Chain([("a", first), ("b", second), ("c", third)])
    assert chain.stage_of("burst") == 0 and chain.stage_of("rules.0.limit") == 1
    group = Group(("r1", "r2"), "r1")
    chain.update(values={"limit": 7, "rules.0.limit": 9}, group=group)
    assert first.updates == [({"limit": 7}, group)]
    assert second.updates == [({"rules.0.limit": 9}, group)]
    assert third.updates == [(None, group)]  # no value, but the new group
    assert first.values == {"limit": 7, "burst": 1}
    assert second.values == {"rules.0.limit": 9}
    assert all(s.group is group for s in (first, second, third))


def test_update_of_a_group_alone_reaches_every_stage_once() -> None:
    stages = [Fixed(items=(item("limit"),)), Fixed()]
    chain = Chain([("a", stages[0]), ("b", stages[1])])
    group = Group(("r1", "r2", "r3"), "r2")
    chain.update(group=group)
    assert [s.updates for s in stages] == [[(None, group)], [(None, group)]]
    chain.update(values={"limit": 3})
    assert stages[0].updates[-1] == ({"limit": 3}, None)
    assert stages[1].updates[-1] == (None, None)
    assert stages[0].group is group  # a value alone keeps the group


def test_a_value_of_an_item_no_stage_declares_is_refused() -> None:
    chain = Chain([("a", Fixed(items=(item("limit"),)))])
    with pytest.raises(KeyError):
        chain.update(values={"nope": 1})


def test_items_are_every_stages_in_chain_order() -> None:
    limit, burst, rule = item("limit"), item("burst"), item("rules.0.limit")
    chain = Chain([("a", Fixed(items=(limit, burst))), ("b", Fixed()), ("c", Fixed(items=(rule,)))])
    assert chain.items == (limit, burst, rule)


def test_tables_are_every_stages_by_name() -> None:
    first, second = Fixed(tables=("conn",)), Fixed(tables=("ports", "nat"))
    chain = Chain([("a", first), ("b", second)])
    assert chain.tables == {
        "conn": first.tables["conn"],
        "ports": second.tables["ports"],
        "nat": second.tables["nat"],
    }


def test_first_finds_the_first_stage_of_a_kind() -> None:
    plain, other, another = Fixed(), Other(), Other()
    chain = Chain([("a", plain), ("b", other), ("c", another)])
    assert chain.first(Other) is other
    assert chain.first(Fixed) is plain
    assert Chain([("a", Fixed())]).first(Other) is None


def test_gauges_merge_every_stages() -> None:
    chain = Chain([("a", Fixed(gauge="a_seen")), ("b", Fixed(gauge="b_seen"))])
    chain.process(packet(), T0)
    assert chain.gauges() == {"a_seen": 1.0, "b_seen": 1.0}


# -- what a chain refuses ---------------------------------------------------------------------


def test_an_empty_chain_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Chain([])


def test_a_function_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="each function once"):
        Chain([("ratelimit", Fixed()), ("firewall", Fixed()), ("ratelimit", Fixed())])


def test_a_state_item_declared_by_two_stages_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'limit'.*declared twice"):
        Chain([("a", Fixed(items=(item("limit"),))), ("b", Fixed(items=(item("limit"),)))])


def test_a_keyed_table_declared_by_two_stages_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'conn'.*declared twice"):
        Chain([("a", Fixed(tables=("conn",))), ("b", Fixed(tables=("conn",)))])
