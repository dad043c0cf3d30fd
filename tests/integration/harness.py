"""What integration tests share beyond the fixtures: a spec on fresh ports, a service on
the test's etcd, and experiments run as an operator runs them.

`running_service` is vmbox.testbed's on the session etcd (or the test's own),
with a store connection of its own: an echo server (the protected service),
the controller with the local runtime, and the spec's replicas, ready.
Everything it starts it stops.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbox import testbed
from vmbox.spec import Spec, parse_spec
from vmbox.testbed import Service, free_udp_port


def make_spec(
    service: str = "web", replicas: int = 1, *, memory_limit: str | None = None, **middlebox: Any
) -> Spec:
    limit = {"memory_limit": memory_limit} if memory_limit else {}
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            "middlebox": {"function": "ratelimit", "limit": 100} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": 4} | limit,
            "lease_ttl": 2,
        }
    )


@asynccontextmanager
async def running_service(
    endpoints: list[str], spec: Spec, log_dir: Path, *, echo: bool = True
) -> AsyncIterator[Service]:
    """The testbed's service on `endpoints`, its replicas ready; logs in `log_dir`.

    As under `vmbox up`, its replicas are adoptable and its controller serves metrics.
    `echo=False`: no echo at the upstream (the test runs its own server there).
    """
    async with (
        testbed.connected(endpoints) as store,
        testbed.running_service(
            store, spec, log_dir=log_dir, adoptable=True, metrics_port=0, echo=echo
        ) as service,
    ):
        yield service


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file an experiment wrote, as dicts by column."""
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@dataclass
class ExperimentRun:
    """One `vmbox experiment ...` run in a subprocess: where it wrote, what it printed."""

    out: Path
    result: subprocess.CompletedProcess[str]


def run_experiment(out: Path, *args: str, timeout: float) -> ExperimentRun:
    """Run `vmbox experiment ARGS --out OUT` as an operator would, bounded in time."""
    result = subprocess.run(
        [sys.executable, "-m", "vmbox", "experiment", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return ExperimentRun(out, result)
