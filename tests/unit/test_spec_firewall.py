"""`function: firewall` and chains in the spec: each problem one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmbox.spec import SpecError, load_spec, parse_spec
from vmbox.spec.changes import diff
from vmbox.spec.items import limit_of, spec_items

EXAMPLE = Path(__file__).parents[2] / "examples" / "firewall.yaml"
FIREWALL = {"function": "firewall", "allow": [{"proto": "tcp", "dport": 80}]}


def inpath(middlebox: Any, **gateway: Any) -> dict[str, Any]:
    return {
        "service": "fw",
        "dataplane": "nfqueue",
        "gateway": {"namespace": "gw"} | gateway,
        "middlebox": middlebox,
    }


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "fw.yaml")
    return str(caught.value).removeprefix("fw.yaml: ")


def test_the_example_is_a_chain_of_ratelimit_then_firewall() -> None:
    spec = load_spec(EXAMPLE)
    assert [s.function for s in spec.chain] == ["ratelimit", "firewall"]
    assert spec.firewall is not None and spec.firewall.state == "shared"
    assert spec.ratelimit is spec.limiter and spec.window == 1.0
    assert [f.item.name for f in spec_items(spec)] == ["rules.udp-clients.limit"]
    assert limit_of(spec) == "1 rules + firewall (4 allowed)"


def test_one_section_or_a_list_mean_the_same_for_one_function() -> None:
    one = parse_spec(inpath({"limit": 5}, interface="gw-c"))
    listed = parse_spec(inpath([{"limit": 5}], interface="gw-c"))
    assert one == listed and len(one.chain) == 1 and diff(one, listed).empty


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            {
                "service": "fw",
                "listen": "127.0.0.1:1",
                "upstream": "127.0.0.1:2",
                "middlebox": FIREWALL,
            },
            "middlebox: function firewall sits in the packet path: use dataplane: nfqueue",
        ),
        (inpath(FIREWALL, interface="gw-c"), "gateway.interface: function firewall must see"),
        (inpath([{"limit": 5}, {"limit": 6}]), "middlebox: 1.function: ratelimit is already"),
        (inpath({"function": "nat"}), "middlebox: function: unknown middlebox function 'nat'"),
        (inpath([]), "middlebox: needs at least one function"),
        (inpath([{"limit": 5}, FIREWALL | {"state": "global"}]), "middlebox.1.state: "),
        (inpath(FIREWALL | {"timeouts": {"tcp_syn": "0s"}}), "middlebox.timeouts.tcp_syn: "),
        (inpath(FIREWALL | {"allow": [{"proto": "icmp", "dport": 1}]}), "middlebox.allow.0.dport:"),
        (
            inpath([{"limit": 5}, FIREWALL], namespace="n{n}", enforce="kernel"),
            "middlebox: enforce: kernel runs the ratelimit function alone",
        ),
    ],
)
def test_a_bad_chain_or_firewall_is_one_line_naming_the_field(
    data: dict[str, Any], line: str
) -> None:
    assert refused(data).startswith(line), refused(data)


def test_adding_a_function_to_a_running_chain_is_refused_live() -> None:
    old = parse_spec(inpath({"limit": 5}))
    new = parse_spec(inpath([{"limit": 5}, FIREWALL]))
    change = diff(old, new)
    assert "middlebox.function (ratelimit -> ratelimit,firewall" in change.refusal


def test_a_chains_live_items_are_its_ratelimits_limits() -> None:
    old = parse_spec(inpath([{"limit": 5}, FIREWALL]))
    new = parse_spec(inpath([{"limit": 7}, FIREWALL]))
    (only,) = diff(old, new).changes
    assert (only.path, only.kind) == ("middlebox.ratelimit.limit", "live")
    allowed = parse_spec(inpath([{"limit": 5}, FIREWALL | {"allow": []}]))
    (rolled,) = {c.kind for c in diff(old, allowed).changes}
    assert rolled == "rollout"
