"""The sections of a spec below its top level: middlebox, replicas, autoscale, store.

Used by vmbox.spec.model, whose Spec model holds one of each; vmbox.spec
re-exports them (the demo and the experiments build MiddleboxSpec and
ReplicasSpec directly; vmbox.control.autoscale reads AutoscaleSpec). Also here: `SpecModel`, the
strict frozen base of every spec model, and `flows_for_memory`, the default
max_flows of a replica under replicas.memory_limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vmbox.spec.rules import RuleSpec, unique_names
from vmbox.spec.values import Duration, Size
from vmbox.state.access import StoreSpec

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


Consistency = Literal["local", "poll", "watch", "strong", "fenced"]

# middlebox.split's choices, for the CRD's description and the spec's error line.
SPLIT_CHOICES = (
    "demand (the default: per source, in proportion to what each replica was offered) "
    "or even (limit / n per replica, the reference design's behaviour)"
)
SPLIT_DESCRIPTION = (
    "How the limit is divided among the replicas: "
    + SPLIT_CHOICES
    + ". Under even a source whose traffic is one flow reaches one replica and gets limit / n."
)


class SpecModel(BaseModel):
    """Unknown fields are errors; a validated spec does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MiddleboxSpec(SpecModel):
    """What runs in each replica and how its shared state is kept fresh."""

    function: Literal["ratelimit"] = "ratelimit"
    # An ordered firewall (vmbox.spec.rules): first match wins, no match accepts.
    # (Before `limit`, whose check reads it.)
    rules: tuple[RuleSpec, ...] | None = None
    # Bounded like every value a replica accepts from etcd (middlebox.MAX_STATE_INT).
    # Required without `rules`; beside them, a final ratelimit rule matching everything.
    limit: Annotated[int, Field(gt=0, le=10**9)] | None = Field(default=None, validate_default=True)
    window: Duration = 1.0
    # fixed_window: a counter per source per window; token_bucket: a bucket per
    # source refilled at the share of `limit` per `window`, holding up to its
    # share of `burst` (default: one window's worth, i.e. `limit`).
    algorithm: Literal["fixed_window", "token_bucket"] = "fixed_window"
    burst: PositiveInt | None = None
    # demand (the default): per source, in proportion to what each replica was
    # offered (reported every report_interval), so a source whose traffic is one
    # flow, on one replica, still gets the limit; even: limit / n per replica, the
    # reference design's behaviour (no reports; such a source gets limit / n).
    split: Literal["demand", "even"] = Field(default="demand", description=SPLIT_DESCRIPTION)
    report_interval: Duration = 0.1
    report_max_sources: PositiveInt = 256
    demand_floor: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    # Use the smaller of the old and new shares until every live member has
    # acknowledged a change of the group (off only to measure what it prevents).
    resize_guard: bool = True
    consistency: Consistency = "watch"
    poll_interval: Duration = 0.1
    max_sources: PositiveInt = 65536

    _unique_rule_names = field_validator("rules")(unique_names)

    @field_validator("limit")
    @classmethod
    def _limit_or_rules(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("rules") is None:
            raise PydanticCustomError(
                "missing", "is required (or give rules)"
            )  # shown as "is required"
        return value


class GatewaySpec(SpecModel):
    """Where an in-path service (`dataplane: nfqueue`) sits: a gateway network namespace.

    The gateway forwards between a client side and a server side; a rule in its
    FORWARD chain (vmbox.dataplane.steering) sends the service's packets to the
    replicas' netfilter queues. Replica `<service>-<n>` consumes queue
    `queue + n - 1`. `interface` limits the service to packets that enter the
    gateway there (the client side); unset, every forwarded packet is the
    service's, replies included. `spread: flow` hashes the 5-tuple (HMARK) so one
    client's flows spread over the replicas; `addresses` leaves it to the
    kernel's --queue-balance, which hashes the address pair and protocol only.

    `enforce: kernel` takes Python out of the packet path: each replica has a
    node of its own, the namespace `namespace` names with `{n}` replaced by the
    replica's number (`vmbox-n{n}`: replica `<service>-2` on `vmbox-n2`, as
    `vmbox lab up --nodes N` names them), and keeps an nftables table there
    that holds each source to the replica's share (vmbox.enforce; no queue,
    no steering chain). Whatever spreads flows over the nodes is in front of
    them; `lab: NAME` names a fleet of `vmbox lab up --nodes N --name NAME`,
    whose router's ECMP route the controller then keeps to the nodes whose
    replica enforces (vmbox.control.nodes), as it keeps a gateway's steering.
    """

    namespace: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.-]|\{n\}){0,63}$")
    interface: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    queue: Annotated[int, Field(ge=0, le=65000)] = 0
    spread: Literal["flow", "addresses"] = "flow"
    enforce: Literal["python", "kernel"] = "python"
    lab: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

    @model_validator(mode="after")
    def _nodes(self) -> GatewaySpec:
        per_node = "{n}" in self.namespace
        if self.enforce == "kernel":
            if not per_node:
                raise ValueError(
                    "namespace: with enforce: kernel each replica has a node of its own: "
                    "name them with {n}, e.g. vmbox-n{n}"
                )
            # By value, not by what was written: a stored spec holds every field.
            for name in ("queue", "spread"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(
                        f"{name}: only with enforce: python (a kernel-enforced node has no queue)"
                    )
        elif per_node:
            raise ValueError("namespace: {n} names a node per replica, only with enforce: kernel")
        elif self.lab is not None:
            raise ValueError("lab: a fleet's route is steered only with enforce: kernel")
        return self

    def node_namespace(self, node: int) -> str:
        """The namespace of replica number `node` (the gateway's own under enforce: python)."""
        return self.namespace.replace("{n}", str(node))


class ReplicasSpec(SpecModel):
    """How many replicas, within which bounds, and how many warm spares beside them."""

    count: PositiveInt = 1
    min: PositiveInt = 1
    max: PositiveInt = 4
    # Spare processes kept started and standby (connected, spec and state loaded,
    # not in the group, taking no traffic) for a scale-up to promote. They count
    # against `max`: min(warm, max - desired) are kept (DESIGN.md "Warm spares").
    warm: NonNegativeInt = 0
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
        if self.warm and self.warm >= self.max:
            raise ValueError(
                f"warm ({self.warm}) must be below max ({self.max}): spares count against max"
            )
        return self


class AutoscaleSpec(SpecModel):
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
