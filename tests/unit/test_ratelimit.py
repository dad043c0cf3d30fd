"""The ratelimit middlebox as pure logic: fake clock, no sockets, no etcd."""

from __future__ import annotations

import tracemalloc

from vmbox.functions.ratelimit import RateLimit
from vmbox.middlebox import Group, get_function
from vmbox.packet import Packet, Verdict


def make(
    limit: int = 100, members: tuple[str, ...] = ("r1",), me: str = "r1", **config: object
) -> RateLimit:
    return RateLimit({"limit": limit, "window": 1.0, **config}, Group(members, me))


def passed(mb: RateLimit, count: int, now: float, src: str = "10.0.0.1") -> int:
    return sum(mb.process(Packet(src, 1000 + i, 64), now) is Verdict.PASS for i in range(count))


def test_registered_under_its_name() -> None:
    assert get_function("ratelimit") is RateLimit


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


def test_a_new_limit_applies_at_once() -> None:
    mb = make(limit=100)
    assert passed(mb, 10, now=30.1) == 10
    mb.update(values={"limit": 15})
    assert passed(mb, 100, now=30.2) == 5
    mb.update(values={"limit": 50})
    assert passed(mb, 100, now=30.3) == 35
