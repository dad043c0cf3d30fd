"""What reached the upstream during a fault: packets over the limit, counts per second,
and the datagrams the kernel dropped at the service's sockets.

Called by the fault modules with an echo server's history (epoch second, received).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable


def over_limit(
    history: Iterable[tuple[int, int]], allowed: Callable[[int], int | None], carry: bool = True
) -> int:
    """Packets the upstream received above `allowed(second)` in the measured seconds.

    `history` is an echo server's (epoch second, received) list; a second for
    which `allowed` returns None is not measured. The limiter's windows are
    epoch-aligned seconds too, so each second is one window. A packet admitted
    late in a window can reach the upstream early in the next (a new client's
    upstream socket is created first; the echo stamps a packet when it reads
    it), never later. So what a second received is its window's packets that
    came in time plus the previous window's late ones, and the count is the
    least excess any such split of the arrivals allows: `late` is how many of
    the previous window's packets may have arrived in this second, at most
    what that window left of its allowance once its own late predecessors are
    counted, and at most what this second received. Late packets can follow
    one another window after window (a flood fills every window, and some of
    each arrive in the next), but a packet is never carried further than one
    window. Without `carry` every second is held to its cap alone.
    """
    over = late = 0
    for second, received in sorted(history):
        cap = allowed(second)
        if cap is None:
            late = 0
            continue
        late = min(late, received)  # the previous window's packets that arrived now
        room = cap - (received - late)  # this window's allowance left after its in-time packets
        over += max(0, -room)
        late = max(0, room) if carry else 0
    return over


def received_between(history: Iterable[tuple[int, int]], first: int, last: int) -> list[int]:
    """The echo's counts of the whole seconds first..last (inclusive), in order."""
    counts = dict(history)
    return [counts.get(second, 0) for second in range(first, last + 1)]


def socket_drops(address: tuple[str, int]) -> int:
    """Datagrams the kernel dropped at the sockets bound to `address` (a full receive buffer).

    Read from /proc/net/udp, whose last column counts drops per socket; the
    service's SO_REUSEPORT sockets are those bound to its address and
    connected nowhere. 0 where /proc is not readable.
    """
    host, port = address
    local = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    drops = 0
    with contextlib.suppress(OSError), open("/proc/net/udp") as table:
        for line in table:
            parts = line.split()
            if len(parts) > 12 and parts[1] == local and parts[2] == "00000000:0000":
                drops += int(parts[12])
    return drops
