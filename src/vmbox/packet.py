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

# TCP header flags (Packet.flags of a TCP packet).
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# ICMP and ICMPv6 echo types (Packet.flags of an ICMP packet is its type).
ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}
ECHO_REPLY = {ICMP: 0, ICMPV6: 129}


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet as a middlebox sees it.

    `src` and `dst` are addresses as text (IPv4 dotted or IPv6 compressed, as
    `ipaddress` prints them); `sport` and `dport` are 0 for protocols without
    ports (ICMP's type and code are not ports), except that an ICMP or ICMPv6
    echo request or reply carries its identifier in both, which is what ties a
    reply to its request (the stateful firewall's pseudo-connection); `size`
    is the IP packet's length for the in-path driver, the UDP payload's for
    the relay; `proto` is the IP
    protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6). `segments` is how many
    packets it is on the wire: more than 1 for a GSO packet the in-path driver
    was handed whole (vmbox.dataplane.headers), whose `size` is then the
    segments' total; a limit in packets counts segments. `flags` is a TCP
    packet's flags byte (FIN, SYN, RST, PSH, ACK below; of the first segment
    for a GSO packet) and an ICMP packet's type; 0 otherwise (and for what the
    relay sees).
    """

    src: str
    sport: int
    size: int
    proto: int = UDP
    dst: str = ""
    dport: int = 0
    segments: int = 1
    flags: int = 0


class Verdict(enum.Enum):
    """What the driver does with a packet."""

    PASS = "pass"
    DROP = "drop"
