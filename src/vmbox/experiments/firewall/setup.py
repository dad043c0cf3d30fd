"""What every part of the firewall experiment shares: its lab, its specs, its replicas' figures.

Called by the part modules (failover, resize, policy, flood) and run.py. A lab
of its own (always removed; one line, ExperimentError, where none can be
built), the firewall's spec for a state and a replica count, and what is read
from outside the replicas' packet path: their /metrics (the one carrying a
flow, the firewall's counters summed), their RSS, and etcd's own /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import psutil

from vmbox.experiments.results import ExperimentError
from vmbox.lab import LabError, LabPlan
from vmbox.labclients import lab_for, require_inpath, unique_prefix
from vmbox.labtraffic import HTTP_PORT, STREAM_PORT
from vmbox.metrics import scrape
from vmbox.spec import Spec, parse_spec
from vmbox.testbed import Service

NAME = "firewall"
State = Literal["shared", "local"]
STATES: tuple[State, State] = ("shared", "local")
CLIENT_NET, SERVER_NET = "198.18.0.0/24", "198.19.0.0/24"
PASSED = "vmbox_packets_passed_total"
OPENED = "vmbox_firewall_opened"  # connections a replica stored that have not ended
HTTP_TRIES = 6  # the failover's downloads: each on a port of its own from HTTP_PORT up
HTTP_PORTS = f"{HTTP_PORT}-{HTTP_PORT + HTTP_TRIES - 1}"


def firewall_spec(
    service: str,
    lab: LabPlan,
    state: State,
    count: int,
    *,
    public_http: bool = False,
    **options: object,
) -> Spec:
    """A firewall in `lab`'s gateway seeing both directions (no `gateway.interface`): the
    client side may open the stream's and HTTP's ports and ping. `public_http`: anyone
    may open HTTP (a public web server: what lets spoofed SYNs become half-open)."""
    http: dict[str, object] = {"proto": "tcp", "dst": SERVER_NET, "dport": HTTP_PORTS}
    if not public_http:
        http["src"] = CLIENT_NET
    allow = [
        {"proto": "tcp", "src": CLIENT_NET, "dst": SERVER_NET, "dport": STREAM_PORT},
        http,
        {"proto": "icmp", "src": CLIENT_NET},
    ]
    return parse_spec(
        {
            "service": service,
            "dataplane": "nfqueue",
            "gateway": {"namespace": lab.namespace("gateway")},
            "middlebox": {"function": "firewall", "state": state, "allow": allow} | options,
            "replicas": {"count": count, "min": 1, "max": 4},
            "lease_ttl": 2,
        },
        f"experiment {NAME}",
    )


@contextlib.contextmanager
def firewall_lab(clients: int, base: str = "vxfw") -> Iterator[LabPlan]:
    """A lab of its own for the run (named `base` and this process's id), removed whatever
    happens. Services whose replicas bound queues in it must stop inside the block."""
    try:
        require_inpath(f"vmbox experiment {NAME}")
        with lab_for(unique_prefix(base), clients) as plan:
            yield plan
    except LabError as exc:  # no root, a missing tool, a lab that could not be built
        raise ExperimentError(str(exc)) from None


async def replica_values(svc: Service, name: str) -> dict[str, tuple[float, int]]:
    """Each answering replica's sample `name` and its pid."""
    out = {}
    for rid, member in (await svc.members()).items():
        with contextlib.suppress(Exception):  # starting or gone: left out
            metrics = await scrape(str(member.info["metrics"]))
            out[rid] = (metrics.get(name, 0.0), int(member.info["pid"]))
    return out


async def carrier(svc: Service, window: float = 0.3) -> tuple[str, int, dict[str, float]]:
    """The replica whose passed packets grow fastest over `window` s (it carries the
    busiest flow), its pid, and every replica's passed packets a second."""
    before = await replica_values(svc, PASSED)
    await asyncio.sleep(window)
    after = await replica_values(svc, PASSED)
    if not after:
        raise ExperimentError(f"{svc.spec.service}: no replica answered its metrics")
    rates = {r: (n - before.get(r, (n, 0))[0]) / window for r, (n, _) in after.items()}
    rid = max(rates, key=lambda r: rates[r])
    return rid, after[rid][1], rates


def summed(gauges: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Pure: each of `names` summed over the replicas' scraped metrics."""
    return {name: sum(m.get(name, 0.0) for m in gauges.values()) for name in names}


def firewall_counters(gauges: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Pure: the firewall's counters that a part reports, summed over the replicas."""
    names = ("dropped_no_connection", "dropped_not_allowed", "fetch_refused", "fetches", "writes")
    total = summed(gauges, [f"vmbox_firewall_{n}" for n in names])
    return {n: total[f"vmbox_firewall_{n}"] for n in names}


def minus(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def rss_mib(pids: Sequence[int]) -> dict[int, float]:
    """Each live process's resident memory, MiB."""
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
    return out


async def etcd_metrics(endpoint: str) -> dict[str, float]:
    """etcd's own /metrics (served on its client port, outside its auth): its db size and
    its put count, whichever of the names this etcd exports."""
    metrics = await scrape(endpoint, timeout=2.0)

    def first(*names: str) -> float:
        return next((metrics[n] for n in names if n in metrics), float("nan"))

    return {
        "db_bytes": first(
            "etcd_mvcc_db_total_size_in_bytes", "etcd_debugging_mvcc_db_total_size_in_bytes"
        ),
        "puts": first("etcd_mvcc_put_total", "etcd_debugging_mvcc_put_total"),
        "keys": first("etcd_debugging_mvcc_keys_total"),
    }
