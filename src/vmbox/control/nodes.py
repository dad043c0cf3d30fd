"""The controller's side of a kernel-enforced service: its tables, and a lab's route.

Called by vmbox.control.controller for `enforce: kernel` services. Each replica
keeps its node's table (vmbox.enforce.node) and leaves it closed when it goes,
so a node still in the route admits nothing the others' shares do not count.
A replica that dies cannot: while the controller holds its place it renews
the table's dead man's switch (`renew`), and it closes its table (`close`)
before it removes the dead member, whose departure grows the siblings' shares. When
the whole service goes down, the controller removes the table from every
node a replica of it may have used (1 .. replicas.max, and any replica it
started beyond that), so the nodes forward as they did before vmbox.

With `gateway.lab`, `FleetRoute` keeps the lab router's ECMP route to the nodes
whose replicas serve (vmbox.control.plan.serving), written with vmbox.lab.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence

from vmbox import netns
from vmbox.dataplane.steering import replica_number
from vmbox.enforce.kernel import EnforceError, KernelEnforcer
from vmbox.enforce.nftables import Table, kernel_rules
from vmbox.enforce.rates import closed_rates
from vmbox.lab import LabError, fleet, set_nodes
from vmbox.spec import GatewaySpec, Spec


class NodeTables:
    """Where one kernel-enforced service's tables live: node n's namespace for replica n."""

    def __init__(self, spec: Spec, gateway: GatewaySpec) -> None:
        self.service = spec.service
        self.gateway = gateway
        self.table = Table(
            spec.service, kernel_rules(spec.chain[0].model_dump()), interface=gateway.interface
        )
        self.most = spec.replicas.max

    def nodes(self, replicas: Iterable[str] = ()) -> list[int]:
        """The node numbers to clean: 1 .. replicas.max and those of `replicas` (ids)."""
        numbers = set(range(1, self.most + 1))
        for rid in replicas:
            with contextlib.suppress(ValueError):
                numbers.add(replica_number(self.service, rid))
        return sorted(numbers)

    def _enforcer(self, replica: str) -> KernelEnforcer | None:
        """The table of `replica`'s node, or None when the id names no node or the node
        is gone."""
        try:
            node = replica_number(self.service, replica)
        except ValueError:
            return None
        namespace = self.gateway.node_namespace(node)
        if not netns.exists(namespace):
            return None
        return KernelEnforcer(namespace, self.table)

    async def close(self, replica: str) -> str | None:
        """Close the table of a replica that died: every packet on its node dropped.

        Called before the dead replica's member goes: the siblings' shares grow as
        soon as it does, while its table would go on admitting its last share.
        Its restart installs the table anew. The node's namespace, or None when
        the id names no node or the node is gone."""
        enforcer = self._enforcer(replica)
        if enforcer is None:
            return None
        await enforcer.install(closed_rates(self.table), closed=True)
        return enforcer.namespace

    async def renew(self, replica: str, deadline: int) -> bool:
        """Move a dead replica's dead man's switch to `deadline` (Unix seconds), while its
        place is held: its table goes on enforcing its last share until its restart
        installs one anew. False when the id names no node or the node is gone."""
        enforcer = self._enforcer(replica)
        if enforcer is None:
            return False
        await enforcer.renew(deadline)
        return True

    async def remove(self, replicas: Iterable[str] = ()) -> list[str]:
        """Remove the table from each node that exists; the namespaces it was removed from.

        A node that is gone needs nothing; an nft failure on one node does not
        stop the others (it is named in the EnforceError raised at the end)."""
        removed, failed = [], []
        for node in self.nodes(replicas):
            namespace = self.gateway.node_namespace(node)
            if not netns.exists(namespace):
                continue
            try:
                await KernelEnforcer(namespace, self.table).remove()
            except EnforceError as exc:
                failed.append(f"{namespace}: {exc}")
                continue
            removed.append(namespace)
        if failed:
            raise EnforceError("; ".join(failed))
        return removed


class FleetRoute:
    """The route of a lab's router over the nodes whose replicas enforce (`gateway.lab`).

    The controller's steering for `enforce: kernel` in a fleet, as PathSteering
    is for a gateway's queues: `install` at start, `sync` each pass (before any
    drain, so a leaving replica's node is out of the route before its share
    goes to the others), `remove` when the service goes (every node in the
    route again, as `vmbox lab up` left it). No serving node: an unreachable
    route, so nothing crosses a node without a table at its share.
    """

    def __init__(self, spec: Spec, lab: str) -> None:
        self.service = spec.service
        self.lab = lab
        self.written: tuple[int, ...] | None = None
        self.changes = 0

    def nodes_for(self, replicas: Iterable[str]) -> tuple[int, ...]:
        return tuple(sorted(replica_number(self.service, rid) for rid in replicas))

    async def _route(self, nodes: Iterable[int]) -> None:
        def write() -> None:
            try:
                plan = fleet(self.lab)
                set_nodes(plan, [n for n in nodes if n <= plan.nodes])
            except LabError as exc:
                raise EnforceError(str(exc)) from None

        await asyncio.to_thread(write)

    async def install(self, replicas: Sequence[str]) -> None:
        nodes = self.nodes_for(replicas)
        await self._route(nodes)
        self.written = nodes

    async def sync(self, replicas: Sequence[str]) -> bool:
        """Route over the nodes of `replicas` if that changed; True when it did."""
        nodes = self.nodes_for(replicas)
        if nodes == self.written:
            return False
        await self._route(nodes)
        self.written = nodes
        self.changes += 1
        return True

    async def remove(self) -> None:
        def every() -> None:
            with contextlib.suppress(LabError):
                plan = fleet(self.lab)
                set_nodes(plan, range(1, plan.nodes + 1))

        await asyncio.to_thread(every)
        self.written = None

    def describe(self) -> str:
        """Where it steers now, for the controller's events."""
        if self.written is None:
            return f"lab {self.lab}: route as the lab left it"
        nodes = ",".join(str(n) for n in self.written) or "none (unreachable)"
        return f"lab {self.lab}: route over nodes {nodes}"
