"""The Middlebox CRD: a structural schema taking what the spec takes, refusing what it refuses.

The bad specs are the spec tests' own (read from their parametrize marks), so
a new bad case there is checked here too. jsonschema stands in for the API
server (Draft 4 is what OpenAPI 3.0 schemas follow).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator  # type: ignore[import-untyped]

from tests.unit import test_rules_spec, test_spec
from vmbox.kube import crd
from vmbox.kube.manifests import API_VERSION, KIND
from vmbox.spec import SpecError, parse_spec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
VALIDATOR = Draft4Validator(crd.checkable(crd.schema()))

# Bad specs only pydantic refuses (cross-field rules, values a pattern cannot
# judge), by the start of the one line `vmbox up` prints after the source.
# The operator reports them as the condition SpecRejected=True.
PYDANTIC_ONLY = {
    "gateway: is required with dataplane: nfqueue": "a field required by another's value",
    "listen: only for dataplane: relay": "a field allowed by another's value",
    "gateway: only for dataplane: nfqueue": "a field allowed by another's value",
    "upstream: is required with dataplane: relay": "a field required by another's value",
    "middlebox.limit: is required": "limit or rules",
    "middlebox.rules: needs at least one rule": "a validator's check (minItems could say it)",
    "middlebox.rules: rule 1 has the name of rule 0": "unique names across list items",
    "middlebox.rules.0.name: 'limit' is the rule": "one reserved name",
    "middlebox.rules.0: action ratelimit needs a limit": "a field required by another's value",
    "middlebox.rules.0.limit: only with action ratelimit": "a field allowed by another's value",
    "middlebox.rules.0.unit: only with action ratelimit": "a field allowed by another's value",
    "middlebox.rules.0.shadow: only with action drop": "a field allowed by another's value",
    "middlebox.rules.0.match.dport: only with proto tcp or udp": "allowed by another's value",
    "middlebox.rules.0.match.dport: ports lie between": "a port in a string or an int",
    "middlebox.rules.0.match.dport: range 99-9 is empty": "a range's order",
    "middlebox.rules.0.match.dport: must be a port or a range": "port syntax in int-or-string",
    "middlebox.rules.0.match.src: ": "CIDR syntax",
    "middlebox.rules.0.match.dst: must be a CIDR": "CIDR syntax",
    "middlebox.rules.1.match.src: ": "CIDR syntax",
    "replicas: count": "min <= count <= max",
    "replicas: warm (4) must be below max": "warm < max",
    "store: needs at least one etcd endpoint": "store is left open (three forms)",
}


def middlebox(data: dict[str, Any]) -> dict[str, Any]:
    """A YAML spec as the Middlebox object `vmbox k8s render` makes of it."""
    spec = {key: value for key, value in data.items() if key != "service"}
    meta = {"name": data.get("service", "web"), "namespace": "default"}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def cases(test: Callable[..., None]) -> list[tuple[Any, ...]]:
    """The parameter sets of a test's parametrize mark."""
    (mark,) = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    return [tuple(values) for values in mark.args[1]]


def bad_specs() -> Iterator[dict[str, Any]]:
    for path, value, _ in cases(test_spec.test_a_bad_field_is_named):
        data = test_spec.good()
        target = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        yield data
    for change, _ in cases(test_spec.test_each_dataplane_rejects_the_others_fields):
        data = test_spec.good() | change
        yield {key: value for key, value in data.items() if value is not None}
    for gateway, _ in cases(test_spec.test_a_bad_gateway_field_is_named):
        data = test_spec.good() | {"dataplane": "nfqueue", "gateway": gateway}
        del data["listen"], data["upstream"]
        yield data
    for mb, _ in cases(test_rules_spec.test_each_rule_problem_is_one_line_naming_the_field):
        yield test_rules_spec.spec(**mb)
    good = test_spec.good()
    yield good | {"middlebox": {"limit": 5, "limt": 5}}
    for warm in (4, -1, "two"):
        yield good | {"replicas": {"count": 1, "max": 4, "warm": warm}}
    yield good | {"replicas": {"count": 5, "min": 1, "max": 4}}


def reason(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "web.yaml")
    return str(caught.value).removeprefix("web.yaml: ")


BAD = [pytest.param(data, id=reason(data)[:60]) for data in bad_specs()]


def chained(path: Path) -> bool:
    """A spec whose middlebox is a list (a chain): the CRD describes one section."""
    return isinstance(yaml.safe_load(path.read_text()).get("middlebox"), list)


ONE_SECTION = [p for p in EXAMPLES if not chained(p)]


@pytest.mark.parametrize("path", ONE_SECTION, ids=[p.name for p in ONE_SECTION])
def test_the_shipped_examples_are_accepted(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    parse_spec(data)  # the spec's own verdict first
    assert not list(VALIDATOR.iter_errors(middlebox(data)))


def test_a_chain_is_a_yaml_form_the_crd_refuses_for_now() -> None:
    """DESIGN.md "Stateful firewall": the CRD's middlebox is one ratelimit section."""
    chains = [p for p in EXAMPLES if chained(p)]
    assert [p.name for p in chains] == ["firewall.yaml"]
    data = yaml.safe_load(chains[0].read_text())
    parse_spec(data)
    assert list(VALIDATOR.iter_errors(middlebox(data)))


def test_the_spec_tests_good_specs_are_accepted() -> None:
    good = test_spec.good()
    with_rules = test_rules_spec.spec(rules=[test_rules_spec.rule()], limit=5)
    store = {"endpoints": ["https://etcd:2379"], "ca_cert": "ca.pem", "username": "u"}
    external = good | {"store": store | {"password_env": "PW"}}
    for data in (good, with_rules, external, good | {"store": "a:1,b:2"}):
        parse_spec(data)
        assert not list(VALIDATOR.iter_errors(middlebox(data))), data


@pytest.mark.parametrize("data", BAD)
def test_a_bad_spec_is_refused_on_the_field_pydantic_names(data: dict[str, Any]) -> None:
    line = reason(data)
    errors = list(VALIDATOR.iter_errors(middlebox(data)))
    only = [start for start in PYDANTIC_ONLY if line.startswith(start)]
    if only:  # the list is exact: a case the schema learns to refuse must leave it
        assert not errors, f"{line!r} is refused by the schema now: drop it from PYDANTIC_ONLY"
        return
    assert errors, f"the CRD schema accepts a spec `vmbox up` refuses: {line}"
    field = line.split(":")[0]
    field = "metadata.name" if field == "service" else f"spec.{field}"
    paths = {".".join(str(p) for p in error.absolute_path) for error in errors}
    # The schema names the field, or (an unknown field) the object holding it.
    assert any(field.startswith(path) for path in paths), (paths, line)


def test_the_split_says_demand_is_the_default_and_even_the_reference_design() -> None:
    """No default in the CRD (the operator's pydantic fills it in): the description says it."""
    spec = crd.schema()["properties"]["spec"]["properties"]
    split = spec["middlebox"]["properties"]["split"]
    assert split["enum"] == ["demand", "even"] and "default" not in split
    assert "demand (the default" in split["description"]
    assert "even (limit / n per replica, the reference design's behaviour)" in split["description"]
    data = test_spec.good()
    assert parse_spec(data).limiter.split == "demand"
    data["middlebox"]["split"] = "even"
    assert not list(VALIDATOR.iter_errors(middlebox(data)))


def test_durations_sizes_and_addresses_in_the_forms_a_crd_can_hold() -> None:
    def refused(**change: Any) -> bool:
        data = test_spec.good()
        data["middlebox"] = data["middlebox"] | change.pop("middlebox", {})
        return bool(list(VALIDATOR.iter_errors(middlebox(data | change))))

    assert not refused(middlebox={"window": "500ms"})
    assert not refused(middlebox={"window": 2, "poll_interval": "0.5"})
    assert refused(middlebox={"window": 0.5})  # int-or-string: a fraction needs a unit or quotes
    assert refused(middlebox={"window": "0s"}) and refused(middlebox={"window": 0})
    assert not refused(replicas={"memory_limit": "70Mi"})
    assert refused(replicas={"memory_limit": 1024})
    assert refused(listen="127.0.0.1:0") and refused(listen="127.0.0.1:65536")
    assert not refused(listen="web.default.svc:65535")
    assert refused(listen=["127.0.0.1", 9000])  # the list form is YAML-only


FORBIDDEN_IN_JUNCTORS = {"type", "default", "additionalProperties", "nullable", "description"}


def structural_problems(node: Any, where: str = "") -> Iterator[str]:
    """What the API server's structural-schema check would refuse (the rules it documents)."""
    if not isinstance(node, dict):
        return
    if "$ref" in node or "$defs" in node:
        yield f"{where}: a reference"
    if "properties" in node and "additionalProperties" in node:
        yield f"{where}: properties beside additionalProperties"
    if "default" in node and node["default"] is None:
        yield f"{where}: default: null"
    if isinstance(node.get("exclusiveMinimum"), int | float) and node["exclusiveMinimum"] not in (
        True,
        False,
    ):
        yield f"{where}: a numeric exclusiveMinimum (OpenAPI 3.0 has a boolean)"
    open_node = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if "type" not in node and not open_node:
        yield f"{where}: no type"
    int_or_string = [{"type": "integer"}, {"type": "string"}]
    for junctor in ("anyOf", "oneOf", "allOf", "not"):
        branches = node.get(junctor, [])
        if node.get("x-kubernetes-int-or-string") and junctor == "anyOf":
            if branches != int_or_string:  # exactly this, nothing beside the types
                yield f"{where}.anyOf: not the int-or-string pattern: {branches}"
            continue
        for branch in branches if isinstance(branches, list) else [branches]:
            bad = set(branch) & FORBIDDEN_IN_JUNCTORS
            if bad:
                yield f"{where}.{junctor}: {sorted(bad)}"
    for name, sub in node.get("properties", {}).items():
        yield from structural_problems(sub, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        yield from structural_problems(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_problems(node["additionalProperties"], f"{where}{{}}")


def test_the_schema_is_structural() -> None:
    assert list(structural_problems(crd.schema())) == []
    # The checker itself catches what the generator must avoid.
    assert list(structural_problems({"type": "object", "properties": {"a": {"anyOf": []}}}))
    branches = [{"type": "integer", "minimum": 1}, {"type": "string"}]
    assert list(structural_problems({"x-kubernetes-int-or-string": True, "anyOf": branches}))
    raw = crd.spec_json_schema()
    assert any("reference" in p or "no type" in p for p in structural_problems(raw))


def test_status_and_scale_subresources_and_columns() -> None:
    (version,) = crd.crd()["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["storage"]
    scale = version["subresources"]["scale"]
    spec_props = version["schema"]["openAPIV3Schema"]["properties"]
    status_props = spec_props["status"]["properties"]
    # Every path the scale subresource and the columns name exists in the schema.
    paths = [scale["specReplicasPath"], scale["statusReplicasPath"], scale["labelSelectorPath"]]
    paths += [c["jsonPath"] for c in version["additionalPrinterColumns"]]
    for path in paths:
        node: dict[str, Any] = version["schema"]["openAPIV3Schema"]
        for part in path.strip(".").split("."):
            if part == "metadata":
                break
            node = node["properties"][part]
    assert {"replicas", "readyReplicas", "shares", "lastScale", "conditions"} <= set(status_props)
    assert set(status_props["lastScale"]["properties"]) == {"time", "from", "to", "reason"}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Replicas", "Ready", "Limit", "Function", "Dataplane", "Age"]
    assert re.fullmatch(r"[a-z]+\.vmbox\.dev", crd.crd()["metadata"]["name"])
