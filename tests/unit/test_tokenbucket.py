"""The ratelimit middlebox's token bucket as pure logic: fake clock, no sockets, no etcd."""

from __future__ import annotations

import pytest

from vmbox.functions import ratelimit
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.functions.limiter import RateLimiter
from vmbox.functions.tokenbucket import TokenBucket
from vmbox.group import Group
from vmbox.packet import Packet, Verdict

FOUR = ("r1", "r2", "r3", "r4")


def make(
    limit: int = 100, members: tuple[str, ...] = ("r1",), me: str = "r1", **config: object
) -> TokenBucket:
    mb = ratelimit.build(
        {"limit": limit, "window": 1.0, "algorithm": "token_bucket", **config}, Group(members, me)
    )
    assert isinstance(mb, TokenBucket)
    return mb


def passed(mb: RateLimiter, count: int, now: float, src: str = "10.0.0.1") -> int:
    return sum(mb.process(Packet(src, 1000 + i, 64), now) is Verdict.PASS for i in range(count))


def paced(mb: RateLimiter, rate: float, start: float, seconds: float, src: str = "s") -> int:
    """Offer `rate` packets/s from `start` for `seconds`; how many passed."""
    n = int(rate * seconds)
    return sum(passed(mb, 1, start + i / rate, src) for i in range(n))


def test_the_config_picks_the_algorithm() -> None:
    assert type(ratelimit.build({"limit": 5}, Group(("r1",), "r1"))) is FixedWindow
    assert type(make()) is TokenBucket


def test_an_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match=r"'leaky'.*fixed_window, token_bucket"):
        ratelimit.build({"limit": 5, "algorithm": "leaky"}, Group(("r1",), "r1"))


def test_holds_a_flooding_source_to_the_rate() -> None:
    mb = make(limit=100, burst=10)
    assert passed(mb, 100, now=0.0, src="s") == 10  # the burst
    assert paced(mb, 1000, start=0.0, seconds=5.0) in range(495, 501)  # then the rate


def test_a_burst_after_idle_passes_at_most_burst() -> None:
    mb = make(limit=100, burst=30)
    passed(mb, 1000, now=5.0)
    assert passed(mb, 1000, now=10.0) == 30  # full again after 0.3 s, never beyond


def test_a_new_replica_starts_empty_and_admits_nothing_before_its_first_whole_window() -> None:
    mb = make(limit=100, burst=100)
    mb.start(7.4)
    assert passed(mb, 100, now=7.9) == 0
    assert passed(mb, 100, now=8.0) == 0  # buckets fill from 8.0 on
    assert passed(mb, 100, now=8.25) == 25


def test_even_split_rates_and_capacities() -> None:
    mbs = [make(limit=100, burst=50, members=FOUR, me=m) for m in FOUR]
    assert [mb.share for mb in mbs] == [25, 25, 25, 25]
    assert [mb.burst_share for mb in mbs] == [13, 13, 12, 12]
    assert sum(passed(mb, 100, now=3.0) for mb in mbs) == 50


def test_a_faster_rate_never_credits_the_time_before_the_change() -> None:
    mb = make(limit=100, burst=100, members=FOUR, me="r1")  # 25/s, capacity 25
    passed(mb, 100, now=1.0)  # empty
    passed(mb, 1, now=1.2)  # 5 tokens by now, one spent
    mb.update(group=Group(("r1",), "r1"))  # 100/s from here on
    assert passed(mb, 100, now=1.3) == 4 + 10


def test_a_smaller_share_clamps_the_tokens() -> None:
    mb = make(limit=100, burst=100)
    mb.update(group=Group(FOUR, "r1"))
    assert passed(mb, 100, now=50.0) == 25


def test_full_buckets_are_swept_and_the_table_stays_bounded() -> None:
    mb = make(limit=10, max_sources=100)
    for i in range(1000):
        mb.process(Packet(f"10.0.{i >> 8}.{i & 255}", 1, 64), 2.0)
    assert len(mb.buckets) == 101  # 100 sources and the overflow bucket
    assert passed(mb, 20, now=2.0, src="192.0.2.1") == 0  # the overflow bucket is empty
    mb.process(Packet("10.9.9.9", 1, 64), 4.0)  # a sweep: everything is full again
    assert len(mb.buckets) == 1


def test_demand_split_gives_a_one_replica_source_nearly_the_whole_rate() -> None:
    mb = make(limit=100, burst=100, members=FOUR, me="r1", split="demand")
    mb.set_demand({"r1": {"s": 30}})
    assert mb.params["s"] == (97.0, 97.0)
    passed(mb, 1000, now=1.0, src="s")
    assert paced(mb, 1000, start=1.0, seconds=2.0) in range(192, 196)
    assert mb.gauges()["demand_sources"] == 1


def test_demand_rates_of_the_group_add_up_to_the_limit() -> None:
    reports = {"r1": {"s": 42}, "r2": {"s": 7}, "r3": {"s": 19}}
    mbs = [make(limit=100, members=FOUR, me=m, split="demand") for m in FOUR]
    for mb in mbs:
        mb.set_demand(reports)
    assert sum(mb.params["s"][0] for mb in mbs) == 100.0


def test_demand_guard_applies_to_the_token_bucket() -> None:
    mb = make(limit=1000, members=("r1", "r2", "r3"), me="r1", split="demand")
    mb.update(group=Group(("r1", "r2", "r3"), "r1", previous=FOUR))
    mb.set_demand({"r1": {"s": 30}, "r2": {"s": 30}})
    assert mb.params["s"][0] == 488.0
