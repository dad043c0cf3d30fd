"""Lease slots against a real etcd: an entry outlives its deadline, then leaves by itself."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from tests.conftest import Aio
from vmbox.state.etcd import EtcdStore
from vmbox.state.leaseslots import LeaseSlots
from vmbox.state.store import Put

pytestmark = pytest.mark.timeout(60)

K = "/vmbox/t/keyed/conn/"


def test_an_entry_leaves_etcd_between_its_deadline_and_a_slot_and_two_seconds_later(
    store: EtcdStore, aio: Aio
) -> None:
    granularity = 1.0

    async def main() -> None:
        slots = LeaseSlots(store, granularity)
        now = time.time()
        deadline = now + 2
        lease = await slots.lease_for(deadline, now)
        assert await slots.lease_for(math.ceil(deadline), time.time()) == lease  # its slot's end
        assert slots.grants == 1
        await store.apply([Put(K + "a", b"1", lease), Put(K + "b", b"2", lease)])
        # Nobody keeps the lease alive, and nothing revokes it: it ends by itself.
        await asyncio.sleep(max(deadline - 0.2 - time.time(), 0))
        assert await store.get(K + "a") is not None  # not before its deadline
        while await store.get(K + "a") is not None:
            assert time.time() < deadline + granularity + 2, "the entry outlived its slot"
            await asyncio.sleep(0.05)
        assert await store.get(K + "b") is None  # the slot's entries leave together
        gone_after = time.time() - deadline
        print(f"gone {gone_after:.2f} s after its deadline (slot {granularity} s)")
        await slots.close()

    aio.run(main(), timeout=20)
