"""The whole service spec as a pydantic model, its one-line SpecError, and `load_spec()`.

Every validation problem becomes one `SpecError` line naming the field, e.g.
`web.yaml: middlebox.limit: must be greater than 0 (got -5)`. `store:` is
`managed` or a StoreSpec: an external etcd, perhaps with TLS and a user
(vmbox.state.access turns it into connect() arguments and replica flags).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    Discriminator,
    Field,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from vmbox.spec.firewall import FirewallSpec
from vmbox.spec.sections import (
    MAX_FLOWS,
    SPLIT_CHOICES,
    AutoscaleSpec,
    GatewaySpec,
    MiddleboxSpec,
    ReplicasSpec,
    SpecModel,
    Store,
    flows_for_memory,
)
from vmbox.spec.values import (
    Address,
    Duration,
    one_line,
    short_repr,
)
from vmbox.state.access import StoreSpec

# split: demand under enforce: kernel: each report reads the node's table first.
KERNEL_REPORT_INTERVAL = 0.5  # seconds, unless the spec says
KERNEL_MIN_REPORT_INTERVAL = 0.25


FUNCTIONS = ("ratelimit", "firewall")


def _function_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("function", "ratelimit"))
    return str(getattr(value, "function", "ratelimit"))


# One function's section; `function` says which (ratelimit when unset).
Stage = Annotated[
    Annotated[MiddleboxSpec, Tag("ratelimit")] | Annotated[FirewallSpec, Tag("firewall")],
    Discriminator(_function_of),
]


class SpecError(ValueError):
    """A spec that cannot be used; str() is the one line to show the operator."""


class Relay(NamedTuple):
    """A relay service's two addresses: where clients send, where it relays to."""

    listen: tuple[str, int]
    upstream: tuple[str, int]


class Spec(SpecModel):
    """One deployed middlebox service.

    `dataplane: relay` (the default) is a UDP relay between `listen` and
    `upstream`; `dataplane: nfqueue` sits in the packet path of the `gateway`
    namespace and has no addresses of its own.
    """

    service: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    dataplane: Literal["relay", "nfqueue"] = "relay"
    listen: Address | None = None
    upstream: Address | None = None
    gateway: GatewaySpec | None = None
    # One function, or a chain of them run in order (vmbox.chain): a list.
    middlebox: tuple[Stage, ...]
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

    @field_validator("middlebox", mode="before")
    @classmethod
    def _chain(cls, value: Any) -> Any:
        """One function's section (a mapping) or a list of them; each function once."""
        if isinstance(value, dict | SpecModel):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise ValueError("expected a function's section or a list of them")
        if not value:
            raise ValueError("needs at least one function")
        seen: dict[str, int] = {}
        for index, stage in enumerate(value):
            name = _function_of(stage)
            if name not in FUNCTIONS:
                where = f"{index}.function: " if len(value) > 1 else "function: "
                raise ValueError(
                    f"{where}unknown middlebox function {name!r} (known: "
                    f"{', '.join(sorted(FUNCTIONS))})"
                )
            if name in seen:
                raise ValueError(
                    f"{index}.function: {name} is already function {seen[name]} of the chain "
                    "(a chain holds each function once)"
                )
            seen[name] = index
        return tuple(value)

    @property
    def chain(self) -> tuple[MiddleboxSpec | FirewallSpec, ...]:
        """The functions a replica runs, in order."""
        return self.middlebox

    @property
    def ratelimit(self) -> MiddleboxSpec | None:
        """The chain's ratelimit section, if it has one."""
        return next((s for s in self.middlebox if isinstance(s, MiddleboxSpec)), None)

    @property
    def limiter(self) -> MiddleboxSpec:
        """The ratelimit section, for callers that only run one; ValueError without it."""
        limiter = self.ratelimit
        if limiter is None:
            raise ValueError(f"service {self.service} runs no ratelimit")
        return limiter

    @property
    def firewall(self) -> FirewallSpec | None:
        """The chain's firewall section, if it has one."""
        return next((s for s in self.middlebox if isinstance(s, FirewallSpec)), None)

    @property
    def window(self) -> float:
        """The ratelimit's window, on which replicas align their resizes (1 s without one)."""
        limiter = self.ratelimit
        return 1.0 if limiter is None else limiter.window

    @property
    def consistency(self) -> str:
        """The ratelimit's consistency mode (`local` without one: nothing scalar is shared)."""
        limiter = self.ratelimit
        return "local" if limiter is None else limiter.consistency

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
    def _dataplane_fields(self) -> Spec:
        if self.dataplane == "relay":
            for name in ("listen", "upstream"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: is required with dataplane: relay")
            if self.gateway is not None:
                raise ValueError("gateway: only for dataplane: nfqueue")
        else:
            if self.gateway is None:
                raise ValueError("gateway: is required with dataplane: nfqueue")
            for name in ("listen", "upstream"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: only for dataplane: relay (nfqueue sits in the path)"
                    )
        return self

    @property
    def relay(self) -> Relay:
        """The relay's addresses; a ValueError for an in-path service, which has none."""
        if self.listen is None or self.upstream is None:
            raise ValueError(f"service {self.service} is in-path (dataplane: nfqueue): no relay")
        return Relay(self.listen, self.upstream)

    @model_validator(mode="after")
    def _fenced_fails_closed(self) -> Spec:
        # `fail: open` passes every packet once etcd is away: a fenced item must admit
        # nothing then (vmbox.state.fence), or `vmbox set`'s promise would not hold.
        if self.consistency == "fenced" and self.fail == "open":
            raise ValueError(
                "fail: open would pass what a fenced item must hold while etcd is away; "
                "use fail: static or closed with consistency: fenced"
            )
        return self

    @model_validator(mode="after")
    def _kernel_enforces_what_it_can(self) -> Spec:
        # The kernel holds one rate per rule in a node's sets and sees packets vmbox does
        # not: what needs per-source shares or a read per packet stays with python.
        if self.gateway is None or self.gateway.enforce != "kernel":
            return self
        mb = self.ratelimit
        if mb is None or len(self.middlebox) > 1:
            raise ValueError(
                "middlebox: enforce: kernel runs the ratelimit function alone; "
                "a firewall or a chain needs enforce: python"
            )
        if "split" not in mb.model_fields_set:
            # The default split is demand, except here: the nodes' tables over-admit a
            # source spread over them under demand (103-108 of 100 through 2 nodes,
            # DESIGN.md "Kernel enforcement"), so a kernel spec that names none runs even.
            mb = mb.model_copy(update={"split": "even"})
            object.__setattr__(self, "middlebox", (mb,))
        if mb.split == "demand" and "report_interval" not in mb.model_fields_set:
            # Each report reads the node's table first (one nft call, 20-40 ms): every
            # 100 ms that would be a core's worth for four nodes. The model is frozen;
            # this is still its validation.
            update = {"report_interval": KERNEL_REPORT_INTERVAL}
            object.__setattr__(self, "middlebox", (mb.model_copy(update=update),))
        elif mb.split == "demand" and mb.report_interval < KERNEL_MIN_REPORT_INTERVAL:
            raise ValueError(
                f"middlebox.report_interval: under enforce: kernel each demand report reads "
                f"the node's table (an nft call of 20-40 ms); use at least "
                f"{KERNEL_MIN_REPORT_INTERVAL:g} s (the default there is "
                f"{KERNEL_REPORT_INTERVAL:g} s), not {mb.report_interval:g} s"
            )
        if self.consistency == "strong":
            raise ValueError(
                "middlebox.consistency: strong reads the store per packet, and under "
                "enforce: kernel vmbox sees no packet; use watch, poll, fenced or local"
            )
        return self

    @model_validator(mode="after")
    def _firewall_sees_both_ways(self) -> Spec:
        # A stateful firewall must see every packet of a connection, both ways.
        if self.firewall is None:
            return self
        if self.gateway is None:
            raise ValueError(
                "middlebox: function firewall sits in the packet path: use dataplane: nfqueue "
                "with a gateway (the relay sees neither TCP nor the replies)"
            )
        if self.gateway.interface is not None:
            raise ValueError(
                "gateway.interface: function firewall must see the replies too; leave "
                "interface unset so every forwarded packet is the service's"
            )
        return self

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


def _describe(error: Any, single: bool = False) -> str:
    parts = list(error["loc"])
    if parts[:2] == ["store", "external"]:
        del parts[1]  # the union's tag, not a field the operator wrote
    if parts[:1] == ["middlebox"] and len(parts) > 2 and parts[2] in FUNCTIONS:
        del parts[2]  # the function's tag
    if single and parts[:2] == ["middlebox", 0]:
        del parts[1]  # one section, not a list: no index
    # A key the operator wrote may hold a line break: show it as repr() does.
    location = ".".join(str(p) if str(p).isprintable() else short_repr(p) for p in parts)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "is required"
    elif error["type"] == "string_pattern_mismatch":
        message = "must be lowercase letters, digits and '-' (a DNS label)"
    elif error["type"] == "literal_error" and parts[-1:] == ["split"]:
        message = f"must be {SPLIT_CHOICES}"
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
        single = not isinstance(data.get("middlebox"), list)
        raise SpecError(f"{source}: {_describe(first, single)}{suffix}") from None


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
