"""Raw IP packets as a netfilter queue delivers them, parsed into a `Packet`.

The in-path driver (vmbox.dataplane.nfqueue) calls `parse` once per queued
packet. The queue hands over the packet from its IP header on (no link-layer
header), cut to the driver's copy range, so `parse` reads only headers: the
size comes from the IP header's length field, not from how much was copied.

What it returns: IPv4 and IPv6 (hop-by-hop, routing, destination-options,
fragment and AH extension headers skipped), with TCP and UDP ports and TCP's
flags; ICMP and ICMPv6 with their type in `flags` and, for an echo request or
reply, its identifier as both ports; a fragment that is not the first and any
other protocol get ports 0.
A TCP or UDP packet longer than the egress `mtu` is a GSO packet (the queue
hands those over whole, vmbox.dataplane.nfqueue): its `segments` are the
packets it becomes on the wire, ceil(payload / (mtu - its headers)), and its
`size` is what they add up to (each segment repeats the headers). Exact when
the sender's segment size is the MTU less those headers (TCP's MSS on a path
of one MTU, as in the lab); a sender with a smaller MSS makes more, smaller
segments than counted.

Anything it cannot read (another IP version, a header cut short, lengths that
contradict each other) is None: the driver counts it as malformed and drops
it, since a firewall that passes what it cannot parse can be walked around.

Pure: no I/O, no clock. The hot path unpacks with precompiled structs and
builds nothing but the address strings and the Packet itself.
"""

from __future__ import annotations

import socket
import struct

from vmbox.packet import ECHO_REPLY, ECHO_REQUEST, ICMP, ICMPV6, TCP, UDP, Packet

# version/IHL, total length, flags/fragment offset, protocol, source, destination
_V4 = struct.Struct("!BxH2xHxB2x4s4s")
# payload length, next header, source, destination (after the 4-byte version/class/label)
_V6 = struct.Struct("!4xHBx16s16s")
_PORTS = struct.Struct("!HH")
_ECHO_ID = struct.Struct("!4xH")  # an ICMP echo's identifier, after type, code and checksum
_TCP_OFFSET = struct.Struct("!12xB")  # TCP data offset (header length in words, high nibble)
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
_ECHOES = {proto: frozenset((ECHO_REQUEST[proto], ECHO_REPLY[proto])) for proto in (ICMP, ICMPV6)}
# Extension headers skipped in a row before the packet is judged malformed;
# real packets carry a few, a longer chain is an attempt to hide the ports.
MAX_EXTENSIONS = 8
MTU = 1500  # the default egress MTU: packets longer than it are GSO packets
UDP_HEADER = 8
ICMP_HEADER = 8  # type, code, checksum, then (echo) identifier and sequence
_TCP_FLAGS_END = 14  # a TCP header is read up to its flags byte

Buffer = bytes | bytearray | memoryview


def parse(data: Buffer, mtu: int = MTU) -> Packet | None:
    """The packet `data` holds (from its IP header on), or None if unreadable."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _parse_v4(data, mtu)
    if version == 6:
        return _parse_v6(data, mtu)
    return None


def _parse_v4(data: Buffer, mtu: int) -> Packet | None:
    if len(data) < 20:
        return None
    vihl, total, frag, proto, src, dst = _V4.unpack_from(data)
    hlen = (vihl & 0x0F) * 4
    if hlen < 20 or total < hlen or len(data) < hlen:
        return None
    sport = dport = 0
    if proto in _PORTED and not frag & 0x1FFF:
        need = hlen + (_TCP_FLAGS_END if proto == TCP else 4)
        if len(data) < need or total < need:
            return None
        sport, dport = _PORTS.unpack_from(data, hlen)
        flags = data[hlen + 13] if proto == TCP else 0
        if total > mtu:
            return _segmented(
                data,
                hlen,
                total,
                mtu,
                proto,
                _ntop(_AF_INET, src),
                sport,
                _ntop(_AF_INET, dst),
                dport,
                flags,
            )
        return Packet(
            _ntop(_AF_INET, src), sport, total, proto, _ntop(_AF_INET, dst), dport, 1, flags
        )
    if proto == ICMP and not frag & 0x1FFF:
        if len(data) < hlen + ICMP_HEADER or total < hlen + ICMP_HEADER:
            return None
        kind = data[hlen]
        if kind in _ECHOES[ICMP]:
            sport = dport = _ECHO_ID.unpack_from(data, hlen)[0]
        return Packet(
            _ntop(_AF_INET, src), sport, total, proto, _ntop(_AF_INET, dst), dport, 1, kind
        )
    return Packet(_ntop(_AF_INET, src), sport, total, proto, _ntop(_AF_INET, dst), dport)


def _parse_v6(data: Buffer, mtu: int) -> Packet | None:
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
        need = offset + (_TCP_FLAGS_END if proto == TCP else 4)
        if len(data) < need or end < need:
            return None
        sport, dport = _PORTS.unpack_from(data, offset)
        flags = data[offset + 13] if proto == TCP else 0
        if end > mtu:
            return _segmented(
                data,
                offset,
                end,
                mtu,
                proto,
                _ntop(_AF_INET6, src),
                sport,
                _ntop(_AF_INET6, dst),
                dport,
                flags,
            )
        return Packet(
            _ntop(_AF_INET6, src), sport, end, proto, _ntop(_AF_INET6, dst), dport, 1, flags
        )
    if proto == ICMPV6 and first:
        if len(data) < offset + ICMP_HEADER or end < offset + ICMP_HEADER:
            return None
        kind = data[offset]
        if kind in _ECHOES[ICMPV6]:
            sport = dport = _ECHO_ID.unpack_from(data, offset)[0]
        return Packet(
            _ntop(_AF_INET6, src), sport, end, proto, _ntop(_AF_INET6, dst), dport, 1, kind
        )
    return Packet(_ntop(_AF_INET6, src), sport, end, proto, _ntop(_AF_INET6, dst), dport)


def _segmented(
    data: Buffer,
    offset: int,
    total: int,
    mtu: int,
    proto: int,
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
) -> Packet | None:
    """A GSO packet (longer than `mtu`; its L4 header at `offset`): its segments and wire size."""
    if proto == TCP:
        if len(data) < offset + 13:
            return None
        headers = offset + (_TCP_OFFSET.unpack_from(data, offset)[0] >> 4) * 4
    else:
        headers = offset + UDP_HEADER
    per = mtu - headers
    if headers > total or per <= 0:
        return None
    segments = max(1, -(-(total - headers) // per))
    size = total + (segments - 1) * headers
    return Packet(src, sport, size, proto, dst, dport, segments, flags)
