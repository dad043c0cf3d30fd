"""Fault injection: the faults vmbox must survive, and the registry that lists them.

Each fault is an async function in a module of this package,

    async def fault(scale: Scale, say: Say) -> FaultResult

that sets up a real service of its own (a private etcd, an echo server as the
upstream, a controller and replicas as local processes), injects its fault a
number of times under load, and reports what happened as a `FaultResult`: how
often it was injected, whether the service survived, how many packets the
upstream received over the limit, and whether any state in etcd was lost.
`scale` is "full" (`make faults`) or "small" (the test suite's quick version);
`say` takes one line of progress.

`FAULTS` (a lazy vmbox.registry.Registry, the one the experiments use too)
lists the faults in the order the runner (`python -m vmbox.faults`,
vmbox.faults.runner) injects them. Adding a fault is one module and one entry
here. Nothing here imports the etcd client, so listing the faults is cheap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from vmbox.registry import Entry, Registry, Scale

__all__ = ["FAULTS", "NONE", "FaultFunction", "FaultResult", "Say", "Scale"]

Say = Callable[[str], None]
NONE = "none"  # FaultResult.state_lost when nothing was lost


@dataclass
class FaultResult:
    """One row of the fault table, with the figures behind it."""

    fault: str
    injected: int = 0  # times the fault was injected (datagrams, outages, bad values, ...)
    survived: bool = False  # the service kept serving: no replica died, traffic passes
    over_limit: int = 0  # packets the upstream received above limit x seconds
    state_lost: str = NONE  # etcd state (spec, desired, state items) that changed: NONE or what
    peak_rss: int | None = None  # bytes, the highest replica RSS sampled, when measured
    notes: list[str] = field(default_factory=list)  # figures worth a line in the table
    problems: list[str] = field(default_factory=list)  # checks that failed, one line each
    figures: dict[str, float] = field(default_factory=dict)  # raw numbers for tests
    seconds: float = 0.0  # wall time, filled in by the runner

    @property
    def ok(self) -> bool:
        """Survived, lost nothing, stayed within the limit and passed every check."""
        return (
            self.survived and self.state_lost == NONE and self.over_limit == 0 and not self.problems
        )

    def check(self, condition: bool, problem: str) -> bool:
        """Record `problem` unless `condition` holds; returns `condition`."""
        if not condition:
            self.problems.append(problem)
        return condition


class FaultFunction(Protocol):
    def __call__(self, scale: Scale, say: Say) -> Awaitable[FaultResult]: ...


FAULTS: Registry[FaultFunction] = Registry(
    [
        Entry(
            name="flood",
            module="vmbox.faults.flood",
            function="flood",
            summary="1,000,000 datagrams from 100,000 source addresses "
            "(small: 100,000 from 20,000): the limiter's table and the replica's memory "
            "stay bounded.",
            budget=240,
            small_budget=60,
        ),
        Entry(
            name="odd datagrams",
            module="vmbox.faults.bad_input",
            function="odd_datagrams",
            summary="Empty and 65,507-byte datagrams among normal traffic.",
            budget=90,
            small_budget=45,
        ),
        Entry(
            name="upstream vanished",
            module="vmbox.faults.bad_input",
            function="upstream_vanished",
            summary="The upstream stops while datagrams keep arriving, then comes back.",
            budget=120,
            small_budget=45,
        ),
        Entry(
            name="corrupt etcd values",
            module="vmbox.faults.bad_state",
            function="corrupt_values",
            summary="etcdctl writes abc, an empty value, a huge and a negative number "
            "as the limit.",
            budget=90,
            small_budget=45,
        ),
        Entry(
            name="etcd member loss",
            module="vmbox.faults.etcd_members",
            function="etcd_members",
            summary="On a three-member etcd: kill the leader, kill a follower, "
            "stop two (quorum lost), restart them; leases, watches and control carry on.",
            budget=300,
            small_budget=150,
        ),
        Entry(
            name="replica churn",
            module="vmbox.faults.churn",
            function="churn",
            summary="kill -9 a random replica every few seconds under load for 60 s (small: 17 s).",
            budget=180,
            small_budget=90,
        ),
        Entry(
            name="controller restart",
            module="vmbox.faults.controller_restart",
            function="controller_restart",
            summary="kill -9 `vmbox up` and start it again: it adopts the running replicas.",
            budget=180,
            small_budget=90,
        ),
        Entry(
            name="partition (static)",
            module="vmbox.faults.partition",
            function="partition_static",
            summary="One replica cut off from etcd by a blackholed proxy under load, a fenced "
            "limit written meanwhile, then healed; consistency fenced, fail: static.",
            budget=90,
            small_budget=45,
        ),
        Entry(
            name="partition (closed)",
            module="vmbox.faults.partition",
            function="partition_closed",
            summary="The same with fail: closed (fenced).",
            budget=90,
            small_budget=45,
        ),
        Entry(
            name="partition (open)",
            module="vmbox.faults.partition",
            function="partition_open",
            summary="The same with fail: open, under watch (a fenced spec refuses open).",
            budget=90,
            small_budget=45,
        ),
        Entry(
            name="in-path kill",
            module="vmbox.faults.inpath_kill",
            function="inpath_kill",
            summary="kill -9 the in-path replica under an iperf3 TCP stream: fail: open "
            "(at most a retransmission) and closed (the restart, then the same connection) (root).",
            budget=120,
            small_budget=60,
        ),
        Entry(
            name="kernel kill",
            module="vmbox.faults.kernel_kill",
            function="kernel_kill",
            summary="kill -9 a node's replica under 3x load with enforce: kernel: the node's "
            "table goes on enforcing, no second over the limit or under 90% of it (root).",
            budget=90,
            small_budget=45,
        ),
    ],
    signature="(scale, say)",
)
