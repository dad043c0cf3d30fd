"""The store health decision and the fail policy, with a fake clock and the memory store."""

from __future__ import annotations

import asyncio
import logging

import pytest

from vmbox.control.status import store_column
from vmbox.packet import Verdict
from vmbox.state.health import (
    FAIL_MODE_CODES,
    FAIL_VERDICTS,
    FailMode,
    StoreHealth,
    failing_line,
    probe_interval,
    recovered_line,
)
from vmbox.state.healthprobe import HealthProbe
from vmbox.state.memory import FakeClock, MemoryStore
from vmbox.state.store import KeyValue


class DeadlineStore(MemoryStore):
    """The memory store, noting the deadline of every read."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.deadlines: list[float | None] = []

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        self.deadlines.append(timeout)
        return await super().get(key, timeout=timeout)


def test_probe_interval_is_a_third_of_the_timeout_at_most_a_second() -> None:
    assert probe_interval(0.3) == pytest.approx(0.1)
    assert probe_interval(3.0) == 1.0
    assert probe_interval(60.0) == 1.0


def test_healthy_store_is_never_down_whatever_the_time_between_reads() -> None:
    health = StoreHealth(3.0, now=0.0)
    assert health.down_for(50.0) == 0.0 and not health.failed(50.0)
    health.succeeded(10.0)
    assert health.step(50.0) is None and not health.applying


def test_down_counts_from_the_last_answer_and_fails_after_the_timeout() -> None:
    health = StoreHealth(3.0, now=0.0)
    health.succeeded(1.0)
    health.failed_read("connection refused")
    assert health.down_for(2.0) == pytest.approx(1.0)
    assert not health.failed(4.0)  # exactly the timeout: not yet
    assert health.step(4.0) is None
    assert health.failed(4.01)
    assert health.step(4.01) == "failed" and health.applying
    assert health.step(6.0) is None  # said once
    health.succeeded(7.0)
    assert health.down_for(7.5) == 0.0 and health.outage == pytest.approx(6.0)
    assert health.step(7.5) == "recovered" and not health.applying
    assert health.step(8.0) is None


def test_a_short_outage_never_applies_the_policy() -> None:
    health = StoreHealth(3.0, now=0.0)
    health.failed_read("timed out")
    assert health.step(2.5) is None
    health.succeeded(2.6)
    assert health.step(2.7) is None and not health.applying


def test_an_old_answer_arriving_late_does_not_move_last_ok_back() -> None:
    health = StoreHealth(1.0, now=5.0)
    health.succeeded(3.0)
    assert health.last_ok == 5.0


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StoreHealth(0.0, now=0.0)


def test_verdicts_and_gauge_codes_cover_every_policy() -> None:
    assert FAIL_VERDICTS == {"static": None, "closed": Verdict.DROP, "open": Verdict.PASS}
    assert set(FAIL_MODE_CODES) == set(FAIL_VERDICTS)


def test_log_lines_say_what_happens() -> None:
    assert failing_line("closed", 3.04, None) == (
        "etcd unreachable for 3.0s: failing closed (dropping every packet) until it returns"
    )
    assert "passing every packet" in failing_line("open", 3.0, "connection refused")
    assert "(connection refused)" in failing_line("open", 3.0, "connection refused")
    assert "keeping the last shares" in failing_line("static", 3.0, None)
    assert recovered_line("closed", 7.25) == (
        "etcd reachable again after 7.2s: no longer failing closed"
    )


@pytest.mark.parametrize("mode", ["static", "closed", "open"])
def test_probe_applies_and_lifts_the_policy(
    mode: FailMode, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(100.0)
    store = DeadlineStore(clock)
    applied: list[Verdict | None] = []
    probe = HealthProbe(store, "/vmbox/web/spec", 1.0, mode, applied.append, clock=clock)

    async def main() -> None:
        await probe.probe()
        store.available = False
        for _ in range(3):  # 0.9 s of failed reads: within the timeout
            clock.advance(0.3)
            await probe.probe()
        assert applied == [] and not probe.applying
        assert probe.down_for() == pytest.approx(0.9)
        clock.advance(0.3)
        await probe.probe()
        assert applied == [FAIL_VERDICTS[mode]] and probe.applying
        clock.advance(0.3)
        await probe.probe()
        assert len(applied) == 1
        store.available = True
        clock.advance(0.3)
        await probe.probe()
        assert applied == [FAIL_VERDICTS[mode], None] and not probe.applying
        assert probe.down_for() == 0.0

    with caplog.at_level(logging.INFO, logger="vmbox.state.health"):
        asyncio.run(main())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("etcd unreachable for 1.2s: failing " + mode)
    assert "(connection refused)" in lines[0][1]  # why the last read failed
    assert lines[1][1] == f"etcd reachable again after 1.8s: no longer failing {mode}"
    assert store.deadlines == [pytest.approx(1 / 3)] * len(store.deadlines)


def test_store_column_names_the_state_and_the_policy() -> None:
    assert store_column({}) == "ok"
    assert store_column({"store_stale": 1.0}) == "stale"
    assert store_column({"store_stale": 1.0, "store_down_seconds": 1.6}) == "down 2s"
    failing = {"store_down_seconds": 4.2, "fail_policy_active": 1.0, "fail_mode": 1.0}
    assert store_column(failing) == "down 4s: closed"
    assert store_column(failing | {"fail_mode": 2.0}) == "down 4s: open"
    assert store_column(failing | {"fail_mode": 0.0}) == "down 4s: static"
