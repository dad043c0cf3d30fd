"""Packet and Verdict: the values that cross between a data-plane driver and a middlebox.

Drivers build a `Packet` from each datagram or IP packet and ask the middlebox
for a `Verdict`. The UDP relay (vmbox.dataplane.udp) fills the source, its port
and the size, and names the service's upstream as the destination; the in-path
driver (vmbox.dataplane.nfqueue) fills every field from the IP header. Nothing
here does I/O, so middleboxes are testable without sockets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# IP protocol numbers (IANA) a rule may name.
ICMP = 1
TCP = 6
UDP = 17
ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet as a middlebox sees it.

    `src` and `dst` are addresses as text (IPv4 dotted or IPv6 compressed, as
    `ipaddress` prints them); `sport` and `dport` are 0 for protocols without
    ports (ICMP's type and code are not ports); `size` is the IP packet's length
    for the in-path driver, the UDP payload's for the relay; `proto` is the IP
    protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6). `segments` is how many
    packets it is on the wire: more than 1 for a GSO packet the in-path driver
    was handed whole (vmbox.dataplane.headers), whose `size` is then the
    segments' total; a limit in packets counts segments.
    """

    src: str
    sport: int
    size: int
    proto: int = UDP
    dst: str = ""
    dport: int = 0
    segments: int = 1


class Verdict(enum.Enum):
    """What the driver does with a packet."""

    PASS = "pass"
    DROP = "drop"
