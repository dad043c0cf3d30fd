"""Spec validation: every problem is one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbox.spec import (
    MAX_FLOWS,
    MIN_FLOWS,
    SpecError,
    flows_for_memory,
    load_spec,
    parse_duration,
    parse_spec,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "ratelimit.yaml"


def good() -> dict[str, Any]:
    return {
        "service": "web",
        "listen": "127.0.0.1:9000",
        "upstream": "127.0.0.1:9100",
        "middlebox": {"function": "ratelimit", "limit": 100},
    }


def test_the_example_spec_loads() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.limiter.limit == 100
    assert spec.limiter.poll_interval == pytest.approx(0.1)
    assert spec.relay.listen == ("127.0.0.1", 9000)
    assert spec.store == "managed"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("middlebox", "limit"), -5, "middlebox.limit"),
        (("middlebox", "consistency"), "eventual", "middlebox.consistency"),
        (("middlebox", "split"), "evenly", "middlebox.split"),
        (("middlebox", "window"), "soon", "middlebox.window"),
        (("middlebox", "poll_interval"), "0ms", "middlebox.poll_interval"),
        (("listen",), "127.0.0.1", "listen"),
        (("upstream",), "127.0.0.1:99999", "upstream"),
        (("service",), "Web Server", "service"),
        (("store",), [], "store"),
    ],
)
def test_a_bad_field_is_named(path: tuple[str, ...], value: Any, field: str) -> None:
    data = good()
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(SpecError) as err:
        parse_spec(data, "web.yaml")
    message = str(err.value)
    assert message.startswith(f"web.yaml: {field}: ")
    assert "\n" not in message


def test_demand_is_the_default_split_and_even_is_kept() -> None:
    """Issue 18: a one-flow source gets its limit through any number of replicas by default."""
    assert parse_spec(good()).limiter.split == "demand"
    even = good()
    even["middlebox"]["split"] = "even"
    assert parse_spec(even).limiter.split == "even"


@pytest.mark.parametrize("value", ["evenly", "", 2, "Demand"])
def test_a_bad_split_names_the_choices_and_the_reference_designs(value: Any) -> None:
    data = good()
    data["middlebox"]["split"] = value
    with pytest.raises(SpecError) as err:
        parse_spec(data, "web.yaml")
    message = str(err.value)
    assert message.startswith("web.yaml: middlebox.split: must be demand (the default"), message
    assert "even (limit / n per replica, the reference design's behaviour)" in message
    assert message.endswith(f"(got {value!r})") and "\n" not in message


def test_unknown_and_missing_fields() -> None:
    data = good()
    data["middlebox"]["limt"] = 5
    with pytest.raises(SpecError, match=r"middlebox\.limt: unknown field"):
        parse_spec(data)
    del data["middlebox"]["limt"]
    del data["middlebox"]["limit"]
    with pytest.raises(SpecError, match=r"middlebox\.limit: is required"):
        parse_spec(data)


def test_replica_bounds() -> None:
    data = good() | {"replicas": {"count": 5, "min": 1, "max": 4}}
    with pytest.raises(SpecError, match="replicas: count"):
        parse_spec(data)


def test_warm_spares_count_against_max() -> None:
    assert parse_spec(good()).replicas.warm == 0
    spec = parse_spec(good() | {"replicas": {"count": 1, "max": 4, "warm": 3}})
    assert spec.replicas.warm == 3
    for warm, pattern in (
        (4, r"^web.yaml: replicas: warm \(4\) must be below max \(4\): spares count against max$"),
        (-1, r"^web.yaml: replicas\.warm: .*greater than or equal to 0"),
        ("two", r"^web.yaml: replicas\.warm: "),
    ):
        data = good() | {"replicas": {"count": 1, "max": 4, "warm": warm}}
        with pytest.raises(SpecError, match=pattern) as err:
            parse_spec(data, "web.yaml")
        assert "\n" not in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("service: [web\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)


def test_durations() -> None:
    assert parse_duration("100ms") == pytest.approx(0.1)
    assert parse_duration("2m") == 120
    assert parse_duration(1.5) == 1.5
    for bad in ("fast", -1, True, "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_input_gives_a_spec_or_one_line(data: Any) -> None:
    try:
        parse_spec(data, "x.yaml")
    except SpecError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("x.yaml: ")


def test_max_flows_defaults_to_what_fits_the_memory_limit() -> None:
    base = {
        "service": "web",
        "listen": "127.0.0.1:9000",
        "upstream": "127.0.0.1:9001",
        "middlebox": {"function": "ratelimit", "limit": 100},
    }
    assert parse_spec(base, "t").max_flows == MAX_FLOWS  # no memory limit: the plain default
    limited = parse_spec(base | {"replicas": {"memory_limit": "70Mi"}}, "t")
    # 85% of 70 MiB less an idle replica's 36 MiB, at 4,800 bytes a flow: about 5,100,
    # well below the ~9,300 flows at which the OOM killer acted on such a replica.
    assert 4500 < limited.max_flows < 6000
    assert limited.max_flows == flows_for_memory(70 * 1024 * 1024)
    explicit = parse_spec(base | {"replicas": {"memory_limit": "70Mi"}, "max_flows": 9000}, "t")
    assert explicit.max_flows == 9000  # the operator's value stands
    again = parse_spec(json.loads(limited.to_json()), "etcd")  # what a replica reads
    assert again.max_flows == limited.max_flows
    assert flows_for_memory(16 * 1024 * 1024) == MIN_FLOWS  # never none
    assert flows_for_memory(4 * 1024**3) == MAX_FLOWS  # never more than without a limit


INPATH = Path(__file__).parents[2] / "examples" / "inpath.yaml"


def test_the_inpath_example_loads_and_has_no_relay() -> None:
    spec = load_spec(INPATH)
    assert spec.dataplane == "nfqueue"
    assert spec.gateway is not None and spec.gateway.namespace == "vmbox-gw"
    assert spec.listen is None and spec.upstream is None
    with pytest.raises(ValueError, match="in-path"):
        spec.relay  # noqa: B018 - the property raises


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataplane": "nfqueue"}, r"web\.yaml: gateway: is required with dataplane: nfqueue"),
        (
            {"dataplane": "nfqueue", "gateway": {"namespace": "gw"}},
            r"web\.yaml: listen: only for dataplane: relay",
        ),
        ({"gateway": {"namespace": "gw"}}, r"web\.yaml: gateway: only for dataplane: nfqueue"),
        ({"dataplane": "tap"}, r"web\.yaml: dataplane: Input should be 'relay' or 'nfqueue'"),
        ({"upstream": None}, r"web\.yaml: upstream: is required with dataplane: relay"),
    ],
)
def test_each_dataplane_rejects_the_others_fields(change: dict[str, Any], message: str) -> None:
    data = good() | change
    if data["upstream"] is None:
        del data["upstream"]
    with pytest.raises(SpecError, match=message):
        parse_spec(data, "web.yaml")


@pytest.mark.parametrize(
    ("gateway", "field"),
    [
        ({"namespace": "gw", "interface": "a-name-that-is-too-long"}, "gateway.interface"),
        ({"namespace": "gw", "queue": -1}, "gateway.queue"),
        ({"namespace": "gw", "spread": "ports"}, "gateway.spread"),
        ({"namespace": "../etc"}, "gateway.namespace"),
    ],
)
def test_a_bad_gateway_field_is_named(gateway: dict[str, Any], field: str) -> None:
    data = good() | {"dataplane": "nfqueue", "gateway": gateway}
    del data["listen"], data["upstream"]
    with pytest.raises(SpecError, match=rf"^web\.yaml: {field}: "):
        parse_spec(data, "web.yaml")


def kernel(gateway: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    data = good() | {
        "dataplane": "nfqueue",
        "gateway": {"namespace": "vmbox-n{n}", "enforce": "kernel"} | (gateway or {}),
    }
    del data["listen"], data["upstream"]
    return data | top


def test_a_kernel_enforced_spec_names_a_node_per_replica() -> None:
    spec = parse_spec(kernel({"lab": "vmbox", "interface": "gw-c"}), "web.yaml")
    assert spec.gateway is not None
    assert spec.gateway.node_namespace(3) == "vmbox-n3" and spec.gateway.lab == "vmbox"
    again = parse_spec(json.loads(spec.to_json()), "stored")  # every field written out
    assert again == spec


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (kernel({"namespace": "vmbox-gw"}), r"gateway: namespace: with enforce: kernel .*\{n\}"),
        (kernel({"queue": 4}), r"gateway: queue: only with enforce: python"),
        (kernel({"spread": "addresses"}), r"gateway: spread: only with enforce: python"),
        (
            kernel({"enforce": "python", "namespace": "gw{n}"}),
            r"gateway: namespace: \{n\} names a node per replica, only with enforce: kernel",
        ),
        (
            kernel({"enforce": "python", "namespace": "gw", "lab": "vmbox"}),
            r"gateway: lab: a fleet's route is steered only with enforce: kernel",
        ),
        (
            kernel(middlebox={"limit": 5, "split": "demand", "report_interval": "100ms"}),
            r"middlebox\.report_interval: under enforce: kernel each demand report reads",
        ),
        (
            kernel(middlebox={"limit": 5, "consistency": "strong"}),
            r"middlebox\.consistency: strong reads the store per packet",
        ),
    ],
)
def test_what_the_kernel_cannot_enforce_is_refused_with_one_line(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=rf"^web\.yaml: {message}"):
        parse_spec(data, "web.yaml")


def test_the_kernel_reports_demand_every_half_second_unless_told() -> None:
    """Each report reads the node's table: 0.5 s by default, 0.25 s at the least."""
    spec = parse_spec(kernel(middlebox={"limit": 5, "split": "demand"}), "web.yaml")
    assert spec.limiter.report_interval == 0.5
    assert parse_spec(json.loads(spec.to_json()), "stored") == spec
    # demand is the default split, but not under the kernel (its tables over-admit a
    # source spread over the nodes under demand): a kernel spec that names none runs even.
    unnamed = parse_spec(kernel(middlebox={"limit": 5}), "web.yaml")
    assert unnamed.limiter.split == "even" and unnamed.limiter.report_interval == 0.1
    assert parse_spec(json.loads(unnamed.to_json()), "stored") == unnamed
    with pytest.raises(SpecError, match=r"middlebox\.report_interval: under enforce: kernel"):
        parse_spec(
            kernel(middlebox={"limit": 5, "split": "demand", "report_interval": "100ms"}),
            "web.yaml",
        )
    # Under even there is no report: the interval is left as written.
    even = parse_spec(kernel(middlebox={"limit": 5, "split": "even"}), "web.yaml")
    assert even.limiter.report_interval == 0.1
    told = kernel(middlebox={"limit": 5, "split": "demand", "report_interval": "250ms"})
    assert parse_spec(told, "web.yaml").limiter.report_interval == 0.25
    relay = parse_spec(good() | {"middlebox": {"limit": 5, "split": "demand"}}, "w")
    assert relay.limiter.report_interval == 0.1


def test_the_kernel_example_loads_with_a_node_per_replica() -> None:
    spec = load_spec(Path(__file__).parents[2] / "examples" / "kernel.yaml")
    assert spec.gateway is not None and spec.gateway.enforce == "kernel"
    assert spec.gateway.node_namespace(2) == "vmbox-n2" and spec.gateway.lab == "vmbox"
