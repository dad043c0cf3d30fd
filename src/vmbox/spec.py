"""The YAML service spec as pydantic models, and `load_spec()`.

Called by the CLI (`vmbox up`), the controller and each replica (which gets the
spec as JSON). Every validation problem becomes one `SpecError` line naming the
field, e.g. `web.yaml: middlebox.limit: must be greater than 0 (got -5)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class SpecError(ValueError):
    """A spec that cannot be used; str() is the one line to show the operator."""


def parse_duration(value: Any) -> float:
    """'100ms', '1s', '2m', 1.5 -> seconds as a float (bare numbers are seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 100ms or 1s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 100ms or 1s, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def parse_address(value: Any) -> tuple[str, int]:
    """'127.0.0.1:9000' -> ('127.0.0.1', 9000)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        host, port = str(value[0]), value[1]
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


Duration = Annotated[float, BeforeValidator(parse_duration)]
Address = Annotated[tuple[str, int], BeforeValidator(parse_address)]
Consistency = Literal["local", "poll", "watch", "strong"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MiddleboxSpec(_Model):
    """What runs in each replica and how its shared state is kept fresh."""

    function: Literal["ratelimit"] = "ratelimit"
    limit: PositiveInt
    window: Duration = 1.0
    split: Literal["even"] = "even"
    consistency: Consistency = "watch"
    poll_interval: Duration = 0.1
    max_sources: PositiveInt = 65536


class ReplicasSpec(_Model):
    """How many replicas, within which bounds."""

    count: PositiveInt = 1
    min: PositiveInt = 1
    max: PositiveInt = 4

    @model_validator(mode="after")
    def _bounds(self) -> ReplicasSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if not self.min <= self.count <= self.max:
            raise ValueError(f"count ({self.count}) must lie between min and max")
        return self


class Spec(_Model):
    """One deployed middlebox service."""

    service: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    listen: Address
    upstream: Address
    middlebox: MiddleboxSpec
    replicas: ReplicasSpec = ReplicasSpec()
    store: Literal["managed"] | list[str] = "managed"
    metrics_host: str = "127.0.0.1"
    lease_ttl: PositiveInt = 3
    # Per-client upstream sockets a replica keeps; also capped by its file limit.
    max_flows: PositiveInt = 16384
    flow_idle_timeout: Duration = 30.0

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "managed":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("store")
    @classmethod
    def _endpoints(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("needs at least one etcd endpoint")
            for endpoint in value:
                parse_address(endpoint.removeprefix("http://"))
        return value

    def to_json(self) -> str:
        return self.model_dump_json()


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "is required"
    elif error["type"] == "string_pattern_mismatch":
        message = "must be lowercase letters, digits and '-' (a DNS label)"
    got = error.get("input")
    quiet = error["type"] in {"missing", "extra_forbidden"} or "got " in message
    shown = "" if quiet or isinstance(got, dict | list) else f" (got {got!r})"
    return f"{location or 'spec'}: {message}{shown}"


def parse_spec(data: Any, source: str = "spec") -> Spec:
    """Validate already-loaded data; raise SpecError with one line naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise SpecError(f"{source}: {_describe(first)}{suffix}") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(data, str(path))
