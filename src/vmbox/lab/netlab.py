"""The lab driver: build, read back, enter and remove a lab of network namespaces.

Called by `vmbox lab` (vmbox.cli.lab) and by the tests, experiments and demo
that run an in-path service. `up` runs a `LabPlan`'s commands (an existing lab
of that name is an error, or is removed first with `replace=True`; a failure
half-way removes what this call made); `down` stops every process inside the
lab's namespaces and removes the namespaces, which takes their links,
addresses, routes, rules and sysctls with them; `show` reads the lab from the
kernel (`ip -j addr` inside each namespace), so it works from any process.
A fleet (`LabPlan(nodes=N)`) is built, read and removed the same way;
`set_nodes` puts a set of its nodes in the router's route (one `ip route
replace` per address family) and `routed_nodes` reads which are in it.
Every failure is a `LabError` whose str() is one line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import Any

from vmbox import netns
from vmbox.lab.plan import (
    CLIENT_IF,
    DEFAULT_PREFIX,
    GATEWAY_CLIENT_IF,
    GATEWAY_SERVER_IF,
    MAX_NODES,
    SERVER_IF,
    SERVER_NET4,
    SERVER_NET6,
    Argv,
    LabError,
    LabPlan,
    Step,
    router_node_if,
)

COMMAND_TIMEOUT = 30.0
STOP_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a lab's processes


def require_tools() -> None:
    """Return when this process can build labs; a LabError saying what is missing if not."""
    if os.geteuid() != 0:
        raise LabError("vmbox lab needs root (it makes network namespaces): run it with sudo")
    for tool, package in (("ip", "iproute2"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            raise LabError(
                f"`{tool}` not found: `make setup` installs it (or apt-get install {package})"
            )


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"`{' '.join(argv)}`: {exc}") from None
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {_why(done, stdin)}")
    return done.stdout


def _why(done: subprocess.CompletedProcess[str], stdin: str | None) -> str:
    """The cause in one line; for `ip -batch`, with the command that failed."""
    lines = (done.stderr or done.stdout).strip().splitlines()
    causes = [line for line in lines if not line.startswith("Command failed")]
    why = causes[-1] if causes else lines[-1] if lines else f"exit code {done.returncode}"
    failed = re.search(r"Command failed -:(\d+)", done.stderr or "")
    if failed and stdin is not None:
        batch = stdin.splitlines()
        index = int(failed.group(1)) - 1
        if 0 <= index < len(batch):
            why = f"{why} (at `{batch[index]}`)"
    return why


def _batches(steps: Sequence[Step]) -> Iterable[tuple[list[Step], Argv, str | None]]:
    """Steps in runs: consecutive `ip -n NS ...` steps go to one `ip -n NS -batch -`.

    K clients take 2K address commands; one process per namespace instead of
    one per command keeps `up --clients 200` well under a second.
    """

    def key(step: Step) -> str | None:
        batchable = step.argv[:2] == ("ip", "-n") and step.undo is None
        return step.argv[2] if batchable else None

    for ns, run in groupby(steps, key=key):
        group = list(run)
        if ns is None:
            for step in group:
                yield [step], step.argv, None
        else:
            lines = "".join(" ".join(step.argv[3:]) + "\n" for step in group)
            yield group, ("ip", "-n", ns, "-batch", "-"), lines


def up(plan: LabPlan, replace: bool = False) -> dict[str, Any]:
    """Build the lab; return what `show` will read back. A lab of that name is an error."""
    require_tools()
    if replace:
        down(plan.prefix)
    if found := [ns for ns in plan.namespaces if netns.exists(ns)]:
        raise LabError(
            f"lab {plan.prefix!r} already exists ({', '.join(found)}): "
            f"`vmbox lab down --name {plan.prefix}` removes it"
        )
    made: list[Step] = []
    try:
        for steps, argv, stdin in _batches(plan.up_steps()):
            _run(argv, stdin)
            made += steps
    except BaseException:
        _undo(made)
        raise
    return plan.describe()


def _undo(made: Sequence[Step]) -> None:
    """Remove what a failed `up` made (its own namespaces only, never an existing one)."""
    for step in reversed(made):
        if step.undo is not None:
            ns = step.undo[-1]
            _stop_processes(ns)
            with contextlib.suppress(LabError):
                _run(step.undo)


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Stop every process in the lab's namespaces and remove them; return the ones removed.

    Whatever the lab's shape (one gateway or a fleet of any size) and however
    far its `up` got: every namespace a lab of this name can have is looked for."""
    plan = LabPlan(prefix)
    require_tools()
    present = [ns for ns in plan.every_namespace if netns.exists(ns)]
    for ns in present:
        _stop_processes(ns)
    for ns in reversed(present):
        if netns.exists(ns):
            _run(("ip", "netns", "del", ns))
    return present


def set_nodes(plan: LabPlan, nodes: Iterable[int]) -> list[int]:
    """Route the fleet's client->server traffic through `nodes` (those ready) and no other:
    one `ip route replace` of the router's multipath route per address family (both in
    one `ip -batch`). Return the nodes now in the route, as the kernel has it."""
    if not plan.fleet:
        raise LabError(f"lab {plan.prefix!r} has one gateway: only a fleet (--nodes) has a route")
    commands = plan.route_command(nodes)
    require_tools()
    lines = "".join(" ".join(argv[3:]) + "\n" for argv in commands)
    _run(("ip", "-n", plan.namespace("router"), "-batch", "-"), lines)
    return sorted(routed_nodes(plan))


def routed_nodes(plan: LabPlan) -> set[int]:
    """The nodes the router's route to the server side goes through (IPv4 and IPv6 both)."""
    router = plan.namespace("router")
    found: list[set[int]] = []
    for net in (SERVER_NET4, SERVER_NET6):
        family = f"-{net.version}"
        text = _run(("ip", "-n", router, "-j", family, "route", "show", "exact", str(net)))
        try:
            routes = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise LabError(f"`ip -n {router} -j route` printed something not JSON: {exc}") from None
        devs: set[str] = set()
        for route in routes:
            if route.get("type", "unicast") != "unicast":
                continue
            hops = route.get("nexthops") or [route]
            devs |= {hop["dev"] for hop in hops if "dev" in hop}
        found.append({i for i in range(1, plan.nodes + 1) if router_node_if(i) in devs})
    return found[0] & found[1]


def pids_in(ns: str) -> list[int]:
    """The processes whose network namespace is `ns` (what `ip netns pids` lists), not us."""
    try:
        target = os.stat(netns.path(ns))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            mine = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            continue
        if (mine.st_ino, mine.st_dev) == (target.st_ino, target.st_dev):
            found.append(int(entry))
    return found


def _stop_processes(ns: str) -> None:
    """SIGTERM the namespace's processes, SIGKILL those left after STOP_GRACE."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_in(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = pids_in(ns)
        if not pids:
            return
    raise LabError(f"processes {pids} in network namespace {ns} survived SIGKILL")


def _interfaces(ns: str) -> dict[str, dict[str, list[str]]]:
    """{ifname: {"inet": [...], "inet6": [...]}}: the global addresses, in numeric order."""
    try:
        links = json.loads(_run(("ip", "-n", ns, "-j", "addr", "show")))
    except json.JSONDecodeError as exc:
        raise LabError(f"`ip -n {ns} -j addr` printed something that is not JSON: {exc}") from None
    found: dict[str, dict[str, list[str]]] = {}
    for link in links:
        families: dict[str, list[str]] = {"inet": [], "inet6": []}
        for addr in link.get("addr_info", []):
            if addr.get("scope") == "global" and addr.get("family") in families:
                families[addr["family"]].append(addr["local"])
        for values in families.values():
            values.sort(key=ipaddress.ip_address)
        found[link["ifname"]] = families
    return found


def show(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The lab as the kernel has it, in the shape of `LabPlan.describe()`."""
    plan = LabPlan(prefix)
    require_tools()
    if netns.exists(plan.namespace("router")):
        return _show_fleet(prefix)
    missing = [ns for ns in plan.namespaces if not netns.exists(ns)]
    if len(missing) == len(plan.namespaces):
        raise LabError(f"no lab named {prefix!r}: `vmbox lab up --name {prefix}` builds one")
    if missing:
        raise LabError(
            f"lab {prefix!r} is incomplete (no {', '.join(missing)}): "
            f"`vmbox lab down --name {prefix}` removes the rest"
        )
    client_ns, gw_ns, server_ns = plan.namespaces
    client_ifs, gw_ifs, server_ifs = (_interfaces(ns) for ns in plan.namespaces)

    def on(ifs: dict[str, dict[str, list[str]]], name: str, ns: str) -> dict[str, list[str]]:
        if name not in ifs:
            raise LabError(f"lab {prefix!r} is incomplete: no interface {name} in {ns}")
        return ifs[name]

    c, s = on(client_ifs, CLIENT_IF, client_ns), on(server_ifs, SERVER_IF, server_ns)
    gc, gs = on(gw_ifs, GATEWAY_CLIENT_IF, gw_ns), on(gw_ifs, GATEWAY_SERVER_IF, gw_ns)
    return {
        "name": prefix,
        "client": {
            "namespace": client_ns,
            "interface": CLIENT_IF,
            "addresses": c["inet"],
            "addresses6": c["inet6"],
        },
        "gateway": {
            "namespace": gw_ns,
            "interfaces": {"client": GATEWAY_CLIENT_IF, "server": GATEWAY_SERVER_IF},
            "addresses": sorted(gc["inet"] + gs["inet"], key=ipaddress.ip_address),
            "addresses6": sorted(gc["inet6"] + gs["inet6"], key=ipaddress.ip_address),
        },
        "server": {
            "namespace": server_ns,
            "interface": SERVER_IF,
            "address": s["inet"][0] if s["inet"] else None,
            "address6": s["inet6"][0] if s["inet6"] else None,
        },
    }


def fleet(prefix: str) -> LabPlan:
    """The plan of the fleet named `prefix` as the kernel has it: its nodes are the node
    namespaces present (1..N). A LabError when there is no such fleet, or half of one."""
    probe = LabPlan(prefix, nodes=MAX_NODES)
    count = sum(1 for _ in _takewhile_exists(probe))
    if count == 0:
        if not netns.exists(probe.namespace("router")):
            raise LabError(f"no fleet named {prefix!r} (vmbox lab up --nodes N --name {prefix})")
        raise LabError(
            f"lab {prefix!r} is incomplete (a router and no node): "
            f"`vmbox lab down --name {prefix}` removes the rest"
        )
    plan = LabPlan(prefix, nodes=count)
    missing = [ns for ns in plan.namespaces if not netns.exists(ns)]
    extra = [ns for ns in probe.namespaces if ns not in plan.namespaces and netns.exists(ns)]
    if missing or extra:
        raise LabError(
            f"lab {prefix!r} is incomplete ({', '.join(missing) or 'nodes out of sequence'}): "
            f"`vmbox lab down --name {prefix}` removes the rest"
        )
    return plan


def _show_fleet(prefix: str) -> dict[str, Any]:
    """A fleet as the kernel has it (`fleet`), described."""
    plan = fleet(prefix)
    ifs = {role: _interfaces(plan.namespace(role)) for role in plan.roles}

    def on(role: str, name: str) -> dict[str, list[str]]:
        if name not in ifs[role]:
            raise LabError(
                f"lab {prefix!r} is incomplete: no interface {name} in {plan.namespace(role)}"
            )
        return ifs[role][name]

    def both(role: str, names: Sequence[str], family: str) -> list[str]:
        found = [a for name in names for a in on(role, name)[family]]
        return sorted(found, key=ipaddress.ip_address)

    view = plan.describe(in_route=routed_nodes(plan))
    c, s = on("client", CLIENT_IF), on("server", SERVER_IF)
    view["client"]["addresses"], view["client"]["addresses6"] = c["inet"], c["inet6"]
    router = view["router"]
    router_ifs = list(router["interfaces"].values())
    router["addresses"] = both("router", router_ifs, "inet")
    router["addresses6"] = both("router", router_ifs, "inet6")
    for node in view["nodes"]:
        role, node_ifs = f"node{node['node']}", list(node["interfaces"].values())
        on("router", node["router_interface"])
        node["addresses"], node["addresses6"] = (
            both(role, node_ifs, "inet"),
            both(role, node_ifs, "inet6"),
        )
    view["server"]["address"] = s["inet"][0] if s["inet"] else None
    view["server"]["address6"] = s["inet6"][0] if s["inet6"] else None
    return view


def _takewhile_exists(probe: LabPlan) -> Iterable[str]:
    for role in probe.node_roles:
        ns = probe.namespace(role)
        if not netns.exists(ns):
            return
        yield ns


def exec_argv(role: str, argv: Sequence[str], prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The command line that runs `argv` inside the lab's `role` namespace (it must exist)."""
    ns = LabPlan(prefix).namespace(role)
    if not netns.exists(ns):
        raise LabError(
            f"no lab named {prefix!r} (no namespace {ns}): "
            f"`vmbox lab up --name {prefix}` builds one"
        )
    return netns.exec_argv(ns, argv)
