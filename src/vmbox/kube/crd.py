"""The `middleboxes.vmbox.dev` CRD, its OpenAPI v3 schema generated from the spec's pydantic models.

Pure. Called by install.py (`vmbox k8s render --install`, deploy/) and the
tests, which check the schema with jsonschema against the spec tests' good and
bad specs.

The generation: `Spec.model_json_schema()` (with the scalar values' parsers
turned into the forms they accept, `_Values`), then `structural()` makes it a
Kubernetes structural schema: $refs inlined, `X | None` as `nullable: true`,
`const` as a one-value enum, JSON Schema 2020's numeric `exclusiveMinimum`
as OpenAPI 3.0's boolean, no titles, no defaults (pydantic fills them in the
operator, so the stored object stays what the user wrote), and no
`additionalProperties: false` (a CRD may not say it beside `properties`:
unknown fields are pruned, and kubectl's default `--validate=strict` reports
them as errors; `checkable()` adds it back for the tests' jsonschema, which
is what that field validation amounts to).

What the structural schema cannot say, and how it is handled:
- A value of two types. Durations ("100ms", 2) and sizes ("70Mi", 73400320)
  are `x-kubernetes-int-or-string` with the parsers' patterns, so a fraction
  of a second is written with a unit or quoted ("500ms", "0.5"), not 0.5.
  Addresses are "HOST:PORT" strings (the [host, port] list form is YAML-only).
  `store` (`managed`, a list of endpoints or a mapping) is left open
  (`x-kubernetes-preserve-unknown-fields`) and checked by pydantic alone.
- Rules across fields: listen/upstream only with relay, gateway only with
  nfqueue, min <= count <= max, warm < max, threshold mode's two levels,
  `limit` or `rules`, unique rule names, a rule's limit only with ratelimit,
  dport only with tcp/udp, CIDRs, port ranges, memory autoscaling needing
  memory_limit. CEL (`x-kubernetes-validations`) could say most of them,
  but no CEL evaluator checks them offline here, and a rule that does not
  compile makes the whole CRD uninstallable, so none is shipped: pydantic
  stays the authority. The operator runs spec_of() (manifests.py) and sets
  the condition SpecRejected=True with the same one line `vmbox up` prints.
- `middlebox` as a list (a chain of functions) or a firewall: the CRD
  describes one ratelimit section, the form every Middlebox so far has; a
  chain on Kubernetes needs that schema opened (planned, not built).
- Values a pattern cannot judge: a size under 4Mi written with a unit, a
  CIDR, a port range's order. Pydantic again.
The tests list these cases by name, so the list cannot go stale.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from vmbox.kube.manifests import API_VERSION, GROUP, KIND, PLURAL, VERSION
from vmbox.spec import MiddleboxSpec, Spec, parse_address, parse_duration, parse_size

NAME = f"{PLURAL}.{GROUP}"
SINGULAR = "middlebox"
SHORT_NAMES = ["mbox"]
CATEGORIES = ["vmbox"]

# A positive number with an optional unit (values.parse_duration): a non-zero digit somewhere.
DURATION_PATTERN = r"^\s*(\d*[1-9]\d*(\.\d+)?|\d+\.\d*[1-9]\d*)\s*(ms|s|m|h)?\s*$"
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(Ki|Mi|Gi|K|M|G|k)?i?B?\s*$"
PORT = r"(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"
ADDRESS_PATTERN = rf"^[^:\s]+:{PORT}$"

_INT_OR_STRING = "x-kubernetes-int-or-string"
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_DROPPED = {"title", "default", "format"}  # format: pydantic's "path" is no OpenAPI format


def _int_or_string(integer: dict[str, Any], string: dict[str, Any], what: str) -> dict[str, Any]:
    """An int-or-string node. The API server takes only the bare anyOf (type alone in each
    branch), so the checks sit beside it: `minimum` judges numbers only, `pattern` strings."""
    return {
        _INT_OR_STRING: True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        **integer,
        **string,
        "description": what,
    }


DURATION = _int_or_string(
    {"minimum": 1},
    {"pattern": DURATION_PATTERN},
    "seconds, or a number with a unit: 100ms, 1.5s, 2m, 1h",
)
SIZE = _int_or_string(
    {"minimum": 4 * 1024**2},
    {"pattern": SIZE_PATTERN},
    "bytes, or a Kubernetes quantity: 70Mi, 64M (at least 4Mi)",
)
ADDRESS = {"type": "string", "pattern": ADDRESS_PATTERN, "description": "HOST:PORT"}
STORE = {
    _PRESERVE: True,
    "description": "`managed` (the in-cluster etcd of vmbox-system), a list of etcd "
    "endpoints, or a mapping {endpoints, ca_cert, cert, key, server_name, username, "
    "password_file | password_env}; on Kubernetes the files come from the Secrets "
    "vmbox-etcd-tls and vmbox-etcd-auth. Checked by the operator.",
}


class _Values(GenerateJsonSchema):
    """model_json_schema() with the forms a duration, size or address is written in."""

    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> Any:
        function = schema["function"].get("function")
        for parser, form in ((parse_duration, DURATION), (parse_size, SIZE)):
            if function is parser:
                return copy.deepcopy(form)
        if function is parse_address:
            return copy.deepcopy(ADDRESS)
        return super().function_before_schema(schema)


def spec_json_schema() -> JsonSchemaValue:
    """The pydantic JSON Schema of a Middlebox's spec: the YAML spec without `service`."""
    schema = Spec.model_json_schema(schema_generator=_Values)
    schema["properties"].pop("service")
    schema["required"] = [name for name in schema["required"] if name != "service"]
    schema["properties"]["store"] = copy.deepcopy(STORE)
    # One function's section (a mapping), as the CRD has always said: a chain (a list,
    # or a firewall) is a YAML spec's form only, since a structural schema cannot say
    # "a mapping or a list of mappings"; the operator's pydantic accepts both.
    middlebox = MiddleboxSpec.model_json_schema(schema_generator=_Values)
    schema.setdefault("$defs", {}).update(middlebox.pop("$defs", {}))
    schema["properties"]["middlebox"] = middlebox
    return schema


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON Schema node as a Kubernetes structural schema node (see the module doc)."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = _without_null(node)
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        else:
            out[key] = structural(value, defs)
    return out


def checkable(node: Any) -> Any:
    """A structural schema as jsonschema (Draft 4, like OpenAPI 3.0) checks what the API does.

    Unknown fields are errors (kubectl's `--validate=strict`, the default), and
    `nullable: true` lets null through.
    """
    if isinstance(node, list):
        return [checkable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: checkable(value) for key, value in node.items() if key != "nullable"}
    if "metadata" in node.get("properties", {}):  # the API server checks ObjectMeta itself
        out["properties"]["metadata"] = node["properties"]["metadata"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` as X with `nullable: true`; [int, str, null] as int-or-string."""
    branches = node.get("anyOf")
    if not branches or {"type": "null"} not in branches:
        return node
    rest = [branch for branch in branches if branch != {"type": "null"}]
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if len(rest) == 1:
        return {**outer, **rest[0], "nullable": True}
    if sorted(branch.get("type") for branch in rest) == ["integer", "string"]:
        return {**outer, _INT_OR_STRING: True, "anyOf": rest, "nullable": True}
    raise ValueError(f"no structural form for a union of {rest}")


def schema() -> dict[str, Any]:
    """The openAPIV3Schema of a Middlebox: spec (from the pydantic models) and status."""
    spec = spec_json_schema()
    spec_schema = structural(spec, spec.get("$defs", {}))
    spec_schema["description"] = (
        "The vmbox service spec (the YAML of `vmbox up` without `service:`, which is "
        "metadata.name). Checked again by the operator with the same models."
    )
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # The only restriction a CRD may put on metadata: the name, the service's name.
            "metadata": {"type": "object", "properties": {"name": NAME_SCHEMA}},
            "spec": spec_schema,
            "status": STATUS,
        },
    }


_INT32 = {"type": "integer", "format": "int32"}
NAME_SCHEMA = {
    "type": "string",
    "maxLength": 63,
    "pattern": Spec.model_json_schema()["properties"]["service"]["pattern"],
}
CONDITION = {
    "type": "object",
    "required": ["type", "status", "lastTransitionTime", "reason", "message"],
    "properties": {
        "type": {"type": "string", "maxLength": 316},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "reason": {"type": "string", "maxLength": 1024},
        "message": {"type": "string", "maxLength": 32768},
    },
}
STATUS = {
    "type": "object",
    "description": "What the operator observed and decided (it alone writes this).",
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "replicas": {**_INT32, "description": "Replica pods that exist."},
        "readyReplicas": {**_INT32, "description": "Replica pods that are ready."},
        "selector": {"type": "string", "description": "The replica pods' label selector."},
        "limit": {"type": "string", "description": "The service's limit, for printing."},
        "shares": {
            "type": "object",
            "description": "Each ready replica pod's even share of the limit (limit / n), by "
            "pod name: what each source gets there under split: even; under split: demand "
            "(the default) what a source no demand report has yet gets.",
            "additionalProperties": {"type": "number"},
        },
        "lastScale": {
            "type": "object",
            "description": "The last scale decision.",
            "properties": {
                "time": {"type": "string", "format": "date-time"},
                "from": _INT32,
                "to": _INT32,
                "reason": {"type": "string"},
            },
        },
        "conditions": {
            "type": "array",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}

PRINTER_COLUMNS = [
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas.count"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Limit", "type": "integer", "jsonPath": ".spec.middlebox.limit"},
    {"name": "Function", "type": "string", "jsonPath": ".spec.middlebox.function"},
    {"name": "Dataplane", "type": "string", "jsonPath": ".spec.dataplane"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object, ready for `kubectl apply`."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": "vmbox"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas.count",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


__all__ = ["API_VERSION", "NAME", "checkable", "crd", "schema", "spec_json_schema", "structural"]
