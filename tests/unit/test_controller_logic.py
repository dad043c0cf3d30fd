"""Pure parts of the control plane: rate tracking, context files (the backoff: test_plan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbox import context
from vmbox.control.status import RateTracker, ReplicaRow, ServiceStatus, render


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


def test_status_shows_warm_spares_apart_from_members() -> None:
    from rich.console import Console

    member = ReplicaRow("web-1", 101, "127.0.0.1:1", values={"share": 100.0, "limit": 100.0})
    spare = ReplicaRow("web-2", 202, "127.0.0.1:2", values={"store_stale": 0.0})
    status = ServiceStatus("web", "1", [member], [], 0.0, spares=[spare])
    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "service web: 1 replicas (desired 1), 1 warm spare" in text
    line = next(line for line in text.splitlines() if "web-2" in line)
    assert "(spare)" in line and "202" in line and "standby, ok" in line
    assert "(spare)" not in next(line for line in text.splitlines() if "web-1" in line)
    assert status.total_rate("packets_received_total") == 0.0
