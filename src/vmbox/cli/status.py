"""`vmbox status` and `vmbox scale`: read and steer a running service through etcd.

Called by the CLI only; talks to etcd through the Store protocol.
"""

from __future__ import annotations

import asyncio
import json

from rich.console import Console
from rich.live import Live

from vmbox.control import events
from vmbox.control.status import RateTracker, render, snapshot
from vmbox.spec import parse_spec
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
