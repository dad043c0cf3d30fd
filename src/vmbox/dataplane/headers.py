"""Raw IP packets as a netfilter queue delivers them, parsed into a `Packet`.

The in-path driver (vmbox.dataplane.nfqueue) calls `parse` once per queued
packet. The queue hands over the packet from its IP header on (no link-layer
header), cut to the driver's copy range, so `parse` reads only headers: the
size comes from the IP header's length field, not from how much was copied.

What it returns: IPv4 and IPv6 (hop-by-hop, routing, destination-options,
fragment and AH extension headers skipped), with TCP and UDP ports; ICMP,
ICMPv6, a fragment that is not the first and any other protocol get ports 0.
Anything it cannot read (another IP version, a header cut short, lengths that
contradict each other) is None: the driver counts it as malformed and drops
it, since a firewall that passes what it cannot parse can be walked around.

Pure: no I/O, no clock. The hot path unpacks with precompiled structs and
builds nothing but the address strings and the Packet itself.
"""

from __future__ import annotations

import socket
import struct

from vmbox.packet import TCP, UDP, Packet

# version/IHL, total length, flags/fragment offset, protocol, source, destination
_V4 = struct.Struct("!BxH2xHxB2x4s4s")
# payload length, next header, source, destination (after the 4-byte version/class/label)
_V6 = struct.Struct("!4xHBx16s16s")
_PORTS = struct.Struct("!HH")
_EXT = struct.Struct("!BB")  # next header, length field of an extension header
_FRAG = struct.Struct("!B1xH")  # next header, offset (13 bits) and flags

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_ntop = socket.inet_ntop

HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
AH = 51
DEST_OPTS = 60
_SKIPPED = frozenset((HOP_BY_HOP, ROUTING, DEST_OPTS, AH))
_PORTED = frozenset((TCP, UDP))
# Extension headers skipped in a row before the packet is judged malformed;
# real packets carry a few, a longer chain is an attempt to hide the ports.
MAX_EXTENSIONS = 8

Buffer = bytes | bytearray | memoryview


def parse(data: Buffer) -> Packet | None:
    """The packet `data` holds (from its IP header on), or None if unreadable."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _parse_v4(data)
    if version == 6:
        return _parse_v6(data)
    return None


def _parse_v4(data: Buffer) -> Packet | None:
    if len(data) < 20:
        return None
    vihl, total, frag, proto, src, dst = _V4.unpack_from(data)
    hlen = (vihl & 0x0F) * 4
    if hlen < 20 or total < hlen or len(data) < hlen:
        return None
    sport = dport = 0
    if proto in _PORTED and not frag & 0x1FFF:
        if len(data) < hlen + 4 or total < hlen + 4:
            return None
        sport, dport = _PORTS.unpack_from(data, hlen)
    return Packet(_ntop(_AF_INET, src), sport, total, proto, _ntop(_AF_INET, dst), dport)


def _parse_v6(data: Buffer) -> Packet | None:
    if len(data) < 40:
        return None
    plen, proto, src, dst = _V6.unpack_from(data)
    end = 40 + plen
    offset = 40
    first = True
    for _ in range(MAX_EXTENSIONS + 1):
        if proto in _SKIPPED:
            if len(data) < offset + 2:
                return None
            kind = proto
            proto, length = _EXT.unpack_from(data, offset)
            # AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
            offset += (length + 2) * 4 if kind == AH else (length + 1) * 8
        elif proto == FRAGMENT:
            if len(data) < offset + 8:
                return None
            proto, frag = _FRAG.unpack_from(data, offset)
            first = first and frag >> 3 == 0
            offset += 8
        else:
            break
        if offset > end:
            return None
    else:
        return None
    sport = dport = 0
    if proto in _PORTED and first:
        if len(data) < offset + 4 or end < offset + 4:
            return None
        sport, dport = _PORTS.unpack_from(data, offset)
    return Packet(_ntop(_AF_INET6, src), sport, end, proto, _ntop(_AF_INET6, dst), dport)
