"""vmbox.dataplane.headers: raw IP packets, built by hand, parsed into Packets."""

from __future__ import annotations

import socket
import struct

import pytest

from vmbox.dataplane.headers import parse
from vmbox.packet import ACK, ICMP, ICMPV6, SYN, TCP, UDP, Packet

GRE = 47


def v4(
    proto: int,
    payload: bytes,
    *,
    src: str = "198.18.0.1",
    dst: str = "198.19.0.2",
    options: bytes = b"",
    frag: int = 0,
) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        0x1234,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + options + payload


def v6(
    next_header: int,
    payload: bytes,
    *,
    src: str = "2001:2::1",
    dst: str = "2001:2:0:1::2",
) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def udp(sport: int, dport: int, data: bytes = b"x" * 20) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


ICMP_ECHO = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping" * 8


def ext(next_header: int, units: int) -> bytes:
    """A hop-by-hop, routing or destination-options header of (units + 1) * 8 bytes."""
    return struct.pack("!BB", next_header, units) + b"\x01\x04\x00\x00\x00\x00" + b"\0" * 8 * units


def frag6(next_header: int, offset: int, more: bool = False) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset << 3 | int(more), 0xABCD)


def test_ipv4_udp() -> None:
    packet = v4(UDP, udp(40000, 53))
    assert parse(packet) == Packet("198.18.0.1", 40000, len(packet), UDP, "198.19.0.2", 53)


def test_ipv4_tcp_with_options_reads_ports_after_the_options() -> None:
    options = b"\x01\x01\x01\x00" * 3  # NOPs and an end of list: IHL 8
    packet = v4(TCP, tcp(443, 51000), options=options)
    assert parse(packet) == Packet(
        "198.18.0.1", 443, len(packet), TCP, "198.19.0.2", 51000, flags=SYN
    )


def test_ipv4_icmp_echo_carries_its_identifier_as_ports_and_its_type_as_flags() -> None:
    packet = v4(ICMP, ICMP_ECHO)
    ident = struct.unpack_from("!H", ICMP_ECHO, 4)[0]
    assert parse(packet) == Packet(
        "198.18.0.1", ident, len(packet), ICMP, "198.19.0.2", ident, flags=8
    )


def test_ipv4_icmp_other_than_echo_has_no_ports() -> None:
    unreachable = struct.pack("!BBHI", 3, 3, 0, 0) + b"\0" * 28
    packet = v4(ICMP, unreachable)
    assert parse(packet) == Packet("198.18.0.1", 0, len(packet), ICMP, "198.19.0.2", 0, flags=3)


def test_tcp_flags_are_read_and_a_header_cut_before_them_is_none() -> None:
    packet = v4(TCP, struct.pack("!HHIIBBHHH", 1, 2, 1, 0, 5 << 4, SYN | ACK, 65535, 0, 0))
    parsed = parse(packet)
    assert parsed is not None and parsed.flags == SYN | ACK
    assert parse(packet[: 20 + 13]) is None
    assert parse(packet[: 20 + 14]) == parsed


def test_ipv4_other_protocol_has_no_ports() -> None:
    packet = v4(GRE, b"\0" * 12)
    assert parse(packet) == Packet("198.18.0.1", 0, len(packet), GRE, "198.19.0.2", 0)


def test_ipv4_size_is_the_total_length_even_when_the_copy_is_cut() -> None:
    packet = v4(UDP, udp(1, 2, b"y" * 1400))
    parsed = parse(packet[:128])
    assert parsed is not None
    assert parsed.size == 1400 + 8 + 20


def test_ipv4_first_fragment_has_ports_later_ones_do_not() -> None:
    first = v4(UDP, udp(5000, 6000), frag=0x2000)  # more fragments, offset 0
    later = v4(UDP, b"z" * 16, frag=0x2000 | 3)  # offset 24 bytes: payload, no header
    last = v4(UDP, b"z" * 16, frag=5)
    assert parse(first) == Packet("198.18.0.1", 5000, len(first), UDP, "198.19.0.2", 6000)
    for packet in (later, last):
        assert parse(packet) == Packet("198.18.0.1", 0, len(packet), UDP, "198.19.0.2", 0)


def test_ipv6_udp_tcp_icmpv6() -> None:
    u = v6(UDP, udp(1234, 5201))
    t = v6(TCP, tcp(80, 60000))
    i = v6(ICMPV6, struct.pack("!BBHHH", 128, 0, 0, 1, 1))
    assert parse(u) == Packet("2001:2::1", 1234, len(u), UDP, "2001:2:0:1::2", 5201)
    assert parse(t) == Packet("2001:2::1", 80, len(t), TCP, "2001:2:0:1::2", 60000, flags=SYN)
    assert parse(i) == Packet("2001:2::1", 1, len(i), ICMPV6, "2001:2:0:1::2", 1, flags=128)


def test_ipv6_skips_extension_headers() -> None:
    chain = ext(43, 0) + ext(60, 1) + ext(UDP, 0) + udp(7, 9)  # hop, routing, dest-opts
    packet = v6(0, chain)
    assert parse(packet) == Packet("2001:2::1", 7, 40 + len(chain), UDP, "2001:2:0:1::2", 9)


def test_ipv6_skips_ah() -> None:
    ah = struct.pack("!BBHII", TCP, 4, 0, 1, 1) + b"\0" * 12  # (4 + 2) * 4 = 24 bytes
    packet = v6(51, ah + tcp(22, 40000))
    assert parse(packet) == Packet(
        "2001:2::1", 22, len(packet), TCP, "2001:2:0:1::2", 40000, flags=SYN
    )


def test_ipv6_fragments() -> None:
    first = v6(44, frag6(UDP, 0, more=True) + udp(1000, 2000))
    later = v6(44, frag6(UDP, 10) + b"q" * 24)
    assert parse(first) == Packet("2001:2::1", 1000, len(first), UDP, "2001:2:0:1::2", 2000)
    assert parse(later) == Packet("2001:2::1", 0, len(later), UDP, "2001:2:0:1::2", 0)


def test_ipv6_no_next_header_and_other_protocols_have_no_ports() -> None:
    packet = v6(59, b"")
    assert parse(packet) == Packet("2001:2::1", 0, 40, 59, "2001:2:0:1::2", 0)


def test_ipv6_size_is_40_plus_payload_length_when_cut() -> None:
    packet = v6(UDP, udp(1, 2, b"w" * 1000))
    parsed = parse(packet[:128])
    assert parsed is not None
    assert parsed.size == 40 + 8 + 1000


def test_memoryview_and_bytearray_parse_like_bytes() -> None:
    packet = v4(UDP, udp(1, 2))
    assert parse(memoryview(packet)) == parse(bytearray(packet)) == parse(packet)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 40,  # version 0
        b"\x50" + b"\0" * 40,  # version 5
        v4(UDP, udp(1, 2))[:19],
        bytes([0x44]) + v4(UDP, udp(1, 2))[1:],  # IHL 4 < 5
        v4(UDP, udp(1, 2))[:2] + struct.pack("!H", 10) + v4(UDP, udp(1, 2))[4:],  # total < IHL
        v4(UDP, udp(1, 2))[:2] + struct.pack("!H", 22) + v4(UDP, udp(1, 2))[4:],  # no room: ports
        v6(UDP, udp(1, 2))[:39],
        v6(UDP, b"\0\1"),  # payload length shorter than a UDP header
        v6(0, ext(UDP, 3))[:48],  # hop-by-hop longer than the packet says
        v6(0, ext(0, 0) * 10 + udp(1, 2)),  # a chain of 10 hop-by-hop headers
    ],
)
def test_garbage_is_none(garbage: bytes) -> None:
    assert parse(garbage) is None


VALID = [
    v4(UDP, udp(40000, 53)),
    v4(TCP, tcp(443, 51000), options=b"\x01" * 40),
    v4(ICMP, ICMP_ECHO),
    v4(UDP, b"z" * 16, frag=7),
    v6(UDP, udp(1, 2)),
    v6(0, ext(43, 0) + ext(60, 1) + ext(TCP, 2) + tcp(7, 9)),
    v6(44, frag6(UDP, 0, more=True) + udp(1000, 2000)),
    v6(51, struct.pack("!BBHII", TCP, 4, 0, 1, 1) + b"\0" * 12 + tcp(22, 40000)),
    v6(ICMPV6, struct.pack("!BBHHH", 128, 0, 0, 1, 1)),
]


@pytest.mark.parametrize("packet", VALID)
def test_every_prefix_parses_or_is_none_and_ports_need_their_bytes(packet: bytes) -> None:
    whole = parse(packet)
    assert whole is not None
    for cut in range(len(packet)):
        parsed = parse(packet[:cut])
        # Never raises; a prefix either reads the same headers or nothing at all.
        assert parsed is None or parsed == whole


@pytest.mark.parametrize("packet", VALID)
def test_every_single_byte_corruption_never_raises(packet: bytes) -> None:
    for index in range(min(len(packet), 80)):
        for value in (0x00, 0x45, 0x60, 0xFF):
            mutated = bytearray(packet)
            mutated[index] = value
            parsed = parse(bytes(mutated))
            assert parsed is None or isinstance(parsed, Packet)


def test_a_prefix_that_ends_before_the_ports_is_none() -> None:
    packet = v4(UDP, udp(40000, 53))
    assert parse(packet[:23]) is None
    assert parse(packet[:24]) == parse(packet)


def tcp_with_options(sport: int, dport: int, data: bytes) -> bytes:
    """A TCP header with 12 bytes of options (timestamps, as Linux sends), then `data`."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 8 << 4, 0x10, 65535, 0, 0)
    return header + b"\x01\x01\x08\x0a" + b"\0" * 8 + data


def test_a_gso_tcp_packet_counts_the_segments_it_becomes_on_the_wire() -> None:
    # 20 + 32 header bytes: 1448 payload bytes per 1500-byte segment, as Linux's MSS.
    whole = v4(TCP, tcp_with_options(40000, 5201, b"x" * (1448 * 3 + 100)))
    packet = parse(whole[:128])  # the copy is cut: lengths come from the headers
    assert packet is not None
    assert packet.segments == 4
    assert packet.size == len(whole) + 3 * 52  # each segment repeats the 52 header bytes
    assert (packet.sport, packet.dport, packet.proto) == (40000, 5201, TCP)
    exactly = parse(v4(TCP, tcp_with_options(1, 2, b"x" * (1448 * 2))))
    assert exactly is not None and (exactly.segments, exactly.size) == (2, 3000)


def test_a_packet_within_the_mtu_is_one_segment() -> None:
    full = parse(v4(TCP, tcp_with_options(1, 2, b"x" * 1448)))
    assert full is not None and (full.segments, full.size) == (1, 1500)
    small = parse(v4(UDP, udp(1, 2)))
    assert small is not None and small.segments == 1


def test_gso_udp_and_ipv6_follow_the_mtu_given() -> None:
    # IPv6 + UDP: 48 header bytes, so 9000 - 48 payload bytes per jumbo segment.
    packet = parse(v6(UDP, udp(1, 2, b"y" * 20000)), mtu=9000)
    assert packet is not None
    assert packet.segments == 3
    assert packet.size == 48 + 20000 + 2 * 48
    assert parse(v6(UDP, udp(1, 2, b"y" * 20000))).segments == 14  # type: ignore[union-attr]


def test_a_gso_packet_whose_headers_do_not_fit_is_none() -> None:
    # A TCP header cut before its data offset byte, on a packet longer than the MTU.
    long = v4(TCP, tcp_with_options(1, 2, b"x" * 3000))
    assert parse(long[: 20 + 12]) is None
    # A data offset claiming more header than the MTU leaves room for.
    assert parse(long, mtu=52) is None
