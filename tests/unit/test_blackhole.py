"""The partition fault's proxy on loopback (a TCP echo behind it), and its pure helpers.

The fault itself runs in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio

import pytest

from vmbox.faults.blackhole import Blackhole
from vmbox.faults.partition import Marks, fenced_open_refused, partition_spec

QUIET = 0.3  # seconds a cut proxy must stay silent


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _cut_then_heal() -> tuple[bytes, bool, bytes, bytes, bool]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    async with server, Blackhole(target) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"before")
        before = await asyncio.wait_for(reader.readexactly(6), 2)
        proxy.cut()
        writer.write(b"during")
        try:
            await asyncio.wait_for(reader.readexactly(6), QUIET)
            silent = False
        except TimeoutError:
            silent = True  # nothing answered, and nothing was reset either
        # A connection made during the cut is accepted and held, not refused.
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        late_writer.write(b"late")
        proxy.heal()
        during = await asyncio.wait_for(reader.readexactly(6), 2)
        late = await asyncio.wait_for(late_reader.readexactly(4), 2)
        for w in (writer, late_writer):
            w.close()
        return before, silent, during, late, proxy.connections == 2


def test_a_cut_proxy_answers_nothing_and_delivers_after_the_heal() -> None:
    before, silent, during, late, both = asyncio.run(_cut_then_heal())
    assert before == b"before"
    assert silent
    assert during == b"during"  # held through the cut, delivered after it
    assert late == b"late"
    assert both


def test_marks_count_the_cut_replicas_passes_between_moments() -> None:
    marks = Marks(series=[(10.0, 5.0), (10.5, 30.0), (11.0, 30.0), (12.0, 80.0)])
    assert marks.passed_between(10.0, 11.0) == 25.0
    assert marks.passed_between(10.7, 11.9) == 0.0  # samples at or before each moment
    assert marks.passed_between(9.0, 12.5) == 75.0


def test_the_open_row_uses_watch_because_fenced_refuses_open() -> None:
    refused = fenced_open_refused()
    assert refused is not None and "fail: open" in refused
    spec = partition_spec("p", "closed", "fenced")
    assert spec.fail == "closed" and spec.limiter.consistency == "fenced"
    assert spec.store_timeout < spec.lease_ttl  # the policy applies before the lease can expire


@pytest.mark.parametrize("policy", ["static", "closed", "open"])
def test_each_policy_has_a_registered_row(policy: str) -> None:
    from vmbox.faults import FAULTS

    entry = FAULTS.lookup(f"partition ({policy})")
    assert entry is not None and entry.module == "vmbox.faults.partition"
    assert callable(FAULTS.load(entry))
