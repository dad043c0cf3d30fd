"""Reproductions of the published evaluation, and the registry that lists them.

Each experiment is a module exposing

    async def run(out_dir: Path, *, scale: str = "full", console: Console) -> ExperimentResult

(`scale` is "full", the real run, or "small", the quick version the tests run;
ExperimentResult is in vmbox.experiments.results). `EXPERIMENTS` (a lazy
vmbox.registry.Registry) lists them in the order `vmbox experiment all` runs
them. Adding an experiment is one module and one entry here. INPATH_EXPERIMENTS
lists the in-path versions (`--dataplane nfqueue`), by the same names. Called
by vmbox.cli.experiment.
"""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vmbox.registry import Entry, Registry

if TYPE_CHECKING:  # results imports rich.progress: not at `vmbox --help` time
    from rich.console import Console

    from vmbox.experiments.results import ExperimentResult, Scale


class RunFunction(Protocol):
    def __call__(
        self, out_dir: Path, *, scale: Scale = "full", console: Console
    ) -> Awaitable[ExperimentResult]: ...


EXPERIMENTS: Registry[RunFunction] = Registry(
    [
        Entry(
            name="correctness",
            module="vmbox.experiments.correctness",
            function="run",
            summary="Ramp 10 -> 300 packets/s through a 100/s limit with 1, 2 and 4 replicas.",
            budget=300,
            small_budget=120,
        ),
        Entry(
            name="overhead",
            module="vmbox.experiments.overhead",
            function="run",
            summary="Per-packet latency at 1,000 packets/s: base, poll 1000/100 ms, watch, strong.",
            budget=300,
            small_budget=120,
        ),
        Entry(
            name="scaling",
            module="vmbox.experiments.scaling",
            function="run",
            summary="70 MiB replicas, idle then rising load: a replica per 60% memory crossing, "
            "back to 1 as memory returns; then up and down on packet rate, without and with a "
            "warm spare.",
            budget=480,
            small_budget=240,
        ),
        Entry(
            name="skew",
            module="vmbox.experiments.skew",
            function="run",
            summary="One heavy one-flow source (and 20 spread ones) on 4 replicas: "
            "even vs demand split.",
            budget=180,
            small_budget=90,
        ),
        Entry(
            name="kernel",
            module="vmbox.experiments.kernel",
            function="run",
            summary="A fleet of nodes enforcing in the kernel (nftables): one source at 3x its "
            "limit across 1-8 nodes, throughput against no table and the Python driver, "
            "1 -> N -> 1 nodes under load.",
            budget=420,
            small_budget=200,
        ),
        Entry(
            name="firewall",
            module="vmbox.experiments.firewall",
            function="run",
            summary="A stateful firewall in the packet path of a lab: kill -9 of a stream's "
            "replica (shared vs local state), 1 -> 4 -> 1 replicas, the policy on every count, "
            "a SYN flood of spoofed sources.",
            budget=420,
            small_budget=180,
        ),
        Entry(
            name="controlplane",
            module="vmbox.experiments.controlplane",
            function="run",
            summary="Simulated replicas (real, headless) against a private etcd: etcd's "
            "writes, watch events, CPU and bytes as N replicas and S services grow, before "
            "and after the aggregator; limit change reach, resize settle, accuracy.",
            budget=1200,
            small_budget=150,
        ),
    ],
    signature="run(out_dir, *, scale, console)",
)

INPATH_EXPERIMENTS: Registry[RunFunction] = Registry(
    [
        Entry(
            name="correctness",
            module="vmbox.experiments.inpath.correctness",
            function="run",
            summary="In-path: UDP and TCP clients step up to 300 packets/s through a 100/s "
            "limit with 1, 2 and 4 replicas, counted at the server.",
            budget=400,
            small_budget=150,
        ),
        Entry(
            name="overhead",
            module="vmbox.experiments.inpath.overhead",
            function="run",
            summary="In-path: ping's round trip with no firewall, and through it with "
            "consistency local, poll and strong.",
            budget=300,
            small_budget=120,
        ),
        Entry(
            name="skew",
            module="vmbox.experiments.inpath.skew",
            function="run",
            summary="In-path: one heavy one-flow source (and spread ones) on 4 replicas: "
            "even vs demand split, counted at the server.",
            budget=240,
            small_budget=150,
        ),
    ],
    signature="run(out_dir, *, scale, console)",
)
"""`vmbox experiment NAME --dataplane nfqueue`: the same experiments in the packet path of a
lab (vmbox.experiments.inpath); `all --dataplane nfqueue` runs these."""
