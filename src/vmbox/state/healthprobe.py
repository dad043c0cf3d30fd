"""HealthProbe: the replica's loop that reads the store and applies the fail policy.

vmbox.replica runs one: every `probe_interval(store_timeout)` seconds a
linearizable read of the service's spec key, with a deadline; the verdict of
the pure `StoreHealth` (vmbox.state.health) goes to `apply` when the policy
starts and when it ends, with one log line each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from vmbox.packet import Verdict
from vmbox.state.health import (
    FAIL_VERDICTS,
    FailMode,
    StoreHealth,
    failing_line,
    probe_interval,
    recovered_line,
)
from vmbox.state.store import Store, StoreError

# The module's name before the pure decision and this loop were split: log lines keep it.
log = logging.getLogger("vmbox.state.health")


class HealthProbe:
    """Reads `key` every `interval` seconds and calls `apply` with the fail verdict.

    `apply(verdict)` is called when the policy starts (with FAIL_VERDICTS[mode])
    and when it ends (with None); the replica stores it where its packet path
    reads it. Never raises on store errors.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        timeout: float,
        mode: FailMode,
        apply: Callable[[Verdict | None], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.key = key
        self.mode = mode
        self.apply = apply
        self.clock = clock
        self.interval = probe_interval(timeout)
        self.deadline = max(self.interval, 0.2)  # a loaded machine must not look like an outage
        self.health = StoreHealth(timeout, clock())

    def down_for(self) -> float:
        return self.health.down_for(self.clock())

    @property
    def applying(self) -> bool:
        return self.health.applying

    async def probe(self) -> None:
        """One read, then act on what it means."""
        started = self.clock()
        try:
            await self.store.get(self.key, timeout=self.deadline)
        except StoreError as exc:
            self.health.failed_read(str(exc))
        else:
            self.health.succeeded(started)
        self.check()

    def check(self) -> None:
        """Apply or lift the policy if the store's health says so (also between reads)."""
        now = self.clock()
        transition = self.health.step(now)
        if transition == "failed":
            down = self.health.down_for(now)
            log.warning("%s", failing_line(self.mode, down, self.health.error))
            self.apply(FAIL_VERDICTS[self.mode])
        elif transition == "recovered":
            log.info("%s", recovered_line(self.mode, self.health.outage))
            self.apply(None)

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await self.probe()
            await asyncio.sleep(self.interval)
