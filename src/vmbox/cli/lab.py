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
from vmbox.lab.plan import DEFAULT_PREFIX, MAX_CLIENTS, ROLES, LabError, LabPlan

T = TypeVar("T")
NAME_HELP = (
    "The lab's name: its namespaces are NAME-client, NAME-gw and NAME-server. "
    "Several labs with different names can exist at once."
)


def _plan(prefix: str, clients: int = 1) -> LabPlan:
    try:
        return LabPlan(prefix, clients)
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
    """


@lab.command()
@click.option(
    "--clients",
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_CLIENTS),
    help="Client addresses (198.18.0.10 up, and as many IPv6) on the client's one interface.",
)
@name_option
@click.option("--replace", is_flag=True, help="Remove a lab of the same name first.")
def up(clients: int, prefix: str, replace: bool) -> None:
    """Build the lab: three namespaces joined by two veth pairs.

    A lab of that name that already exists is an error (or, with --replace,
    is removed first). A failure half-way removes what was made.
    """
    plan = _plan(prefix, clients)
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


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("role", type=click.Choice(ROLES))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@name_option
def exec(role: str, command: tuple[str, ...], prefix: str) -> NoReturn:
    """Run COMMAND inside the lab's ROLE namespace (client, gateway or server).

    \b
    vmbox lab exec server -- python3 -m http.server 8080
    vmbox lab exec client -- curl --interface 198.18.0.11 http://198.19.0.2:8080/

    Put the command after `--` (options before it are vmbox's, such as --name).
    Exits with COMMAND's exit status. `vmbox lab down` stops what is still running.
    """
    _plan(prefix)
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
    "address6"}}.
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
    client, gw, server = view["client"], view["gateway"], view["server"]
    rows = [
        ("ROLE", "NAMESPACE", "INTERFACES", "IPV4", "IPV6"),
        ("client", client["namespace"], client["interface"],
         _span(client["addresses"]), _span(client["addresses6"])),
        ("gateway", gw["namespace"], f"{gw['interfaces']['client']} {gw['interfaces']['server']}",
         " ".join(gw["addresses"]), " ".join(gw["addresses6"])),
        ("server", server["namespace"], server["interface"],
         server["address"] or "-", server["address6"] or "-"),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return f"lab {view['name']}\n" + "\n".join(line.rstrip() for line in lines)
