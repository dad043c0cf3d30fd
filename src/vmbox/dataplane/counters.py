"""Traffic counters of one data-plane driver.

The driver (vmbox.dataplane.udp.UdpRelay) bumps these on the hot path, so they
are plain slotted ints: no locks (one event loop owns them), no objects per
packet. vmbox.metrics reads them to export Prometheus counters, and tests read
them directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    """Monotonic totals since the driver started, plus the current flow count."""

    received: int = 0
    passed: int = 0
    dropped: int = 0
    bytes_received: int = 0
    bytes_passed: int = 0
    replies: int = 0
    bytes_replied: int = 0
    upstream_errors: int = 0
    # Datagrams the driver could not turn into a Packet; UDP has none yet, but
    # drivers that parse headers will.
    malformed: int = 0
    # Strong-mode barrier reads that failed and were decided fail-static.
    barrier_errors: int = 0
    # Packets discarded because a flow's pending queue or the relay was full.
    queue_drops: int = 0
    flows: int = 0
    flows_expired: int = 0
    flows_evicted: int = 0
    # The in-path driver (vmbox.dataplane.nfqueue): read errors on its netlink
    # socket, and, read from the kernel's /proc/net/netfilter/nfnetlink_queue,
    # packets waiting for a verdict and the kernel's drops (queue full;
    # netlink socket full, which is where ENOBUFS shows).
    socket_errors: int = 0
    queue_waiting: int = 0
    kernel_queue_drops: int = 0
    kernel_socket_drops: int = 0

    def snapshot(self) -> dict[str, int]:
        """A copy of every field, for metrics and logs."""
        return asdict(self)
