"""A fenced write on the memory store: real fenced views ack it, a silent member's expiring
lease fences it out, a member that neither acks nor expires times it out; and how
`vmbox set` finds the item and checks the value."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import until
from vmbox.cli.setitem import SetError, find_item, parse_value, result_line
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.spec import load_spec
from vmbox.state import keys
from vmbox.state.fencewait import write_fenced
from vmbox.state.memory import MemoryStore
from vmbox.state.views import FencedView, make_view

SERVICE, ITEM = "t", "limit"
TTL = 1
EXAMPLE = Path(__file__).parents[2] / "examples" / "rules.yaml"


@contextlib.asynccontextmanager
async def replicas(store: MemoryStore, names: list[str]) -> AsyncIterator[list[FencedView]]:
    """Fenced views registered as members on their own leases, kept alive by their probes."""
    views, tasks = [], []
    for name in names:
        lease = await store.grant_lease(TTL)
        await store.put(keys.member_key(SERVICE, name), b"{}", lease=lease)
        view = make_view(
            "fenced",
            store,
            keys.state_key(SERVICE, ITEM),
            FixedWindow.state[0],
            100,
            ttl=TTL,
            ack_key=keys.fence_key(SERVICE, ITEM, name),
        )
        assert isinstance(view, FencedView)
        view.lease_of = lambda lease=lease: lease  # type: ignore[misc]
        views.append(view)
        tasks.append(asyncio.create_task(view.run()))
    try:
        await until(lambda: all(not v.closed for v in views), 2)
        yield views
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_every_replica_acks_and_the_wait_ends() -> None:
    store = MemoryStore()

    async def main() -> None:
        async with replicas(store, ["r1", "r2", "r3"]) as views:
            result = await write_fenced(store, SERVICE, ITEM, b"0", timeout=2)
            assert result.done and result.acked == {"r1", "r2", "r3"} and not result.fenced_out
            assert result.seconds < 0.5
            # The ack means applied: each view holds the value now.
            assert [v.value for v in views] == [0, 0, 0]
            line = result_line(SERVICE, ITEM, b"0", result)
            assert "acked: r1 r2 r3; fenced out: none" in line

    asyncio.run(main())


def test_a_member_that_never_acks_is_fenced_out_when_its_lease_expires() -> None:
    store = MemoryStore()

    async def main() -> None:
        async with replicas(store, ["r1"]):
            ghost = await store.grant_lease(TTL)  # registered, then cut off: no keep-alive
            await store.put(keys.member_key(SERVICE, "ghost"), b"{}", lease=ghost)
            result = await write_fenced(store, SERVICE, ITEM, b"5", timeout=3)
            assert result.done and result.acked == {"r1"} and result.fenced_out == {"ghost"}
            assert 0.5 < result.seconds < 1.5  # the lease's TTL

    asyncio.run(main())


def test_a_member_alive_but_silent_times_the_wait_out() -> None:
    store = MemoryStore()

    async def main() -> None:
        async with replicas(store, ["r1"]):
            await store.put(keys.member_key(SERVICE, "mute"), b"{}")  # no lease: never expires
            result = await write_fenced(store, SERVICE, ITEM, b"5", timeout=0.3)
            assert not result.done and result.waiting == {"mute"} and result.acked == {"r1"}
            assert result.seconds >= 0.3

    asyncio.run(main())


def test_items_by_name_or_by_rule_and_values_checked_as_replicas_do() -> None:
    spec = load_spec(EXAMPLE)
    names = [rule.name for rule in spec.limiter.rules or () if rule.action == "ratelimit"]
    assert names, "the example has ratelimit rules"
    assert find_item(spec, names[0]).name == f"rules.{names[0]}.limit"
    assert find_item(spec, f"rules.{names[0]}.limit").name == f"rules.{names[0]}.limit"
    with pytest.raises(SetError, match="no shared item or rule limit 'nope'") as error:
        find_item(spec, "nope")
    assert error.value.code == 2
    item = find_item(spec, names[0])
    assert parse_value(item, "0") == b"0" and parse_value(item, "+050") == b"50"
    for bad in ("abc", "-1", "1.5", str(10**10)):
        with pytest.raises(SetError, match=f"^rules.{names[0]}.limit: "):
            parse_value(item, bad)


def test_a_fenced_spec_cannot_fail_open() -> None:
    from vmbox.spec import SpecError, parse_spec

    base = {
        "service": "web",
        "listen": "127.0.0.1:9000",
        "upstream": "127.0.0.1:9100",
        "middlebox": {"limit": 5, "consistency": "fenced"},
    }
    assert parse_spec(base | {"fail": "closed"}, "t").limiter.consistency == "fenced"
    with pytest.raises(SpecError, match="fail: open would pass what a fenced item must hold"):
        parse_spec(base | {"fail": "open"}, "t")
