"""middlebox.rules (vmbox.functions.rules): matching, actions, units, shadow, state per rule."""

from __future__ import annotations

from typing import Any

import pytest

from vmbox.functions import get_function, rules
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.functions.rules import RuleSet
from vmbox.group import Group
from vmbox.middlebox import config_value
from vmbox.packet import ICMP, ICMPV6, TCP, UDP, Packet, Verdict
from vmbox.spec import MiddleboxSpec

SOLO = Group(("r1",), "r1")
GRE = 47  # a protocol no rule names: only `any` rules see it
T = 10.5  # past the first window (a replica admits nothing in its first)
FUNCTION = get_function("ratelimit")


def ruleset(**middlebox: Any) -> RuleSet:
    config = MiddleboxSpec.model_validate(middlebox).model_dump()
    built = FUNCTION.build(config, SOLO)
    assert isinstance(built, RuleSet)
    built.start(1.0)
    return built


FIREWALL: list[dict[str, Any]] = [
    {"name": "no-telnet", "match": {"proto": "tcp", "dport": 23}, "action": "drop"},
    {"name": "web", "match": {"proto": "tcp", "dport": "80-443"}, "action": "accept"},
    {"name": "dns", "match": {"proto": "udp", "dport": 53}, "action": "ratelimit", "limit": 2},
    {"name": "ping", "match": {"proto": "icmp"}, "action": "ratelimit", "limit": 1},
    {"name": "bad-v4", "match": {"src": "192.0.2.0/24"}, "action": "drop"},
    {"name": "bad-v6", "match": {"src": "2001:db8:bad::/48"}, "action": "drop"},
    {"name": "to-db", "match": {"dst": "198.18.5.0/24"}, "action": "drop"},
]

V4, V6 = "198.18.0.7", "2001:db8:1::7"
BAD4, BAD6 = "192.0.2.9", "2001:db8:bad::9"


def verdicts(fw: RuleSet, packet: Packet, times: int) -> list[Verdict]:
    return [fw.process(packet, T) for _ in range(times)]


@pytest.mark.parametrize("src", [V4, V6])
def test_each_action_applies_to_what_it_matches(src: str) -> None:
    fw = ruleset(rules=FIREWALL)
    assert fw.process(Packet(src, 1000, 60, TCP, "", 23), T) is Verdict.DROP
    assert verdicts(fw, Packet(src, 1000, 60, TCP, "", 443), 5) == [Verdict.PASS] * 5
    dns = verdicts(fw, Packet(src, 1000, 60, UDP, "", 53), 4)
    assert dns == [Verdict.PASS, Verdict.PASS, Verdict.DROP, Verdict.DROP]
    echo = ICMP if ":" not in src else ICMPV6
    assert verdicts(fw, Packet(src, 0, 84, echo), 2) == [Verdict.PASS, Verdict.DROP]
    # UDP to another port, TCP to 8080: no rule matches them, so they pass.
    assert verdicts(fw, Packet(src, 1000, 60, UDP, "", 54), 5) == [Verdict.PASS] * 5
    assert fw.process(Packet(src, 1000, 60, TCP, "", 8080), T) is Verdict.PASS
    counts = fw.rule_counters()
    assert counts["no-telnet"] == {"matched": 1, "passed": 0, "dropped": 1, "shadow_dropped": 0}
    assert counts["dns"] == {"matched": 4, "passed": 2, "dropped": 2, "shadow_dropped": 0}
    assert counts["web"]["passed"] == 5
    assert counts[rules.UNMATCHED]["matched"] == 6


@pytest.mark.parametrize(("bad", "good"), [(BAD4, V4), (BAD6, V6)])
def test_source_cidrs_never_cross_families(bad: str, good: str) -> None:
    fw = ruleset(rules=FIREWALL)
    for proto in (TCP, UDP, GRE):  # ICMP would meet the ping rule first
        assert fw.process(Packet(bad, 1, 10, proto, "", 8080), T) is Verdict.DROP
        assert fw.process(Packet(good, 1, 10, proto, "", 8080), T) is Verdict.PASS
    # The v4 rule never matches a v6 packet: bad-v6 did all of the v6 drops.
    counts = fw.rule_counters()
    wanted = "bad-v4" if bad == BAD4 else "bad-v6"
    other = "bad-v6" if bad == BAD4 else "bad-v4"
    assert counts[wanted]["dropped"] == 3 and counts[other]["matched"] == 0


def test_destination_cidr_and_unknown_destination() -> None:
    fw = ruleset(rules=FIREWALL)
    assert fw.process(Packet(V4, 1, 10, UDP, "198.18.5.1", 9), T) is Verdict.DROP
    assert fw.process(Packet(V4, 1, 10, UDP, "198.18.6.1", 9), T) is Verdict.PASS
    # The relay knows no destination: a rule on dst never matches it.
    assert fw.process(Packet(V4, 1, 10, UDP), T) is Verdict.PASS


def test_first_match_wins() -> None:
    fw = ruleset(
        rules=[
            {
                "name": "ssh-ok",
                "match": {"proto": "tcp", "src": "10.1.0.0/16", "dport": 22},
                "action": "accept",
            },
            {"name": "ssh-no", "match": {"proto": "tcp", "dport": 22}, "action": "drop"},
        ]
    )
    assert fw.process(Packet("10.1.2.3", 5, 10, TCP, "", 22), T) is Verdict.PASS
    assert fw.process(Packet("10.2.2.3", 5, 10, TCP, "", 22), T) is Verdict.DROP
    assert fw.process(Packet("10.1.2.3", 5, 10, UDP, "", 22), T) is Verdict.PASS  # no match


def test_port_range_edges() -> None:
    fw = ruleset(
        rules=[{"name": "hi", "match": {"proto": "udp", "dport": "1000-1999"}, "action": "drop"}]
    )
    got = {p: fw.process(Packet(V4, 1, 10, UDP, "", p), T) for p in (999, 1000, 1999, 2000)}
    assert got == {999: Verdict.PASS, 1000: Verdict.DROP, 1999: Verdict.DROP, 2000: Verdict.PASS}


def test_limit_beside_rules_is_the_final_catch_all() -> None:
    fw = ruleset(
        limit=3, rules=[{"name": "trusted", "match": {"src": "10.0.0.0/8"}, "action": "accept"}]
    )
    assert verdicts(fw, Packet("10.9.9.9", 1, 10), 10) == [Verdict.PASS] * 10
    assert verdicts(fw, Packet(V4, 1, 10), 5) == [Verdict.PASS] * 3 + [Verdict.DROP] * 2
    assert [item.name for item in fw.items] == ["limit"]
    assert fw.rule_counters()["limit"]["dropped"] == 2


def test_bytes_unit_counts_sizes() -> None:
    fw = ruleset(rules=[{"name": "bulk", "action": "ratelimit", "limit": 1000, "unit": "bytes"}])
    sizes = [400, 400, 300, 200, 1]
    got = [fw.process(Packet(V4, 1, size), T) for size in sizes]
    # 400 + 400 = 800; 300 more would be 1100 > 1000; 200 fits exactly; then nothing.
    assert got == [Verdict.PASS, Verdict.PASS, Verdict.DROP, Verdict.PASS, Verdict.DROP]


def test_bytes_unit_with_a_token_bucket() -> None:
    fw = ruleset(
        algorithm="token_bucket",
        rules=[{"name": "bulk", "action": "ratelimit", "limit": 1000, "unit": "bytes"}],
    )
    now = 3.0  # the bucket has been filling since the first whole window (2.0): full
    assert [fw.process(Packet(V4, 1, 600), now) for _ in range(2)] == [Verdict.PASS, Verdict.DROP]
    # 0.5 s later 500 more bytes of tokens: 400 + 500 = 900 >= 600.
    assert fw.process(Packet(V4, 1, 600), now + 0.5) is Verdict.PASS


def test_shadow_counts_would_drop_and_lets_the_next_rules_decide() -> None:
    fw = ruleset(
        rules=[
            {"name": "try-limit", "action": "ratelimit", "limit": 2, "shadow": True},
            {"name": "try-drop", "match": {"src": "10.0.0.0/8"}, "action": "drop", "shadow": True},
            {"name": "real", "match": {"src": "10.66.0.0/16"}, "action": "drop"},
        ]
    )
    assert verdicts(fw, Packet("10.1.1.1", 1, 10), 5) == [Verdict.PASS] * 5
    assert fw.process(Packet("10.66.0.1", 1, 10), T) is Verdict.DROP  # the real rule still drops
    counts = fw.rule_counters()
    # 10.66.0.1 has its own count: within its limit.
    assert counts["try-limit"] == {"matched": 6, "passed": 3, "dropped": 0, "shadow_dropped": 3}
    assert counts["try-drop"] == {"matched": 6, "passed": 0, "dropped": 0, "shadow_dropped": 6}
    assert counts["real"]["dropped"] == 1


def test_each_rule_has_its_own_state_item_and_table() -> None:
    config = MiddleboxSpec.model_validate(
        {
            "limit": 7,
            "rules": [
                {"name": "a", "match": {"src": "10.1.0.0/16"}, "action": "ratelimit", "limit": 2},
                {"name": "skip", "action": "drop", "match": {"src": "10.9.0.0/16"}},
                {"name": "b", "match": {"src": "10.2.0.0/16"}, "action": "ratelimit", "limit": 3},
            ],
        }
    ).model_dump()
    items = FUNCTION.state_items(config)
    assert [i.name for i in items] == ["rules.a.limit", "rules.b.limit", "limit"]
    assert [config_value(config, i.config_key) for i in items] == [2, 3, 7]
    fw = FUNCTION.build(config, SOLO)
    assert isinstance(fw, RuleSet) and fw.items == items
    fw.start(1.0)
    a, b = Packet("10.1.0.1", 1, 1), Packet("10.2.0.1", 1, 1)
    assert verdicts(fw, a, 3).count(Verdict.PASS) == 2
    fw.update(values={"rules.b.limit": 5})  # only b's limiter sees it
    assert verdicts(fw, b, 6).count(Verdict.PASS) == 5
    assert fw.process(a, T) is Verdict.DROP
    fw.update(values={"rules.a.limit": 4})
    assert verdicts(fw, a, 3).count(Verdict.PASS) == 2  # 2 of 4 were used this window
    assert fw.limiters["limit"].limit == 7


def test_a_group_change_reaches_every_rule() -> None:
    fw = ruleset(rules=[{"name": "a", "action": "ratelimit", "limit": 10}], resize_guard=False)
    fw.update(group=Group(("r1", "r2"), "r1"))
    limiter = fw.limiters["rules.a.limit"]
    assert isinstance(limiter, FixedWindow) and limiter.share == 5


def test_a_flood_of_sources_stays_bounded_per_rule() -> None:
    fw = ruleset(max_sources=100, rules=[{"name": "a", "action": "ratelimit", "limit": 1}])
    for i in range(5000):
        fw.process(Packet(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1, 1), T)
    limiter = fw.limiters["rules.a.limit"]
    assert isinstance(limiter, FixedWindow)
    assert len(limiter.counts) <= 101  # max_sources and the overflow entry
    assert fw.gauges()["overflowed_sources"] == 4900


def test_address_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "ADDRESS_CACHE", 50)
    fw = ruleset(rules=[{"name": "a", "match": {"src": "10.0.0.0/8"}, "action": "drop"}])
    for i in range(500):
        assert fw.process(Packet(f"10.0.{i // 256}.{i % 256}", 1, 1), T) is Verdict.DROP
    assert len(fw.src_masks.cache) <= 50


def test_demand_reports_are_kept_apart_per_rule() -> None:
    fw = ruleset(
        split="demand",
        rules=[
            {"name": "a", "match": {"src": "10.1.0.0/16"}, "action": "ratelimit", "limit": 10},
            {"name": "b", "action": "ratelimit", "limit": 10, "unit": "bytes"},
        ],
    )
    fw.process(Packet("10.1.0.1", 1, 100), T)
    fw.process(Packet("10.2.0.1", 1, 100), T)
    offered = fw.take_demand()
    assert offered == {"rules.a.limit|10.1.0.1": 1, "rules.b.limit|10.2.0.1": 100}
    fw.set_demand({"r1": offered, "r2": {"rules.a.limit|10.1.0.1": 3}})
    a = fw.limiters["rules.a.limit"]
    assert a.index.by_source == {"10.1.0.1": {"r1": 1, "r2": 3}}
    assert fw.limiters["rules.b.limit"].index.by_source == {"10.2.0.1": {"r1": 100}}


def test_the_single_limit_spec_is_the_plain_limiter() -> None:
    config = MiddleboxSpec(limit=5).model_dump()
    built = FUNCTION.build(config, SOLO)
    assert type(built) is FixedWindow
    assert [i.name for i in FUNCTION.state_items(config)] == ["limit"]
    assert built.rule_counters() == {}


def test_a_gso_packet_costs_its_segments_or_its_bytes() -> None:
    fw = ruleset(
        rules=[
            {"name": "pkts", "match": {"proto": "tcp"}, "action": "ratelimit", "limit": 5},
            {
                "name": "bulk",
                "match": {"proto": "udp"},
                "action": "ratelimit",
                "limit": 9000,
                "unit": "bytes",
            },
        ]
    )
    tcp = Packet(V4, 1, 4500, TCP, segments=3)
    assert verdicts(fw, tcp, 2) == [Verdict.PASS, Verdict.DROP]  # 3, then 6 > 5
    udp = Packet(V4, 1, 4500, UDP, segments=3)
    assert verdicts(fw, udp, 3) == [Verdict.PASS, Verdict.PASS, Verdict.DROP]  # bytes: 9000
