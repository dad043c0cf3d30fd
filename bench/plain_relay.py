"""The bench's baseline: vmbox's UDP relay forwarding every datagram, no middlebox, no store.

Run by bench.py as `python bench/plain_relay.py LISTEN UPSTREAM` until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from vmbox.dataplane.udp import UdpRelay
from vmbox.packet import Packet, Verdict
from vmbox.spec import parse_address


def pass_all(packet: Packet, now: float) -> Verdict:
    return Verdict.PASS


async def main(listen: str, upstream: str) -> None:
    relay = UdpRelay(parse_address(listen), parse_address(upstream), pass_all)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await relay.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
