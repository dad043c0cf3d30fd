"""The etcd state a fault must not lose: a snapshot of it, and what changed between two.

Called by the fault modules: `read_state` before and after a fault, `state_lost`
to compare the two (spec, desired count and every state item).
"""

from __future__ import annotations

from collections.abc import Mapping

from vmbox.faults import NONE
from vmbox.state import keys
from vmbox.state.store import Store


async def read_state(store: Store, service: str) -> dict[str, bytes]:
    """The state a fault must not lose: spec, desired count and every state item."""
    prefix = keys.service_prefix(service)
    kept = {keys.spec_key(service), keys.desired_key(service)}
    items = keys.state_key(service, "")
    kvs, _ = await store.get_prefix(prefix)
    return {
        kv.key.removeprefix(prefix): kv.value
        for kv in kvs
        if kv.key in kept or kv.key.startswith(items)
    }


def _short(value: bytes | None) -> str:
    if value is None:
        return "missing"
    text = value.decode(errors="replace")
    return repr(text if len(text) <= 24 else text[:21] + "...")


def state_lost(
    before: Mapping[str, bytes], after: Mapping[str, bytes], written: Mapping[str, bytes] = {}
) -> str:
    """NONE, or each key whose value is not what it was (or what the fault wrote last)."""
    expected = dict(before) | dict(written)
    lost = [
        f"{key}: {_short(expected.get(key))} -> {_short(after.get(key))}"
        for key in sorted(expected.keys() | after.keys())
        if expected.get(key) != after.get(key)
    ]
    return "; ".join(lost) or NONE
