"""vmbox.spec.changes: what `vmbox apply` would change in a running service, field by field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmbox.spec import parse_spec
from vmbox.spec.changes import MISSING, diff, template_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return data


def edited(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[leaf] = value
    return out


def kinds(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    return {c.path: c.kind for c in diff(parse_spec(old), parse_spec(new)).changes}


def test_the_same_spec_changes_nothing_and_keeps_its_template() -> None:
    spec = parse_spec(raw("rules.yaml"))
    assert diff(spec, parse_spec(raw("rules.yaml"))).empty
    assert template_of(spec) == template_of(parse_spec(raw("rules.yaml")))


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("middlebox.limit", 50, {"middlebox.limit": "live"}),
        ("middlebox.rules.2.limit", 20000, {"middlebox.rules[lab-bytes].limit": "live"}),
        ("middlebox.consistency", "fenced", {"middlebox.consistency": "rollout"}),
        ("middlebox.algorithm", "token_bucket", {"middlebox.algorithm": "rollout"}),
        ("fail", "closed", {"fail": "rollout"}),
        ("replicas.max", 6, {"replicas.max": "controller"}),
        ("listen", "127.0.0.1:9003", {"listen": "refused"}),
        ("middlebox.window", "2s", {"middlebox.window": "refused"}),
        ("upstream", "127.0.0.1:9301", {"upstream": "refused"}),
    ],
)
def test_each_field_has_the_kind_of_who_reads_it(path: str, value: Any, expected: Any) -> None:
    old = raw("rules.yaml")
    assert kinds(old, edited(old, path, value)) == expected


def test_a_limit_change_keeps_the_template_and_a_rollout_change_does_not() -> None:
    old = raw("rules.yaml")
    base = template_of(parse_spec(old))
    assert template_of(parse_spec(edited(old, "middlebox.limit", 7))) == base
    assert template_of(parse_spec(edited(old, "middlebox.rules.2.limit", 7))) == base
    assert template_of(parse_spec(edited(old, "replicas.max", 9))) == base
    assert template_of(parse_spec(edited(old, "middlebox.consistency", "fenced"))) != base
    assert template_of(parse_spec(edited(old, "middlebox.rules.1.match.src", "127.0.0.3/32"))) != (
        base
    )


def test_a_rule_added_is_a_rollout_and_shows_as_added_fields() -> None:
    old = raw("rules.yaml")
    new = copy.deepcopy(old)
    new["middlebox"]["rules"].insert(
        0,
        {"name": "dns", "match": {"proto": "udp", "dport": 53}, "action": "ratelimit", "limit": 10},
    )
    changes = diff(parse_spec(old), parse_spec(new))
    added = [c for c in changes.changes if c.path.startswith("middlebox.rules[dns]")]
    assert added and all(c.old is MISSING for c in added)
    assert {c.kind for c in added} == {"rollout", "live"}  # its limit is a seed, the rule is not
    assert any(c.line().startswith("+ middlebox.rules[dns].action: ratelimit") for c in added)
    assert not changes.refusal


def test_the_refusal_names_every_immutable_field_and_why() -> None:
    old = raw("ratelimit.yaml")
    new = edited(edited(old, "listen", "127.0.0.1:9999"), "middlebox.window", "2s")
    new = edited(new, "middlebox.limit", 5)
    changes = diff(parse_spec(old), parse_spec(new))
    line = changes.refusal
    assert "listen (127.0.0.1:9000 -> 127.0.0.1:9999" in line
    assert "middlebox.window (1.0 -> 2.0: every replica's windows must begin together)" in line
    assert "middlebox.limit" not in line and "nothing was written" in line
    assert "\n" not in line


def test_lines_read_as_a_diff() -> None:
    old = raw("ratelimit.yaml")
    changes = diff(parse_spec(old), parse_spec(edited(old, "middlebox.limit", 50)))
    assert [c.line() for c in changes.changes] == [
        "~ middlebox.limit: 100 -> 50  (live: written to its state key; replicas apply it "
        "from their watch)"
    ]
