"""The YAML service spec: `from vmbox.spec import ...` is the one import path.

Called by the CLI (`vmbox up`), the controller and each replica (which gets the
spec as JSON). model.py holds the whole spec, its errors and `load_spec()`;
sections.py its sections (middlebox, replicas, autoscale, store) and
`flows_for_memory`; values.py its values (durations, sizes, addresses).
"""

from vmbox.spec.model import (
    Relay,
    Spec,
    SpecError,
    load_spec,
    parse_spec,
)
from vmbox.spec.sections import (
    FLOW_MEMORY,
    IDLE_MEMORY,
    MAX_FLOWS,
    MEMORY_USABLE,
    MIN_FLOWS,
    AutoscaleSpec,
    Consistency,
    GatewaySpec,
    MiddleboxSpec,
    ReplicasSpec,
    Store,
    flows_for_memory,
)
from vmbox.spec.values import (
    Address,
    Duration,
    Size,
    one_line,
    parse_address,
    parse_duration,
    parse_size,
)

__all__ = [
    "FLOW_MEMORY",
    "IDLE_MEMORY",
    "MAX_FLOWS",
    "MEMORY_USABLE",
    "MIN_FLOWS",
    "Address",
    "AutoscaleSpec",
    "Consistency",
    "Duration",
    "GatewaySpec",
    "MiddleboxSpec",
    "Relay",
    "ReplicasSpec",
    "Size",
    "Spec",
    "SpecError",
    "Store",
    "flows_for_memory",
    "load_spec",
    "one_line",
    "parse_address",
    "parse_duration",
    "parse_size",
    "parse_spec",
]
