"""Publishing a service's spec to the store: the spec key, then the shared state items' seeds.

Every replica reads its service's spec from the store (keys.spec_key) and
watches the shared state items (keys.state_key), so whoever runs a service
publishes its spec first: the local Controller at `vmbox up`, the Kubernetes
operator (vmbox.kube.operator) whenever a Middlebox's spec changes.

Seeding follows what the operator changed, not what the replicas wrote: an
item whose seed (its config value in the spec) differs from the previous
spec's is overwritten (`limit: 100` -> `limit: 50` in the spec is an
operator's change); an unchanged seed is written only where the key is
missing (compare-and-swap from nothing), so a value set since with `vmbox
set` or etcdctl survives a restart of whoever publishes.
"""

from __future__ import annotations

import json
from typing import Any

from vmbox.functions import get_function
from vmbox.middlebox import config_value
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.store import Store


async def publish(store: Store, spec: Spec) -> dict[str, Any] | None:
    """Write `spec` and seed its shared state items; returns the spec stored before (or None)."""
    old = await store.get(keys.spec_key(spec.service))
    old_spec = json.loads(old.value) if old is not None else None
    await store.put(keys.spec_key(spec.service), spec.to_json().encode())
    await _seed_state(store, spec, old_spec)
    return old_spec if isinstance(old_spec, dict) else None


async def publish_changed(store: Store, spec: Spec) -> bool:
    """`publish` unless the store holds this very spec already; True if it wrote."""
    current = await store.get(keys.spec_key(spec.service))
    if current is not None and current.value == spec.to_json().encode():
        return False
    await publish(store, spec)
    return True


async def _seed_state(store: Store, spec: Spec, old_spec: dict[str, Any] | None) -> None:
    old_stages = old_spec.get("middlebox", ()) if old_spec else ()
    if isinstance(old_stages, dict):
        old_stages = (old_stages,)
    old_by_function = {
        stage.get("function", "ratelimit"): stage for stage in old_stages if isinstance(stage, dict)
    }
    for stage in spec.chain:
        config = stage.model_dump()
        old_config = old_by_function.get(stage.function, {})
        await _seed_items(store, spec, stage.function, config, old_config)


async def _seed_items(
    store: Store, spec: Spec, function: str, config: dict[str, Any], old_config: dict[str, Any]
) -> None:
    for item in get_function(function).state_items(config):
        if not item.shared:
            continue
        seed = config_value(config, item.config_key)
        value = item.encode(seed)
        key = keys.state_key(spec.service, item.name)
        if _seeded(old_config, item.config_key) != seed:
            await store.put(key, value)  # the operator changed the spec
        else:
            await store.compare_and_swap(key, None, value)


def _seeded(old_config: dict[str, object], config_key: str) -> object:
    """What the previous spec seeded an item from (None: it had no such item)."""
    try:
        return config_value(old_config, config_key)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
