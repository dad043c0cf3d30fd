"""The controller's sampling loop: monitor every replica, publish the samples, autoscale.

Owned by vmbox.control.controller, which runs `ScaleLoop.run()` beside its
reconcile loop. Every interval it takes one sample per replica
(vmbox.control.monitor), writes them to /vmbox/<service>/samples for
`vmbox status`, and, when the spec has an `autoscale:` section, feeds the
pure policy (vmbox.control.autoscale). A decision is written to the desired
key (the same key `vmbox scale` writes) and recorded as an event carrying
the values that caused it. The loop runs without autoscaling too: status and
the least-loaded choice of a replica to remove need the samples anyway.

Samples end `LEAD` seconds before the ticks of their interval (epoch-aligned,
vmbox.control.autoscale.next_sample_in), so a scale-up decided on one leaves
time for a warm spare to be promoted and registered before the window boundary
at which it can take its share; without spares, `LEAD_COLD`, so a new process
registers mid-window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vmbox.control.autoscale import Autoscaler, Decision, Policy, next_sample_in
from vmbox.control.monitor import Monitor, Sample, publish
from vmbox.runtime.base import Runtime
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.store import Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
# Seconds between a sample's end and the next tick: a decision's desired write,
# the controller's reaction (it watches that key), a spare's promotion and its
# registration and acks take 10-50 ms here.
LEAD = 0.15
# Without a warm spare a scale-up starts a process, which registers 0.8-1.1 s
# after the sample's end here (under load). Samples ending LEAD_COLD before a
# tick put that registration in the middle of a window, clear of the last
# margin before a boundary, past which a join waits a whole window
# (vmbox.state.epoch.registration_delay). Ending LEAD before a tick, as for
# spares, put it within 0.1 s of a boundary, on one side or the other at random:
# a reaction of 1.2 s or 2.2 s. Now it is about 1.6 s every time.
LEAD_COLD = 0.55

EventSink = Callable[..., Awaitable[None]]


@dataclass
class ScaleStats:
    """What the controller's /metrics shows about sampling and decisions."""

    samples: dict[str, Sample] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    value: float | None = None  # the aggregated metric value of the last sample
    last: Decision | None = None


class ScaleLoop:
    """Samples a service's replicas and, with `autoscale:`, moves its desired count."""

    def __init__(
        self,
        spec: Spec,
        store: Store,
        runtime: Runtime,
        *,
        current: Callable[[], int],
        decided: Callable[[int], None],
        event: EventSink,
    ) -> None:
        self.spec = spec
        self.store = store
        self.monitor = Monitor(spec.service, store, runtime)
        self.current = current
        self.decided = decided
        self.event = event
        self.autoscaler = Autoscaler(Policy.from_spec(spec)) if spec.autoscale else None
        self.interval = spec.autoscale.interval if spec.autoscale else DEFAULT_INTERVAL
        self.stats = ScaleStats()

    def respec(self, spec: Spec) -> None:
        """Follow a spec `vmbox apply` changed: a new policy keeps the cooldown running."""
        old, self.spec = self.autoscaler, spec
        self.autoscaler = Autoscaler(Policy.from_spec(spec)) if spec.autoscale else None
        if old is not None and self.autoscaler is not None:
            self.autoscaler.last_change = old.last_change
        self.interval = spec.autoscale.interval if spec.autoscale else DEFAULT_INTERVAL

    def load(self) -> dict[str, float]:
        """Each replica's load as the policy sees it (packets/s without autoscale)."""
        metric = self.spec.autoscale.metric if self.spec.autoscale else "pps"
        out: dict[str, float] = {}
        for rid, sample in self.stats.samples.items():
            value = sample.value(metric)
            if value is not None:
                out[rid] = value
        return out

    async def step(self) -> Decision | None:
        """One sample of every replica, published, then one policy decision."""
        samples = await self.monitor.sample()
        self.stats.samples = samples
        with contextlib.suppress(StoreError):
            await publish(self.store, self.spec.service, samples)
        if self.autoscaler is None or self.spec.autoscale is None:
            return None
        values = list(self.load().values())
        self.stats.value = max(values) if values else None
        decision = self.autoscaler.observe(time.monotonic(), self.current(), values)
        if decision is not None:
            await self._apply(decision)
        return decision

    async def _apply(self, decision: Decision) -> None:
        await self.store.put(keys.desired_key(self.spec.service), str(decision.desired).encode())
        self.decided(decision.desired)
        self.stats.decisions[decision.direction] += 1
        self.stats.last = decision
        assert self.spec.autoscale is not None
        by_replica = {rid: round(v, 3) for rid, v in self.load().items()}
        await self.event(
            f"scale-{decision.direction}",
            f"autoscale {decision.current} -> {decision.desired}: {decision.reason}",
            old=decision.current,
            new=decision.desired,
            metric=self.spec.autoscale.metric,
            value=round(decision.value, 3),
            values=by_replica,
            since=time.time() - (time.monotonic() - decision.since),
        )

    async def run(self) -> None:
        """Sample every interval until cancelled; one failed step never ends the loop."""
        took = 0.0  # how long a step takes, smoothed: the next one starts that much early
        while True:
            started = time.monotonic()
            try:
                await self.step()
            except StoreError as exc:
                log.warning("sampling failed: %s", exc)
            except Exception:  # a bug here must not take down the reconcile loop
                log.exception("sampling failed")
            took = 0.7 * took + 0.3 * (time.monotonic() - started)
            lead = LEAD if self.spec.replicas.warm else LEAD_COLD
            await asyncio.sleep(next_sample_in(time.time(), self.interval, lead, took))
