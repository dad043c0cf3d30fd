"""`vmbox demo`, the main job, at its shortest: it runs, scales 1 -> 2 -> 4 and summarises;
the relay on loopback, and (as root) the in-path version through a lab of its own."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.labs import require_lab


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


def test_inpath_demo_holds_the_limit_for_udp_and_tcp_and_removes_its_lab() -> None:
    """--dataplane nfqueue: a lab of its own, hping3 UDP and TCP at 300/s; the server got 100."""
    require_lab()
    with subprocess.Popen(
        [sys.executable, "-m", "vmbox", "demo", "--dataplane", "nfqueue", "--duration", "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as proc:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    summary = stdout.split("summary:")[1]
    rows = [line.split("│") for line in summary.splitlines() if line.startswith("│")]
    by_replicas = {cells[1].strip(): cells for cells in rows if cells[1].strip().isdigit()}
    assert set(by_replicas) == {"1", "2", "4"}, summary
    for cells in by_replicas.values():
        assert int(cells[2]) >= 2, summary  # whole seconds measured at that count
        assert 95 <= float(cells[3]) <= 105, summary  # UDP
        assert 95 <= float(cells[6]) <= 105, summary  # TCP
        assert cells[9].strip() == "yes", summary
    # The lab it built (named after its pid) is gone, its clients with it (down stops them).
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"vmdemo{proc.pid}-")]
