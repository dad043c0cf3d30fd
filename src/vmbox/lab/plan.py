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
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "vmbox"
MAX_CLIENTS = 200
ROLES = ("client", "gateway", "server")

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

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise LabError(
                f"lab name {self.prefix!r}: use 1-32 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise LabError(f"--clients {self.clients}: a lab has 1 to {MAX_CLIENTS} clients")

    # Names and addresses.
    def namespace(self, role: str) -> str:
        if role not in ROLES:
            raise LabError(f"unknown lab role {role!r}: use one of {', '.join(ROLES)}")
        return f"{self.prefix}-{'gw' if role == 'gateway' else role}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.namespace(role) for role in ROLES)

    @property
    def client_addresses(self) -> list[str]:
        return [_host(CLIENT_NET4, FIRST_CLIENT_HOST + i) for i in range(self.clients)]

    @property
    def client_addresses6(self) -> list[str]:
        return [_host(CLIENT_NET6, FIRST_CLIENT_HOST + i) for i in range(self.clients)]

    # Commands.
    def up_steps(self) -> list[Step]:
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

    def down_commands(self) -> list[Argv]:
        """What removes the lab once its processes are gone: its namespaces, newest first."""
        return [s.undo for s in reversed(self.up_steps()) if s.undo is not None]

    def _veth(self, ns: str, name: str, peer_ns: str, peer: str) -> Step:
        """A veth pair made inside `ns` with its peer moved straight into `peer_ns`."""
        return self._in(
            ns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns
        )

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
        """Only the far side's subnets, via the gateway: no default route, no way out."""
        return [
            self._in(ns, "route", "add", str(far4), "via", _host(near4, GATEWAY_HOST)),
            self._in(ns, "route", "add", str(far6), "via", _host(near6, GATEWAY_HOST)),
        ]

    def describe(self) -> dict[str, Any]:
        """The lab as `vmbox lab show --json` prints it (vmbox.lab.netlab.show reads it back)."""
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
