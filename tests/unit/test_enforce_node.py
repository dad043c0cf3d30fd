"""NodeDriver with a recording enforcer: which nft transactions each change makes, and the
counters it keeps across re-installs. No namespace, no nft (the real ones:
tests/integration/test_kernel_service.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from vmbox import netns
from vmbox.enforce.kernel import EnforceError, KernelEnforcer, Reading, SourceRates
from vmbox.enforce.nftables import Count, Rate, Table, kernel_rules
from vmbox.enforce.node import NodeDriver, NodeGone, alive_for
from vmbox.packet import Verdict

TABLE = Table("web", kernel_rules({"limit": 100}))


class Recording(KernelEnforcer):
    """Records each step; `counts` is what the current table has counted."""

    def __init__(self) -> None:
        super().__init__("node", TABLE)
        self.steps: list[str] = []
        self.counts = 0
        self.fail_next = False
        self.deadline: int | None = None

    def _step(self, what: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise EnforceError("nft: refused")
        self.steps.append(what)

    async def install(
        self,
        rates: Mapping[str, Rate],
        *,
        closed: bool = False,
        sources: SourceRates | None = None,
        deadline: int | None = None,
    ) -> None:
        self._step(f"install {'closed' if closed else rates['limit'].amount}{_own(sources)}")
        self.counts = 0
        self.deadline = deadline

    async def renew(self, deadline: int) -> None:
        self._step(f"renew {deadline}")
        self.deadline = deadline

    async def set_rates(
        self, rates: Mapping[str, Rate] | None, sources: SourceRates | None = None
    ) -> None:
        self._step(f"rates {rates['limit'].amount if rates else '-'}{_own(sources)}")

    async def remove(self) -> None:
        self._step("remove")
        self.counts = 0

    async def read(self, *, sources: bool = True) -> Reading:
        rules = {"limit": {"matched": self.counts, "dropped": self.counts // 2}}
        seen, dropped = Count(self.counts, 10 * self.counts), Count(self.counts // 2, 0)
        offered = {"limit": {"198.18.0.9": Count(self.counts, 64 * self.counts)}}
        return Reading(rules, offered if sources else {}, {}, seen, dropped)


def _own(sources: SourceRates | None) -> str:
    """The sources with a rate of their own, as ` 198.18.0.9:40`."""
    own = sorted((a, r.amount) for rates in (sources or {}).values() for a, r in rates.items())
    return "".join(f" {a}:{n}" for a, n in own)


def driver() -> tuple[NodeDriver, Recording, dict[str, int]]:
    share = {"limit": 50}
    enforcer = Recording()
    node = NodeDriver(enforcer, lambda: {"limit": Rate(share["limit"])})
    return node, enforcer, share


def test_a_share_change_is_one_transaction_and_no_change_is_none() -> None:
    async def run() -> list[str]:
        node, enforcer, share = driver()
        await node.sync()
        await node.sync()  # nothing changed: nothing run
        share["limit"] = 100
        await node.sync()
        await node.sync()
        return enforcer.steps

    assert asyncio.run(run()) == ["install 50", "rates 100"]


def test_fail_policies_close_remove_and_reinstall_the_table() -> None:
    async def run() -> tuple[list[str], list[str]]:
        node, enforcer, _ = driver()
        await node.sync()
        states: list[str] = [node.state]
        for verdict in (Verdict.DROP, None, Verdict.PASS, Verdict.PASS, None):
            node.fail(verdict)
            await node.sync()
            states.append(node.state)
        return enforcer.steps, states

    steps, states = asyncio.run(run())
    assert steps == ["install 50", "install closed", "install 50", "remove", "install 50"]
    assert states == ["enforcing", "closed", "enforcing", "removed", "removed", "enforcing"]


def test_counters_add_up_across_re_installs() -> None:
    async def run() -> tuple[int, int, dict[str, int]]:
        node, enforcer, _ = driver()
        await node.sync()
        enforcer.counts = 10
        await node.read()
        enforcer.counts = 30  # counted since, not yet read: read before the table goes
        node.fail(Verdict.DROP)
        await node.sync()
        enforcer.counts = 4
        await node.read()
        totals = node.totals
        return totals.seen.packets, totals.dropped.packets, node.rule_counters()["limit"]

    seen, dropped, rule = asyncio.run(run())
    assert (seen, dropped) == (34, 17)
    assert rule == {"matched": 34, "dropped": 17}


def test_a_leaving_replica_leaves_its_table_closed_and_a_failed_step_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(netns, "exists", lambda name: True)  # the node is there

    async def run() -> list[str]:
        node, enforcer, share = driver()
        await node.sync()
        node._task = asyncio.create_task(node._run())
        enforcer.fail_next = True
        share["limit"] = 25
        node.changed()
        for _ in range(100):  # the failed step is tried again after a pause
            await asyncio.sleep(0.01)
            if "rates 25" in enforcer.steps:
                break
        await node.stop(close=True)
        await node.stop(close=True)  # once closed, nothing more
        return enforcer.steps

    steps = asyncio.run(asyncio.wait_for(run(), 10))
    assert steps == ["install 50", "rates 25", "rates 0"]


def test_a_node_that_vanishes_under_its_table_is_reported_once_a_step_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    there = {"node": True}
    monkeypatch.setattr(netns, "exists", lambda name: there[name])
    gone: list[NodeGone] = []

    async def run() -> tuple[str, list[str]]:
        enforcer, share = Recording(), {"limit": 50}
        node = NodeDriver(enforcer, lambda: {"limit": Rate(share["limit"])}, on_gone=gone.append)
        await node.start()
        there["node"] = False
        enforcer.fail_next = True
        share["limit"] = 100
        node.changed()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if gone:
                break
        await node.stop(close=True)  # no table to close any more: nothing run
        with pytest.raises(NodeGone, match="does not exist"):
            await node.start()
        return node.state, enforcer.steps

    state, steps = asyncio.run(asyncio.wait_for(run(), 10))
    assert len(gone) == 1 and "node" in str(gone[0])
    assert state == "absent" and steps == ["install 50"]


def test_demand_sources_move_in_the_same_transaction_and_a_small_rise_waits() -> None:
    """A source's own rate is applied when it falls, and when it rises by 2% or more; a
    wobble under that keeps the rate in force (each new rate restarts its bucket)."""

    async def run() -> tuple[list[str], list[tuple[str, dict[str, int]]]]:
        enforcer = Recording()
        share, own = {"limit": 50}, {"198.18.0.9": 90}
        offered: list[tuple[str, dict[str, int]]] = []
        node = NodeDriver(
            enforcer,
            lambda: {"limit": Rate(share["limit"])},
            sources=lambda: {"limit": {a: Rate(n) for a, n in own.items()}},
            on_offered=lambda rule, counts: offered.append((rule, dict(counts))),
        )
        await node.sync()  # installed with the source's own rate
        own["198.18.0.9"] = 91  # +1.1%: kept at 90
        await node.sync()
        own["198.18.0.9"] = 92  # +2.2%: applied
        await node.sync()
        own["198.18.0.9"] = 91  # lower: applied at once
        share["limit"] = 40  # with the rule's rate, in one transaction
        await node.sync()
        own.clear()  # out of the reports: back to the rule's rate
        await node.sync()
        enforcer.counts = 7
        await node.gather()
        node.fail(Verdict.DROP)
        await node.sync()
        await node.gather()  # closed: nothing read
        return enforcer.steps, offered

    steps, offered = asyncio.run(run())
    assert steps == [
        "install 50 198.18.0.9:90",
        "rates - 198.18.0.9:92",
        "rates 40 198.18.0.9:91",
        "rates -",
        "install closed",
    ]
    assert offered == [("limit", {"198.18.0.9": 7})]


def test_failing_nft_backs_off_and_warns_once_per_run_of_failures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nft missing: the retry waits 0.2, 0.4, 0.8 ... up to 5 s, one warning, and one line
    when it works again."""
    monkeypatch.setattr(netns, "exists", lambda name: True)
    pauses: list[float] = []

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    async def run() -> list[bool]:
        node, enforcer, _ = driver()
        monkeypatch.setattr(asyncio, "sleep", no_wait)
        outcomes = []
        for _ in range(7):
            enforcer.fail_next = True
            outcomes.append(await node._logged(node.sync()))
        outcomes.append(await node._logged(node.sync()))
        return outcomes

    with caplog.at_level("DEBUG", logger="vmbox.enforce.node"):
        outcomes = asyncio.run(run())
    assert outcomes == [False] * 7 + [True]
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "nft: refused" in warnings[0].getMessage()
    assert any("works again after 7 failed" in r.getMessage() for r in caplog.records)


def test_the_dead_mans_switch_is_set_at_install_and_renewed_while_the_driver_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table installed alive_for seconds ahead (whole seconds, rounded down), renewed
    RENEWALS times a span by the running driver; none while closed by a stop, none without
    a switch; the span is 2 lease TTLs, 2 s at least."""
    monkeypatch.setattr(netns, "exists", lambda name: True)
    wall = {"now": 1_000.7}

    async def run() -> tuple[list[str], int | None]:
        enforcer = Recording()
        node = NodeDriver(
            enforcer, lambda: {"limit": Rate(50)}, alive_for=0.4, wall=lambda: wall["now"]
        )
        await node.start()  # installed with its deadline
        wall["now"] = 1_003.2
        await asyncio.sleep(0.35)  # about 3 renewals (every 0.1 s)
        await node.stop(close=False)
        return enforcer.steps, enforcer.deadline

    steps, deadline = asyncio.run(asyncio.wait_for(run(), 10))
    assert steps[0] == "install 50" and deadline == 1_003
    renewals = [s for s in steps if s.startswith("renew")]
    assert 2 <= len(renewals) <= 4 and set(renewals) == {"renew 1003"}, steps
    plain = NodeDriver(Recording(), lambda: {"limit": Rate(50)})
    assert plain.deadline() is None
    assert (alive_for(2), alive_for(3), alive_for(0.5)) == (4.0, 6.0, 2.0)
