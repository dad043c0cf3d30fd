"""The partition fault: one replica cut off from etcd while it keeps receiving traffic.

Registered in vmbox.faults, once per fail policy. Two replicas (even split,
limit 100/s, lease TTL 2 s, store_timeout 1.5 s) serve one source offering 1.5 x
the limit over eight flows, so SO_REUSEPORT gives each replica some of them.
The controller runs one; the fault starts the other itself (a second
LocalRuntime, which the controller does not count) with a Blackhole proxy
(vmbox.faults.blackhole) as its etcd endpoint, so nothing on the host changes.
After LEAD s the proxy is cut: the replica's connections stay open and nothing
answers, for longer than store_timeout, the fence deadline (TTL/2) and the
lease TTL. Early in the cut the limit is lowered to 50, then the proxy heals.

- `static` and `closed` run `consistency: fenced`: the write goes through
  vmbox set's own path (write_fenced) and must return only once the cut
  replica is fenced out (its lease gone, after its fence closed); from then on
  the cut replica must pass nothing until the heal, and the upstream must
  never receive more than the limit in force in any second, the cut's included.
- `open` runs `consistency: watch` (a fenced spec with fail: open is refused;
  the row checks that it is): the cut replica passes everything once
  store_timeout has passed, as `open` says. The upstream is held to the limit
  outside the cut, and during it what the other replica passed (the upstream's
  count less the cut replica's own) must stay within the limit.

Every row: the cut replica is still the same process at the end, applied the
fail policy during the cut, admits again after the heal (registered again,
under the new limit), and nothing in etcd is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from vmbox.faults import FaultResult, Say, Scale, processes
from vmbox.faults.blackhole import Blackhole
from vmbox.faults.sampler import ReplicaSampler, finish
from vmbox.faults.service import LIMIT, steady_load
from vmbox.faults.snapshot import read_state
from vmbox.faults.traffic import over_limit, received_between
from vmbox.metrics import ScrapeError, scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec, SpecError, parse_spec
from vmbox.state import keys
from vmbox.state.fence import fence_deadline
from vmbox.state.fencewait import FenceResult, write_fenced
from vmbox.testbed import (
    Service,
    free_udp_port,
    private_store,
    running_service,
    store_access,
    wait_ready,
)

Policy = Literal["static", "closed", "open"]

CUT_ID = "cut"  # the replica behind the proxy
NEW_LIMIT = LIMIT // 2  # written during the cut
FLOWS = 8
TTL = 2
STORE_TIMEOUT = 1.5
WRITE_AFTER = 0.2  # seconds into the cut the new limit is written
FENCE_TIMEOUT = TTL + 3.0  # vmbox set's default: a partitioned replica's lease is gone by then
SAMPLE_EVERY = 0.1  # seconds between scrapes of the cut replica's counters
PASSED = "vmbox_packets_passed_total"


@dataclass(frozen=True)
class Plan:
    lead: float  # seconds of load before the cut
    cut: float  # seconds the proxy is blackholed
    after: float  # seconds of load after the heal


PLANS = {"full": Plan(3.0, 8.0, 6.0), "small": Plan(1.5, 3.5, 3.5)}


@dataclass
class Marks:
    """Wall-clock moments of the run (time.time()) and the cut replica's counter series."""

    began: float = 0.0
    cut: float = 0.0
    returned: float = 0.0  # the write of NEW_LIMIT returned to its writer
    healed: float = 0.0
    ended: float = 0.0
    series: list[tuple[float, float]] = field(default_factory=list)  # (time, passed)
    at: dict[str, dict[str, float]] = field(default_factory=dict)  # moment -> metrics

    def passed_between(self, start: float, end: float) -> float:
        """What the cut replica passed from `start` to `end`, by its nearest samples."""
        return _passed_at(self.series, end) - _passed_at(self.series, start)


def _passed_at(series: list[tuple[float, float]], moment: float) -> float:
    """The cut replica's counter at the last sample taken at or before `moment`."""
    value = series[0][1] if series else 0.0
    for at, passed in series:
        if at > moment:
            break
        value = passed
    return value


def partition_spec(service: str, policy: Policy, consistency: str) -> Spec:
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"function": "ratelimit", "limit": LIMIT, "consistency": consistency},
            "replicas": {"count": 1, "min": 1, "max": 4},
            "lease_ttl": TTL,
            "store_timeout": STORE_TIMEOUT,
            "fail": policy,
        },
        f"fault {service}",
    )


def fenced_open_refused() -> str | None:
    """The one line a fenced spec with fail: open is refused with (None: it was accepted)."""
    try:
        partition_spec("refused", "open", "fenced")
    except SpecError as exc:
        return str(exc)
    return None


@asynccontextmanager
async def cut_replica(service: Service, proxy: Blackhole) -> AsyncIterator[LocalRuntime]:
    """The second replica, on the proxy's endpoint, ready; stopped (and left) afterwards."""
    runtime = LocalRuntime(
        service.spec.service,
        [proxy.endpoint],
        service.log_dir,
        adoptable=False,  # dies with this process
        access=store_access(service.store.endpoints),  # the private etcd's user and file
    )
    try:
        runtime.start(CUT_ID)
        await wait_ready(service.store, service.spec.service, 2)
        yield runtime
    finally:
        await asyncio.to_thread(runtime.stop_all)


async def _metrics(address: str) -> dict[str, float]:
    try:
        return await scrape(address)
    except ScrapeError:
        return {}


async def _follow(address: str, marks: Marks) -> None:
    """Scrape the cut replica's passed counter every SAMPLE_EVERY s (cancelled by the owner)."""
    while True:
        values = await _metrics(address)
        if PASSED in values:
            marks.series.append((time.time(), values[PASSED]))
        await asyncio.sleep(SAMPLE_EVERY)


async def _mark(marks: Marks, moment: str, address: str) -> float:
    """Record `moment` now, with the cut replica's metrics scraped at it."""
    now = time.time()
    values = await _metrics(address)
    marks.at[moment] = values
    if PASSED in values:
        marks.series.append((now, values[PASSED]))
    return now


async def _write(service: Service, fenced: bool) -> FenceResult | None:
    """The new limit: through vmbox set's fenced path, or a plain put (what watch gets)."""
    name = service.spec.service
    if fenced:
        return await write_fenced(
            service.store, name, "limit", str(NEW_LIMIT).encode(), FENCE_TIMEOUT
        )
    await service.store.put(keys.state_key(name, "limit"), str(NEW_LIMIT).encode())
    return None


async def _inject(
    service: Service, proxy: Blackhole, plan: Plan, fenced: bool, address: str, say: Say
) -> tuple[Marks, FenceResult | None]:
    """Load, cut, write, heal, load on; the moments and the cut replica's counters."""
    marks = Marks()
    seconds = plan.lead + plan.cut + plan.after
    follower = asyncio.create_task(_follow(address, marks))
    marks.began = time.time()
    load = asyncio.create_task(steady_load(service.spec.relay.listen, 1, seconds, FLOWS))
    try:
        await asyncio.sleep(plan.lead)
        marks.cut = await _mark(marks, "cut", address)
        proxy.cut()
        say(f"partition: {CUT_ID} cut off from etcd for {plan.cut:g} s")
        await asyncio.sleep(WRITE_AFTER)
        fence = await _write(service, fenced)
        marks.returned = await _mark(marks, "returned", address)
        await asyncio.sleep(max(0.0, marks.cut + plan.cut - time.time()))
        marks.healed = await _mark(marks, "healed", address)
        proxy.heal()
        await load
        marks.ended = await _mark(marks, "ended", address)
    finally:
        for task in (load, follower):
            task.cancel()
        await asyncio.gather(load, follower, return_exceptions=True)
    return marks, fence


async def partition(policy: Policy, plan: Plan, say: Say) -> FaultResult:
    """Cut one replica off from etcd under load, write a new limit, heal; judge each phase."""
    fenced = policy != "open"
    consistency = "fenced" if fenced else "watch"
    result = FaultResult(f"partition ({policy})")
    name = f"partition-{policy}"
    async with (
        private_store() as store,
        Blackhole(_target(store.endpoints[0])) as proxy,
        running_service(store, lambda: partition_spec(name, policy, consistency)) as service,
        cut_replica(service, proxy),
    ):
        address = str((await service.members())[CUT_ID].info["metrics"])
        before = await read_state(store, name)
        say(f"partition: {consistency}, fail {policy}, 2 replicas, one source at 1.5 x {LIMIT}/s")
        async with ReplicaSampler(service) as sampler:
            marks, fence = await _inject(service, proxy, plan, fenced, address, say)
        after = await read_state(store, name)
        history = list(service.echo.history)
        members = await service.members()
    leaks = await processes.leaks(name, proxy.endpoint)  # the cut replica
    leaks += await processes.leaks(name, ",".join(store.endpoints))  # the controller's
    result.injected = 1
    result.survived = True
    result.problems.extend(leaks)
    result.check(CUT_ID in members, f"{CUT_ID} was not registered again after the heal")
    _judge(result, policy, marks, fence, history)
    written = {"state/limit": str(NEW_LIMIT).encode()}
    return finish(result, sampler, before, after, written)


def _target(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _judge(
    result: FaultResult,
    policy: Policy,
    marks: Marks,
    fence: FenceResult | None,
    history: list[tuple[int, int]],
) -> None:
    first, last = int(marks.began) + 1, int(marks.ended) - 1
    cut_s, healed_s = int(marks.cut), int(marks.healed)

    def limit_at(second: int) -> int:
        return LIMIT if second <= int(marks.returned) else NEW_LIMIT

    def allowed(second: int) -> int | None:
        if not first <= second <= last:
            return None
        if policy == "open" and cut_s <= second <= healed_s + 1:
            return None  # failing open: the cut replica passes what it gets (judged below)
        return limit_at(second)

    strict = over_limit(history, allowed)
    counts = received_between(history, first, last)
    during = marks.passed_between(marks.cut, marks.healed)
    after_write = marks.passed_between(marks.returned, marks.healed)
    after_heal = marks.passed_between(marks.healed, marks.ended)
    others_over = 0
    if policy == "open":
        echo_cut = sum(received_between(history, cut_s, healed_s + 1))
        own = marks.passed_between(float(cut_s), float(healed_s + 2))
        budget = sum(limit_at(second) for second in range(cut_s, healed_s + 2))
        others_over = max(0, echo_cut - int(own) - budget)
    result.over_limit = strict + others_over
    healed = marks.at.get("ended", {})
    at_heal = marks.at.get("healed", {})
    result.figures.update(
        strict_over=strict,
        others_over=others_over,
        cut_passed=during,
        cut_passed_after_write=after_write,
        cut_passed_after_heal=after_heal,
        cut_policy_active=at_heal.get("vmbox_fail_policy_active", 0.0),
        cut_limit_after=healed.get("vmbox_limit", -1.0),
        min_second=min(counts, default=0),
    )
    result.check(
        strict == 0,
        f"{strict:,} packets over the limit within single seconds (received/s from {first}: "
        f"{counts}; {LIMIT} until {int(marks.returned)}, then {NEW_LIMIT}; cut {cut_s}, "
        f"healed {healed_s})",
    )
    result.check(others_over == 0, f"the other replica passed {others_over:,} over the limit")
    result.check(
        at_heal.get("vmbox_fail_policy_active") == 1.0,
        f"the cut replica did not apply fail: {policy} before the heal",
    )
    result.check(after_heal > 0, f"{CUT_ID} admitted nothing after the heal")
    result.check(
        healed.get("vmbox_limit") == NEW_LIMIT,
        f"{CUT_ID} enforces limit {healed.get('vmbox_limit')} after the heal, not {NEW_LIMIT}",
    )
    if fence is not None:
        _judge_fence(result, marks, fence, after_write)
    else:
        refused = fenced_open_refused()
        result.check(refused is not None, "a fenced spec with fail: open was accepted")
        result.notes.append(f"fenced + open refused: {(refused or '').split(': ', 1)[-1]}")
    result.notes += [
        f"{CUT_ID} passed {during:.0f} during the {marks.healed - marks.cut:.1f} s cut "
        f"({after_write:.0f} after the write returned), {after_heal:.0f} in the "
        f"{marks.ended - marks.healed:.1f} s after the heal (limit {NEW_LIMIT} then)",
        f"upstream per second: {' '.join(str(count) for count in counts)}; {CUT_ID}'s: "
        + " ".join(f"{marks.passed_between(s, s + 1):.0f}" for s in range(first, last + 1)),
        f"seconds: cut in {cut_s - first + 1}, write returned in "
        f"{int(marks.returned) - first + 1}, healed in {healed_s - first + 1}",
    ]


def _judge_fence(result: FaultResult, marks: Marks, fence: FenceResult, after_write: float) -> None:
    """The fenced write returned once the cut replica was fenced out; it passed nothing since."""
    closed = marks.at.get("returned", {}).get("vmbox_state_fence_closed", 0.0)
    result.figures.update(
        fence_seconds=fence.seconds,
        fence_deadline=fence_deadline(TTL),
        fence_closed_at_return=closed,
    )
    result.check(fence.done, f"the fenced write timed out after {fence.seconds:.1f} s")
    result.check(
        CUT_ID in fence.fenced_out and CUT_ID not in fence.acked,
        f"the fenced write did not fence {CUT_ID} out "
        f"(acked {sorted(fence.acked)}, fenced out {sorted(fence.fenced_out)})",
    )
    result.check(closed >= 1, f"{CUT_ID}'s fenced limit was open when the write returned")
    result.check(
        after_write == 0,
        f"{CUT_ID} passed {after_write:.0f} under the superseded limit after the write returned",
    )
    result.notes.append(
        f"fenced write returned after {fence.seconds:.2f} s ({CUT_ID} fenced out: its lease "
        f"expired; fence deadline {fence_deadline(TTL):g} s, TTL {TTL} s)"
    )


async def partition_static(scale: Scale, say: Say) -> FaultResult:
    """fenced, fail: static: the cut replica's fence closes its limit; nothing over it."""
    return await partition("static", PLANS[scale], say)


async def partition_closed(scale: Scale, say: Say) -> FaultResult:
    """fenced, fail: closed: the cut replica drops everything; nothing over the limit."""
    return await partition("closed", PLANS[scale], say)


async def partition_open(scale: Scale, say: Say) -> FaultResult:
    """watch, fail: open: the cut replica passes everything; the other stays in its limit."""
    return await partition("open", PLANS[scale], say)
