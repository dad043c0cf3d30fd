"""Pure parts of the control plane: rate tracking, context files (the backoff: test_plan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbox import context
from vmbox.control.status import RateTracker


def test_rates_come_from_two_scrapes() -> None:
    tracker = RateTracker()
    assert tracker.update("r1", {"packets_received_total": 100.0}, 10.0) == {}
    rates = tracker.update("r1", {"packets_received_total": 400.0}, 12.0)
    assert rates["packets_received_total"] == 150.0
    # A restarted replica's counters go back to zero: never a negative rate.
    rates = tracker.update("r1", {"packets_received_total": 5.0}, 13.0)
    assert rates["packets_received_total"] == 0.0


def test_context_records_and_finds_endpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBOX_STATE_DIR", str(tmp_path))
    with pytest.raises(context.NoContext, match="--etcd"):
        context.lookup(None)
    context.record("web", ["127.0.0.1:2379"])
    assert context.lookup(None) == ("web", ["127.0.0.1:2379"])
    assert context.lookup("web") == ("web", ["127.0.0.1:2379"])
    context.forget("web")
    with pytest.raises(context.NoContext):
        context.lookup("web")
    # A record whose `vmbox up` is gone is skipped and removed.
    context.record("gone", ["127.0.0.1:1"], pid=2**22 + 1)
    with pytest.raises(context.NoContext):
        context.lookup("gone")
    assert context.known_services() == []
    assert context.parse_endpoints("http://a:1, b:2") == ["a:1", "b:2"]
