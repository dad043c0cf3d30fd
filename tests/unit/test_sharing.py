"""The even and demand splits as pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmbox.group import Group
from vmbox.sharing import (
    demand_shares,
    even,
    even_share,
    floor_ratio,
    group_demand_shares,
    replica_set,
    source_share,
)


def test_even_split_of_100() -> None:
    assert [even(100, ["a"], "a")] == [100]
    assert [even(100, ["a", "b"], m) for m in "ab"] == [50, 50]
    assert [even(100, ["a", "b", "c", "d"], m) for m in "abcd"] == [25, 25, 25, 25]


def test_a_replica_not_yet_registered_counts_itself_last() -> None:
    assert even(100, ["a", "b"], "c") == 33


@given(
    st.integers(1, 10_000),
    st.sets(st.text("abcdef", min_size=1, max_size=4), min_size=1, max_size=12),
)
def test_shares_always_add_up_to_the_total(total: int, members: set[str]) -> None:
    shares = [even(total, sorted(members), m) for m in members]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


# -- the resize guard on the even split ---------------------------------------


def test_even_share_takes_the_smaller_of_old_and_new_while_the_guard_is_up() -> None:
    # A leave not yet acknowledged: 4 -> 3 members, the shares stay at 25.
    assert even_share(100, Group(("a", "b", "c"), "a", previous=("a", "b", "c", "d"))) == 25
    assert even_share(100, Group(("a", "b", "c"), "a")) == 34
    # A join not yet acknowledged: the newcomer takes nothing, the others the new share.
    assert even_share(100, Group(("a", "b"), "b", previous=("a",))) == 0
    assert even_share(100, Group(("a", "b"), "a", previous=("a",))) == 50


# -- the demand split ---------------------------------------------------------

FLOOR = 0.05
FOUR = ("a", "b", "c", "d")


def shares_of(reports: dict[str, dict[str, int]], members: tuple[str, ...] = FOUR) -> list[int]:
    return [demand_shares(100, reports, members, m, FLOOR).get("s", -1) for m in members]


def test_one_flow_on_one_replica_gets_nearly_the_whole_limit() -> None:
    # w = d + floor * D / n: the replica with the flow 30 + 0.375, the others 0.375 each.
    assert shares_of({"a": {"s": 30}}) == [97, 1, 1, 1]


def test_shares_follow_each_replicas_fraction_of_the_offered_demand() -> None:
    assert shares_of({"a": {"s": 60}, "b": {"s": 30}, "c": {"s": 30}}) == [49, 25, 25, 1]
    assert shares_of({m: {"s": 10} for m in FOUR}) == [25, 25, 25, 25]


def test_the_floor_keeps_a_share_for_replicas_the_source_has_not_reached() -> None:
    assert demand_shares(1000, {"a": {"s": 50}}, FOUR, "d", 0.05)["s"] == 12  # 11.9
    assert demand_shares(1000, {"a": {"s": 50}}, FOUR, "d", 0.0)["s"] == 0
    assert demand_shares(1000, {"a": {"s": 50}}, FOUR, "a", 0.0)["s"] == 1000


def test_sources_in_no_report_are_left_to_the_even_share() -> None:
    shares = demand_shares(100, {"a": {"s": 5}}, FOUR, "b", FLOOR)
    assert set(shares) == {"s"}  # any other source: even(100, members, me)


def test_reports_of_replicas_that_are_not_members_are_ignored() -> None:
    assert demand_shares(100, {"gone": {"s": 50}}, FOUR, "a", FLOOR) == {}
    assert shares_of({"a": {"s": 30}, "gone": {"s": 900}}) == [97, 1, 1, 1]


def test_a_replica_not_yet_registered_counts_itself_in() -> None:
    assert demand_shares(100, {"c": {"s": 30}}, ("a", "b"), "c", FLOOR)["s"] == 97  # of 3


def test_demand_guard_takes_the_smaller_of_old_and_new() -> None:
    reports = {"a": {"s": 30}, "b": {"s": 30}}
    # d left (its report went with its lease): old split over 4, new over 3.
    old = group_demand_shares(1000, reports, Group(FOUR, "a"), FLOOR)["s"]
    new = group_demand_shares(1000, reports, Group(("a", "b", "c"), "a"), FLOOR)["s"]
    guarded = Group(("a", "b", "c"), "a", previous=FOUR)
    assert (old, new) == (488, 492)
    assert group_demand_shares(1000, reports, guarded, FLOOR)["s"] == 488
    joining = Group(FOUR, "d", previous=("a", "b", "c"))
    assert group_demand_shares(100, {"d": {"s": 30}}, joining, FLOOR) == {"s": 0}


@given(
    st.integers(0, 10_000),
    st.dictionaries(
        st.sampled_from("abcdefg"),
        st.dictionaries(st.sampled_from(["s", "t", "u"]), st.integers(1, 500), max_size=3),
        max_size=7,
    ),
    st.sets(st.sampled_from("abcdefg"), min_size=1),
    st.floats(0, 0.5),
)
def test_demand_shares_of_a_group_add_up_to_the_total(
    total: int, reports: dict[str, dict[str, int]], members: set[str], floor: float
) -> None:
    group = sorted(members)
    per_member = [demand_shares(total, reports, group, m, floor) for m in group]
    for source in set().union(*per_member):
        shares = [s[source] for s in per_member]
        assert sum(shares) == total and min(shares) >= 0


@given(
    st.integers(0, 10_000),
    st.dictionaries(st.sampled_from("abcdefg"), st.integers(1, 500), min_size=1),
    st.sets(st.sampled_from("bcdefg")),
    st.sets(st.sampled_from("bcdefg")),
    st.floats(0, 0.5),
)
def test_the_guarded_demand_share_never_exceeds_the_share_under_a_smaller_group(
    total: int, counts: dict[str, int], some: set[str], more: set[str], floor: float
) -> None:
    # The resize guard's `previous` is a union of groups (vmbox.state.epoch):
    # its side of the min must be at most the share under any group in it.
    ratio = floor_ratio(floor)
    smaller = replica_set(sorted(some), "a")
    union = replica_set(sorted(some | more), "a")
    under_smaller = source_share(total, counts, smaller, "a", ratio)
    under_union = source_share(total, counts, union, "a", ratio, remainders=False)
    if under_smaller is not None and under_union is not None:
        assert under_union <= under_smaller


def _share_by_every_replica(
    total: int,
    counts: dict[str, int],
    replicas: tuple[str, ...],
    me: str,
    floor: tuple[int, int],
    remainders: bool,
) -> int | None:
    """source_share as first written: every replica's weight and remainder, one by one."""
    offered = [counts.get(r, 0) for r in replicas]
    demand = sum(offered)
    if demand <= 0:
        return None
    p, q = floor
    n = len(replicas)
    whole, extra = n * demand * (p + q), p * demand
    mine = replicas.index(me)
    base, mine_rem = divmod(total * (offered[mine] * q * n + extra), whole)
    if not remainders:
        return base
    left, ahead = total, 0
    for i, d in enumerate(offered):
        share, rem = divmod(total * (d * q * n + extra), whole)
        left -= share
        if rem > mine_rem or (rem == mine_rem and i < mine):
            ahead += 1
    return base + (1 if ahead < left else 0)


@given(
    st.integers(0, 10_000),
    # Zero counts, and replicas outside the set (a member that left), as reports have.
    st.dictionaries(st.sampled_from("abcdefghij"), st.integers(0, 500), max_size=10),
    st.sets(st.sampled_from("abcdefgh"), min_size=1),
    st.data(),
    st.floats(0, 0.5),
    st.booleans(),
)
def test_the_share_counts_the_idle_replicas_together_and_gets_what_counting_each_gets(
    total: int,
    counts: dict[str, int],
    members: set[str],
    data: st.DataObject,
    floor: float,
    remainders: bool,
) -> None:
    replicas = replica_set(tuple(members), "a")
    ratio = floor_ratio(floor)
    for me in replicas:
        want = _share_by_every_replica(total, counts, replicas, me, ratio, remainders)
        assert source_share(total, counts, replicas, me, ratio, remainders=remainders) == want
    many = replica_set(tuple(f"r{i:03d}" for i in range(data.draw(st.integers(1, 300)))), "r000")
    spread = {r: data.draw(st.integers(0, 50)) for r in data.draw(st.lists(st.sampled_from(many)))}
    me = data.draw(st.sampled_from(many))
    want = _share_by_every_replica(total, spread, many, me, ratio, remainders)
    assert source_share(total, spread, many, me, ratio, remainders=remainders) == want
