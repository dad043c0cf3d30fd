"""The YAML service spec as pydantic models, and `load_spec()`.

Called by the CLI (`vmbox up`), the controller and each replica (which gets the
spec as JSON). Every validation problem becomes one `SpecError` line naming the
field, e.g. `web.yaml: middlebox.limit: must be greater than 0 (got -5)`.
`store:` is `managed` or a StoreSpec: an external etcd, perhaps with TLS and a
user (vmbox.state.access turns it into connect() arguments and replica flags).
"""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from vmbox.state.access import StoreSpec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class SpecError(ValueError):
    """A spec that cannot be used; str() is the one line to show the operator."""


def _shown(value: Any, limit: int = 60) -> str:
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
            raise ValueError(f"expected a duration such as 100ms or 1s, got {_shown(value)}")
    except OverflowError:  # float() of an integer with hundreds of digits
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive, finite duration, got {_shown(value)}")
    return seconds


def parse_address(value: Any) -> tuple[str, int]:
    """'127.0.0.1:9000' -> ('127.0.0.1', 9000)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        host, port = str(value[0]), value[1]
        if isinstance(port, bool) or not isinstance(port, int | str):
            raise ValueError(f"port must be a number, got {_shown(port)}")
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
    None: 1, "K": 1000, "k": 1000, "M": 1000**2, "G": 1000**3,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3,
}  # fmt: skip


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
            raise ValueError(f"expected a size such as 70Mi or 64M, got {_shown(value)}")
    except OverflowError:
        size = math.inf
    if not math.isfinite(size):
        raise ValueError(f"must be a finite size such as 70Mi, got {_shown(value)}")
    if size < 4 * 1024**2:
        raise ValueError(f"must be at least 4Mi, got {_shown(value)}")
    return int(size)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

MAX_FLOWS = 16384  # upstream sockets a replica keeps when nothing limits its memory
# What a replica's memory is made of (measured with cgroup v1, DESIGN.md
# "Autoscaling"): about 34 MiB idle, plus about 4.7 KiB per open flow (kernel
# socket memory and Python objects). The OOM killer acted near 9,300 flows at
# 70 MiB; 85% of the limit leaves room for the heap's fragmentation.
IDLE_MEMORY = 36 * 1024 * 1024
FLOW_MEMORY = 4800
MEMORY_USABLE = 0.85
MIN_FLOWS = 256


def flows_for_memory(limit: int) -> int:
    """The default max_flows under a memory limit: what fits beside an idle replica."""
    fits = int((limit * MEMORY_USABLE - IDLE_MEMORY) / FLOW_MEMORY)
    return max(MIN_FLOWS, min(MAX_FLOWS, fits))
Address = Annotated[tuple[str, int], BeforeValidator(parse_address)]
Consistency = Literal["local", "poll", "watch", "strong"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MiddleboxSpec(_Model):
    """What runs in each replica and how its shared state is kept fresh."""

    function: Literal["ratelimit"] = "ratelimit"
    # Bounded like every value a replica accepts from etcd (middlebox.MAX_STATE_INT).
    limit: Annotated[int, Field(gt=0, le=10**9)]
    window: Duration = 1.0
    # fixed_window: a counter per source per window; token_bucket: a bucket per
    # source refilled at the share of `limit` per `window`, holding up to its
    # share of `burst` (default: one window's worth, i.e. `limit`).
    algorithm: Literal["fixed_window", "token_bucket"] = "fixed_window"
    burst: PositiveInt | None = None
    # even: limit / n per replica; demand: per source, in proportion to what
    # each replica was offered (reported every report_interval).
    split: Literal["even", "demand"] = "even"
    report_interval: Duration = 0.1
    report_max_sources: PositiveInt = 256
    demand_floor: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    # Use the smaller of the old and new shares until every live member has
    # acknowledged a change of the group (off only to measure what it prevents).
    resize_guard: bool = True
    consistency: Consistency = "watch"
    poll_interval: Duration = 0.1
    max_sources: PositiveInt = 65536


class ReplicasSpec(_Model):
    """How many replicas, within which bounds."""

    count: PositiveInt = 1
    min: PositiveInt = 1
    max: PositiveInt = 4
    # Like a pod's limit: a cgroup's memory.max when running as root, else
    # only the figure memory percentages are taken against.
    memory_limit: Size | None = None
    # A replica being removed keeps its open flows this long at most.
    drain_timeout: Duration = 2.0

    @model_validator(mode="after")
    def _bounds(self) -> ReplicasSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if not self.min <= self.count <= self.max:
            raise ValueError(f"count ({self.count}) must lie between min and max")
        return self


class AutoscaleSpec(_Model):
    """When to add or remove replicas (vmbox.control.autoscale reads it).

    `threshold` mode adds one replica after `up_for` samples at or above
    `scale_up_at` and removes one after `down_for` samples at or below
    `scale_down_at`; `proportional` mode asks for ceil(n * value / target)
    replicas outside a tolerance band, as Kubernetes' horizontal autoscaler
    does. Values are per replica: percent of the memory limit (memory), percent
    of one core (cpu), packets received per second (pps), bytes received per
    second (bandwidth).
    """

    metric: Literal["memory", "cpu", "pps", "bandwidth"]
    mode: Literal["threshold", "proportional"] = "threshold"
    scale_up_at: PositiveFloat | None = None
    scale_down_at: NonNegativeFloat | None = None
    target: PositiveFloat | None = None
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.1
    aggregate: Literal["max", "mean"] | None = None
    up_for: PositiveInt = 2
    down_for: PositiveInt = 5
    cooldown: Duration = 5.0
    interval: Duration = 1.0

    @model_validator(mode="after")
    def _mode_fields(self) -> AutoscaleSpec:
        if self.mode == "threshold":
            if self.scale_up_at is None or self.scale_down_at is None:
                raise ValueError("threshold mode needs scale_up_at and scale_down_at")
            if self.scale_down_at >= self.scale_up_at:
                raise ValueError(
                    f"scale_down_at ({self.scale_down_at:g}) must be below "
                    f"scale_up_at ({self.scale_up_at:g})"
                )
        elif self.target is None:
            raise ValueError("proportional mode needs a target")
        return self

    @property
    def how(self) -> Literal["max", "mean"]:
        """How replicas' values combine: max (any replica) for thresholds, mean otherwise."""
        if self.aggregate is not None:
            return self.aggregate
        return "max" if self.mode == "threshold" else "mean"


def _store_form(value: Any) -> str:
    return "managed" if value == "managed" else "external"


# `managed` or an external etcd; the tag keeps pydantic's errors about the one form meant.
Store = Annotated[
    Annotated[Literal["managed"], Tag("managed")] | Annotated[StoreSpec, Tag("external")],
    Discriminator(_store_form),
]


class Spec(_Model):
    """One deployed middlebox service."""

    service: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    listen: Address
    upstream: Address
    middlebox: MiddleboxSpec
    replicas: ReplicasSpec = ReplicasSpec()
    autoscale: AutoscaleSpec | None = None
    store: Store = "managed"
    # Replicas' and the controller's /metrics bind here: loopback unless the
    # operator says otherwise (0.0.0.0 for every interface).
    metrics_host: str = "127.0.0.1"
    # What a replica does once etcd has been unreachable for store_timeout:
    # static keeps the last shares, closed drops everything, open passes everything.
    fail: Literal["static", "closed", "open"] = "static"
    store_timeout: Duration = 3.0
    lease_ttl: PositiveInt = 3
    # Per-client upstream sockets a replica keeps; also capped by its file limit.
    # Unset with replicas.memory_limit: what fits that limit (flows_for_memory).
    max_flows: PositiveInt = MAX_FLOWS
    flow_idle_timeout: Duration = 30.0

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        """Today's short forms: `managed`, 'a:1,b:2' and [a:1, b:2] (endpoints only)."""
        if isinstance(value, str) and value != "managed":
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("needs at least one etcd endpoint (or `managed`)")
            return {"endpoints": value}
        if value != "managed" and not isinstance(value, dict | StoreSpec):
            raise ValueError("expected `managed`, a list of etcd endpoints, or a mapping")
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        if value == "localhost":
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "must be an IP address to bind, e.g. 127.0.0.1 (or 0.0.0.0 for every interface)"
            ) from None
        return value

    @model_validator(mode="after")
    def _memory_needs_limit(self) -> Spec:
        if self.autoscale and self.autoscale.metric == "memory" and not self.replicas.memory_limit:
            raise ValueError("autoscale on memory needs replicas.memory_limit")
        return self

    @model_validator(mode="after")
    def _flows_fit_memory(self) -> Spec:
        limit = self.replicas.memory_limit
        if limit is not None and "max_flows" not in self.model_fields_set:
            # The model is frozen; this is still its validation.
            object.__setattr__(self, "max_flows", flows_for_memory(limit))
        return self

    def to_json(self) -> str:
        return self.model_dump_json()


def _describe(error: Any) -> str:
    parts = list(error["loc"])
    if parts[:2] == ["store", "external"]:
        del parts[1]  # the union's tag, not a field the operator wrote
    # A key the operator wrote may hold a line break: show it as repr() does.
    location = ".".join(str(p) if str(p).isprintable() else _shown(p) for p in parts)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "is required"
    elif error["type"] == "string_pattern_mismatch":
        message = "must be lowercase letters, digits and '-' (a DNS label)"
    got = error.get("input")
    quiet = error["type"] in {"missing", "extra_forbidden"} or "got " in message
    quiet = quiet or "password" in str(parts[-1:])  # an error line must never echo a secret
    shown = "" if quiet or isinstance(got, dict | list) else f" (got {got!r})"
    return f"{location}: {message}{shown}" if location else f"{message}{shown}"


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
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)  # a ReaderError has no problem
        raise SpecError(f"{path}: not valid YAML{where}: {one_line(problem)}") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None
    spec = parse_spec(data, str(path))
    if isinstance(spec.store, StoreSpec):
        store = spec.store.resolved(path.parent)
        try:
            store.check_files()
        except ValueError as exc:
            raise SpecError(f"{path}: store.{exc}") from None
        spec = spec.model_copy(update={"store": store})
    return spec
