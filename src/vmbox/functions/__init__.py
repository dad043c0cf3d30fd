"""The middlebox functions vmbox ships, and the registry a spec's `middlebox.function` names.

The registry is lazy: a name maps to the module that defines it, imported the
first time it is asked for, so `vmbox status` never imports a middlebox it
does not run. A module defines `FUNCTION` (a vmbox.middlebox.Function: the
state items it declares and how to build it). Called by the controller (to
seed the shared state) and the replica (to build the middlebox). A function
shipped elsewhere is added with `register`.
"""

from __future__ import annotations

import importlib

from vmbox.middlebox import Function

SHIPPED: dict[str, str] = {
    "ratelimit": "vmbox.functions.ratelimit",
    "firewall": "vmbox.functions.firewall",
}
_extra: dict[str, Function] = {}


def register(function: Function) -> Function:
    """Make a middlebox available as `middlebox.function: <function.name>`."""
    if function.name in SHIPPED or _extra.get(function.name, function) is not function:
        raise ValueError(f"middlebox function {function.name!r} is registered twice")
    _extra[function.name] = function
    return function


def names() -> list[str]:
    """Every function a spec may name."""
    return sorted({*SHIPPED, *_extra})


def get_function(name: str) -> Function:
    """The function registered as `name`; KeyError names the known ones."""
    if name in _extra:
        return _extra[name]
    try:
        module = SHIPPED[name]
    except KeyError:
        known = ", ".join(names()) or "none"
        raise KeyError(f"unknown middlebox function {name!r} (known: {known})") from None
    function = importlib.import_module(module).FUNCTION
    assert isinstance(function, Function), f"{module}.FUNCTION is not a Function"
    return function
