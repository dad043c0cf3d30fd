"""Pure: what `vmbox lab up` builds, as the ordered commands that build and remove it.

A lab is three network namespaces in a line, client - gateway - server, joined
by two veth pairs that are created directly inside the namespaces (`ip -n A
link add ... peer ... netns B`), so no command addresses the host's own
namespace except `ip netns add|del`, which only make and remove the names
under /run/netns. The gateway routes between its two connected subnets and
nothing else: no packet leaves the lab. Addresses come from the ranges set
aside for benchmarking network devices (198.18.0.0/15, RFC 2544; 2001:2::/48,
RFC 5180).

`LabPlan.up_steps()` is what the driver (vmbox.lab.netlab) runs in order; a
`Step`'s `undo` is the command that removes what it made, or None when what
it made lives inside a namespace and goes with it (`Step.inside`).
`LabPlan.describe()` is the shape `vmbox lab show --json` prints, so a test can
compare the kernel's view with the plan's. No I/O here.

A fleet (`LabPlan(nodes=N)`, `vmbox lab up --nodes N`) puts a router and N
gateway nodes where the one gateway was:

    client --c0══rt-c-- router --rt-nI══gw-c-- node I --gw-s══s-nI--+
                          |  ECMP route to the server side,          s0 (a bridge) server
                          +--rt-s══════════════════════════ s-rt ---+
                             the direct return path

The router reaches each node on a link of its own and spreads flows over the
nodes with one multipath route hashed on the 5-tuple
(`fib_multipath_hash_policy=1`, the router's namespace only); the nodes reach
the server through a bridge in the server's namespace; the server answers
straight to the router on a link of its own, so a node sees only the
client->server direction. `route_command(nodes)` is the one replacement of
that route (per address family) that puts a set of nodes in it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "vmbox"
MAX_CLIENTS = 200
MAX_NODES = 16
ROLES = ("client", "gateway", "server")
FLEET_ROLES = ("client", "router", "server", *(f"node{i}" for i in range(1, MAX_NODES + 1)))

# Interface names: fixed and short (IFNAMSIZ leaves 15 characters).
CLIENT_IF = "c0"
GATEWAY_CLIENT_IF = "gw-c"
"""The gateway's client-side interface: what a spec's `gateway.interface` names."""
GATEWAY_SERVER_IF = "gw-s"
SERVER_IF = "s0"

CLIENT_NET4 = ipaddress.IPv4Network("198.18.0.0/24")
SERVER_NET4 = ipaddress.IPv4Network("198.19.0.0/24")
CLIENT_NET6 = ipaddress.IPv6Network("2001:2:0:1::/64")
SERVER_NET6 = ipaddress.IPv6Network("2001:2:0:2::/64")
GATEWAY_HOST, SERVER_HOST, FIRST_CLIENT_HOST = 1, 2, 10

# A fleet: the router takes the gateway's place on the client side (and its
# address, .1), node I's link to the router is the I-th /24 (/64) of the node
# range (router .1, node .2), node I is .10+I on the server side, and the
# server's return link to the router is one more subnet (router .1, server .2).
ROUTER_CLIENT_IF = "rt-c"
ROUTER_RETURN_IF = "rt-s"
SERVER_RETURN_IF = "s-rt"
NODE_CLIENT_IF = GATEWAY_CLIENT_IF
NODE_SERVER_IF = GATEWAY_SERVER_IF
RETURN_NET4 = ipaddress.IPv4Network("198.19.1.0/24")
RETURN_NET6 = ipaddress.IPv6Network("2001:2:0:3::/64")
NODE_LINKS4 = list(ipaddress.IPv4Network("198.18.16.0/20").subnets(new_prefix=24))
NODE_LINKS6 = list(ipaddress.IPv6Network("2001:2:0:100::/60").subnets(new_prefix=64))
ROUTER_HOST, NODE_HOST, FIRST_NODE_SERVER_HOST = 1, 2, 10
RETURN_PATH = "direct"
# The router hashes on the 5-tuple (addresses, protocol, ports) and does not
# check that a source is routed back the way it came (the server's answers
# arrive on the return link, while the server side is routed via the nodes).
_ROUTER_SYSCTLS = (
    "net.ipv4.fib_multipath_hash_policy=1",
    "net.ipv6.fib_multipath_hash_policy=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
)

_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
Argv = tuple[str, ...]
# Set in each namespace before its links exist, so they inherit it: no duplicate
# address detection (the lab is a closed wire; a tentative link-local address
# lost the first IPv6 packets after `up`), and forwarding in the gateway only.
_NO_DAD = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
_FORWARDING = ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


class LabError(Exception):
    """A lab cannot be planned, built, read or removed; str() is one line."""


@dataclass(frozen=True, slots=True)
class Step:
    """One command of `up`: its argv, how to undo it, and the namespace it acts in."""

    argv: Argv
    undo: Argv | None = None
    inside: str | None = None


def _host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, index: int) -> str:
    return str(net.network_address + index)


def _cidr(net: ipaddress.IPv4Network | ipaddress.IPv6Network, index: int) -> str:
    return f"{_host(net, index)}/{net.prefixlen}"


@dataclass(frozen=True, slots=True)
class LabPlan:
    """The lab named `prefix` with `clients` client addresses (one per client, IPv4 and IPv6)."""

    prefix: str = DEFAULT_PREFIX
    clients: int = 1
    nodes: int = 0
    """0: one gateway (client - gateway - server); 1 to MAX_NODES: a router and that many nodes."""

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise LabError(
                f"lab name {self.prefix!r}: use 1-32 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise LabError(f"--clients {self.clients}: a lab has 1 to {MAX_CLIENTS} clients")
        if not 0 <= self.nodes <= MAX_NODES:
            raise LabError(f"--nodes {self.nodes}: a fleet has 1 to {MAX_NODES} nodes")

    # Names and addresses.
    @property
    def fleet(self) -> bool:
        return self.nodes > 0

    @property
    def roles(self) -> tuple[str, ...]:
        """This lab's roles, in the order its namespaces are made."""
        if not self.fleet:
            return ROLES
        return ("client", "router", *self.node_roles, "server")

    @property
    def node_roles(self) -> tuple[str, ...]:
        return tuple(f"node{i}" for i in range(1, self.nodes + 1))

    def namespace(self, role: str) -> str:
        """The namespace of `role`: client, gateway, server, router or node1..node16.

        By name only (`vmbox lab exec` and `down` find a lab's namespaces without
        knowing its shape); `roles` are the ones this plan builds."""
        if role not in ROLES and role not in FLEET_ROLES:
            raise LabError(
                f"unknown lab role {role!r}: use client, gateway, server, router "
                f"or node1..node{MAX_NODES}"
            )
        short = {"gateway": "gw", "router": "rt"}.get(role, role)
        if role.startswith("node"):
            short = f"n{role[4:]}"
        return f"{self.prefix}-{short}"

    @property
    def node_template(self) -> str:
        """The nodes' namespaces with `{n}` for the number: `gateway.namespace` of a service
        enforced in their kernels (`enforce: kernel`)."""
        return self.namespace("node1").removesuffix("1") + "{n}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.namespace(role) for role in self.roles)

    @property
    def every_namespace(self) -> tuple[str, ...]:
        """Every namespace a lab of this name can have, whatever its shape: what `down` removes."""
        roles = dict.fromkeys([*ROLES, *FLEET_ROLES])
        return tuple(self.namespace(role) for role in roles)

    @property
    def client_addresses(self) -> list[str]:
        return [_host(CLIENT_NET4, FIRST_CLIENT_HOST + i) for i in range(self.clients)]

    @property
    def client_addresses6(self) -> list[str]:
        return [_host(CLIENT_NET6, FIRST_CLIENT_HOST + i) for i in range(self.clients)]

    def node_addresses(self, node: int) -> dict[str, str]:
        """Node `node`'s addresses: its end of the router link and its server-side one."""
        self._check_node(node)
        link4, link6 = NODE_LINKS4[node - 1], NODE_LINKS6[node - 1]
        return {
            "client": _host(link4, NODE_HOST),
            "client6": _host(link6, NODE_HOST),
            "router": _host(link4, ROUTER_HOST),
            "router6": _host(link6, ROUTER_HOST),
            "server": _host(SERVER_NET4, FIRST_NODE_SERVER_HOST + node),
            "server6": _host(SERVER_NET6, FIRST_NODE_SERVER_HOST + node),
        }

    def _check_node(self, node: int) -> None:
        if not 1 <= node <= self.nodes:
            raise LabError(f"lab {self.prefix!r} has no node {node} (it has 1 to {self.nodes})")

    # Commands.
    def route_command(self, nodes: Iterable[int]) -> list[Argv]:
        """The router's route to the server side through `nodes` (the ready ones), for each
        address family one `ip route replace` of the whole multipath route: the kernel swaps
        the route in one step, so a flow never sees a route with a node half added or removed
        (IPv4; IPv6 inserts a multipath route's nexthops one by one under the replace: see
        DESIGN.md). No node: an unreachable route (the router answers with an ICMP error)."""
        chosen = sorted(set(nodes))
        for node in chosen:
            self._check_node(node)
        router = self.namespace("router")
        argv: list[Argv] = []
        for net, via in ((SERVER_NET4, "client"), (SERVER_NET6, "client6")):
            if not chosen:  # (`ip` takes the family from the prefix: one `ip -batch` for both)
                argv.append(("ip", "-n", router, "route", "replace", "unreachable", str(net)))
                continue
            hops: list[str] = []
            for node in chosen:  # the node's end of its link to the router
                hops += [
                    "nexthop",
                    "via",
                    self.node_addresses(node)[via],
                    "dev",
                    router_node_if(node),
                ]
            argv.append(("ip", "-n", router, "route", "replace", str(net), *hops))
        return argv

    def up_steps(self) -> list[Step]:
        if self.fleet:
            return self._fleet_steps()
        client, gw, server = self.namespaces
        steps = [
            Step(("ip", "netns", "add", ns), undo=("ip", "netns", "del", ns))
            for ns in self.namespaces
        ]
        for ns in (client, gw, server):
            steps.append(self._in(ns, "link", "set", "dev", "lo", "up"))
            steps.append(self._sysctl(ns, *_NO_DAD, *(_FORWARDING if ns == gw else ())))
        steps.append(self._veth(gw, GATEWAY_CLIENT_IF, client, CLIENT_IF))
        steps.append(self._veth(gw, GATEWAY_SERVER_IF, server, SERVER_IF))
        # The gateway's side of each pair comes up first: with the client's side
        # first, the gateway ignored the client's first IPv6 neighbour
        # solicitation and the first packet after `up` waited 1 s for the retry.
        steps += self._addresses(gw, GATEWAY_CLIENT_IF, [(CLIENT_NET4, CLIENT_NET6, GATEWAY_HOST)])
        steps += self._addresses(gw, GATEWAY_SERVER_IF, [(SERVER_NET4, SERVER_NET6, GATEWAY_HOST)])
        steps += self._addresses(client, CLIENT_IF, self._client_hosts())
        steps += self._addresses(server, SERVER_IF, [(SERVER_NET4, SERVER_NET6, SERVER_HOST)])
        steps += self._routes(client, SERVER_NET4, SERVER_NET6, CLIENT_NET4, CLIENT_NET6)
        steps += self._routes(server, CLIENT_NET4, CLIENT_NET6, SERVER_NET4, SERVER_NET6)
        return steps

    def _fleet_steps(self) -> list[Step]:
        client, router, server = (self.namespace(r) for r in ("client", "router", "server"))
        nodes = [self.namespace(role) for role in self.node_roles]
        steps = [
            Step(("ip", "netns", "add", ns), undo=("ip", "netns", "del", ns))
            for ns in self.namespaces
        ]
        for ns in self.namespaces:
            extra: tuple[str, ...] = _FORWARDING if ns in (router, *nodes) else ()
            extra += _ROUTER_SYSCTLS if ns == router else ()
            steps.append(self._sysctl(ns, *_NO_DAD, *extra))
        # Grouped by namespace, so `up` runs one `ip -batch` per group (16 nodes:
        # 59 processes, not 160). The server: a bridge (s0, its one address as
        # in the lab of one gateway) with a port per node, made from its side.
        steps.append(self._lo(server))
        steps.append(self._in(server, "link", "add", SERVER_IF, "type", "bridge"))
        for i, ns in enumerate(nodes, 1):
            steps.append(self._veth(server, server_node_if(i), ns, NODE_SERVER_IF))
            steps.append(
                self._in(server, "link", "set", "dev", server_node_if(i), "master", SERVER_IF)
            )
        # The router: its links to the client, the server (the return link)
        # and each node, up with their addresses before the far ends (the
        # forwarding ends first, see up_steps).
        steps.append(self._lo(router))
        steps.append(self._veth(router, ROUTER_CLIENT_IF, client, CLIENT_IF))
        steps.append(self._veth(router, ROUTER_RETURN_IF, server, SERVER_RETURN_IF))
        for i, ns in enumerate(nodes, 1):
            steps.append(self._veth(router, router_node_if(i), ns, NODE_CLIENT_IF))
        steps += self._addresses(
            router, ROUTER_CLIENT_IF, [(CLIENT_NET4, CLIENT_NET6, ROUTER_HOST)]
        )
        steps += self._addresses(
            router, ROUTER_RETURN_IF, [(RETURN_NET4, RETURN_NET6, ROUTER_HOST)]
        )
        for i in range(1, self.nodes + 1):
            link = (NODE_LINKS4[i - 1], NODE_LINKS6[i - 1], ROUTER_HOST)
            steps += self._addresses(router, router_node_if(i), [link])
        # Each node: both sides up, and a route to the client side via the
        # router (only for what a node itself sends: ICMP errors).
        for i, ns in enumerate(nodes, 1):
            steps.append(self._lo(ns))
            steps += self._addresses(ns, NODE_CLIENT_IF, [(*_node_link(i), NODE_HOST)])
            server_side = [(SERVER_NET4, SERVER_NET6, FIRST_NODE_SERVER_HOST + i)]
            steps += self._addresses(ns, NODE_SERVER_IF, server_side)
            steps += self._routes(ns, CLIENT_NET4, CLIENT_NET6, *_node_link(i))
        # The client, then the server's ports, address and return link.
        steps.append(self._lo(client))
        steps += self._addresses(client, CLIENT_IF, self._client_hosts())
        steps += self._routes(client, SERVER_NET4, SERVER_NET6, CLIENT_NET4, CLIENT_NET6)
        for i in range(1, self.nodes + 1):
            steps.append(self._in(server, "link", "set", "dev", server_node_if(i), "up"))
        steps += self._addresses(server, SERVER_IF, [(SERVER_NET4, SERVER_NET6, SERVER_HOST)])
        steps += self._addresses(
            server, SERVER_RETURN_IF, [(RETURN_NET4, RETURN_NET6, SERVER_HOST)]
        )
        # The server answers from its service address (s0's), not the return
        # link's: a socket that picks its source from the route (iperf3's UDP
        # server connects to its client) would otherwise answer from 198.19.1.2.
        for net, via, src in (
            (CLIENT_NET4, _host(RETURN_NET4, ROUTER_HOST), _host(SERVER_NET4, SERVER_HOST)),
            (CLIENT_NET6, _host(RETURN_NET6, ROUTER_HOST), _host(SERVER_NET6, SERVER_HOST)),
        ):
            steps.append(self._in(server, "route", "add", str(net), "via", via, "src", src))
        # Last, the router's route through every node: the lab is ready.
        route = self.route_command(range(1, self.nodes + 1))
        return steps + [Step(argv, inside=router) for argv in route]

    def down_commands(self) -> list[Argv]:
        """What removes the lab once its processes are gone: its namespaces, newest first."""
        return [s.undo for s in reversed(self.up_steps()) if s.undo is not None]

    def _veth(self, ns: str, name: str, peer_ns: str, peer: str) -> Step:
        """A veth pair made inside `ns` with its peer moved straight into `peer_ns`."""
        return self._in(
            ns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns
        )

    def _lo(self, ns: str) -> Step:
        return self._in(ns, "link", "set", "dev", "lo", "up")

    def _sysctl(self, ns: str, *settings: str) -> Step:
        return Step(("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings), inside=ns)

    def _in(self, ns: str, *args: str) -> Step:
        return Step(("ip", "-n", ns, *args), inside=ns)

    def _client_hosts(self) -> list[tuple[ipaddress.IPv4Network, ipaddress.IPv6Network, int]]:
        return [(CLIENT_NET4, CLIENT_NET6, FIRST_CLIENT_HOST + i) for i in range(self.clients)]

    def _addresses(
        self,
        ns: str,
        dev: str,
        hosts: list[tuple[ipaddress.IPv4Network, ipaddress.IPv6Network, int]],
    ) -> list[Step]:
        steps = [self._in(ns, "addr", "add", _cidr(v4, i), "dev", dev) for v4, _, i in hosts]
        steps += [
            self._in(ns, "addr", "add", _cidr(v6, i), "dev", dev, "nodad") for _, v6, i in hosts
        ]
        steps.append(self._in(ns, "link", "set", "dev", dev, "up"))
        return steps

    def _routes(
        self,
        ns: str,
        far4: ipaddress.IPv4Network,
        far6: ipaddress.IPv6Network,
        near4: ipaddress.IPv4Network,
        near6: ipaddress.IPv6Network,
    ) -> list[Step]:
        """Only the far side's subnets, via the gateway (a fleet's router is .1 too on each of
        its links): no default route, no way out."""
        return [
            self._in(ns, "route", "add", str(far4), "via", _host(near4, GATEWAY_HOST)),
            self._in(ns, "route", "add", str(far6), "via", _host(near6, GATEWAY_HOST)),
        ]

    def describe(self, in_route: Iterable[int] | None = None) -> dict[str, Any]:
        """The lab as `vmbox lab show --json` prints it (vmbox.lab.netlab.show reads it back).
        A fleet's nodes say whether they are `in_route` (default: all, as after `up`)."""
        if self.fleet:
            ready = set(range(1, self.nodes + 1) if in_route is None else in_route)
            return self._describe_fleet(ready)
        client, gw, server = self.namespaces
        return {
            "name": self.prefix,
            "client": {
                "namespace": client,
                "interface": CLIENT_IF,
                "addresses": self.client_addresses,
                "addresses6": self.client_addresses6,
            },
            "gateway": {
                "namespace": gw,
                "interfaces": {"client": GATEWAY_CLIENT_IF, "server": GATEWAY_SERVER_IF},
                "addresses": [_host(CLIENT_NET4, GATEWAY_HOST), _host(SERVER_NET4, GATEWAY_HOST)],
                "addresses6": [_host(CLIENT_NET6, GATEWAY_HOST), _host(SERVER_NET6, GATEWAY_HOST)],
            },
            "server": {
                "namespace": server,
                "interface": SERVER_IF,
                "address": _host(SERVER_NET4, SERVER_HOST),
                "address6": _host(SERVER_NET6, SERVER_HOST),
            },
        }

    def _client(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace("client"),
            "interface": CLIENT_IF,
            "addresses": self.client_addresses,
            "addresses6": self.client_addresses6,
        }

    def _describe_fleet(self, ready: set[int]) -> dict[str, Any]:
        nodes = []
        for i in range(1, self.nodes + 1):
            a = self.node_addresses(i)
            nodes.append(
                {
                    "node": i,
                    "namespace": self.namespace(f"node{i}"),
                    "interfaces": {"client": NODE_CLIENT_IF, "server": NODE_SERVER_IF},
                    "addresses": _numeric([a["client"], a["server"]]),
                    "addresses6": _numeric([a["client6"], a["server6"]]),
                    "router_interface": router_node_if(i),
                    "in_route": i in ready,
                }
            )
        return {
            "name": self.prefix,
            "client": self._client(),
            "router": {
                "namespace": self.namespace("router"),
                "interfaces": {"client": ROUTER_CLIENT_IF, "return": ROUTER_RETURN_IF},
                "addresses": [_host(CLIENT_NET4, ROUTER_HOST), _host(RETURN_NET4, ROUTER_HOST)],
                "addresses6": [_host(CLIENT_NET6, ROUTER_HOST), _host(RETURN_NET6, ROUTER_HOST)],
            },
            "nodes": nodes,
            "return_path": RETURN_PATH,
            "server": {
                "namespace": self.namespace("server"),
                "interface": SERVER_IF,
                "address": _host(SERVER_NET4, SERVER_HOST),
                "address6": _host(SERVER_NET6, SERVER_HOST),
            },
        }


def _node_link(node: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """The subnets of node `node`'s link to the router."""
    return NODE_LINKS4[node - 1], NODE_LINKS6[node - 1]


def _numeric(addresses: list[str]) -> list[str]:
    return sorted(addresses, key=ipaddress.ip_address)


def router_node_if(node: int) -> str:
    """The router's end of its link to node `node`."""
    return f"rt-n{node}"


def server_node_if(node: int) -> str:
    """Node `node`'s port on the server's bridge."""
    return f"s-n{node}"
