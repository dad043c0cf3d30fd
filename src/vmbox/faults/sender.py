"""One flood sender process: datagrams from many loopback source addresses, paced.

vmbox.faults.flood starts several (`python -m vmbox.faults.sender ...`), each
with its own share of the sources, so the flood is not bounded by one core's
Python. One socket sends from every source: IP_PKTINFO names the source address
of each datagram (any 127.x.y.z is local on Linux), so 100,000 sources cost no
100,000 sockets. The sender follows an absolute timetable (datagram k at
start + k / rate) and stops at a deadline; on exit it prints one JSON object:
how many it sent and, per epoch second, how many datagrams, distinct sources and
the most from one source, which is what the limiter's windows saw.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

IP_PKTINFO = 8  # Linux's value; the socket module names it only from Python 3.13
PAYLOAD = b"vmbox-flood-0000"
CHECK_EVERY = 64  # datagrams between clock reads


def source_address(index: int) -> str:
    """The index-th flood source: 127.10.1.1, 127.10.1.2, ... (no .0 or .255 octets)."""
    high, rest = divmod(index, 254 * 254)
    return f"127.{10 + high}.{rest // 254 + 1}.{rest % 254 + 1}"


def _pktinfo(address: str) -> list[tuple[int, int, bytes]]:
    # struct in_pktinfo {int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr;}:
    # on send, ipi_spec_dst is the source address.
    info = struct.pack("=I4s4s", 0, socket.inet_aton(address), bytes(4))
    return [(socket.IPPROTO_IP, IP_PKTINFO, info)]


class _Seconds:
    """Per epoch second: datagrams, distinct sources and the most from one source."""

    def __init__(self) -> None:
        self.stats: dict[int, list[int]] = {}
        self.second = -1
        self.counts: dict[int, int] = {}

    def add(self, second: int, source: int) -> None:
        if second != self.second:
            self.close()
            self.second = second
        self.counts[source] = self.counts.get(source, 0) + 1

    def close(self) -> None:
        if self.counts:
            sent = sum(self.counts.values())
            self.stats[self.second] = [sent, len(self.counts), max(self.counts.values())]
            self.counts = {}


def send(
    target: tuple[str, int],
    sources: list[int],
    rounds: int,
    rate: float,
    start_at: float,
    deadline: float,
) -> dict[str, object]:
    """Send one datagram from each source per round, `rounds` times, at `rate` per second."""
    ancillary = [_pktinfo(source_address(i)) for i in sources]
    seconds = _Seconds()
    sent = 0
    total = rounds * len(sources)
    time.sleep(max(0.0, start_at - time.time()))
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for k in range(total):
            if k % CHECK_EVERY == 0:
                now = time.monotonic()
                if now - start > deadline:
                    break
                time.sleep(max(0.0, start + k / rate - now))
                second = int(time.time())
            slot = k % len(sources)
            try:
                sock.sendmsg([PAYLOAD], ancillary[slot], 0, target)
            except OSError:
                continue  # e.g. ENOBUFS; not sent, not counted
            sent += 1
            seconds.add(second, sources[slot])
    seconds.close()
    return {"sent": sent, "planned": total, "seconds": seconds.stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmbox.faults.sender")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--sources", type=int, required=True, help="all senders' sources")
    parser.add_argument("--part", type=int, default=0, help="this sender's index")
    parser.add_argument("--parts", type=int, default=1, help="how many senders")
    parser.add_argument("--rounds", type=int, default=1, help="datagrams per source")
    parser.add_argument("--rate", type=float, required=True, help="this sender's datagrams/s")
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch time to begin")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds to stop after")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not args.rate > 0 or not 0 <= args.part < args.parts or args.rounds < 1:
        parser.error("need a positive rate, 0 <= part < parts and rounds >= 1")
    mine = list(range(args.part, args.sources, args.parts))
    if not mine:
        parser.error("this part has no sources")
    report = send((host, int(port)), mine, args.rounds, args.rate, args.start_at, args.deadline)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
