"""`vmbox set SERVICE ITEM VALUE`: change a shared state item live, and wait for its fence.

Called by vmbox.cli.main only. The value is validated as the replicas
validate it (the item's own parser), written through the store, and for a
`fenced` service the command returns only once every live replica acked the
write or lost its lease (vmbox.state.fencewait); it then prints how long that
took and who acked or was fenced out. Other modes are written and said to be
unfenced. A write made with etcdctl is picked up by the watches too, but
nobody waits for it.
"""

from __future__ import annotations

import json

from vmbox.functions.rules import limit_item
from vmbox.middlebox import StateItem, StateValueError
from vmbox.spec import Spec, parse_spec
from vmbox.spec.items import spec_items
from vmbox.state import keys
from vmbox.state.access import StoreSpec, connect_kwargs
from vmbox.state.etcd import connect
from vmbox.state.fencewait import FenceResult, write_fenced
from vmbox.state.store import Store, StoreError

TIMEOUT_SLACK = 3.0  # the default timeout: the lease TTL (a partitioned replica's end) + this


class SetError(Exception):
    """Something the user asked that cannot be done; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def find_item(spec: Spec, name: str) -> StateItem:
    """The shared item NAME means: an item's own name (`limit`, `rules.web.limit`) or a rule's."""
    items = {found.item.name: found.item for found in spec_items(spec)}
    item = items.get(name) or items.get(limit_item(name))
    if item is None:
        known = ", ".join(sorted(items)) or "none"
        raise SetError(
            f"{spec.service} has no shared item or rule limit {name!r} (items: {known})", 2
        )
    return item


def parse_value(item: StateItem, value: str) -> bytes:
    """VALUE as the replicas would store it; a value they would refuse is a one-line error."""
    try:
        return item.encode(item.parse(value.encode()))
    except StateValueError as exc:
        raise SetError(f"{item.name}: {exc}", 2) from None


def result_line(service: str, item: str, value: bytes, result: FenceResult) -> str:
    acked = " ".join(sorted(result.acked)) or "none"
    out = " ".join(sorted(result.fenced_out)) or "none"
    return (
        f"{service}: {item} = {value.decode()} at revision {result.revision}, "
        f"fenced in {result.seconds * 1000:.1f} ms; acked: {acked}; fenced out: {out}"
    )


async def set_item(
    service: str, target: StoreSpec, name: str, value: str, timeout: float | None
) -> None:
    store = await connect(target.endpoints, **connect_kwargs(target))
    try:
        kv = await store.get(keys.spec_key(service))
        if kv is None:
            raise StoreError(f"no service {service!r} in etcd at {store.where}")
        spec = parse_spec(json.loads(kv.value), "stored spec")
        item = find_item(spec, name)
        raw = parse_value(item, value)
        if spec.consistency != "fenced":
            revision = await store.put(keys.state_key(service, item.name), raw)
            print(
                f"{service}: {item.name} = {raw.decode()} at revision {revision}; not fenced "
                f"(consistency: {spec.consistency}): replicas apply it when they see it",
                flush=True,  # a script reading the pipe learns it is written now
            )
            return
        wait = spec.lease_ttl + TIMEOUT_SLACK if timeout is None else timeout
        await fence_or_fail(store, service, item.name, raw, wait)
    finally:
        await store.close()


async def fence_or_fail(
    store: Store, service: str, item: str, raw: bytes, wait: float, then: str = ""
) -> None:
    """Write a fenced item and print its fence line; SetError (plus `then`) when the fence
    is not done within `wait` seconds. `vmbox set` and `vmbox apply` both write this way."""
    result = await write_fenced(store, service, item, raw, wait)
    if not result.done:
        late = " ".join(sorted(result.waiting)) or "(no answer from etcd)"
        raise SetError(
            f"{service}: {item} = {raw.decode()} written at revision {result.revision} "
            f"but not fenced within {wait:g}s: {late} neither acked nor lost its lease{then}"
        )
    print(result_line(service, item, raw, result), flush=True)
