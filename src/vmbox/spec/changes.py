"""What changing a running service's spec means, field by field: the pure half of `vmbox apply`.

`diff(old, new)` lists every field that differs between two specs of one
service (as dotted paths; rules by name: `middlebox.rules[web].limit`), and
gives each change one of four kinds, by who reads the field and when:

- `refused`: what a running service cannot change. Its identity and where it
  sits (service, dataplane, listen, upstream, gateway), what it is
  (middlebox.function), its store, its window (every replica's windows must
  begin together, or the shares of one window would not add up to the limit),
  and what `vmbox up` set up once for all its replicas (metrics_host,
  replicas.memory_limit: the replicas' cgroups). `vmbox apply` refuses the
  whole spec before it writes anything; delete the service and apply it anew.
- `live`: a shared state item's seed (`middlebox.limit`, each ratelimit
  rule's `limit`). Written to the item's key (vmbox.control.publish); the
  replicas apply it from their watch, and under `consistency: fenced` the
  writer waits for the fence, as `vmbox set` does.
- `controller`: `replicas.*` and `autoscale.*`. The controller reads the spec
  each pass and follows.
- `rollout`: everything else, which a replica reads once when it starts
  (consistency, rules added or removed, algorithm, split, fail policy, ...).
  The controller replaces the replicas one at a time: one more is started
  with the new spec, and once it is a member an old one is drained
  (vmbox.control.plan, "Rollouts"). Which spec a replica runs is its
  `template` (`template_of`): a hash of the spec without the controller's
  fields and the live seeds, which each replica puts in its member info.

No I/O here: specs in, changes out (tests/unit/test_spec_changes.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vmbox.functions import get_function
from vmbox.middlebox import Function
from vmbox.spec.model import Spec

Kind = Literal["refused", "live", "controller", "rollout"]

# Dotted prefixes that cannot change while the service runs, and why.
IMMUTABLE: dict[str, str] = {
    "service": "it names the service: apply it as a new service",
    "dataplane": "the replicas' driver is chosen at start",
    "listen": "the service address is bound by every replica",
    "upstream": "the relays' upstream is where clients' flows already go",
    "gateway": "the gateway's path is installed once for the service",
    "middlebox.function": "another function is another service",
    "middlebox.window": "every replica's windows must begin together",
    "middlebox.ratelimit.function": "another function is another service",
    "middlebox.ratelimit.window": "every replica's windows must begin together",
    "middlebox.firewall.function": "another function is another service",
    "store": "the replicas keep their state there",
    "metrics_host": "the controller's /metrics is bound to it",
    "replicas.memory_limit": "`vmbox up` made the replicas' cgroups with it",
}
CONTROLLER = ("replicas.", "autoscale")

WHAT = {
    "refused": "cannot change live",
    "live": "written to its state key; replicas apply it from their watch",
    "controller": "the controller follows",
    "rollout": "replicas replaced one at a time",
}


@dataclass(frozen=True, slots=True)
class Change:
    path: str
    old: Any  # MISSING when the field is new
    new: Any  # MISSING when the field is gone
    kind: Kind

    def line(self) -> str:
        """`  middlebox.limit: 100 -> 50  (live: ...)`; `+`/`-` for fields added or removed."""
        if self.old is MISSING:
            text = f"+ {self.path}: {_shown(self.new)}"
        elif self.new is MISSING:
            text = f"- {self.path}: {_shown(self.old)}"
        else:
            text = f"~ {self.path}: {_shown(self.old)} -> {_shown(self.new)}"
        return f"{text}  ({self.kind}: {WHAT[self.kind]})"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class Changes:
    """The changes from a running spec to an applied one."""

    service: str
    changes: tuple[Change, ...]

    @property
    def empty(self) -> bool:
        return not self.changes

    def of(self, kind: Kind) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.kind == kind)

    @property
    def refusal(self) -> str:
        """One line naming every field that cannot change live ('' when none)."""
        refused = self.of("refused")
        if not refused:
            return ""
        parts = [
            f"{c.path} ({_shown(c.old)} -> {_shown(c.new)}: {_reason(c.path)})" for c in refused
        ]
        return (
            f"{self.service}: cannot change live: {'; '.join(parts)}; nothing was written "
            f"(`vmbox delete {self.service}`, then apply the spec anew)"
        )


def diff(old: Spec, new: Spec) -> Changes:
    """Every field that differs from `old` to `new`, each with its kind."""
    before, after = dict(_flatten(_plain(old))), dict(_flatten(_plain(new)))
    live = _live_paths(old) | _live_paths(new)
    changes = []
    was, now = _functions(old), _functions(new)
    if was != now and (len(old.chain) > 1 or len(new.chain) > 1):
        # Functions added to or taken from a chain: another function is another service.
        changes.append(Change("middlebox.function", was, now, "refused"))
    for path in sorted(before.keys() | after.keys()):
        was, now = before.get(path, MISSING), after.get(path, MISSING)
        if was != now:
            changes.append(Change(path, was, now, _kind(path, live)))
    return Changes(new.service, tuple(changes))


def template_of(spec: Spec) -> str:
    """What a replica runs, as 12 hex digits: the spec less the controller's fields and
    the live seeds. Two specs with the same template need no rollout between them."""
    data = _plain(spec)
    data.pop("replicas", None)
    data.pop("autoscale", None)
    for path in _live_paths(spec):
        _clear(data, path)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(spec: Spec) -> dict[str, Any]:
    """The spec as JSON data; one function's section as `middlebox`, a chain's by function."""
    data: dict[str, Any] = json.loads(spec.to_json())
    stages = data["middlebox"]
    if len(stages) == 1:
        data["middlebox"] = stages[0]
    else:
        data["middlebox"] = {stage["function"]: stage for stage in stages}
    return data


def _functions(spec: Spec) -> str:
    return ",".join(stage.function for stage in spec.chain)


def _stage_path(spec: Spec, function: str) -> str:
    """Where _plain puts a function's section: `middlebox`, or `middlebox.<function>`."""
    return "middlebox" if len(spec.chain) == 1 else f"middlebox.{function}"


def _flatten(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Leaves by dotted path; a list of named mappings (rules) by name: `rules[web].limit`."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value and all(_named(v) for v in value):
        for item in value:
            yield from _flatten(item, f"{path}[{item['name']}]")
    else:
        yield path, value


def _named(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("name"), str)


def _live_paths(spec: Spec) -> set[str]:
    """The dotted paths (as _flatten names them) of the spec's shared items' seeds."""
    paths = set()
    for stage in spec.chain:
        config = stage.model_dump(mode="json")
        paths |= _item_paths(
            config, get_function(stage.function), _stage_path(spec, stage.function)
        )
    return paths


def _item_paths(config: dict[str, Any], function: Function, prefix: str) -> set[str]:
    paths = set()
    for item in function.state_items(config):
        if not item.shared:
            continue
        node: Any = config
        path = prefix
        for part in item.config_key.split("."):
            if isinstance(node, list):
                node = node[int(part)]
                path += f"[{node['name']}]" if _named(node) else f".{part}"
            else:
                node = node[part]
                path += f".{part}"
        paths.add(path)
    return paths


def _clear(data: dict[str, Any], path: str) -> None:
    """Set the leaf at a _flatten path to None (the path exists in `data`)."""
    node: Any = data
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        if part.startswith("["):
            name = part[1:-1]
            node = next(item for item in node if _named(item) and item["name"] == name)
        else:
            node = node[part]
    node[parts[-1]] = None


def _kind(path: str, live: set[str]) -> Kind:
    if any(path == p or path.startswith(f"{p}.") for p in IMMUTABLE):
        return "refused"
    if path in live:
        return "live"
    if path.startswith(CONTROLLER):
        return "controller"
    return "rollout"


def _reason(path: str) -> str:
    return next(why for p, why in IMMUTABLE.items() if path == p or path.startswith(f"{p}."))


def _shown(value: Any) -> str:
    if value is MISSING:
        return "(none)"
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"  # an address
    return json.dumps(value) if not isinstance(value, str) else value
