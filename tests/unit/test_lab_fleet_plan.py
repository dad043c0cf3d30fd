"""A fleet's plan (`LabPlan(nodes=N)`): the ECMP route for a set of nodes, names, addresses,
undo, and nothing that acts on the host or leads out of the lab."""

from __future__ import annotations

import ipaddress

import pytest

from tests.unit.test_lab_plan import IFNAMSIZ, namespace_of
from vmbox.lab.plan import MAX_NODES, Argv, LabError, LabPlan, router_node_if

FLEETS = [LabPlan("f", 1, 1), LabPlan("vt1x2", 3, 4), LabPlan("a" * 32, 200, MAX_NODES)]
BENCH4, BENCH6 = ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:2::/48")


def ids(plan: LabPlan) -> str:
    return f"{plan.prefix[:6]}x{plan.nodes}"


def hops(argv: Argv) -> list[tuple[str, str]]:
    """(via, dev) of each `nexthop` of a route command."""
    return [(argv[i + 2], argv[i + 4]) for i, w in enumerate(argv) if w == "nexthop"]


@pytest.mark.parametrize("plan", FLEETS, ids=ids)
def test_no_command_addresses_the_host_namespace(plan: LabPlan) -> None:
    for step in plan.up_steps():
        ns = namespace_of(step.argv, plan)
        assert step.inside in (ns, None)
        if "netns" in step.argv[3:]:
            assert step.argv[step.argv.index("netns", 3) + 1] in plan.namespaces
    for argv in [*plan.down_commands(), *plan.route_command([1])]:
        namespace_of(argv, plan)


@pytest.mark.parametrize("plan", FLEETS, ids=ids)
def test_every_namespace_is_made_before_use_and_removed(plan: LabPlan) -> None:
    steps = plan.up_steps()
    added = [s.argv[3] for s in steps if s.argv[:3] == ("ip", "netns", "add")]
    deleted = [argv[3] for argv in plan.down_commands()]
    assert added == list(plan.namespaces) and sorted(deleted) == sorted(added)
    assert len(added) == plan.nodes + 3
    made: set[str] = set()
    for step in steps:
        ns = namespace_of(step.argv, plan)
        made |= {ns} if step.argv[:3] == ("ip", "netns", "add") else set()
        assert ns in made, step.argv
        assert step.undo is not None or step.inside in deleted
    # What `down` looks for covers this fleet and any other shape of the same name.
    assert set(plan.namespaces) <= set(plan.every_namespace)
    assert set(LabPlan(plan.prefix).namespaces) <= set(plan.every_namespace)


def test_the_route_for_a_node_set_is_one_replacement_per_family() -> None:
    plan = LabPlan("f", 1, 4)
    v4, v6 = plan.route_command([4, 2, 2])
    router = plan.namespace("router")
    assert v4[:6] == ("ip", "-n", router, "route", "replace", "198.19.0.0/24")
    assert v6[:6] == ("ip", "-n", router, "route", "replace", "2001:2:0:2::/64")
    assert hops(v4) == [("198.18.17.2", "rt-n2"), ("198.18.19.2", "rt-n4")]
    assert hops(v6) == [("2001:2:0:101::2", "rt-n2"), ("2001:2:0:103::2", "rt-n4")]
    # Each nexthop is the node's own end of its link to the router.
    for node in (2, 4):
        addresses = plan.node_addresses(node)
        assert (addresses["client"], router_node_if(node)) in hops(v4)
        net = ipaddress.ip_network(f"{addresses['router']}/24", strict=False)
        assert ipaddress.ip_address(addresses["client"]) in net
    assert plan.route_command([3, 1]) == plan.route_command([1, 3])


def test_no_ready_node_makes_the_route_unreachable_not_absent() -> None:
    plan = LabPlan("f", 1, 2)
    commands = plan.route_command([])
    assert [argv[3:6] for argv in commands] == [("route", "replace", "unreachable")] * 2
    assert not any(hops(argv) for argv in commands)


@pytest.mark.parametrize("nodes", [[0], [5], [1, 5], [-1]])
def test_a_node_the_fleet_lacks_is_refused(nodes: list[int]) -> None:
    with pytest.raises(LabError) as caught:
        LabPlan("f", 1, 4).route_command(nodes)
    assert "\n" not in str(caught.value) and "no node" in str(caught.value)


def test_up_routes_through_every_node() -> None:
    plan = LabPlan("f", 1, 3)
    argvs = [s.argv for s in plan.up_steps()]
    for argv in plan.route_command([1, 2, 3]):
        assert argv in argvs
    assert all(node["in_route"] for node in plan.describe()["nodes"])
    out = plan.describe(in_route=[2])["nodes"]
    assert [n["in_route"] for n in out] == [False, True, False]


def test_multipath_hashing_and_forwarding_in_the_fleets_namespaces_only() -> None:
    plan = LabPlan("f", 1, 3)
    sysctls = {s.argv[3]: s.argv[7:] for s in plan.up_steps() if "sysctl" in s.argv}
    router, client, server = (plan.namespace(r) for r in ("router", "client", "server"))
    assert set(sysctls) == set(plan.namespaces)
    for ns, settings in sysctls.items():
        hashed = {"net.ipv4.fib_multipath_hash_policy=1", "net.ipv6.fib_multipath_hash_policy=1"}
        assert hashed <= set(settings) if ns == router else not hashed & set(settings)
        forwards = "net.ipv4.ip_forward=1" in settings
        assert forwards == (ns not in (client, server)), ns


@pytest.mark.parametrize("plan", FLEETS, ids=ids)
def test_interface_names_fit_the_kernel_limit(plan: LabPlan) -> None:
    names = set()
    for step in plan.up_steps():
        argv = step.argv
        if argv[3:5] == ("link", "add"):
            names |= {argv[5], argv[argv.index("name") + 1]} if "name" in argv else {argv[5]}
        names |= {argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("dev", "master")}
    assert {"c0", "rt-c", "rt-s", "s-rt", "s0", "gw-c", "gw-s", f"rt-n{plan.nodes}"} <= names
    assert all(len(n) < IFNAMSIZ for n in names), sorted(names, key=len)[-1]


@pytest.mark.parametrize("plan", FLEETS, ids=ids)
def test_addresses_are_distinct_and_in_the_benchmarking_ranges(plan: LabPlan) -> None:
    assigned = [s.argv for s in plan.up_steps() if s.argv[3:5] == ("addr", "add")]
    found = [(argv[2], ipaddress.ip_interface(argv[5])) for argv in assigned]
    ips = [str(i.ip) for _, i in found]
    assert len(ips) == len(set(ips))
    for _, interface in found:
        assert interface.ip in (BENCH4 if interface.version == 4 else BENCH6), interface
    # Links to different nodes are different subnets (a nexthop is never ambiguous).
    links = {str(ipaddress.ip_interface(f"{plan.node_addresses(i)['client']}/24").network)
             for i in range(1, plan.nodes + 1)}  # fmt: skip
    assert len(links) == plan.nodes


@pytest.mark.parametrize("plan", FLEETS, ids=ids)
def test_no_route_leads_out_of_the_lab(plan: LabPlan) -> None:
    routes = [s.argv for s in plan.up_steps() if s.argv[3:5] == ("route", "add")]
    routes += plan.route_command(range(1, plan.nodes + 1))
    for argv in routes:
        target = ipaddress.ip_network(argv[5])
        assert argv[5] != "default" and target.prefixlen >= 24
        assert target.subnet_of(BENCH4) if target.version == 4 else target.subnet_of(BENCH6)  # type: ignore[arg-type]
        for via in [argv[i + 1] for i, w in enumerate(argv) if w == "via"]:
            assert ipaddress.ip_address(via) in (BENCH4 if target.version == 4 else BENCH6)


def test_the_server_answers_straight_to_the_router_from_its_service_address() -> None:
    plan = LabPlan("f", 1, 2)
    server = plan.namespace("server")
    view = plan.describe()
    back = [
        s.argv for s in plan.up_steps() if s.argv[2] == server and s.argv[3:5] == ("route", "add")
    ]
    assert [(argv[5], argv[7], argv[9]) for argv in back] == [
        ("198.18.0.0/24", "198.19.1.1", view["server"]["address"]),
        ("2001:2:0:1::/64", "2001:2:0:3::1", view["server"]["address6"]),
    ]
    assert view["return_path"] == "direct"
    assert "198.19.1.1" in view["router"]["addresses"]


@pytest.mark.parametrize("nodes", [-1, MAX_NODES + 1])
def test_node_counts_out_of_range_are_one_line_errors(nodes: int) -> None:
    with pytest.raises(LabError) as caught:
        LabPlan("f", 1, nodes)
    assert "\n" not in str(caught.value)


def test_roles_name_the_fleets_namespaces() -> None:
    plan = LabPlan("lab", 1, 2)
    assert plan.namespaces == ("lab-client", "lab-rt", "lab-n1", "lab-n2", "lab-server")
    assert plan.namespace("node16") == "lab-n16"
    for bad in ("node0", "node17", "nodes", "host"):
        with pytest.raises(LabError):
            plan.namespace(bad)
    assert LabPlan("lab").namespaces == ("lab-client", "lab-gw", "lab-server")
