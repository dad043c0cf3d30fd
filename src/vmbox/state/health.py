"""Store health as a replica sees it, and the fail policy that follows from it.

Each replica (vmbox.replica) runs one `HealthProbe` (vmbox.state.healthprobe):
every `probe_interval(store_timeout)` seconds a cheap linearizable read of the
service's spec key, with a deadline. The views already notice a lost store, but
each in its own way (and `local` never does); the probe is the one place that
decides "etcd has been unreachable for longer than `store_timeout`", so every
consistency mode gets the spec's `fail` policy: `static` keeps deciding on the
last shares, `closed` drops every packet, `open` passes every packet.

Pure: `StoreHealth` is the decision (the time is passed in, so it is tested
with a fake clock), with the probe's interval, the fail verdicts and gauge
codes, and the two log lines. vmbox.state.healthprobe.HealthProbe is the thin
loop that reads, logs the two transitions, and hands the verdict to apply
(None: let the middlebox decide).
"""

from __future__ import annotations

from typing import Literal

from vmbox.packet import Verdict

FailMode = Literal["static", "closed", "open"]
Transition = Literal["failed", "recovered"]

# What a failed replica answers for every packet; None: the middlebox decides.
FAIL_VERDICTS: dict[str, Verdict | None] = {
    "static": None,
    "closed": Verdict.DROP,
    "open": Verdict.PASS,
}
# The `fail_mode` gauge, so `vmbox status` needs no spec to name the policy.
FAIL_MODE_CODES: dict[str, int] = {"static": 0, "closed": 1, "open": 2}
FAIL_MODE_NAMES: dict[int, str] = {code: mode for mode, code in FAIL_MODE_CODES.items()}
_DOING = {
    "static": "failing static (keeping the last shares)",
    "closed": "failing closed (dropping every packet)",
    "open": "failing open (passing every packet)",
}


def probe_interval(store_timeout: float) -> float:
    """Seconds between probes: at least three per timeout, at most one a second."""
    return min(1.0, store_timeout / 3)


class StoreHealth:
    """When the store last answered, and whether the fail policy applies now.

    `last_ok` is when the last successful read *started* (what it returned was
    true then). The store counts as down from the first failed read on; it is
    down for `now - last_ok`, and failed once that exceeds `timeout`.
    """

    def __init__(self, timeout: float, now: float) -> None:
        if timeout <= 0:
            raise ValueError(f"store timeout must be positive, got {timeout}")
        self.timeout = timeout
        self.last_ok = now
        self.error: str | None = None  # why the last read failed; None while it answers
        self.applying = False  # the fail policy is in force (what step() last decided)
        self.outage = 0.0  # how long the last outage lasted, once it is over

    def succeeded(self, started: float) -> None:
        """A read that started at `started` was answered."""
        if self.error is not None:
            self.outage = max(0.0, started - self.last_ok)
        self.last_ok = max(self.last_ok, started)
        self.error = None

    def failed_read(self, reason: str) -> None:
        """A read failed or missed its deadline."""
        self.error = reason

    def down_for(self, now: float) -> float:
        """Seconds since the store last answered, 0 while it answers."""
        if self.error is None:
            return 0.0
        return max(0.0, now - self.last_ok)

    def failed(self, now: float) -> bool:
        """Unreachable for longer than the timeout: the fail policy applies."""
        return self.down_for(now) > self.timeout

    def step(self, now: float) -> Transition | None:
        """Update `applying`; say so when it changes."""
        failed = self.failed(now)
        if failed == self.applying:
            return None
        self.applying = failed
        return "failed" if failed else "recovered"


def failing_line(mode: str, down: float, reason: str | None) -> str:
    """The one WARNING a replica logs when its fail policy starts to apply."""
    why = f" ({reason})" if reason else ""
    return f"etcd unreachable for {down:.1f}s: {_DOING[mode]} until it returns{why}"


def recovered_line(mode: str, down: float) -> str:
    """The one INFO a replica logs when the store answers again."""
    return f"etcd reachable again after {down:.1f}s: no longer {_DOING[mode].split(' (')[0]}"
