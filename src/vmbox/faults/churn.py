"""The replica churn fault: kill -9 a random replica every few seconds under load.

Registered in vmbox.faults. Three replicas (even split, limit 100/s per source,
lease TTL 2 s) serve four sources offering 1.5 x the limit over eight flows each
for 60 s (small: 17 s). Every 3-5 s (small: 3 s) a random registered replica
gets SIGKILL, never the last one; the controller reaps it, revokes its member
lease and starts it again with backoff. What is measured:

- traffic: every whole second of the load, the kills' included, the upstream
  receives at least FLOOR of sources x limit;
- the limit: the upstream's total over the run against sources x limit x seconds
  must stay within 10% (the row's over_limit is what passed above that), and no
  single second may pass more than sources x limit (the strict per-second count
  of traffic.over_limit, after its one-window carry, must be 0);
- membership: a watch on the members prefix must see each killed replica's key
  deleted (or replaced by its restart's) within the lease TTL of the kill;
- processes: the controller restarted one replica per kill, the service ends
  with its replicas registered and ready, and once it has stopped no replica
  process of it is left and no child of this process is a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Self

from vmbox.faults import FaultResult, Say, Scale, processes
from vmbox.faults.service import LIMIT, fault_service, fault_spec, steady_load
from vmbox.faults.snapshot import read_state, state_lost
from vmbox.faults.traffic import over_limit, received_between
from vmbox.state import keys
from vmbox.state.membership import list_members
from vmbox.state.store import StoreError
from vmbox.testbed import Service, readiness

SOURCES = 4
FLOWS = 8  # per source, so every replica sees every source
REPLICAS = 3
TOLERANCE = 1.10  # the issue's: the limit holds within 10% averaged over the run
PASSING = 0.5  # below this share of the limit over the run, traffic did not really pass
# The least share of SOURCES x LIMIT a second of the load may pass, kills included.
# A kill never takes the last replica, and the kernel moves a dead replica's
# flows to the others, which keep their shares of the window's group (a share
# grows only after the revoke, at a boundary): at worst one replica holds a third
# of the limit while its sibling has just joined and waits for its first whole
# window. Less the even split's unevenness (a source's 8 flows hash unevenly),
# a quarter. The row shows about 70% in the worst second.
FLOOR = 0.25
LEAD = 4.0  # seconds of load before the first kill: the baseline without kills
TAIL = 3.0  # seconds of load after the last kill may start
SETTLE = 20.0  # seconds the group gets to be whole again (restart backoff reaches 10 s)


@dataclass(frozen=True)
class Plan:
    seconds: float  # of load
    every: tuple[float, float]  # seconds between kills, drawn uniformly


PLANS = {"full": Plan(60.0, (3.0, 5.0)), "small": Plan(17.0, (3.0, 3.0))}


@dataclass(frozen=True)
class Kill:
    replica: str
    pid: int
    at: float  # time.monotonic() right after the SIGKILL


class MemberLog:
    """Follows the members prefix, keeping each event with the time it arrived."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.prefix = keys.members_prefix(service.spec.service)
        self.events: list[tuple[float, str, str, int | None]] = []  # at, kind, key, pid
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        _, revision = await self.service.store.get_prefix(self.prefix)
        self._task = asyncio.create_task(self._follow(revision + 1))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, revision: int) -> None:
        async for event in self.service.store.watch_prefix(self.prefix, revision):
            pid = None
            if event.kind == "put":
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    pid = int(json.loads(event.value).get("pid"))
            self.events.append((time.monotonic(), event.kind, event.key, pid))

    def gone_after(self, kill: Kill) -> float | None:
        """Seconds from the kill to its member key's deletion (or a put by another pid)."""
        key = keys.member_key(self.service.spec.service, kill.replica)
        for at, kind, event_key, pid in self.events:
            if event_key == key and at >= kill.at and (kind == "delete" or pid != kill.pid):
                return at - kill.at
        return None


async def _kill_one(service: Service, rng: random.Random, say: Say, started: float) -> Kill | None:
    """SIGKILL a random registered replica that the runtime runs, unless it is the last one."""
    members = await list_members(service.store, service.spec.service)
    running = service.runtime.running()
    # A member whose pid is the runtime's own child: never a stale key or a reused pid.
    candidates = sorted(
        (rid, state.pid)
        for rid, state in running.items()
        if state.pid is not None and rid in members and members[rid].info.get("pid") == state.pid
    )
    if len(members) < 2 or not candidates:
        say(
            f"replica churn: {len(members)} registered at {time.monotonic() - started:.1f} s; "
            "no kill this round"
        )
        return None
    rid, pid = rng.choice(candidates)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    kill = Kill(rid, pid, time.monotonic())
    say(
        f"replica churn: kill -9 {rid} (pid {pid}) at {kill.at - started:.1f} s, "
        f"{len(members)} registered"
    )
    return kill


async def _churn(service: Service, plan: Plan, say: Say) -> list[Kill]:
    """Kill a replica every plan.every seconds from LEAD until TAIL before the load ends."""
    rng = random.Random()
    started = time.monotonic()
    last_start = started + plan.seconds - TAIL
    kills: list[Kill] = []
    await asyncio.sleep(LEAD)
    while time.monotonic() <= last_start:
        kill = await _kill_one(service, rng, say, started)
        if kill is not None:
            kills.append(kill)
        await asyncio.sleep(rng.uniform(*plan.every))
    return kills


async def _settle(service: Service, kills: int) -> tuple[int, float]:
    """Wait (SETTLE at most) for a restart per kill and every replica ready; (ready, seconds)."""
    started = time.monotonic()
    deadline = started + SETTLE
    while True:
        ready, whole = 0, False
        with contextlib.suppress(StoreError):
            seen = await readiness(service.store, service.spec.service)
            ready, whole = len(seen.ready), seen.complete(REPLICAS)
        restarted = service.controller.restarts >= kills
        if (whole and restarted) or time.monotonic() > deadline:
            return ready, time.monotonic() - started
        await asyncio.sleep(0.2)


async def churn(scale: Scale, say: Say) -> FaultResult:
    """kill -9 a random replica every few seconds under load; the service carries on."""
    plan = PLANS[scale]
    result = FaultResult("replica churn")
    async with fault_service(lambda: fault_spec("churn", REPLICAS)) as service:
        name, etcd = service.spec.service, ",".join(service.store.endpoints)
        before = await read_state(service.store, name)
        low, high = plan.every
        say(
            f"replica churn: {REPLICAS} replicas, {SOURCES} sources at 1.5 x {LIMIT}/s, "
            f"a kill -9 every {low:g}-{high:g} s for {plan.seconds:g} s"
        )
        async with MemberLog(service) as members:
            began = time.time()
            load = asyncio.create_task(
                steady_load(service.spec.relay.listen, SOURCES, plan.seconds, FLOWS)
            )
            try:
                kills = await _churn(service, plan, say)
                await load
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
            ready, settled = await _settle(service, len(kills))
        delays = [members.gone_after(kill) for kill in kills]
        restarts = service.controller.restarts
        after = await read_state(service.store, name)
        history = list(service.echo.history)
        ttl = service.spec.lease_ttl
    leaks = await processes.leaks(name, etcd)
    first, last = int(began) + 1, int(began + plan.seconds) - 1
    result.injected = len(kills)
    result.state_lost = state_lost(before, after)
    _judge(result, history, (first, last), delays, ttl)
    _baseline(result, history, (first, int(began + LEAD) - 1), last)
    _judge_processes(result, restarts, ready, settled, leaks)
    return result


def _judge(
    result: FaultResult,
    history: list[tuple[int, int]],
    seconds: tuple[int, int],
    delays: list[float | None],
    ttl: int,
) -> None:
    """Traffic, the limit and the member keys."""
    first, last = seconds
    counts = received_between(history, first, last)
    allowed = SOURCES * LIMIT
    total, budget = sum(counts), allowed * len(counts)
    strict = over_limit(history, lambda s: allowed if first <= s <= last else None)
    ratio = total / budget if budget else 0.0
    worst = min(counts, default=0) / allowed
    known = [delay for delay in delays if delay is not None]
    slowest = max(known, default=0.0) if len(known) == len(delays) else float("inf")
    result.over_limit = max(0, total - int(TOLERANCE * budget))
    result.survived = worst > 0
    result.figures.update(
        kills=len(delays),
        ratio=ratio,
        strict_over=strict,
        received=total,
        budget=budget,
        measured_s=len(counts),
        min_second_fraction=worst,
        worst_member_delay=slowest,
        lease_ttl=ttl,
    )
    result.check(
        worst >= FLOOR,
        f"second {counts.index(min(counts)) + first} of the load passed "
        f"{min(counts):,} of {allowed:,} (at least {FLOOR:.0%} must pass)"
        if counts
        else "no second of the load was measured",
    )
    # The design's bound, second by second: a window's shares come from its
    # group at the window's start and add up to the limit; a killed replica's
    # share is not reclaimed before its lease is revoked and the guard settles
    # at a boundary, and a restarted one admits nothing in the window it joins.
    result.check(strict == 0, f"{strict:,} packets passed over the limit within single seconds")
    result.check(ratio <= TOLERANCE, f"the upstream received {ratio:.0%} of the limit")
    result.check(ratio >= PASSING, f"only {ratio:.0%} of the limit passed over the run")
    result.check(len(delays) >= 3, f"only {len(delays)} kill(s) happened")
    missing = len(delays) - len(known)
    result.check(not missing, f"{missing} killed replica(s)' member key never went away")
    result.check(slowest <= ttl, f"a member key outlived its replica by {slowest:.1f} s > {ttl} s")
    result.notes += [
        f"{total:,} of {budget:,} allowed over {len(counts)} s ({ratio:.1%}); "
        f"per-second strict: {strict:,} over",
        f"worst second {min(counts, default=0):,} of {allowed:,}; member key gone "
        f"{slowest:.2f} s after a kill at the latest (TTL {ttl} s)",
    ]


def _baseline(
    result: FaultResult, history: list[tuple[int, int]], lead: tuple[int, int], last: int
) -> None:
    """The share of the limit that passed before the first kill and after it: the kills' cost.

    Under the even split some flows of a source share a replica, so even
    without kills a little less than the limit passes; the difference after
    the first kill is what the kills took (each makes the group run a replica
    short until the next window boundary, then holds the restarted one at
    nothing for the window it joins in).
    """
    allowed = SOURCES * LIMIT
    before = received_between(history, *lead)
    during = received_between(history, lead[1] + 1, last)
    if not before or not during or not result.injected:
        return
    base = sum(before) / (allowed * len(before))
    churned = sum(during) / (allowed * len(during))
    cost = max(0.0, base - churned) * len(during) / result.injected
    result.figures.update(baseline_ratio=base, churn_ratio=churned, seconds_per_kill=cost)
    result.notes.append(
        f"{base:.0%} of the limit before the first kill, {churned:.0%} after: "
        f"each kill cost {cost:.2f} s of the group's traffic"
    )


def _judge_processes(
    result: FaultResult, restarts: int, ready: int, settled: float, leaks: list[str]
) -> None:
    """Restarts, the final group and leftover processes."""
    kills = result.injected
    result.figures.update(restarts=restarts, leaked=len(leaks), ready_at_end=ready)
    whole = ready == REPLICAS and restarts >= kills
    result.survived = result.survived and whole
    result.check(
        whole,
        f"after {settled:.0f} s, {ready} of {REPLICAS} replicas ready and "
        f"{restarts} restart(s) for {kills} kill(s)",
    )
    result.check(restarts <= kills, f"{restarts} restarts for {kills} kills: a replica crashed")
    result.problems.extend(leaks)
    result.notes.append(
        f"{restarts} restarts for {kills} kills, {ready} ready "
        f"{settled:.1f} s after the load; {len(leaks)} processes left"
    )
