"""The service a fault runs against, and the steady load it offers.

Called by the fault modules. `fault_service` is vmbox.testbed's: a private
etcd, an echo server as the upstream, a controller and its replicas as local
processes, all on loopback and all stopped afterwards; `fault_spec` is a
ratelimit service at LIMIT per source on fresh loopback ports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from vmbox.spec import Spec, parse_spec
from vmbox.testbed import Service, free_udp_port, private_store, running_service
from vmbox.tools.load import LoadPlan, LoadResult, run_load

LIMIT = 100  # packets per second per source, as in the demo


def fault_spec(service: str, replicas: int = 1, **middlebox: Any) -> Spec:
    """A ratelimit service on fresh loopback ports (below the ephemeral range)."""
    return parse_spec(
        {
            "service": service,
            "listen": f"127.0.0.1:{free_udp_port()}",
            "upstream": f"127.0.0.1:{free_udp_port()}",
            # even, named: under the default demand split the `corrupt etcd values` and
            # `controller restart` faults let 8-19 packets over the limit in a run before
            # windows divided by their tick's summary; 0 in one run of each since
            # (DESIGN.md "Rate limiting", what demand lacks).
            "middlebox": {"function": "ratelimit", "limit": LIMIT, "split": "even"} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": 4},
            "lease_ttl": 2,
        },
        f"fault {service}",
    )


@asynccontextmanager
async def fault_service(make_spec: Callable[[], Spec]) -> AsyncIterator[Service]:
    """A private etcd and a running service on it, its replicas ready; all gone afterwards."""
    async with private_store() as store, running_service(store, make_spec) as service:
        yield service


async def steady_load(
    target: tuple[str, int], sources: int, duration: float, flows: int = 4
) -> LoadResult:
    """Each of `sources` offers 1.5 x LIMIT packets/s over `flows` flows for `duration` s.

    With several replicas, more flows per source spread each source more
    evenly: under the even split a replica passes at most its share of a
    source's limit, so a source whose flows all hash to one replica gets only
    that share through.
    """
    plan = LoadPlan(
        target,
        rate=1.5 * LIMIT * sources,
        sources=sources,
        flows=flows * sources,
        duration=duration,
    )
    return await run_load(plan)
