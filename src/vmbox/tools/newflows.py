"""A load of new flows: each one a fresh client socket that sends one datagram and closes.

Called by the scaling experiment (vmbox.experiments.scaling) to grow the data
plane's memory the way real traffic does: every new client (address, port)
makes a replica open an upstream flow (a socket, a transport, table entries)
and every new source address a row in the limiter's table, until they idle
out. Nothing is allocated for its own sake. Client sockets bind source
addresses in 127.30.0.0/16 (loopback only) and close at once, so the
generator holds no descriptors and its ports are free again immediately.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

TICK = 0.01  # seconds between batches of new flows
# What each datagram begins with: vmbox.tools.echo counts these apart from the
# rest, so a test can judge a rate limit at the server while flows come and go.
MARK = b"vmbox-new-flow"
MAX_FLOWS = 2_000_000  # a bound on any one run, whatever the rate says


@dataclass
class NewFlowsResult:
    flows: int = 0  # client flows opened (one datagram each)
    errors: int = 0  # sends the kernel refused (buffer full, no port)


def source_address(index: int, sources: int) -> str:
    """The index-th source of `sources`, cycling through 127.30.0.1 upwards."""
    k = index % max(1, sources)
    return f"127.30.{k // 254}.{1 + k % 254}"


async def new_flows(
    target: tuple[str, int],
    rate_at: Callable[[float], float],
    duration: float,
    *,
    sources: int = 20_000,
    payload: int = 64,
    stop: asyncio.Event | None = None,
) -> NewFlowsResult:
    """Open new flows at `rate_at(t)` per second for `duration` seconds (or until `stop`)."""
    result = NewFlowsResult()
    data = MARK + bytes(max(0, payload - len(MARK)))
    started = time.monotonic()
    owed = 0.0
    last = 0.0
    while result.flows < MAX_FLOWS and not (stop is not None and stop.is_set()):
        now = time.monotonic() - started
        if now >= duration:
            break
        owed += rate_at(now) * (now - last)
        last = now
        while owed >= 1.0 and result.flows < MAX_FLOWS:
            owed -= 1.0
            _one(target, source_address(result.flows, sources), data, result)
        await asyncio.sleep(TICK)
    return result


def _one(target: tuple[str, int], source: str, data: bytes, result: NewFlowsResult) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.sendto(data, target)
        result.flows += 1
    except OSError:
        result.errors += 1
    finally:
        sock.close()
