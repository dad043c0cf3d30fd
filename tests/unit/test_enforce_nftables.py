"""vmbox.enforce.nftables: the JSON documents of `enforce: kernel` and the listings it reads.

The documents' shape is checked against the kernel by round trips through
`nft -j -c -f -` in tests/integration/test_enforce_kernel.py; here, what the
documents say: which sets each rule updates, what a share change adds and
deletes, what is matched, and how nft's JSON listings read back.
"""

from __future__ import annotations

from typing import Any

import pytest

from vmbox.enforce import nftables as nft
from vmbox.enforce.nftables import Count, KernelRule, Rate, Table

RULES: list[dict[str, Any]] = [
    {"name": "ssh", "action": "accept", "match": {"proto": "tcp", "dport": 22}},
    {"name": "bad", "action": "drop", "match": {"src": "198.18.5.0/24"}},
    {
        "name": "dns",
        "action": "ratelimit",
        "limit": 50,
        "match": {"proto": "udp", "dport": "53-54", "dst": "198.19.0.0/24"},
    },
    {"name": "big", "action": "ratelimit", "limit": 5000, "unit": "bytes"},
    {
        "name": "v6",
        "action": "ratelimit",
        "limit": 9,
        "shadow": True,
        "match": {"src": "2001:2::/48"},
    },
]
# Real output of nft 1.0.6 (`nft -j list set ...`, `nft -j list counters table ...`).
SET_LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {
            "set": {
                "family": "inet",
                "name": "r0g1v4",
                "table": "vmbox_cap",
                "type": "ipv4_addr",
                "flags": ["timeout"],
                "elem": [
                    {
                        "elem": {
                            "val": "198.18.1.0",
                            "expires": 9,
                            "counter": {"packets": 2, "bytes": 88},
                        }
                    },
                    {
                        "elem": {
                            "val": "198.18.1.1",
                            "expires": 9,
                            "counter": {"packets": 1, "bytes": 44},
                        }
                    },
                ],
            }
        },
    ]
}
COUNTERS_LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "inet", "name": "r0m", "table": "t", "packets": 30, "bytes": 1320}},
        {"counter": {"family": "inet", "name": "r0d", "table": "t", "packets": 12, "bytes": 528}},
        {"counter": {"family": "inet", "name": "r0o", "table": "t", "packets": 2, "bytes": 88}},
    ]
}


def table(**kwargs: Any) -> Table:
    return Table("web", nft.kernel_rules({"rules": RULES, "limit": 100}), **kwargs)


def rates(t: Table, amount: int = 100) -> dict[str, Rate]:
    return {r.name: Rate(amount) for _, r in t.limited()}


def commands(doc: dict[str, Any], verb: str, kind: str) -> list[dict[str, Any]]:
    return [c[verb][kind] for c in doc["nftables"] if kind in c.get(verb, {})]


def updated_sets(doc: dict[str, Any], chain: str) -> list[str]:
    """The sets the rules of `chain` update from the packet path."""
    names = []
    for rule in commands(doc, "add", "rule"):
        if rule["chain"] == chain:
            names += [e["set"]["set"] for e in rule["expr"] if "set" in e]
    return names


def test_rate_for_takes_the_smallest_whole_unit_and_never_rounds_up() -> None:
    assert nft.rate_for(100, 1.0, 5) == Rate(100, "second", 5)
    assert nft.rate_for(25, 0.5, 5) == Rate(50, "second", 5)
    assert nft.rate_for(7, 2.0, 5) == Rate(210, "minute", 5)  # 3.5/s is not whole
    weekly = nft.rate_for(1, 7.0, 3)  # 1/7 s: 86400 per week, exactly
    assert (weekly.amount, weekly.per) == (86400, "week")
    assert nft.rate_for(1, 1.1, 2) == Rate(549818, "week", 2)  # 549818.18: rounded down
    assert nft.rate_for(0, 1.0, 5).amount == 0
    assert nft.rate_for(10, 1.0, 0).burst == nft.MIN_BURST  # 0 would mean nft's 5


def test_rates_and_tables_refuse_what_nftables_cannot_hold() -> None:
    with pytest.raises(nft.NftablesError):
        Rate(-1)
    with pytest.raises(nft.NftablesError):
        Rate(1, per="fortnight")
    with pytest.raises(nft.NftablesError):
        Table("a b", ())
    with pytest.raises(nft.NftablesError):
        Table("web", (KernelRule("x", "drop"), KernelRule("x", "accept")))
    with pytest.raises(nft.NftablesError, match="no rate for ratelimit rule"):
        nft.install(table(), {"dns": Rate(1)})


def test_kernel_rules_read_the_config_as_the_in_path_rule_set_does() -> None:
    rules = nft.kernel_rules({"rules": RULES, "limit": 100})
    assert [r.name for r in rules] == ["ssh", "bad", "dns", "big", "v6", "limit"]
    assert rules[-1] == KernelRule("limit", "ratelimit")
    assert rules[3].unit == "bytes" and rules[4].shadow
    assert (rules[2].version, rules[4].version, rules[5].version) == (4, 6, None)
    assert nft.kernel_rules({"limit": 5}) == (KernelRule("limit", "ratelimit"),)


def test_install_gives_each_ratelimit_rule_its_own_sets_and_chain_in_rule_order() -> None:
    t = table(interface="gw-c", size=1000, timeout=7)
    doc = nft.install(t, rates(t))
    sets = {s["name"]: s for s in commands(doc, "add", "set")}
    # dns is IPv4-only (a v4 CIDR), v6 IPv6-only, big and limit both families.
    assert sorted(sets) == ["r2g1v4", "r3g1v4", "r3g1v6", "r4g1v6", "r5g1v4", "r5g1v6"]
    assert {(s["size"], s["timeout"]) for s in sets.values()} == {(1000, 7)}
    assert updated_sets(doc, "r2") == ["@r2g1v4"]
    assert updated_sets(doc, "r5") == ["@r5g1v4", "@r5g1v6"]
    base = [r for r in commands(doc, "add", "rule") if r["chain"] == nft.BASE_CHAIN]
    assert len(base) == len(t.rules) + 1  # first, the counter of every packet seen
    assert base[0]["expr"][1:] == [{"counter": nft.SEEN}]
    verdicts = [next(k for k in r["expr"][-1]) for r in base[1:]]
    assert verdicts == ["accept", "drop", "jump", "jump", "jump", "jump"]
    for rule in base:  # every rule is for packets entering on the client side only
        assert rule["expr"][0] == nft._match({"meta": {"key": "iifname"}}, "gw-c")
    # The table is replaced whole: created (so deleting it cannot fail), deleted, created.
    assert [next(iter(c)) for c in doc["nftables"][:3]] == ["add", "delete", "add"]


def test_a_limiter_chain_drops_over_the_rate_holds_overflow_and_accepts() -> None:
    t = table()
    doc = nft.install(t, {**rates(t), "limit": Rate(40, "second", 3)})
    chain = [r["expr"] for r in commands(doc, "add", "rule") if r["chain"] == "r5"]
    update = chain[0][0]["set"]
    assert update["op"] == "update"
    assert update["stmt"] == [
        {"counter": None},
        {"limit": {"rate": 40, "per": "second", "burst": 3, "inv": True}},
    ]
    assert chain[0][1:] == [{"counter": "r5d"}, {"drop": None}]
    overflow = chain[2]  # not in the (full) set: one shared bucket at a source's rate
    assert overflow[0]["match"]["op"] == "!=" and overflow[0]["match"]["right"] == "@r5g1v4"
    assert overflow[1]["limit"]["rate"] == 40 and {"drop": None} in overflow
    assert chain[-1] == [{"accept": None}]


def test_a_closed_table_counts_and_drops_every_packet_before_any_rule() -> None:
    t = table(interface="gw-c")
    doc = nft.install(t, rates(t), closed=True)
    base = [r["expr"] for r in commands(doc, "add", "rule") if r["chain"] == nft.BASE_CHAIN]
    arriving = nft._match({"meta": {"key": "iifname"}}, "gw-c")
    assert base[:2] == [
        [arriving, {"counter": nft.SEEN}],
        [arriving, {"counter": nft.CLOSED}, {"drop": None}],
    ]
    assert len(base) == len(t.rules) + 2  # the rules stay, for the table to open again
    counters = {c["name"] for c in commands(doc, "add", "counter")}
    assert {nft.SEEN, nft.CLOSED} <= counters


def test_bytes_shadow_and_closed_rules() -> None:
    t = table()
    doc = nft.install(t, {**rates(t), "dns": Rate(0)})
    rules = commands(doc, "add", "rule")
    big = next(r for r in rules if r["chain"] == "r3")["expr"][0]["set"]["stmt"][1]["limit"]
    assert (big["rate_unit"], big["burst_unit"]) == ("bytes", "bytes")
    shadow = [r["expr"] for r in rules if r["chain"] == "r4"]
    assert all({"drop": None} not in e and {"accept": None} not in e for e in shadow)
    assert any({"counter": "r4d"} in e for e in shadow)  # would-drops are counted
    closed = [r["expr"] for r in rules if r["chain"] == "r2"]
    assert closed == [[{"counter": "r2d"}, {"drop": None}], [{"accept": None}]]
    assert "r2g1v4" not in updated_sets(doc, "r2")


def test_matches_cover_protocol_cidrs_and_port_ranges() -> None:
    exprs = nft._matches(table().rules[2], None)
    assert nft._match({"meta": {"key": "l4proto"}}, 17) in exprs
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    assert nft._match(daddr, {"prefix": {"addr": "198.19.0.0", "len": 24}}) in exprs
    port = {"payload": {"protocol": "th", "field": "dport"}}
    assert nft._match(port, {"range": [53, 54]}) in exprs
    icmp = nft._matches(KernelRule("p", "drop", proto="icmp", src="2001:2::1/128"), None)
    assert nft._match({"meta": {"key": "l4proto"}}, {"set": [1, 58]}) in icmp
    assert nft._match({"payload": {"protocol": "ip6", "field": "saddr"}}, "2001:2::1") in icmp
    # A dport without a protocol matches tcp and udp only, as the in-path rules do.
    anyport = nft._matches(KernelRule("p", "accept", dport=80), None)
    assert anyport[0] == nft._match({"meta": {"key": "l4proto"}}, {"set": [6, 17]})
    assert nft._matches(KernelRule("all", "accept"), None) == []


def test_set_rates_swaps_generations_of_the_named_rules_only() -> None:
    t = table()
    doc = nft.set_rates(t, {"limit": Rate(25), "dns": Rate(10)}, generation=3)
    assert sorted(s["name"] for s in commands(doc, "add", "set")) == [
        "r2g3v4",
        "r5g3v4",
        "r5g3v6",
    ]
    assert sorted(s["name"] for s in commands(doc, "delete", "set")) == [
        "r2g2v4",
        "r5g2v4",
        "r5g2v6",
    ]
    assert sorted(c["name"] for c in commands(doc, "flush", "chain")) == ["r2", "r5"]
    assert updated_sets(doc, "r5") == ["@r5g3v4", "@r5g3v6"]
    assert not [r for r in commands(doc, "add", "rule") if r["chain"] == nft.BASE_CHAIN]
    order = [next(iter(c)) for c in doc["nftables"]]
    assert order.index("flush") < order.index("delete")  # no rule refers to a deleted set


def test_delete_succeeds_whether_or_not_the_table_exists() -> None:
    doc = nft.delete(table())
    assert doc["nftables"] == [
        {"add": {"table": {"family": "inet", "name": "vmbox_web"}}},
        {"delete": {"table": {"family": "inet", "name": "vmbox_web"}}},
    ]


def test_listings_read_back_into_counts() -> None:
    assert nft.parse_set(SET_LISTING) == {
        "198.18.1.0": Count(2, 88),
        "198.18.1.1": Count(1, 44),
    }
    assert nft.parse_set({"nftables": [{"set": {"name": "empty"}}]}) == {}
    counters = nft.parse_counters(COUNTERS_LISTING)
    assert counters["r0d"] == Count(12, 528)
    one = Table("t", (KernelRule("limit", "ratelimit"),))
    assert nft.rule_counters(one, counters) == {
        "limit": {"matched": 30, "passed": 18, "dropped": 12, "shadow_dropped": 0, "overflow": 2}
    }
    shadow = Table("t", (KernelRule("limit", "ratelimit", shadow=True),))
    assert nft.rule_counters(shadow, counters)["limit"]["shadow_dropped"] == 12
    assert nft.rule_counters(shadow, counters)["limit"]["passed"] == 18  # as Rule.counters


def test_source_changes_add_refill_and_remove_a_sources_own_chain() -> None:
    t = Table("web", nft.kernel_rules({"limit": 100}), demand=True)
    one = {"limit": {0: nft.SourceRate("198.18.0.9", Rate(90))}}
    added = {"nftables": nft.source_changes(t, {}, one)}
    assert [c["name"] for c in commands(added, "add", "chain")] == ["r0s0"]
    assert [c["name"] for c in commands(added, "add", "counter")] == ["r0s0c"]
    (element,) = commands(added, "add", "element")
    assert element["name"] == "r0hv4"
    assert element["elem"] == [["198.18.0.9", {"goto": {"target": "r0s0"}}]]
    assert nft.source_changes(t, one, one) == []  # the same rate: nothing to do
    faster = {"limit": {0: nft.SourceRate("198.18.0.9", Rate(95))}}
    refill = {"nftables": nft.source_changes(t, one, faster)}
    assert commands(refill, "flush", "chain") == [
        {"family": "inet", "table": "vmbox_web", "name": "r0s0"}
    ]
    assert not commands(refill, "add", "element")
    gone = {"nftables": nft.source_changes(t, one, {"limit": {}})}
    assert commands(gone, "delete", "element")[0]["elem"] == ["198.18.0.9"]
    assert [c["name"] for c in commands(gone, "delete", "chain")] == ["r0s0"]
    with pytest.raises(nft.NftablesError, match="holds another address"):
        nft.source_changes(t, one, {"limit": {0: nft.SourceRate("198.18.0.8", Rate(1))}})
    # The rule's chain consults the map first, under demand only.
    installed = nft.install(t, {"limit": Rate(50)})
    first = commands(installed, "add", "rule")[0]
    assert first["chain"] == "r0" and "vmap" in first["expr"][0]


def test_the_switch_is_a_chain_of_its_own_that_renew_rewrites_alone() -> None:
    t = Table("web", nft.kernel_rules({"limit": 100}))
    doc = nft.install(t, {"limit": Rate(50)}, deadline=1_900_000_000)
    alive = [r for r in commands(doc, "add", "rule") if r["chain"] == "alive"]
    assert alive[0]["expr"][0]["match"] == {
        "op": ">",
        "left": {"meta": {"key": "time"}},
        "right": 1_900_000_000,
    }
    jumps = [r for r in commands(doc, "add", "rule") if {"jump": {"target": "alive"}} in r["expr"]]
    assert len(jumps) == 1 and jumps[0]["chain"] == "filter"
    renewed = nft.renew(t, 1_900_000_004)
    assert [list(c) for c in renewed["nftables"]] == [["flush"], ["add"]]
    assert "alive" not in str(nft.install(t, {"limit": Rate(50)}))  # no deadline, no switch
