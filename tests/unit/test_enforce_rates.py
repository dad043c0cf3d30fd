"""The rates a node's table enforces come from the shares the replica's limiters hold."""

from __future__ import annotations

from typing import Any

import pytest

from vmbox.enforce.nftables import Rate, Table, kernel_rules
from vmbox.enforce.rates import (
    add_offered,
    closed_rates,
    node_rates,
    settle_sources,
    source_rates,
)
from vmbox.functions import get_function
from vmbox.functions.limiter import RateLimiter
from vmbox.group import Group
from vmbox.middlebox import Middlebox
from vmbox.packet import Packet, Verdict
from vmbox.spec import parse_spec


def built(middlebox: dict[str, Any], members: tuple[str, ...]) -> tuple[Middlebox, Table]:
    addresses = {"listen": "127.0.0.1:1", "upstream": "127.0.0.1:2"}
    spec = parse_spec({"service": "web", **addresses, "middlebox": middlebox})
    config = spec.limiter.model_dump()
    box = get_function("ratelimit").build(config, Group(members, "r1"))
    return box, Table("web", kernel_rules(config))


def test_a_fixed_window_share_becomes_a_rate_with_a_small_bucket() -> None:
    box, table = built({"limit": 100}, ("r1", "r2"))
    assert node_rates(box, table) == {"limit": Rate(50, "second", 3)}  # at least 3 packets
    box.update(group=Group(("r1",), "r1"))
    assert node_rates(box, table) == {"limit": Rate(100, "second", 5)}  # 5% of the share
    box.update(values={"limit": 1000})
    assert node_rates(box, table) == {"limit": Rate(1000, "second", 50)}


def test_a_token_bucket_keeps_its_share_of_the_burst() -> None:
    box, table = built({"limit": 100, "algorithm": "token_bucket", "burst": 40}, ("r1", "r2"))
    assert node_rates(box, table) == {"limit": Rate(50, "second", 20)}


def test_the_resize_guard_gives_the_smaller_share_and_a_leaver_nothing() -> None:
    box, table = built({"limit": 90}, ("r1", "r2", "r3"))
    assert node_rates(box, table)["limit"].amount == 30
    # r4 joined; until every member acked, the smaller of the two splits.
    box.update(group=Group(("r1", "r2", "r3", "r4"), "r1", previous=("r1", "r2")))
    assert node_rates(box, table)["limit"].amount == min(90 // 4 + (90 % 4 > 0), 45)
    box.update(group=Group(("r1", "r2"), "r1", previous=()))  # leaving (ResizeGuard.leaving)
    assert node_rates(box, table)["limit"].amount == 0


def test_each_ratelimit_rule_gets_its_limiters_share_over_its_window() -> None:
    rules = [
        {"name": "ssh", "action": "accept", "match": {"proto": "tcp", "dport": 22}},
        {"name": "dns", "action": "ratelimit", "limit": 600, "match": {"proto": "udp"}},
        {"name": "big", "action": "ratelimit", "limit": 8000, "unit": "bytes"},
    ]
    box, table = built({"rules": rules, "limit": 30, "window": "1m"}, ("r1", "r2"))
    rates = node_rates(box, table)
    assert set(rates) == {"dns", "big", "limit"}  # accept rules have no rate
    assert rates["dns"] == Rate(5, "second", 15)  # 300 a minute: whole per second
    assert rates["limit"] == Rate(15, "minute", 3)
    assert rates["big"] == Rate(4000, "minute", 200)  # bytes: 5% of the share, no floor
    assert closed_rates(table) == dict.fromkeys(rates, Rate(0))


def test_a_function_without_limiters_is_refused() -> None:
    class Other(Middlebox):
        def process(self, packet: Packet, now: float) -> Verdict:
            return Verdict.PASS

    _, table = built({"limit": 1}, ("r1",))
    with pytest.raises(TypeError, match="enforces ratelimit rules"):
        node_rates(Other({}, Group(("r1",), "r1")), table)


def demand_box(middlebox: dict[str, Any]) -> tuple[RateLimiter, Table]:
    box, table = built({**middlebox, "split": "demand"}, ("r1", "r2"))
    assert isinstance(box, RateLimiter)
    return box, Table("web", table.rules, demand=True)


def test_under_demand_a_reported_source_gets_a_rate_of_its_own() -> None:
    """One source, all of its packets at r1: r1 takes the limit but the floor it leaves
    r2 (5% of 100 over 2 replicas, rounded up there); the rule keeps the even share."""
    box, table = demand_box({"limit": 100})
    add_offered(box, "limit", {"198.18.0.9": 300})
    report = box.take_demand()
    assert report == {"198.18.0.9": 300}
    box.set_demand({"r1": report})
    own = source_rates(box, table)["limit"]
    assert own["198.18.0.9"].amount in (97, 98) and own["198.18.0.9"].burst == 4
    assert node_rates(box, table) == {"limit": Rate(50, "second", 3)}
    assert source_rates(box, Table("web", table.rules)) == {}  # split: even: none


def test_a_token_bucket_source_keeps_its_share_of_the_burst_and_bad_reports_are_skipped() -> None:
    box, table = demand_box({"limit": 100, "algorithm": "token_bucket", "burst": 40})
    box.set_demand({"r1": {"198.18.0.9": 100, "not-an-address": 5}, "r2": {"2001:db8::1": 10}})
    own = source_rates(box, table)["limit"]
    assert set(own) == {"198.18.0.9", "2001:db8::1"}
    assert own["198.18.0.9"].amount > 90 and 36 <= own["198.18.0.9"].burst <= 40
    assert own["2001:db8::1"].amount < 10  # r2 saw it: r1 keeps the floor


def test_settling_applies_falls_at_once_and_rises_past_the_margin() -> None:
    applied = {"limit": {"a": Rate(100, burst=5), "b": Rate(100, burst=5)}}
    wanted = {
        "limit": {
            "a": Rate(101, burst=5),  # +1%: kept at 100
            "b": Rate(99, burst=5),  # lower: applied
            "c": Rate(10),  # new: applied
        }
    }
    settled = settle_sources(wanted, applied)["limit"]
    assert settled == {"a": Rate(100, burst=5), "b": Rate(99, burst=5), "c": Rate(10)}
    assert settle_sources({"limit": {"a": Rate(102, burst=5)}}, applied)["limit"]["a"].amount == 102
    smaller_bucket = settle_sources({"limit": {"a": Rate(101, burst=4)}}, applied)
    assert smaller_bucket["limit"]["a"] == Rate(101, burst=4)  # a smaller bucket is a fall
    per_minute = settle_sources({"limit": {"a": Rate(6000, "minute", 5)}}, applied)
    assert per_minute["limit"]["a"] == Rate(100, burst=5)  # the same rate, said per minute
