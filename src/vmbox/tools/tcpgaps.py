"""Pure: TCP segments from tcpdump's text, the gaps between them, the connections they open.

vmbox.labtraffic captures a session's packets at the lab's server (tcpdump,
vmbox.tools.capture) and reads them back with `tcpdump -r -n -tt`; `parse`
turns those lines into `Segment`s, `longest_gap` is the longest time with no
packet (the stall a client would feel, at packet resolution rather than a
tool's report interval), and `opened` lists the connections that a run of
SYNs opened (a reconnect shows as one more). No I/O here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# "1796338403.434997 IP 198.18.0.10.44530 > 198.19.0.2.5301: Flags [S], seq 1, ..., length 0"
# (HTTP lines go on after the length: "length 205: HTTP: HTTP/1.0 200 OK")
_LINE = re.compile(
    r"^(\d+\.\d+) IP6? (\S+)\.(\d+) > (\S+)\.(\d+): Flags \[([^\]]*)\].*? length (\d+)"
)


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP packet as tcpdump printed it (a GSO packet is one, whatever its size)."""

    at: float  # epoch seconds
    src: str
    sport: int
    dst: str
    dport: int
    flags: str  # tcpdump's: "S", "S.", ".", "P.", "F.", "R" ...
    length: int  # payload bytes

    @property
    def syn(self) -> bool:
        """A connection's first packet (SYN without ACK)."""
        return "S" in self.flags and "." not in self.flags

    @property
    def syn_ack(self) -> bool:
        return "S" in self.flags and "." in self.flags


def parse(lines: Iterable[str]) -> Iterator[Segment]:
    """The TCP segments among tcpdump's `-n -tt` lines (other lines are skipped)."""
    for line in lines:
        match = _LINE.match(line)
        if match:
            at, src, sport, dst, dport, flags, length = match.groups()
            yield Segment(float(at), src, int(sport), dst, int(dport), flags, int(length))


def longest_gap(times: Sequence[float], until: float | None = None) -> float:
    """The longest time between consecutive `times` (sorted here), and from the last to
    `until` when given and later: a stream that stopped for good stalled until then."""
    ordered = sorted(times)
    if until is not None and (not ordered or until > ordered[-1]):
        ordered.append(until)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


def opened(segments: Iterable[Segment]) -> list[tuple[str, int]]:
    """(source, source port) of every connection a SYN opened, in the order of the first
    SYN: a retransmitted SYN is the same connection, a new port a new one."""
    found: dict[tuple[str, int], None] = {}
    for seg in segments:
        if seg.syn:
            found.setdefault((seg.src, seg.sport))
    return list(found)


def accepted(segments: Iterable[Segment]) -> list[tuple[str, int]]:
    """(client, client port) of every connection a server accepted (sent a SYN-ACK to)."""
    found: dict[tuple[str, int], None] = {}
    for seg in segments:
        if seg.syn_ack:
            found.setdefault((seg.dst, seg.dport))
    return list(found)
