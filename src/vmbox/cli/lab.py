"""`vmbox lab`: build, show, enter and remove a lab of network namespaces.

A click group registered by vmbox.cli.main; the work is vmbox.lab's. Every
failure (not root, `ip` missing, a lab that exists or does not) is one line
and exit 1; a bad --name is exit 2. `exec` replaces this process with `ip
netns exec`, so the command's exit status is the command's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from vmbox.cli.errors import EXIT_USAGE, fail
from vmbox.lab import netlab
from vmbox.lab.plan import DEFAULT_PREFIX, MAX_CLIENTS, MAX_NODES, LabError, LabPlan

T = TypeVar("T")
NAME_HELP = (
    "The lab's name: its namespaces are NAME-client, NAME-gw and NAME-server. "
    "Several labs with different names can exist at once."
)


def _plan(prefix: str, clients: int = 1, nodes: int = 0) -> LabPlan:
    try:
        return LabPlan(prefix, clients, nodes)
    except LabError as exc:
        fail(str(exc), EXIT_USAGE)


def _do(action: Callable[[], T]) -> T:
    try:
        return action()
    except LabError as exc:
        fail(str(exc))


def name_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--name", "prefix", default=DEFAULT_PREFIX, show_default=True, help=NAME_HELP
    )(f)


@click.group()
def lab() -> None:
    """A lab of network namespaces to run an in-path service in (needs root).

    \b
    client namespace          gateway namespace           server namespace
      c0 198.18.0.10.. ---- gw-c 198.18.0.1
                              gw-s 198.19.0.1 --------- s0 198.19.0.2
    IPv6: 2001:2:0:1::/64 on the client side, 2001:2:0:2::/64 on the server side.

    The gateway forwards between its two sides and has no other route, so
    no packet leaves the lab; a spec's `gateway: {namespace: vmbox-gw,
    interface: gw-c}` runs a service's replicas on its path. Nothing in the
    host's own namespace changes: no interface, route, rule or sysctl.

    \b
    With --nodes N, a fleet: a router (vmbox-rt, rt-c 198.18.0.1) spreads the
    clients' flows over N gateway nodes (vmbox-n1.., each with gw-c on its own
    link to the router and gw-s on a bridge s0 in the server's namespace)
    with one ECMP route hashed on the 5-tuple; the server answers straight to
    the router (rt-s, 198.19.1.1), so a node sees only client->server traffic.
    `vmbox lab route 1 3` puts nodes 1 and 3 alone in the route.
    """


@lab.command()
@click.option(
    "--clients",
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_CLIENTS),
    help="Client addresses (198.18.0.10 up, and as many IPv6) on the client's one interface.",
)
@click.option(
    "--nodes",
    default=0,
    type=click.IntRange(0, MAX_NODES),
    help=f"A fleet: a router and this many gateway nodes (1-{MAX_NODES}) behind one ECMP route, "
    "all in the route. Default: one gateway.",
)
@name_option
@click.option("--replace", is_flag=True, help="Remove a lab of the same name first.")
def up(clients: int, nodes: int, prefix: str, replace: bool) -> None:
    """Build the lab: three namespaces joined by two veth pairs (or a fleet with --nodes).

    A lab of that name that already exists is an error (or, with --replace,
    is removed first). A failure half-way removes what was made.
    """
    plan = _plan(prefix, clients, nodes)
    view = _do(lambda: netlab.up(plan, replace=replace))
    click.echo(render(view))


@lab.command()
@name_option
def down(prefix: str) -> None:
    """Remove the lab: stop every process inside its namespaces, delete them.

    Their links, addresses, routes, rules and sysctls go with them. A lab
    that does not exist is not an error.
    """
    _plan(prefix)
    removed = _do(lambda: netlab.down(prefix))
    click.echo(f"removed {', '.join(removed)}" if removed else f"no lab named {prefix!r}")


@lab.command()
@click.argument("nodes", nargs=-1, type=click.IntRange(1, MAX_NODES))
@click.option("--none", "no_node", is_flag=True, help="Take every node out of the route.")
@name_option
def route(nodes: tuple[int, ...], no_node: bool, prefix: str) -> None:
    """Route a fleet's traffic through NODES only: `vmbox lab route 1 2 4`.

    One `ip route replace` of the router's multipath route per address
    family: flows move from one set of nodes to the other at once. The other
    nodes stay built, out of the route. --none routes through no node (the
    router answers with ICMP unreachable).
    """
    if bool(nodes) == no_node:
        fail("name the nodes to route through (`vmbox lab route 1 2`), or give --none", EXIT_USAGE)
    view = _do(lambda: netlab.show(prefix))
    if "nodes" not in view:
        fail(f"lab {prefix!r} has one gateway: `vmbox lab up --nodes N` builds a fleet")
    plan = _plan(prefix, nodes=len(view["nodes"]))
    routed = _do(lambda: netlab.set_nodes(plan, nodes))
    click.echo(f"lab {prefix}: route through " + (", ".join(f"node{i}" for i in routed) or "none"))


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("role")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@name_option
def exec(role: str, command: tuple[str, ...], prefix: str) -> NoReturn:
    """Run COMMAND inside the lab's ROLE namespace (client, gateway or server;
    in a fleet: client, router, node1..node16 or server).

    \b
    vmbox lab exec server -- python3 -m http.server 8080
    vmbox lab exec client -- curl --interface 198.18.0.11 http://198.19.0.2:8080/

    Put the command after `--` (options before it are vmbox's, such as --name).
    Exits with COMMAND's exit status. `vmbox lab down` stops what is still running.
    """
    try:
        _plan(prefix).namespace(role)
    except LabError as exc:
        fail(str(exc), EXIT_USAGE)
    _do(netlab.require_tools)
    argv = _do(lambda: netlab.exec_argv(role, command, prefix))
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        fail(f"cannot run {argv[0]}: {exc.strerror}")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the lab as JSON (for scripts).")
@name_option
def show(as_json: bool, prefix: str) -> None:
    """Show the lab as the kernel has it: namespaces, interfaces, addresses.

    \b
    --json prints {"name": ..., "client": {"namespace", "interface", "addresses",
    "addresses6"}, "gateway": {"namespace", "interfaces": {"client", "server"},
    "addresses", "addresses6"}, "server": {"namespace", "interface", "address",
    "address6"}}; a fleet has "router": {"namespace", "interfaces": {"client",
    "return"}, "addresses", "addresses6"} and "nodes": [{"node", "namespace",
    "interfaces", "addresses", "addresses6", "router_interface", "in_route"}]
    in place of "gateway", and "return_path": "direct".
    """
    _plan(prefix)
    view = _do(lambda: netlab.show(prefix))
    click.echo(json.dumps(view, indent=2) if as_json else render(view))


def _span(addresses: list[str]) -> str:
    if len(addresses) <= 2:
        return " ".join(addresses)
    return f"{addresses[0]} .. {addresses[-1]} ({len(addresses)})"


def render(view: dict[str, Any]) -> str:
    """The short human table of `vmbox lab up` and `vmbox lab show`."""
    client, server = view["client"], view["server"]
    rows = [
        ("ROLE", "NAMESPACE", "INTERFACES", "IPV4", "IPV6"),
        ("client", client["namespace"], client["interface"],
         _span(client["addresses"]), _span(client["addresses6"])),
    ]  # fmt: skip
    middle = [("gateway", view["gateway"])] if "gateway" in view else [("router", view["router"])]
    for node in view.get("nodes", []):
        role = f"node{node['node']}" + ("" if node["in_route"] else " (out of route)")
        middle.append((role, node))
    for role, part in middle:
        ifs = " ".join(part["interfaces"].values())
        rows.append(
            (
                role,
                part["namespace"],
                ifs,
                " ".join(part["addresses"]),
                " ".join(part["addresses6"]),
            )
        )
    rows.append(
        ("server", server["namespace"], server["interface"],
         server["address"] or "-", server["address6"] or "-"),
    )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return f"lab {view['name']}\n" + "\n".join(line.rstrip() for line in lines)
