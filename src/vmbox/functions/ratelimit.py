"""The `ratelimit` function: a per-source rate-limiting firewall, the first middlebox.

`middlebox.algorithm` picks how a source's packets are counted:
`fixed_window` (vmbox.functions.fixedwindow, the default) or `token_bucket`
(vmbox.functions.tokenbucket). Both split the shared `limit` among the live
replicas the same way (vmbox.functions.limiter, vmbox.sharing). A spec with
`rules` gets a rule set (vmbox.functions.rules) whose ratelimit rules each
own a limiter of that algorithm; one with only `limit` gets the limiter
itself. `FUNCTION` is what the registry (vmbox.functions) hands the
controller and the replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmbox.functions import rules
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.functions.limiter import RateLimiter
from vmbox.functions.rules import RuleSet
from vmbox.functions.tokenbucket import TokenBucket
from vmbox.group import Group
from vmbox.middlebox import Function, Middlebox, StateItem

ALGORITHMS: dict[str, type[RateLimiter]] = {
    FixedWindow.algorithm: FixedWindow,
    TokenBucket.algorithm: TokenBucket,
}


def limiter_for(config: Mapping[str, Any], group: Group) -> RateLimiter:
    """The rate limiter `config["algorithm"]` names (fixed_window when unset)."""
    name = config.get("algorithm", FixedWindow.algorithm)
    try:
        algorithm = ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown ratelimit algorithm {name!r} (known: {known})") from None
    return algorithm(config, group)


def build(config: Mapping[str, Any], group: Group) -> Middlebox:
    """A rule set when the config has `rules`, else the one limiter `limit` asks for."""
    if config.get("rules"):
        return RuleSet(config, group, limiter_for)
    return limiter_for(config, group)


def state_items(config: Mapping[str, Any]) -> tuple[StateItem, ...]:
    """`limit` alone, or one limit per ratelimit rule (vmbox.functions.rules)."""
    return rules.state_items(config) if config.get("rules") else RateLimiter.state


FUNCTION = Function(name="ratelimit", state=RateLimiter.state, build=build, items=state_items)
