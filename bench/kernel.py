"""The kernel rows of `make bench`: a fleet enforcing in the kernel (`enforce: kernel`).

One fleet lab of BENCH_NODES nodes (vmbox.lab, a name of its own, always
removed) and the throughput part of `vmbox experiment kernel`
(vmbox.experiments.kernel.throughput): hping3 --flood from every client
address through the fleet with no vmbox table, through every node's table at
a non-binding limit, then one node with its table against the same node
through the Python in-path driver. Offered (the client's interface) beside
passed (the server's), from the kernel's own counters.

Without root (a lab needs it) `why_not()` says why and the bench skips these rows.
"""

from __future__ import annotations

import os
from dataclasses import replace

from vmbox.experiments.kernel import SIZES, Point, throughput
from vmbox.lab import LabError
from vmbox.labclients import lab_for, require_inpath, unique_prefix
from vmbox.state.etcd import EtcdStore

NODES = int(os.environ.get("BENCH_NODES", 4))


def why_not() -> str | None:
    """Why the kernel rows cannot run here, or None."""
    try:
        require_inpath("the kernel rows")
    except LabError as exc:
        return str(exc)
    return None


async def measure(store: EtcdStore) -> list[Point]:
    """The throughput points: no table, kernel on every node, kernel on one, Python on one."""
    with lab_for(unique_prefix("vbk"), 4, NODES) as plan:
        return await throughput(store, plan, replace(SIZES["small"], one_node=True), lambda: None)
