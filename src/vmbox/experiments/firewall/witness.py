"""Pure: what the stream's packets at the server say about a window of time.

The failover and resize parts capture the iperf3 stream's client-to-server
packets at the lab's server (tcpdump, vmbox.tools.capture; read as segments by
vmbox.tools.tcpgaps) beside labtraffic's own figures, to place them against
the moments they chose (a kill, a resize step): the bytes in each 0.1 s around
them, and the longest time without data within a window. No I/O here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from vmbox.tools import tcpgaps

BIN = 0.1  # s: iperf3's finest report interval, the resolution of the pictures


def data_segments(segments: Sequence[tcpgaps.Segment]) -> list[tcpgaps.Segment]:
    """The segments that carry data on the stream's data connections: iperf3 opens its
    control connection first (labtraffic.stream_result counts it the same way)."""
    opened = tcpgaps.opened(segments)
    control = opened[0] if opened else None
    return [s for s in segments if s.length > 0 and (s.src, s.sport) != control]


def binned(
    segments: Sequence[tcpgaps.Segment], origin: float, start: float, end: float
) -> list[tuple[float, int]]:
    """(bin start, s from `origin`; bytes) for every BIN-long bin from origin+start to
    origin+end, empty bins included."""
    count = max(0, math.ceil((end - start) / BIN - 1e-9))
    totals = [0] * count
    for seg in segments:
        index = math.floor((seg.at - origin - start) / BIN)
        if 0 <= index < count:
            totals[index] += seg.length
    return [(round(start + i * BIN, 3), n) for i, n in enumerate(totals)]


def window_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest time without a packet within [start, end]: the window's edges count,
    so a stream that stopped inside the window stalled until its end. NaN for an empty
    window (one that began after the stream's end)."""
    if end <= start:
        return math.nan
    inside = sorted(t for t in times if start < t < end)
    return max((b - a for a, b in itertools.pairwise([start, *inside, end])), default=0.0)


def stall_over(times: Sequence[float], at: float, end: float) -> float:
    """The longest time without a packet from the last packet before `at` (a kill) until
    `end` (the stream's planned end): what the moment cost the stream, stopping for good
    included."""
    before = [t for t in times if t <= at]
    return window_gap(times, max(before, default=at), end)
