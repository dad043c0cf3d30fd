"""`enforce: kernel` in a real kernel: vmbox.enforce's table in a node namespace under load.

A client - node - server triple (tests/integration/nftlab.py, root; skipped
otherwise, failed under CI), the table on the node's client-side interface, a
Python UDP sender in the client and a counter at the server. Limits here are a
token bucket of `BURST` packets: any second admits at most rate + BURST, and a
source flooding from the start admits rate + BURST in its first second.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from tests.integration import nftlab
from tests.integration.labs import host_network_state
from vmbox.enforce import nftables as nft
from vmbox.enforce.kernel import EnforceError, KernelEnforcer, apply, run_nft
from vmbox.enforce.nftables import Count, KernelRule, Rate, Table

BURST = 5
LIMIT = 100
NODE_IF = "g-c"  # the node's client side (nftlab)


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a loop of its own, bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


@pytest.fixture(scope="module")
def node() -> Iterator[nftlab.Triple]:
    before = host_network_state()
    with nftlab.triple() as names:
        yield names
    assert host_network_state() == before, "the kernel tests changed the host's namespace"


def enforcer(names: nftlab.Triple, service: str, **kwargs: Any) -> KernelEnforcer:
    rules = nft.kernel_rules({"limit": LIMIT})
    return KernelEnforcer(names.node, Table(service, rules, interface=NODE_IF, **kwargs))


async def ruleset(ns: str) -> list[dict[str, Any]]:
    listing = await run_nft(ns, ["list", "ruleset"])
    return [item for item in listing["nftables"] if "metainfo" not in item]


def offered_at(
    names: nftlab.Triple, rx: nftlab.Receiver, rate: float, seconds: float
) -> threading.Thread:
    thread = threading.Thread(target=nftlab.send, args=(names.client, rate, seconds, rx.start))
    thread.start()
    return thread


@on_loop
async def test_documents_pass_nfts_own_check(node: nftlab.Triple) -> None:
    rules = [
        {"name": "ssh", "action": "accept", "match": {"proto": "tcp", "dport": 22}},
        {"name": "bad", "action": "drop", "match": {"src": "198.18.5.0/24", "proto": "icmp"}},
        {"name": "dns", "action": "ratelimit", "limit": 50, "match": {"dport": "53-54"}},
        {"name": "big", "action": "ratelimit", "limit": 5000, "unit": "bytes"},
        {
            "name": "v6",
            "action": "ratelimit",
            "limit": 9,
            "shadow": True,
            "match": {"src": "2001:2::/48", "dst": "2001:2:0:2::1/128"},
        },
        {"name": "log", "action": "drop", "shadow": True},
        {
            "name": "none",
            "action": "ratelimit",
            "limit": 1,
            "match": {"src": "198.18.0.0/15", "dst": "2001:2::/48"},
        },
    ]
    table = Table("check", nft.kernel_rules({"rules": rules, "limit": 100}), interface=NODE_IF)
    rates = {r.name: Rate(7, "minute", 2) for _, r in table.limited()} | {"dns": Rate(0)}
    await apply(node.node, nft.install(table, rates), check=True)
    assert await ruleset(node.node) == []  # -c commits nothing
    kernel = KernelEnforcer(node.node, table)
    await kernel.install(rates)
    try:
        await apply(node.node, nft.set_rates(table, {"dns": Rate(3)}, 2), check=True)
        await kernel.set_rates({r.name: Rate(11) for _, r in table.limited()})
        names = {i["set"]["name"] for i in await ruleset(node.node) if "set" in i}
        # none (r6) has a v4 and a v6 CIDR: no sets, no rule in the base chain.
        assert names == {f"r{i}g2v{v}" for i in (2, 3, 7) for v in (4, 6)} | {"r4g2v6"}
    finally:
        await kernel.remove()
    assert await ruleset(node.node) == []
    with pytest.raises(EnforceError, match="set_rates before install"):
        await kernel.set_rates({"dns": Rate(1)})


@on_loop
async def test_one_source_at_three_times_the_limit_is_held_to_it(node: nftlab.Triple) -> None:
    kernel = enforcer(node, "steady")
    await kernel.install({"limit": Rate(LIMIT, "second", BURST)})
    try:
        with nftlab.Receiver(node.server) as rx:
            sender = offered_at(node, rx, 3 * LIMIT, 3)
            await asyncio.to_thread(sender.join)
            await asyncio.sleep(0.2)
        seconds = rx.per_second(0, 3)
        print(f"offered {3 * LIMIT}/s, limit {LIMIT}/s burst {BURST}: received {seconds}")
        assert seconds[0] <= LIMIT + BURST
        assert all(abs(n - LIMIT) <= 0.05 * LIMIT for n in seconds), seconds
        reading = await kernel.read()
        assert reading.offered["limit"][nftlab.CLIENT].packets >= 3 * LIMIT * 3 * 0.95
        counts = reading.rules["limit"]
        assert counts["passed"] == sum(rx.seconds.values())
        assert counts["dropped"] == counts["matched"] - counts["passed"] > 0
        assert (await kernel.read()).offered["limit"] == {}  # offered since the last read
    finally:
        await kernel.remove()


@on_loop
async def test_a_rate_change_under_load_admits_within_old_and_new(node: nftlab.Triple) -> None:
    """100 -> 50 at 1.5 s, 50 -> 100 at 3.5 s, 300/s offered: no second over max + burst."""
    kernel = enforcer(node, "resize")
    await kernel.install({"limit": Rate(LIMIT, "second", BURST)})
    changes: list[tuple[float, float, int]] = []  # (begun, done) since start, and the new rate
    try:
        with nftlab.Receiver(node.server) as rx:
            sender = offered_at(node, rx, 3 * LIMIT, 5)
            for at, rate in ((1.5, LIMIT // 2), (3.5, LIMIT)):
                await asyncio.sleep(rx.start + at - time.monotonic())
                begun = time.monotonic() - rx.start
                await kernel.set_rates({"limit": Rate(rate, "second", BURST)})
                changes.append((begun, time.monotonic() - rx.start, rate))
            await asyncio.to_thread(sender.join)
            await asyncio.sleep(0.2)
        seconds = rx.per_second(0, 5)
        print(f"received {seconds}; changes (begun, done, rate) {changes}")
        # Each rate may be in force from its change's begin to the next change's end (a
        # change lands somewhere in between, which a busy machine can stretch).
        regimes = [(0.0, changes[0][1], LIMIT)] + [
            (begun, changes[i + 1][1] if i + 1 < len(changes) else 9.0, rate)
            for i, (begun, _, rate) in enumerate(changes)
        ]
        exact = 0
        for second, n in enumerate(seconds):
            rates = {rate for a, b, rate in regimes if a < second + 1 and b > second}
            assert n <= max(rates) + BURST, (second, seconds, changes)
            if len(rates) == 1 and second > 0:  # one rate all second: held to it
                assert abs(n - max(rates)) <= 0.05 * LIMIT, (second, seconds, changes)
                exact += 1
        assert exact >= 1, (seconds, changes)
        assert kernel.generation == 3
    finally:
        await kernel.remove()


@on_loop
async def test_a_source_with_a_rate_of_its_own_follows_it_and_falls_back(
    node: nftlab.Triple,
) -> None:
    """split: demand: the source's own chain at 40/s, then 80/s, then none (the rule's 100/s),
    300/s offered throughout; its offered packets are read back from its chain's counter."""
    kernel = enforcer(node, "own", demand=True)
    rule = Rate(LIMIT, "second", BURST)
    await apply(node.node, nft.install(kernel.table, {"limit": rule}), check=True)
    await kernel.install({"limit": rule}, sources={"limit": {nftlab.CLIENT: Rate(40, burst=2)}})
    changes: list[tuple[float, float]] = []
    offered = 0  # read before each change too: a slot's counter goes with its slot

    async def read() -> None:
        nonlocal offered
        offered += (await kernel.read()).offered["limit"].get(nftlab.CLIENT, Count()).packets

    try:
        with nftlab.Receiver(node.server) as rx:
            sender = offered_at(node, rx, 3 * LIMIT, 4.5)
            for at, own in ((1.5, {nftlab.CLIENT: Rate(80, burst=2)}), (3.0, {})):
                await asyncio.sleep(rx.start + at - time.monotonic())
                begun = time.monotonic() - rx.start
                await read()
                await kernel.set_rates(None, {"limit": own})
                changes.append((begun, time.monotonic() - rx.start))
            await asyncio.to_thread(sender.join)
            await asyncio.sleep(0.2)
            await read()
        seconds = rx.per_second(0, 4)
        print(f"own 40/s, 80/s at 1.5 s, the rule's 100/s at 3 s: {seconds}; changes {changes}")
        assert changes[0][1] < 2.0 and changes[1][1] < 3.5, changes  # else the seconds mix
        assert abs(seconds[0] - 40) <= 2 + 2 and abs(seconds[2] - 80) <= 4
        assert seconds[1] <= 80 + 2  # max(old, new) + burst: the new rate's bucket starts full
        assert abs(seconds[3] - LIMIT) <= 0.05 * LIMIT + BURST
        assert kernel.slots == {"limit": {}} and kernel.generation == 1
        # Every packet offered, through the chain's counter or the set's element.
        assert offered >= 3 * LIMIT * 4.5 * 0.9, offered
    finally:
        await kernel.remove()


@on_loop
async def test_the_dead_mans_switch_drops_everything_past_its_deadline_until_renewed(
    node: nftlab.Triple,
) -> None:
    """Installed with a deadline 1-2 s ahead and not renewed: the table drops every packet
    after it (counted as dropped); renewed, it enforces the limit again."""
    kernel = enforcer(node, "alive")
    deadline = math.floor(time.time()) + 2
    await kernel.install({"limit": Rate(LIMIT, "second", BURST)}, deadline=deadline)
    try:
        with nftlab.Receiver(node.server) as rx:
            sender = offered_at(node, rx, 3 * LIMIT, 7)
            expired_at = rx.start + (deadline - time.time())  # on the monotonic clock
            # Past the first whole second after the deadline: that one must be empty.
            first_dead = math.ceil(expired_at - rx.start)
            await asyncio.sleep(rx.start + first_dead + 1.2 - time.monotonic())
            dead = await kernel.read(sources=False)
            await kernel.renew(math.floor(time.time()) + 30)
            renewed_at = time.monotonic() - rx.start
            await asyncio.to_thread(sender.join)
            await asyncio.sleep(0.2)
        seconds = rx.per_second(0, 7)
        print(f"expired at {expired_at - rx.start:.2f} s, renewed at {renewed_at:.2f}: {seconds}")
        assert seconds[first_dead] == 0, seconds
        assert renewed_at > first_dead + 1, (renewed_at, seconds)
        assert abs(seconds[6] - LIMIT) <= 0.05 * LIMIT + BURST, seconds
        assert dead.dropped.packets > dead.rules["limit"]["dropped"] > 0  # the switch's too
    finally:
        await kernel.remove()


@on_loop
async def test_a_flood_of_sources_stays_within_the_set_size(node: nftlab.Triple) -> None:
    size, count = 4096, 10_000
    kernel = enforcer(node, "flood", size=size)
    await kernel.install({"limit": Rate(LIMIT, "second", BURST)})
    try:
        with nftlab.Receiver(node.server) as rx:
            begun = time.monotonic()
            sent = await asyncio.to_thread(nftlab.flood, node.client, nftlab.sources(count))
            spent = time.monotonic() - begun
            await asyncio.sleep(0.2)
        reading = await kernel.read()
        counts = reading.rules["limit"]
        print(f"{sent} sources in {spent:.2f} s: {reading.sources} elements, {counts}")
        assert sent == count and counts["matched"] == count
        assert reading.sources["limit"] <= size
        assert len(reading.offered["limit"]) == reading.sources["limit"]
        # The sources the full set could not take share one bucket at a source's rate.
        assert counts["overflow"] >= count - size - (LIMIT * (spent + 0.5) + BURST)
        assert counts["passed"] <= size + LIMIT * (spent + 0.5) + BURST
        assert sum(rx.sources.values()) <= counts["passed"]  # a Python receiver may lose some
    finally:
        await kernel.remove()
    assert await ruleset(node.node) == []


@on_loop
async def test_idle_sources_leave_after_the_timeout(node: nftlab.Triple) -> None:
    kernel = enforcer(node, "idle", timeout=1)
    await kernel.install({"limit": Rate(LIMIT, "second", BURST)})
    try:
        await asyncio.to_thread(nftlab.flood, node.client, nftlab.sources(100))
        assert 0 < (await kernel.read()).sources["limit"] <= 100
        await asyncio.sleep(2.0)  # the set's timeout is 1 s
        assert (await kernel.read()).sources == {"limit": 0}
    finally:
        await kernel.remove()


@on_loop
async def test_errors_are_one_line(node: nftlab.Triple) -> None:
    with pytest.raises(EnforceError) as missing:
        await run_nft(node.node + "-absent", ["list", "ruleset"])
    assert "\n" not in str(missing.value)
    bad = {"nftables": [{"add": {"chain": {"family": "inet", "table": "nope", "name": "x"}}}]}
    with pytest.raises(EnforceError) as refused:
        await apply(node.node, bad)
    assert "\n" not in str(refused.value) and "No such file" in str(refused.value)
    table = Table("closed", (KernelRule("limit", "ratelimit"),), interface=NODE_IF)
    kernel = KernelEnforcer(node.node, table)
    await kernel.install({"limit": Rate(0)})  # a share of 0: everything dropped
    try:
        assert (await kernel.read()).sources == {"limit": 0}
    finally:
        await kernel.remove()
