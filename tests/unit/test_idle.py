"""Middlebox.idle: per-source state goes once time has made it stale, and no verdict changes."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from vmbox.functions import get_function
from vmbox.group import Group
from vmbox.middlebox import Middlebox
from vmbox.packet import Packet, Verdict

CONFIGS: dict[str, dict[str, object]] = {
    "fixed window": {"limit": 20},
    "token bucket": {"limit": 20, "algorithm": "token_bucket", "burst": 5},
    "rules": {
        "limit": 20,
        "rules": [
            {
                "name": "web",
                "match": {"proto": "udp", "dport": 80},
                "action": "ratelimit",
                "limit": 7,
            },
        ],
    },
}


def build(config: dict[str, object]) -> Middlebox:
    mb = get_function("ratelimit").build(config, Group(("r1", "r2"), "r1"))
    mb.start(1000.0)
    return mb


def verdicts(
    mb: Middlebox, packets: list[tuple[float, Packet]], idle_at: Callable[[float], bool]
) -> list[Verdict]:
    out = []
    for now, packet in packets:
        if idle_at(now):
            mb.idle(now - 0.001)
        verdict = mb.process(packet, now)
        assert isinstance(verdict, Verdict)  # a ratelimit never waits
        out.append(verdict)
    return out


@pytest.mark.parametrize("kind", CONFIGS)
def test_idle_calls_never_change_a_verdict(kind: str) -> None:
    rng = random.Random(7)
    now, packets = 1001.0, []
    for _ in range(3000):
        now += rng.choice((0.0005, 0.002, 0.01, 0.01, 0.02, 1.2))
        src = f"10.0.0.{rng.randrange(6)}"
        packets.append((now, Packet(src, 1000, 64, 17, "10.9.9.9", rng.choice((80, 53)))))
    plain = verdicts(build(CONFIGS[kind]), packets, lambda now: False)
    tidied = verdicts(build(CONFIGS[kind]), packets, lambda now: rng.random() < 0.3)
    assert plain == tidied
    assert Verdict.DROP in plain and Verdict.PASS in plain  # the limits did bind


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_quiet_replica_lets_go_of_its_sources(kind: str) -> None:
    mb = build(CONFIGS[kind])
    for n in range(500):
        mb.process(Packet(f"10.1.{n // 250}.{n % 250}", 1000, 64, 17, "10.9.9.9", 80), 1001.2)
    assert mb.gauges()["sources"] >= 500
    mb.idle(1001.9)  # the same window: nothing is stale yet
    assert mb.gauges()["sources"] >= 500
    mb.idle(1004.0)  # windows later, with no packet since
    assert mb.gauges()["sources"] == 0
