"""middlebox.rules in the spec: each problem one line naming the field, and the example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmbox.dataplane.counters import Counters
from vmbox.metrics import _ReplicaCollector
from vmbox.spec import SpecError, load_spec, parse_spec

EXAMPLE = Path(__file__).parents[2] / "examples" / "rules.yaml"


def spec(**middlebox: Any) -> dict[str, Any]:
    return {
        "service": "web",
        "listen": "127.0.0.1:9000",
        "upstream": "127.0.0.1:9100",
        "middlebox": middlebox,
    }


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "action": "drop"} | fields


@pytest.mark.parametrize(
    ("middlebox", "error"),
    [
        ({}, r"middlebox\.limit: is required$"),
        ({"rules": []}, r"middlebox\.rules: needs at least one rule"),
        ({"rules": [rule(), rule()]}, r"middlebox\.rules: rule 1 has the name of rule 0: 'r'"),
        ({"rules": [rule(name="Web_1")]}, r"middlebox\.rules\.0\.name: must be lowercase"),
        ({"rules": [rule(name="limit")]}, r"middlebox\.rules\.0\.name: 'limit' is the rule"),
        ({"rules": [rule(action="reject")]}, r"middlebox\.rules\.0\.action: "),
        (
            {"rules": [rule(action="ratelimit")]},
            r"middlebox\.rules\.0: action ratelimit needs a limit",
        ),
        ({"rules": [rule(limit=5)]}, r"middlebox\.rules\.0\.limit: only with action ratelimit"),
        ({"rules": [rule(unit="bytes")]}, r"middlebox\.rules\.0\.unit: only with action ratelimit"),
        (
            {"rules": [rule(action="ratelimit", limit=0)]},
            r"middlebox\.rules\.0\.limit: .*greater than 0",
        ),
        ({"rules": [rule(action="ratelimit", limit=10**9 + 1)]}, r"middlebox\.rules\.0\.limit: "),
        (
            {"rules": [rule(action="ratelimit", limit=5, unit="frames")]},
            r"middlebox\.rules\.0\.unit: ",
        ),
        (
            {"rules": [rule(action="accept", shadow=True)]},
            r"middlebox\.rules\.0\.shadow: only with action drop",
        ),
        ({"rules": [rule(match={"proto": "gre"})]}, r"middlebox\.rules\.0\.match\.proto: "),
        (
            {"rules": [rule(match={"dport": 80})]},
            r"middlebox\.rules\.0\.match\.dport: only with proto tcp or udp",
        ),
        (
            {"rules": [rule(match={"proto": "icmp", "dport": 80})]},
            r"match\.dport: only with proto tcp",
        ),
        ({"rules": [rule(match={"proto": "tcp", "dport": 0})]}, r"match\.dport: ports lie between"),
        (
            {"rules": [rule(match={"proto": "tcp", "dport": "99-9"})]},
            r"match\.dport: range 99-9 is empty",
        ),
        (
            {"rules": [rule(match={"proto": "tcp", "dport": "80,443"})]},
            r"match\.dport: must be a port or a range",
        ),
        ({"rules": [rule(match={"src": "10.0.0.1/8"})]}, r"rules\.0\.match\.src: .*host bits set"),
        ({"rules": [rule(match={"dst": "example.com"})]}, r"rules\.0\.match\.dst: must be a CIDR"),
        ({"rules": [rule(match={"sport": 9})]}, r"rules\.0\.match\.sport: unknown field"),
        (
            {"rules": [rule(), rule(name="x", match={"src": "::1/129"})]},
            r"middlebox\.rules\.1\.match\.src: ",
        ),
    ],
)
def test_each_rule_problem_is_one_line_naming_the_field(
    middlebox: dict[str, Any], error: str
) -> None:
    with pytest.raises(SpecError, match=error) as caught:
        parse_spec(spec(**middlebox))
    assert "\n" not in str(caught.value)


def test_rules_normalise_and_survive_the_store_round_trip() -> None:
    rules = [
        rule(name="a", match={"proto": "tcp", "dport": " 8000 - 8099 ", "src": "2001:DB8::/32"}),
        rule(
            name="b",
            match={"proto": "udp", "dport": "53"},
            action="ratelimit",
            limit=9,
            unit="bytes",
        ),
    ]
    parsed = parse_spec(spec(limit=100, rules=rules))
    assert parsed.limiter.rules is not None
    a, b = parsed.limiter.rules
    assert (a.match.dport, a.match.src, b.match.dport) == ("8000-8099", "2001:db8::/32", 53)
    import json

    assert parse_spec(json.loads(parsed.to_json())) == parsed  # as a replica reads it from etcd


def test_the_rules_example_loads() -> None:
    loaded = load_spec(EXAMPLE)
    assert loaded.limiter.rules is not None and len(loaded.limiter.rules) >= 3
    assert {r.action for r in loaded.limiter.rules} == {"accept", "drop", "ratelimit"}


def test_rule_counters_are_exported_with_a_rule_label() -> None:
    counts = {"web": {"matched": 5, "passed": 3, "dropped": 2, "shadow_dropped": 0}}
    collector = _ReplicaCollector(["svc", "r1"], Counters(), dict, lambda: counts)
    samples = {
        (s.name, s.labels.get("rule"), s.labels.get("verdict")): s.value
        for family in collector.collect()
        for s in family.samples
        if s.name.startswith("vmbox_rule")
    }
    assert samples[("vmbox_rule_packets_total", "web", "dropped")] == 2
    assert samples[("vmbox_rule_packets_total", "web", "passed")] == 3
    assert samples[("vmbox_rule_matched_total", "web", None)] == 5
    plain = _ReplicaCollector(["svc", "r1"], Counters(), dict, dict)
    assert not [f for f in plain.collect() if f.name.startswith("vmbox_rule")]
