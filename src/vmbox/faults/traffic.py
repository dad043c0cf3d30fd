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
    upstream socket is created first), so what a window left of its allowance
    carries into the next one, and no further (unless `carry` is False).
    """
    over = spare = 0
    for second, received in sorted(history):
        cap = allowed(second)
        if cap is None:
            spare = 0
            continue
        excess = received - cap
        over += max(0, excess - spare)
        spare = max(0, -excess) if carry else 0
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
