"""The controller's side of an in-path service: keep the gateway's steering in step.

Called by vmbox.control.controller for `dataplane: nfqueue` services. The
pure choice of replicas is vmbox.control.plan.serving; turning it into a chain
and writing it into the gateway namespace is vmbox.dataplane.steering. This
module holds what was last written, so a pass that changes nothing runs no
iptables, and runs iptables off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from vmbox.dataplane import steering
from vmbox.dataplane.steering import Steering
from vmbox.spec import GatewaySpec, Spec

log = logging.getLogger(__name__)


class PathSteering:
    """The chain of one in-path service in its gateway namespace."""

    def __init__(self, spec: Spec, gateway: GatewaySpec) -> None:
        self.service = spec.service
        self.gateway = gateway
        self.chain = steering.chain_name(spec.service)
        self.bypass = spec.fail == "open"
        self.written: Steering | None = None
        self.changes = 0  # rewrites since start, for the metrics

    def steering_for(self, replicas: Sequence[str]) -> Steering:
        first = self.gateway.queue
        return Steering(
            chain=self.chain,
            queues=tuple(steering.queue_of(self.service, rid, first) for rid in replicas),
            fallback=first,
            bypass=self.bypass,
            spread=self.gateway.spread,
        )

    async def install(self, replicas: Sequence[str]) -> None:
        """The chain and the jump from FORWARD, steering to `replicas` (none yet: the
        first replica's queue, where the fail policy applies until it binds)."""
        wanted = self.steering_for(replicas)
        await asyncio.to_thread(
            steering.install, self.gateway.namespace, wanted, self.gateway.interface
        )
        self.written = wanted

    async def sync(self, replicas: Sequence[str]) -> bool:
        """Rewrite the chain if `replicas` changed; True when it did."""
        wanted = self.steering_for(replicas)
        if wanted == self.written:
            return False
        await asyncio.to_thread(steering.apply, self.gateway.namespace, wanted)
        self.written = wanted
        self.changes += 1
        return True

    def describe(self) -> str:
        """Where it steers now, for the controller's events."""
        written = self.written
        if written is None:
            queues = "none"
        elif not written.queues:
            queues = f"none serving (fallback {written.fallback})"
        else:
            queues = ",".join(str(q) for q in written.queues)
        return f"{self.gateway.namespace}: chain {self.chain}, queues {queues}"

    async def remove(self) -> None:
        """Out of the path: the gateway forwards as if vmbox were not there."""
        await asyncio.to_thread(
            steering.remove, self.gateway.namespace, self.chain, self.gateway.interface
        )
        self.written = None
