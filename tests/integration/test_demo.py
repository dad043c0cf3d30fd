"""`vmbox demo`, the main job, at its shortest: it runs, scales 1 -> 2 -> 4 and summarises."""

from __future__ import annotations

import subprocess
import sys


def test_demo_holds_the_limit_at_each_replica_count() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmbox", "demo", "--duration", "24"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = result.stdout.split("summary:")[1]
    rows = [line.split("│") for line in summary.splitlines() if line.startswith("│")]
    by_replicas = {cells[1].strip(): cells for cells in rows if cells[1].strip().isdigit()}
    assert set(by_replicas) == {"1", "2", "4"}, summary
    for cells in by_replicas.values():
        assert 95 <= float(cells[4]) <= 105, summary
