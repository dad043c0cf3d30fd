"""Scale and failure events under /vmbox/<service>/events/, for `vmbox status`.

Written by the controller (and `vmbox scale`); read by status views. Keys are
zero-padded microsecond timestamps, so etcd's key order is time order and
events from a restarted controller never collide with the old ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from vmbox.state import keys
from vmbox.state.store import Store

KEEP = 200  # events kept per service; older ones are trimmed
_last_seq = 0


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    kind: str
    message: str
    data: dict[str, Any]


def _next_seq() -> int:
    global _last_seq
    _last_seq = max(_last_seq + 1, int(time.time() * 1_000_000))
    return _last_seq


async def record(store: Store, service: str, kind: str, message: str, **data: Any) -> Event:
    """Append one event; returns it so callers can show it too."""
    event = Event(time.time(), kind, message, data)
    body = {"time": event.time, "kind": kind, "message": message, "data": data}
    await store.put(keys.event_key(service, _next_seq()), json.dumps(body).encode())
    return event


async def recent(store: Store, service: str, limit: int = 10) -> list[Event]:
    """The newest `limit` events, oldest first; unparseable entries are skipped."""
    kvs, _ = await store.get_prefix(keys.events_prefix(service))
    events: list[Event] = []
    for kv in sorted(kvs, key=lambda kv: kv.key)[-limit:]:
        try:
            body = json.loads(kv.value)
            events.append(
                Event(
                    float(body["time"]),
                    str(body["kind"]),
                    str(body["message"]),
                    dict(body.get("data", {})),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return events


async def trim(store: Store, service: str, keep: int = KEEP) -> int:
    """Delete all but the newest `keep` events; returns how many went."""
    kvs, _ = await store.get_prefix(keys.events_prefix(service))
    old = sorted(kv.key for kv in kvs)[:-keep] if len(kvs) > keep else []
    for key in old:
        await store.delete(key)
    return len(old)
