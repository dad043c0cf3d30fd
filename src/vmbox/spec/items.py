"""The state items a spec's functions declare, each with the section that seeds it.

The controller seeds them (vmbox.control.publish), `vmbox set` and `vmbox
apply` write them, the replica makes a view of each shared one in its own
function's consistency mode. A chain's functions declare distinct items
(vmbox.chain refuses a clash), so an item's name says which function it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmbox.functions import get_function
from vmbox.middlebox import StateItem, config_value
from vmbox.spec.firewall import FirewallSpec
from vmbox.spec.model import Spec
from vmbox.spec.sections import MiddleboxSpec


@dataclass(frozen=True, slots=True)
class SpecItem:
    """One state item, the function section it belongs to, and its seed."""

    item: StateItem
    section: MiddleboxSpec | FirewallSpec
    config: dict[str, Any]

    @property
    def seed(self) -> Any:
        return config_value(self.config, self.item.config_key)

    @property
    def consistency(self) -> str:
        """How its replicas keep it fresh (a firewall declares no scalar item)."""
        return self.section.consistency if isinstance(self.section, MiddleboxSpec) else "local"


def spec_items(spec: Spec, *, shared_only: bool = True) -> list[SpecItem]:
    """Every (shared) state item of every function of the spec, in chain order."""
    found = []
    for section in spec.chain:
        config = section.model_dump()
        for item in get_function(section.function).state_items(config):
            if item.shared or not shared_only:
                found.append(SpecItem(item, section, config))
    return found


def limit_of(spec: Spec) -> str:
    """What a service holds to, as `vmbox status` lists it: `100`, `3 rules`, and the chain."""
    shown = []
    for section in spec.chain:
        if isinstance(section, MiddleboxSpec):
            rules = section.rules or ()
            shown.append(str(section.limit) if section.limit is not None else f"{len(rules)} rules")
        else:
            shown.append(f"firewall ({len(section.allow)} allowed)")
    return " + ".join(shown)
