"""`vmbox status` and `vmbox scale`: read and steer a running service through etcd.

Called by the CLI only; talks to etcd through the Store protocol.
"""

from __future__ import annotations

import asyncio
import json

from rich.console import Console
from rich.live import Live

from vmbox.control import events
from vmbox.control.host import hosted_services
from vmbox.control.status import ListedService, RateTracker, render, render_list, snapshot
from vmbox.spec import parse_spec
from vmbox.spec.changes import template_of
from vmbox.spec.items import limit_of
from vmbox.state import keys
from vmbox.state.access import StoreSpec, connect_kwargs
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.store import StoreError


async def _connect(target: StoreSpec) -> EtcdStore:
    return await connect(target.endpoints, **connect_kwargs(target))


async def show_status(service: str, target: StoreSpec, watch: bool) -> None:
    store = await _connect(target)
    try:
        if await store.get(keys.spec_key(service)) is None:
            raise StoreError(f"no service {service!r} in etcd at {store.where}")
        tracker = RateTracker()
        await snapshot(store, service, tracker, 0)  # first scrape: rates need two
        await asyncio.sleep(1.0)
        console = Console()
        if not console.is_terminal:  # piped: print every column whole, as kubectl does
            console = Console(width=max(console.width, 160))
        if not watch:
            console.print(render(await snapshot(store, service, tracker)))
            return
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                live.update(render(await snapshot(store, service, tracker)))
                await asyncio.sleep(1.0)
    finally:
        await store.close()


async def show_all(targets: list[tuple[StoreSpec, list[str]]]) -> list[str]:
    """One line per service on each etcd (the services its running hosts run, and those
    recorded here), as `kubectl get` lists; returns the services shown."""
    listed: list[ListedService] = []
    for target, recorded in targets:
        store = await _connect(target)
        try:
            hosts = await hosted_services(store)
            names = sorted(set(hosts) | set(recorded))
            specs = {}
            for name in names:
                kv = await store.get(keys.spec_key(name))
                if kv is not None:
                    specs[name] = parse_spec(json.loads(kv.value), "stored spec")
            tracker = RateTracker()
            for name in specs:
                await snapshot(store, name, tracker, 0)  # first scrape: rates need two
            await asyncio.sleep(1.0)
            for name, spec in specs.items():
                limit = limit_of(spec)
                listed.append(
                    ListedService(
                        await snapshot(store, name, tracker, 0),
                        hosts.get(name, "-"),
                        template_of(spec),
                        limit,
                    )
                )
        finally:
            await store.close()
    if not listed:
        raise StoreError("no service is running (`vmbox up SPEC`)")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    console.print(render_list(listed))
    return [item.status.service for item in listed]


async def set_desired(service: str, target: StoreSpec, replicas: int) -> None:
    store = await _connect(target)
    try:
        kv = await store.get(keys.spec_key(service))
        if kv is None:
            raise StoreError(f"no service {service!r} in etcd at {store.where}")
        spec = parse_spec(json.loads(kv.value), "stored spec")
        lo, hi = spec.replicas.min, spec.replicas.max
        if not lo <= replicas <= hi:
            raise StoreError(
                f"{service} allows {lo} to {hi} replicas (replicas.min/max); {replicas} is outside"
            )
        await store.put(keys.desired_key(service), str(replicas).encode())
        await events.record(store, service, "scale-request", f"`vmbox scale` asked for {replicas}")
        print(f"{service}: desired replicas set to {replicas}")
    finally:
        await store.close()
