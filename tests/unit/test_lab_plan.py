"""The lab's plan: names, addresses, and commands that touch only the lab's own namespaces."""

from __future__ import annotations

import ipaddress

import pytest

from vmbox.lab.plan import (
    CLIENT_IF,
    GATEWAY_CLIENT_IF,
    GATEWAY_SERVER_IF,
    MAX_CLIENTS,
    SERVER_IF,
    Argv,
    LabError,
    LabPlan,
)

IFNAMSIZ = 16  # the kernel's limit, with its terminating NUL
PLANS = [LabPlan(), LabPlan("vt12345", 7), LabPlan("a" * 32, MAX_CLIENTS)]


def namespace_of(argv: Argv, plan: LabPlan) -> str:
    """The namespace a command acts in; fails the test for one that acts on the host."""
    if argv[:3] in (("ip", "netns", "add"), ("ip", "netns", "del")):
        assert len(argv) == 4, argv
    elif argv[:2] == ("ip", "-n") or argv[:3] == ("ip", "netns", "exec"):
        pass
    else:
        pytest.fail(f"{argv} does not name a lab namespace: it would act on the host")
    ns = argv[3] if argv[1] == "netns" else argv[2]
    assert ns in plan.namespaces, argv
    return ns


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.prefix[:8]}x{p.clients}")
def test_no_command_addresses_the_host_namespace(plan: LabPlan) -> None:
    for step in plan.up_steps():
        ns = namespace_of(step.argv, plan)
        assert step.inside in (ns, None)
        if "netns" in step.argv[3:]:  # a veth peer goes straight into another lab namespace
            assert step.argv[step.argv.index("netns", 3) + 1] in plan.namespaces
    for argv in plan.down_commands():
        namespace_of(argv, plan)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.prefix[:8]}x{p.clients}")
def test_every_up_command_has_a_removal(plan: LabPlan) -> None:
    steps = plan.up_steps()
    down = plan.down_commands()
    deleted = {argv[3] for argv in down if argv[:3] == ("ip", "netns", "del")}
    added = [s.argv[3] for s in steps if s.argv[:3] == ("ip", "netns", "add")]
    assert sorted(added) == sorted(deleted) == sorted(plan.namespaces)
    for step in steps:
        assert step.undo in down or step.inside in deleted, step
    # Namespaces first, and nothing used before it is made.
    made: set[str] = set()
    for step in steps:
        ns = namespace_of(step.argv, plan)
        if step.argv[:3] == ("ip", "netns", "add"):
            made.add(ns)
        assert ns in made, step.argv


def test_interface_names_fit_the_kernel_limit() -> None:
    plan = LabPlan("a" * 32, 3)
    names = set()
    for step in plan.up_steps():
        argv = step.argv
        for word in ("dev", "name", "add"):
            names |= {argv[i + 1] for i, w in enumerate(argv[:-1]) if w == word}
        if argv[3:5] == ("link", "add"):
            names.add(argv[5])
    ifnames = {n for n in names if not n[0].isdigit() and "/" not in n and n != "type"}
    ifnames -= set(plan.namespaces)
    assert ifnames == {"lo", CLIENT_IF, GATEWAY_CLIENT_IF, GATEWAY_SERVER_IF, SERVER_IF}
    assert all(len(n) < IFNAMSIZ for n in ifnames)


@pytest.mark.parametrize("clients", [1, 2, 50, MAX_CLIENTS])
def test_clients_get_distinct_addresses_in_the_benchmarking_ranges(clients: int) -> None:
    plan = LabPlan(clients=clients)
    view = plan.describe()
    v4 = [ipaddress.ip_address(a) for a in view["client"]["addresses"]]
    v6 = [ipaddress.ip_address(a) for a in view["client"]["addresses6"]]
    assert len(set(v4)) == len(v4) == clients == len(set(v6)) == len(v6)
    others = [*view["gateway"]["addresses"], view["server"]["address"]]
    others6 = [*view["gateway"]["addresses6"], view["server"]["address6"]]
    assert not {str(a) for a in v4} & set(others)
    assert not {str(a) for a in v6} & set(others6)
    bench4, bench6 = ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:2::/48")
    assert all(ipaddress.ip_address(a) in bench4 for a in [*map(str, v4), *others])
    assert all(ipaddress.ip_address(a) in bench6 for a in [*map(str, v6), *others6])


def test_every_described_address_is_assigned_in_its_namespace() -> None:
    plan = LabPlan("lab", 5)
    view = plan.describe()
    assigned = {
        (s.argv[2], s.argv[5].split("/")[0], s.argv[7])
        for s in plan.up_steps()
        if s.argv[3:5] == ("addr", "add")
    }
    client, gw, server = plan.namespaces
    expected = {(client, a, CLIENT_IF) for a in view["client"]["addresses"]}
    expected |= {(client, a, CLIENT_IF) for a in view["client"]["addresses6"]}
    for a in view["gateway"]["addresses"] + view["gateway"]["addresses6"]:
        side = GATEWAY_CLIENT_IF if a.startswith(("198.18.", "2001:2:0:1:")) else GATEWAY_SERVER_IF
        expected.add((gw, a, side))
    expected |= {(server, view["server"][k], SERVER_IF) for k in ("address", "address6")}
    assert assigned == expected
    v6_adds = [
        s.argv for s in plan.up_steps() if s.argv[3:5] == ("addr", "add") and ":" in s.argv[5]
    ]
    assert v6_adds and all(argv[-1] == "nodad" for argv in v6_adds)


def test_no_route_leads_out_of_the_lab() -> None:
    plan = LabPlan()
    routes = [s.argv for s in plan.up_steps() if s.argv[3:5] == ("route", "add")]
    client, _, server = plan.namespaces
    gateway = plan.describe()["gateway"]["addresses"] + plan.describe()["gateway"]["addresses6"]
    assert {argv[2] for argv in routes} == {client, server}  # the gateway: connected nets only
    for argv in routes:
        assert argv[5] != "default" and argv[6:] == ("via", argv[7])
        assert argv[7] in gateway
        far = ipaddress.ip_network(argv[5])
        near = "198.18." if argv[2] == client else "198.19."
        assert not str(far.network_address).startswith(near)


def test_forwarding_is_switched_on_in_the_gateway_only() -> None:
    plan = LabPlan()
    forwarding = [
        s.argv
        for s in plan.up_steps()
        if any("forwarding" in w or "ip_forward" in w for w in s.argv)
    ]
    assert [argv[3] for argv in forwarding] == [plan.namespace("gateway")]
    assert "net.ipv4.ip_forward=1" in forwarding[0]
    assert "net.ipv6.conf.all.forwarding=1" in forwarding[0]


def test_the_gateway_side_of_each_pair_comes_up_first() -> None:
    plan = LabPlan()
    ups = [s.argv[6] for s in plan.up_steps() if s.argv[3:5] == ("link", "set")]
    assert ups.index(GATEWAY_CLIENT_IF) < ups.index(CLIENT_IF)
    assert ups.index(GATEWAY_SERVER_IF) < ups.index(SERVER_IF)


@pytest.mark.parametrize(
    ("prefix", "clients"),
    [("", 1), ("a b", 1), ("-x", 1), ("a/b", 1), ("a" * 33, 1), ("ok", 0), ("ok", MAX_CLIENTS + 1)],
)
def test_bad_names_and_counts_are_one_line_errors(prefix: str, clients: int) -> None:
    with pytest.raises(LabError) as caught:
        LabPlan(prefix, clients)
    assert "\n" not in str(caught.value)


def test_roles_name_the_namespaces() -> None:
    plan = LabPlan("lab")
    assert [plan.namespace(r) for r in ("client", "gateway", "server")] == [
        "lab-client",
        "lab-gw",
        "lab-server",
    ]
    with pytest.raises(LabError):
        plan.namespace("host")
