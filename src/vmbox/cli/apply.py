"""`vmbox apply SPEC...` and `vmbox delete SERVICE`: change what a running `vmbox up` serves.

Called by vmbox.cli.main only. `apply` compares each spec with the one stored
for its service (vmbox.spec.changes), prints the changes as a diff, and
refuses the whole spec, writing nothing, when a field that cannot change live
changed. An unchanged spec writes nothing. Otherwise it writes the changed
live items first (under `consistency: fenced` it waits for their fence, as
`vmbox set` does), then the spec (vmbox.control.publish), and the controller
follows: its own fields at once, a rollout when what the replicas run
changed. A service no running host runs is given to one (vmbox.control.host):
the `vmbox up` that recorded the service, else the one started last (or the
one `--host` names), and `apply` waits until its controller runs or prints
why it could not.

`delete` removes the service's key from its host, which drains and stops its
replicas and deletes its keys; it waits for that and says how long it took.
"""

from __future__ import annotations

import asyncio
import json
import time

from vmbox import context
from vmbox.cli.setitem import TIMEOUT_SLACK, SetError, fence_or_fail
from vmbox.control.host import host_of, live_hosts
from vmbox.control.publish import publish
from vmbox.spec import Spec, parse_spec
from vmbox.spec.changes import Changes, diff, template_of
from vmbox.spec.items import spec_items
from vmbox.state import keys
from vmbox.state.access import StoreSpec, connect_kwargs
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import list_members

START_TIMEOUT = 20.0  # seconds for a host to start a new service's controller
POLL = 0.1


async def _connect(target: StoreSpec) -> EtcdStore:
    return await connect(target.endpoints, **connect_kwargs(target))


async def apply_spec(
    spec: Spec, target: StoreSpec, host: str | None, dry_run: bool, recorded_host: str | None
) -> None:
    """Apply one spec to the etcd at `target`; see the module docstring."""
    store = await _connect(target)
    try:
        kv = await store.get(keys.spec_key(spec.service))
        stored = parse_spec(json.loads(kv.value), "stored spec") if kv is not None else None
        runner = await host_of(store, spec.service)
        if stored is not None:
            changes = diff(stored, spec)
            if changes.refusal:
                raise SetError(changes.refusal)
            if changes.empty and runner is not None:
                print(f"{spec.service}: unchanged (nothing written)", flush=True)
                return
            if not changes.empty:
                _show(changes)
        else:
            print(f"{spec.service}: a new service", flush=True)
        if runner is None:
            runner = await _pick_host(store, spec.service, host or recorded_host)
        if dry_run:
            print(f"{spec.service}: dry run, nothing written", flush=True)
            return
        if stored is not None:
            await _write(store, stored, spec)
        else:
            await publish(store, spec)
            await store.put(keys.desired_key(spec.service), str(spec.replicas.count).encode())
        if await store.get(keys.host_service_key(runner, spec.service)) is None:
            await _hand_to(store, runner, spec.service)
    finally:
        await store.close()


def _show(changes: Changes) -> None:
    count = len(changes.changes)
    print(f"{changes.service}: {count} change{'s' if count != 1 else ''}", flush=True)
    for change in changes.changes:
        print(f"  {change.line()}", flush=True)


async def _write(store: EtcdStore, stored: Spec, spec: Spec) -> None:
    """The live items first (fenced when the running replicas are), then the spec."""
    service = spec.service
    if stored.consistency == "fenced":
        old_items = {found.item.name: found for found in spec_items(stored)}
        for found in spec_items(spec):
            item, old = found.item, old_items.get(found.item.name)
            if old is None:
                continue  # a new item: the spec seeds it, and the rollout brings its readers
            value = found.seed
            if value == old.seed:
                continue
            wait = stored.lease_ttl + TIMEOUT_SLACK
            then = "; the spec is not written"
            await fence_or_fail(store, service, item.name, item.encode(value), wait, then)
    await publish(store, spec)
    if spec.replicas.count != stored.replicas.count:
        await store.put(keys.desired_key(service), str(spec.replicas.count).encode())
    rollout = template_of(stored) != template_of(spec)
    more = "; rolling out: replicas replaced one at a time (`vmbox status`)" if rollout else ""
    print(f"{service}: applied{more}", flush=True)


async def _pick_host(store: EtcdStore, service: str, wanted: str | None) -> str:
    alive = await live_hosts(store)
    if wanted is not None:
        if wanted not in alive:
            known = ", ".join(sorted(alive)) or "none"
            raise SetError(f"{service}: no running `vmbox up` named {wanted} (running: {known})")
        return wanted
    if not alive:
        raise SetError(
            f"{service}: no running `vmbox up` uses etcd at {store.where}: start one "
            "(`vmbox up SPEC`) and apply again"
        )
    if len(alive) > 1:
        raise SetError(
            f"{service}: {len(alive)} `vmbox up` use etcd at {store.where} "
            f"({', '.join(sorted(alive))}): choose one with --host"
        )
    return next(iter(alive))


async def _hand_to(store: EtcdStore, host: str, service: str) -> None:
    """Give the service to `host`; wait until its controller runs or it says why not."""
    failed = keys.host_failed_key(host, service)
    await store.delete(failed)
    await store.put(keys.host_service_key(host, service), b"")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        why = await store.get(failed)
        if why is not None:
            await store.delete(failed)
            raise SetError(f"{service}: `vmbox up` ({host}) cannot run it: {why.value.decode()}")
        if await store.get(keys.controller_key(service)) is not None:
            print(f"{service}: created; run by `vmbox up` {host}", flush=True)
            return
        await asyncio.sleep(POLL)
    raise SetError(f"{service}: `vmbox up` {host} did not start it within {START_TIMEOUT:.0f}s")


async def delete_service(service: str, target: StoreSpec, timeout: float) -> None:
    """Have the host drain and remove SERVICE; without a host, remove its keys if it is idle."""
    store = await _connect(target)
    try:
        if await store.get(keys.spec_key(service)) is None:
            raise SetError(f"no service {service!r} in etcd at {store.where}")
        host = await host_of(store, service)
        started = time.monotonic()
        if host is None:
            members = await list_members(store, service)
            if members:
                raise SetError(
                    f"{service}: {len(members)} replicas are registered but no running "
                    "`vmbox up` runs it; stop what runs them first"
                )
            await store.delete_prefix(keys.service_prefix(service))
            print(f"{service}: deleted from etcd (no `vmbox up` was running it)", flush=True)
            return
        count = len(await list_members(store, service))
        await store.delete(keys.host_service_key(host, service))
        print(f"{service}: draining {count} replicas ...", flush=True)
        while await store.get(keys.spec_key(service)) is not None:
            if time.monotonic() - started > timeout:
                raise SetError(
                    f"{service}: not removed within {timeout:g}s; `vmbox up` {host} goes on "
                    "draining it"
                )
            await asyncio.sleep(POLL)
        took = time.monotonic() - started
        print(f"{service}: deleted; {count} replicas drained and stopped in {took:.1f}s")
    finally:
        await store.close()
    context.forget(service)
