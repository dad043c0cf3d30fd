"""The ratelimit middlebox as pure logic: fake clock, no sockets, no etcd."""

from __future__ import annotations

import tracemalloc

import pytest

from vmbox.functions import get_function, ratelimit, register
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.group import Group
from vmbox.middlebox import Function
from vmbox.packet import Packet, Verdict


def make(
    limit: int = 100, members: tuple[str, ...] = ("r1",), me: str = "r1", **config: object
) -> FixedWindow:
    return FixedWindow({"limit": limit, "window": 1.0, **config}, Group(members, me))


def passed(mb: FixedWindow, count: int, now: float, src: str = "10.0.0.1") -> int:
    return sum(mb.process(Packet(src, 1000 + i, 64), now) is Verdict.PASS for i in range(count))


def test_registered_under_its_name() -> None:
    function = get_function("ratelimit")
    assert function is ratelimit.FUNCTION
    assert [item.name for item in function.state] == ["limit"]
    assert type(function.build({"limit": 5}, Group(("r1",), "r1"))) is FixedWindow


def test_an_unknown_function_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"'nat'.*known: firewall, ratelimit"):
        get_function("nat")


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(Function(name="ratelimit", state=(), build=ratelimit.build))


def test_holds_a_source_to_the_limit_per_window() -> None:
    mb = make(limit=100)
    assert passed(mb, 300, now=1000.2) == 100
    assert passed(mb, 50, now=1000.9) == 0  # same window: still over
    assert passed(mb, 300, now=1001.0) == 100  # the window reset


def test_sources_are_counted_apart() -> None:
    mb = make(limit=10)
    assert passed(mb, 20, 5.0, "10.0.0.1") == 10
    assert passed(mb, 20, 5.0, "10.0.0.2") == 10


def test_even_split_follows_the_group() -> None:
    mb = make(limit=100, members=("r1", "r2", "r3"), me="r3")
    assert mb.share == 33
    mb.update(group=Group(("r1", "r2"), "r2"))
    assert mb.share == 50
    mb.update(values={"limit": 40})
    assert mb.share == 20


def test_shares_of_a_group_add_up_to_the_limit() -> None:
    members = ("a", "b", "c")
    shares = [make(limit=100, members=members, me=m).share for m in members]
    assert sum(shares) == 100 and sorted(shares) == [33, 33, 34]


def test_windows_align_to_the_epoch_so_replicas_agree() -> None:
    mb = make(limit=5, window=2.0)
    assert passed(mb, 10, now=100.5) == 5
    assert passed(mb, 10, now=101.9) == 0  # window [100, 102)
    assert passed(mb, 10, now=102.0) == 5


def test_a_flood_of_new_sources_keeps_the_table_bounded() -> None:
    mb = make(limit=2, max_sources=1000)
    tracemalloc.start()
    for i in range(100_000):
        mb.process(Packet(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1, 64), 7.5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(mb.counts) <= 1001  # 1000 sources plus the overflow bucket
    assert peak < 2_000_000
    # Sources past the bound share one bucket held to the same share.
    assert passed(mb, 10, now=7.6, src="192.0.2.99") == 0
    assert mb.gauges()["overflowed_sources"] >= 99_000


def test_a_join_mid_window_never_over_admits() -> None:
    old = make(limit=100, members=("r1",), me="r1")
    assert passed(old, 60, now=10.2) == 60
    new = make(limit=100, members=("r1",), me="r2")
    new.start(10.3)  # r2 joins in the middle of window 10
    group = ("r1", "r2")
    old.update(group=Group(group, "r1"))
    new.update(group=Group(group, "r2"))
    # Window 10: r1 keeps its window-start share, r2 admits nothing.
    assert passed(old, 100, now=10.5) + passed(new, 100, now=10.5) == 40
    # Window 11: both use the new even split.
    assert passed(old, 100, now=11.1) + passed(new, 100, now=11.1) == 100
    assert old.share == new.share == 50


def test_a_leave_mid_window_waits_for_the_next_window_to_grow_shares() -> None:
    mb = make(limit=100, members=("r1", "r2"), me="r1")
    assert passed(mb, 30, now=20.1) == 30
    mb.update(group=Group(("r1",), "r1"))
    assert passed(mb, 10, now=20.4) == 10  # still 50 in this window
    mb.update(group=Group(("r1",), "r1"))  # the same group again (a member key rewritten)
    mb.update(values={"limit": 100})  # or the same limit: neither brings the new share early
    assert passed(mb, 100, now=20.5) == 10
    assert passed(mb, 200, now=21.0) == 100


def test_a_resize_guard_lift_applies_within_the_window() -> None:
    # r2 joined in window 10 (nothing there); in window 11 it is still guarded
    # (a set without it): nothing, until the guard lifts mid-window.
    joiner = make(limit=100, members=("r1",), me="r2")
    joiner.start(10.9)
    guarded = Group(("r1", "r2"), "r2", previous=())
    joiner.update(group=guarded)
    assert passed(joiner, 100, now=10.95) == 0  # its first window
    assert passed(joiner, 100, now=11.01) == 0  # guarded
    joiner.update(group=Group(("r1", "r2"), "r2"))  # the guard lifts at 11.02
    assert passed(joiner, 100, now=11.02) == 50  # at once, not in window 12
    # A change of members mid-window still waits for the next window.
    joiner.update(group=Group(("r2",), "r2"))
    assert passed(joiner, 100, now=11.5) == 0  # 50 of window 11 already used
    assert passed(joiner, 200, now=12.0) == 100


def test_a_guard_that_lowers_a_share_waits_for_the_next_window() -> None:
    elder = make(limit=100, members=("r1",), me="r1")
    assert passed(elder, 40, now=20.01) == 40
    elder.update(group=Group(("r1", "r2"), "r1", previous=("r1", "r2")))  # r2 joins
    assert passed(elder, 100, now=20.02) == 60  # keeps this window's first share
    assert passed(elder, 100, now=21.0) == 50  # the guard's share from the next window


def test_a_guard_lift_mid_window_waits_under_the_demand_split() -> None:
    mb = make(limit=100, members=("r1",), me="r2", split="demand")
    mb.start(10.9)
    mb.update(group=Group(("r1", "r2"), "r2", previous=()))
    assert passed(mb, 100, now=11.01) == 0
    mb.update(group=Group(("r1", "r2"), "r2"))
    assert passed(mb, 100, now=11.02) == 0  # the window's shares are fixed at its start
    assert passed(mb, 100, now=12.0) == 50


def test_a_new_limit_applies_at_once() -> None:
    mb = make(limit=100)
    assert passed(mb, 10, now=30.1) == 10
    mb.update(values={"limit": 15})
    assert passed(mb, 100, now=30.2) == 5
    mb.update(values={"limit": 50})
    assert passed(mb, 100, now=30.3) == 35


# -- the demand split ---------------------------------------------------------

FOUR = ("r1", "r2", "r3", "r4")


def demand(me: str = "r1", limit: int = 100, **config: object) -> FixedWindow:
    return make(limit=limit, members=FOUR, me=me, split="demand", **config)


def test_offered_packets_are_counted_dropped_ones_included() -> None:
    mb = demand(limit=8)
    assert passed(mb, 10, now=3.1, src="10.0.0.1") == 2  # even share: 8 / 4
    passed(mb, 3, now=3.2, src="10.0.0.2")
    assert mb.take_demand() == {"10.0.0.1": 10, "10.0.0.2": 3}
    assert mb.take_demand() == {}  # each report covers one interval


def test_offered_counts_are_bounded_like_the_table() -> None:
    mb = demand(max_sources=100)
    for i in range(1000):
        mb.process(Packet(f"10.0.{i >> 8}.{i & 255}", 1, 64), 4.5)
    assert len(mb.take_demand()) == 100


def test_the_even_split_counts_nothing() -> None:
    mb = make(limit=100, members=FOUR, me="r1")
    passed(mb, 10, now=3.1)
    assert mb.take_demand() == {}


def test_a_source_on_one_replica_gets_nearly_the_whole_limit_once_reported() -> None:
    mb = demand()
    assert passed(mb, 50, now=10.05) == 25  # no report yet: the even share
    mb.set_demand({"r1": {"10.0.0.1": 30}})
    assert passed(mb, 100, now=10.2) == 72  # a new source follows the reports at once: 97
    assert passed(mb, 300, now=11.0) == 97  # and keeps its share in the next window
    assert mb.gauges()["demand_sources"] == 1 and mb.gauges()["demand_reports"] == 1


def test_replicas_without_the_source_keep_the_floor_not_the_even_share() -> None:
    mb = demand(me="r2")
    mb.set_demand({"r1": {"10.0.0.1": 30}})
    assert passed(mb, 50, now=10.5) == 1
    assert passed(mb, 50, now=10.6, src="10.9.9.9") == 25  # unreported: even


def test_a_windows_shares_are_fixed_at_its_start_for_sources_already_reported() -> None:
    mb = demand()
    mb.set_demand({"r1": {"s": 30}, "r2": {"s": 30}})
    passed(mb, 1, now=20.0, src="other")  # window 20 begins: s's share is fixed at 49
    mb.set_demand({"r1": {"s": 90}, "r2": {"s": 10}})  # the reports fluctuate
    assert passed(mb, 100, now=20.5, src="s") == 49
    assert passed(mb, 100, now=21.0, src="s") == 87  # the next window takes the new share


def test_a_source_moving_away_keeps_its_share_till_the_window_ends() -> None:
    mb = demand()
    mb.set_demand({"r1": {"s": 30}})
    assert passed(mb, 10, now=30.1, src="s") == 10
    mb.set_demand({"r1": {}, "r2": {"s": 30}})  # its flows now reach r2 only
    assert passed(mb, 200, now=30.5, src="s") == 87  # 97 in all: not the even 25, not 0 more
    assert passed(mb, 200, now=31.1, src="s") == 1  # the floor, from the next window


def test_demand_shares_of_a_window_add_up_to_the_limit() -> None:
    reports = {"r1": {"s": 42}, "r2": {"s": 7}, "r3": {"s": 19}}
    boxes = [demand(me=m) for m in FOUR]
    for mb in boxes:
        mb.set_demand(reports)
    assert sum(passed(mb, 200, now=40.5, src="s") for mb in boxes) == 100


def test_the_first_window_admits_nothing_under_the_demand_split_too() -> None:
    mb = demand()
    mb.start(50.4)
    mb.set_demand({"r1": {"s": 30}})
    assert passed(mb, 10, now=50.5, src="s") == 0
    assert passed(mb, 200, now=51.0, src="s") == 97


def test_a_new_limit_applies_at_once_to_demand_shares() -> None:
    mb = demand()
    mb.set_demand({"r1": {"s": 30}})
    assert passed(mb, 40, now=60.1, src="s") == 40
    mb.update(values={"limit": 50})
    assert passed(mb, 100, now=60.2, src="s") == 8  # 48 now


def test_a_group_change_reaches_demand_shares_at_the_next_window() -> None:
    mb = demand()
    mb.set_demand({"r1": {"s": 30}, "r4": {"s": 30}})
    assert passed(mb, 100, now=70.1, src="s") == 49
    mb.update(group=Group(("r1", "r2", "r3"), "r1"))  # r4 left (its report with it)
    mb.set_demand({"r1": {"s": 30}})
    assert passed(mb, 100, now=70.5, src="s") == 0  # this window: still 49
    assert passed(mb, 100, now=71.0, src="s") == 97


def test_a_report_that_vanishes_mid_window_still_counts_till_the_window_ends() -> None:
    mb = demand()
    passed(mb, 1, now=75.1, src="other")  # window 75 begins
    mb.set_demand({"r4": {"new": 30}})
    mb.set_demand({})  # r4 died: a source new this window must not jump to r1
    assert passed(mb, 100, now=75.5, src="new") == 1
    assert passed(mb, 100, now=76.0, src="new") == 25  # next window: unreported, even


def test_the_resize_guard_holds_demand_shares_to_the_smaller_split() -> None:
    mb = make(limit=1000, members=("r1", "r2", "r3"), me="r1", split="demand")
    mb.update(group=Group(("r1", "r2", "r3"), "r1", previous=FOUR))
    mb.set_demand({"r1": {"s": 30}, "r2": {"s": 30}})
    assert passed(mb, 1000, now=80.5, src="s") == 488  # min(488 of 4, 492 of 3)


@pytest.mark.parametrize("algorithm", ["fixed_window", "token_bucket"])
def test_a_gso_packet_counts_as_its_segments(algorithm: str) -> None:
    mb = ratelimit.build({"limit": 10, "algorithm": algorithm}, Group(("r1",), "r1"))
    mb.start(0.5)
    now = 3.5  # past the first window, a full bucket
    gso = Packet("10.0.0.1", 1000, 60000, 6, "10.0.0.2", 5201, segments=4)
    got = [mb.process(gso, now) for _ in range(3)]
    # 4 + 4 = 8 of 10; 4 more would be 12.
    assert got == [Verdict.PASS, Verdict.PASS, Verdict.DROP]
    assert mb.process(Packet("10.0.0.1", 1000, 64), now) is Verdict.PASS  # 9
    assert mb.process(Packet("10.0.0.1", 1000, 64, segments=2), now) is Verdict.DROP  # 11
