"""The scalar values of a spec: durations, sizes and addresses, and their display.

Used by vmbox.spec.sections and vmbox.spec.model, whose models annotate fields with
`Duration`, `Size` and `Address` (pydantic calls the parsers below), and
re-exported by vmbox.spec for the CLI (parse_address), the experiments
(parse_size) and the benchmarks. `short_repr` and `one_line` keep a value or a
message on the one line a SpecError is.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() on one line (repr escapes line breaks), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    """`text` with every run of whitespace, line breaks included, as one space."""
    return " ".join(text.split())


def parse_duration(value: Any) -> float:
    """'100ms', '1s', '2m', 1.5 -> seconds as a float (bare numbers are seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 100ms or 1s")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        else:
            raise ValueError(f"expected a duration such as 100ms or 1s, got {short_repr(value)}")
    except OverflowError:  # float() of an integer with hundreds of digits
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive, finite duration, got {short_repr(value)}")
    return seconds


def parse_address(value: Any) -> tuple[str, int]:
    """'127.0.0.1:9000' -> ('127.0.0.1', 9000)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        host, port = str(value[0]), value[1]
        if isinstance(port, bool) or not isinstance(port, int | str):
            raise ValueError(f"port must be a number, got {short_repr(port)}")
    elif isinstance(value, str) and value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    try:
        port_num = int(port)
    except ValueError:
        raise ValueError(f"port must be a number, got {port!r}") from None
    if not host or not 0 < port_num < 65536:
        raise ValueError(f"expected HOST:PORT with a port in 1-65535, got {value!r}")
    return host, port_num


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|K|M|G|k)?i?B?\s*$")
_SIZE_UNITS = {
    None: 1,
    "K": 1000,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
}


def parse_size(value: Any) -> int:
    """'70Mi', '64M', 1048576 -> bytes (Kubernetes quantities: Mi = 2**20, M = 10**6)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 70Mi or 64M")
    try:
        if isinstance(value, int | float):
            size = float(value)
        elif isinstance(value, str) and (match := _SIZE.match(value)):
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
        else:
            raise ValueError(f"expected a size such as 70Mi or 64M, got {short_repr(value)}")
    except OverflowError:
        size = math.inf
    if not math.isfinite(size):
        raise ValueError(f"must be a finite size such as 70Mi, got {short_repr(value)}")
    if size < 4 * 1024**2:
        raise ValueError(f"must be at least 4Mi, got {short_repr(value)}")
    return int(size)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[tuple[str, int], BeforeValidator(parse_address)]
