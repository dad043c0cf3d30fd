"""The corrupt etcd values fault: garbage written by hand with etcdctl as a shared item.

Registered in vmbox.faults. Two replicas (watch mode, limit 100/s per source)
serve a steady load from two sources while etcdctl writes values that are not
a limit to /vmbox/<service>/state/limit: `abc`, an empty value, a number too
big to be one, a negative number (and, at full scale, more of the same kind).
After each, every replica must report the bad key (the gauge
vmbox_state_bad_values and a `bad value for <key>` log line) and keep its last
good limit. Then a good value (60) is written: every replica must apply it,
and a bad value after it must keep 60, not go back to the spec's 100; last,
the key is repaired (60 again), which is the state expected at the end. The
upstream may receive 100 per source per second until the good value, 60 after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from vmbox.faults import FaultResult, Say, Scale
from vmbox.faults.sampler import ReplicaSampler, finish
from vmbox.faults.service import LIMIT, fault_service, fault_spec, steady_load
from vmbox.faults.snapshot import read_state
from vmbox.faults.traffic import over_limit, received_between
from vmbox.state import keys
from vmbox.testbed import Service, etcdctl, until_second

SOURCES = 2
REPLICAS = 2
GOOD = 60  # the good value written after the bad ones
BAD_SMALL = ("abc", "", "99999999999999999999", "-5")
BAD_FULL = (*BAD_SMALL, "1.5", "12 packets", "0x40", "9" * 5000, "-0")
SEEN_WITHIN = 3.0  # seconds every replica gets to report a bad value or apply a good one


Metrics = dict[str, float]


def _limit_is(value: int) -> Callable[[Metrics], bool]:
    return lambda metrics: metrics.get("vmbox_limit") == value


def _bad_values_at_least(count: int) -> Callable[[Metrics], bool]:
    return lambda metrics: metrics.get("vmbox_state_bad_values", 0.0) >= count


async def _inject(
    service: Service, watch: ReplicaSampler, values: Sequence[str], kept: int, result: FaultResult
) -> None:
    """Write each bad value with etcdctl; every replica must report it and keep `kept`."""
    key = keys.state_key(service.spec.service, "limit")
    for value in values:
        await etcdctl(service.store.endpoints, "put", "--", key, value)
        result.injected += 1
        shown = _shown(value)
        reported = await watch.until_every(_bad_values_at_least(result.injected), SEEN_WITHIN)
        result.check(reported is not None, f"not every replica reported the bad value {shown}")
        limits = {rid: metrics.get("vmbox_limit") for rid, metrics in watch.last.items()}
        kept_all = all(limit == kept for limit in limits.values())
        result.check(kept_all, f"after {shown} the limits were {limits}, not {kept}")


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 20 else f"'{value[:6]}...' ({len(value)} chars)"


def _logged(service: Service, key: str) -> dict[str, int]:
    """Lines `bad value for <key>` in each replica's log."""
    counts = {}
    for rid in service.runtime.running():
        path = service.runtime.log_dir / f"{rid}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        counts[rid] = text.count(f"bad value for {key}")
    return counts


async def corrupt_values(scale: Scale, say: Say) -> FaultResult:
    """etcdctl writes garbage as the limit; replicas report it and keep the last good one."""
    bad = BAD_FULL if scale == "full" else BAD_SMALL
    result = FaultResult("corrupt etcd values")
    async with fault_service(lambda: fault_spec("corrupt", REPLICAS)) as service:
        key = keys.state_key(service.spec.service, "limit")
        before = await read_state(service.store, service.spec.service)
        async with ReplicaSampler(service) as watch:
            say(f"corrupt etcd values: {len(bad) + 1} bad values for {key} under load")
            started = int(time.time())
            load = asyncio.create_task(
                steady_load(service.spec.relay.listen, SOURCES, 60.0, flows=32)
            )
            try:
                await asyncio.sleep(1.0)
                await _inject(service, watch, bad, LIMIT, result)
                await until_second(0.5)
                await etcdctl(service.store.endpoints, "put", key, str(GOOD))
                good_at = int(time.time())
                applied = await watch.until_every(_limit_is(GOOD), SEEN_WITHIN)
                missed = f"not every replica applied the good value {GOOD}"
                result.check(applied is not None, missed)
                await _inject(service, watch, bad[:1], GOOD, result)
                # The operator repairs the key; a new revision of the same value changes nothing.
                await etcdctl(service.store.endpoints, "put", key, str(GOOD))
                await asyncio.sleep(2.5)  # whole windows at the new limit
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
            ended = int(time.time()) - 1  # the last second was cut short
            logged = _logged(service, key)
        after = await read_state(service.store, service.spec.service)
        history = list(service.echo.history)

    def allowed(second: int) -> int | None:
        if not started <= second <= ended:
            return None
        return SOURCES * (LIMIT if second <= good_at else GOOD)

    result.over_limit = over_limit(history, allowed)
    # What the replicas counted, beside what was written: each bad value once
    # (a view reports a revision once, not per read), by every replica.
    counted = [metrics.get("vmbox_state_bad_values", 0.0) for metrics in watch.last.values()]
    result.figures.update(
        bad_values_min=min(counted, default=0.0), bad_values_max=max(counted, default=0.0)
    )
    result.check(
        len(counted) == REPLICAS and set(counted) == {result.injected},
        f"the replicas counted {counted} bad values; {result.injected} were written",
    )
    _judge(result, history, good_at, ended, logged)
    result.notes.insert(0, "values: " + ", ".join(_shown(value) for value in bad))
    return finish(result, watch, before, after, written={"state/limit": str(GOOD).encode()})


def _judge(
    result: FaultResult,
    history: list[tuple[int, int]],
    good_at: int,
    ended: int,
    logged: dict[str, int],
) -> None:
    result.check(
        all(count >= result.injected for count in logged.values()),
        f"bad value log lines per replica {logged}, want {result.injected} each",
    )
    at_good = received_between(history, good_at + 1, ended)
    share = min(at_good, default=0) / (SOURCES * GOOD)
    result.survived = share >= 0.8
    result.check(result.survived, f"at the good limit only {share:.0%} passed")
    kept = "kept its last good limit" if not result.problems else "see the problems"
    result.notes += [
        f"every replica reported each bad value and {kept}",
        f"then {GOOD} applied: {min(at_good, default=0)} of {SOURCES * GOOD}/s at the worst; "
        f"log lines {sorted(logged.values())}",
    ]
