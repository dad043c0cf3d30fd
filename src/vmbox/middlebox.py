"""The Middlebox base class, declared state items, and what a registered function is.

A middlebox class declares its state items (`state = (StateItem(...), ...)`);
a `Function` names it and says how to build it, and the registry
(vmbox.functions) maps a spec's `middlebox.function` to one. The replica
(vmbox.replica) builds the middlebox, one view per shared item, and calls
`update()` whenever a value or the replica group changes. `process()` is
synchronous, does no I/O and never reads the clock: the driver passes `now` in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from vmbox.group import Group
from vmbox.keyed import KeyedTable, Wait
from vmbox.packet import Packet, Verdict


class StateValueError(ValueError):
    """A stored state value could not be parsed; the caller keeps the last good one."""


@dataclass(frozen=True, slots=True)
class StateItem:
    """A named value a middlebox declares.

    `shared` items live under /vmbox/<service>/state/<name> and are refreshed by
    a view in the spec's consistency mode; `config_key` names the spec field
    that seeds the item. `parse` turns stored bytes into a value and raises
    StateValueError on garbage. `closed` is the value under which the
    middlebox admits nothing the item governs (a limit of 0): a `fenced` view
    hands it to the middlebox while the replica cannot confirm it is current
    (vmbox.state.fence); None if the item cannot fail closed.
    """

    name: str
    config_key: str
    parse: Callable[[bytes], Any]
    encode: Callable[[Any], bytes]
    shared: bool = True
    closed: Any = None


class Middlebox(ABC):
    """Processing logic plus declared state.

    Subclasses set `state`, implement `process`, and react to `update`. A
    middlebox whose items depend on its config (one limit per rule) passes
    them as `items`; `self.items` is what the replica makes views of. A
    middlebox with keyed state (vmbox.keyed: one entry per connection, say)
    puts a KeyedTable per table in `self.tables`; the replica gives each
    shared one a driver (vmbox.state.keyedsync), and `process` may then
    answer a `Wait` for a packet it cannot decide before an entry is read or
    written (the data plane holds that packet alone).
    """

    state: ClassVar[tuple[StateItem, ...]] = ()

    def __init__(
        self, config: Mapping[str, Any], group: Group, items: tuple[StateItem, ...] | None = None
    ) -> None:
        self.config = dict(config)
        self.items: tuple[StateItem, ...] = self.state if items is None else items
        self.values: dict[str, Any] = {
            item.name: config_value(config, item.config_key) for item in self.items
        }
        self.group = group
        self.tables: dict[str, KeyedTable] = {}

    @abstractmethod
    def process(self, packet: Packet, now: float) -> Verdict | Wait:
        """Decide one packet. Synchronous, no I/O; `now` is seconds since the epoch.

        Only a middlebox with keyed tables answers a Wait (one its table gave it).
        """

    def start(self, now: float) -> None:  # noqa: B027 - optional hook
        """Called with the time when the replica begins to serve traffic, and again when
        it registers anew after losing its lease (its siblings may have taken its share)."""

    def idle(self, now: float) -> None:  # noqa: B027 - optional hook
        """Drop per-source state that time alone has made stale, so its memory can go back.

        Called by the replica about once a second, off the packet path (a quiet
        replica gets no packet that would do it); never changes a verdict.
        """

    def update(self, values: Mapping[str, Any] | None = None, group: Group | None = None) -> None:
        """Take new state values and/or a new replica group, then recompute."""
        if values:
            self.values.update(values)
        if group is not None:
            self.group = group
        self.recompute()

    def recompute(self) -> None:  # noqa: B027 - optional hook
        """Derive whatever the middlebox needs from `values` and `group`."""

    def gauges(self) -> dict[str, float]:
        """Numbers worth exporting as metrics (e.g. the current share)."""
        return {}

    def rule_counters(self) -> dict[str, dict[str, int]]:
        """Packets per rule and verdict (rule -> matched, passed, dropped, shadow_dropped).

        Empty for a middlebox without rules; read from the metrics thread, so it only reads.
        """
        return {}


@dataclass(frozen=True, slots=True)
class Function:
    """A middlebox function as the registry (vmbox.functions) knows it.

    `state_items(config)` is what the controller seeds in etcd before any
    replica runs: `state`, unless `items` derives them from the config (one
    limit per rule); `build(config, group)` makes the replica's middlebox from
    the spec's `middlebox` section (a factory, so one function may offer
    several algorithms, as `ratelimit` does).
    """

    name: str
    state: tuple[StateItem, ...]
    build: Callable[[Mapping[str, Any], Group], Middlebox]
    items: Callable[[Mapping[str, Any]], tuple[StateItem, ...]] | None = None

    def state_items(self, config: Mapping[str, Any]) -> tuple[StateItem, ...]:
        """The state items a middlebox built from `config` declares."""
        return self.state if self.items is None else self.items(config)


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The config value a state item is seeded from: `limit`, or a path like `rules.2.limit`.

    A dotted path steps into mappings by key and into lists by index.
    """
    if key in config:
        return config[key]
    value: Any = config
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list | tuple) else value[part]
    return value


# The largest integer a stored state item may hold: no per-window packet budget
# comes near a billion, so a bigger value is a typo or garbage, kept out like `abc`.
MAX_STATE_INT = 10**9


def parse_positive_int(raw: bytes, maximum: int = MAX_STATE_INT) -> int:
    """Parse a stored positive integer such as b'100'; garbage raises StateValueError.

    Only ASCII digits (an optional '+', surrounding blanks) count: int()'s
    underscores and its refusal of very long numbers make poor messages.
    """
    text = raw.decode("ascii", errors="replace").strip()
    digits = text.removeprefix("+")
    if not (digits.isascii() and digits.isdigit()):
        if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
            raise StateValueError(f"must be a positive integer, got {text[:24]}")
        raise StateValueError(f"not an integer: {raw[:40]!r}")
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
        raise StateValueError(f"must be at most {maximum}, got {shown}")
    value = int(digits)
    if value <= 0:
        raise StateValueError(f"must be a positive integer, got {value}")
    return value


def parse_limit(raw: bytes, maximum: int = MAX_STATE_INT) -> int:
    """Parse a stored limit: a positive integer as `parse_positive_int`, or 0 (admit nothing).

    0 is what an operator writes for "nothing from here, now" (`vmbox set web limit 0`).
    """
    text = raw.decode("ascii", errors="replace").strip().removeprefix("+")
    if text.isascii() and text.isdigit() and not text.strip("0"):
        return 0
    return parse_positive_int(raw, maximum)


def encode_int(value: Any) -> bytes:
    """Encode an integer the way etcdctl users would write it."""
    return str(int(value)).encode("ascii")
