"""middlebox.rules end to end: two rules on loopback sources through the UDP relay, a real
etcd and a replica process, and one rule's limit changed live with etcdctl.

Sources come from the load tool (127.0.0.2 + offset): 127.0.0.2 falls in the ratelimit
rule's 127.0.0.0/30, 127.0.0.8 in the drop rule's 127.0.0.8/29.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer
from vmbox.state import keys
from vmbox.testbed import etcdctl
from vmbox.tools.load import LoadPlan, LoadResult, run_load

RULES = [
    {"name": "limited", "match": {"src": "127.0.0.0/30"}, "action": "ratelimit", "limit": 30},
    {"name": "blocked", "match": {"proto": "udp", "src": "127.0.0.8/29"}, "action": "drop"},
]


def rule_counts(address: str) -> dict[tuple[str, str], float]:
    """(rule, verdict) -> packets, from a replica's /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {
        (s.labels["rule"], s.labels["verdict"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vmbox_rule_packets_total"
    }


def test_two_rules_and_a_live_per_rule_limit(etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> tuple[LoadResult, LoadResult, dict[tuple[str, str], float]]:
        spec = make_spec("rules", 1, limit=None, rules=RULES)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            key = keys.state_key(spec.service, "rules.limited.limit")
            assert await etcdctl(etcd.endpoints, "get", "--print-value-only", key) == "30\n"
            target = spec.relay.listen
            limited = asyncio.create_task(
                run_load(LoadPlan(target=target, rate=100, flows=4, duration=8.0))
            )
            blocked = asyncio.create_task(
                run_load(LoadPlan(target=target, rate=50, flows=2, duration=8.0, source_offset=6))
            )
            await asyncio.sleep(4.0)
            await etcdctl(etcd.endpoints, "put", key, "60")  # only this rule's limiter sees it
            results = await asyncio.gather(limited, blocked)
            (member,) = (await svc.members()).values()
            counts = await asyncio.to_thread(rule_counts, str(member.info["metrics"]))
            return results[0], results[1], counts

    limited, blocked, counts = asyncio.run(scenario())
    per_second = [s.received for s in limited.seconds]
    print(f"limited: received/s {per_second}; blocked: {blocked.received} of {blocked.sent}")
    print(f"rule counts {counts}")
    # Second 0 may meet the replica's first window; 1-2 under 30, 5-7 under 60.
    assert all(abs(c - 30) <= 3 for c in per_second[1:3]), per_second
    assert all(abs(c - 60) <= 4 for c in per_second[5:8]), per_second
    assert blocked.sent >= 350 and blocked.received == 0
    assert counts[("blocked", "dropped")] == blocked.sent
    assert counts[("limited", "passed")] == limited.received
    assert counts[("limited", "dropped")] == limited.sent - limited.received
    assert counts[("(unmatched)", "passed")] == 0
