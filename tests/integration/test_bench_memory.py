"""`make bench`'s memory rows (bench/memory.py) at small scale: sane figures, nothing left behind.

2,000 new flows per run instead of 15,000 (about 30 s); needs a writable
memory cgroup (tests/integration/cgroup.py: skipped without one, failed
under CI).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from tests.conftest import Aio
from tests.integration.cgroup import MIB, require_cgroups
from vmbox.state.etcd import EtcdStore

BENCH = Path(__file__).resolve().parents[2] / "bench"
FLOWS = 2_000


def load_bench_memory() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH / "memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# The bench's own measurement (run by `make bench`); what it measures, memory that
# returns once flows idle out, is in the default run (test_memory_return.py, and the
# scaling experiment's memory phase).
@pytest.mark.slow
def test_memory_figures_are_sane_and_every_replica_is_gone(
    store: EtcdStore, aio: Aio, tmp_path: Path
) -> None:
    require_cgroups()
    memory = load_bench_memory()
    figures = aio.run(memory.measure(store, tmp_path, flows=FLOWS), timeout=120)
    one, many = figures.one_source, figures.many_sources
    # Each run opened (nearly) every flow; the second tracked a source per flow.
    assert one.flows >= 0.95 * FLOWS and one.sources == 1
    assert many.flows >= 0.95 * FLOWS and many.sources >= 0.95 * FLOWS
    # An idle replica fits the reference design's pod, with room for flows.
    assert 5 * MIB < figures.idle < memory.POD
    # A flow costs a socket and some objects: more than nothing, less than 20 KiB,
    # and the kernel's part (its socket) is charged to the replica's cgroup.
    per_flow = figures.per_flow()
    assert 0 < per_flow < 20 * 1024
    kernel = figures.per_flow("kernel")
    assert kernel is None or 0 < kernel < per_flow
    # A source beyond its flow is a table entry: far less than a flow.
    assert abs(figures.per_source()) < per_flow / 2
    assert figures.fits_in_pod == int((memory.POD - figures.idle) / per_flow)
    # After idle-out the kernel gave the sockets back: the working set fell from its peak.
    for run in (one, many):
        assert run.after.working_set < run.loaded.working_set
    assert many.next_window is not None and many.next_window.working_set < many.loaded.working_set
    # Every replica is gone, and so is its cgroup.
    for run in (one, many):
        assert not psutil.pid_exists(run.pid) or psutil.Process(run.pid).status() == "zombie"
        assert not run.cgroup.exists()
