"""The `vmbox` command as an operator meets it: help, bad input, scale and status.

Each error the user can cause ends in one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbox.etcdserver import EtcdServer
from vmbox.testbed import free_tcp_port, free_udp_port

VMBOX = [sys.executable, "-m", "vmbox"]


def vmbox(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMBOX, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_spec(path: Path, listen: int, upstream: int, extra: str = "") -> Path:
    path.write_text(f"""service: clitest
listen: 127.0.0.1:{listen}
upstream: 127.0.0.1:{upstream}
middlebox:
  function: ratelimit
  limit: 100
  consistency: watch
replicas: {{count: 1, min: 1, max: 4}}
{extra}""")
    return path


def test_help_explains_every_command() -> None:
    result = vmbox("--help")
    assert result.returncode == 0
    for command in ("up", "status", "scale", "demo", "echo", "load", "lab"):
        assert command in result.stdout
    commands = [
        line.split()[0]
        for line in result.stdout.split("Commands:")[1].splitlines()
        if line.startswith("  ") and line.strip()
    ]
    assert "replica" not in commands  # internal: started by runtimes, hidden
    assert "desired replica count" in vmbox("scale", "--help").stdout


def test_malformed_spec_names_the_field(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.yaml", 9000, 9100).read_text()
    spec = spec.replace("limit: 100", "limit: -5")
    (tmp_path / "bad.yaml").write_text(spec)
    line = one_error_line(vmbox("up", str(tmp_path / "bad.yaml")))
    assert "middlebox.limit" in line
    assert vmbox("up", str(tmp_path / "bad.yaml")).returncode == 2


def test_unreachable_etcd_is_reported(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", free_udp_port(), free_udp_port())
    dead = f"127.0.0.1:{free_tcp_port()}"
    line = one_error_line(vmbox("up", str(spec), "--etcd", dead, "--no-live"))
    assert "cannot reach etcd" in line and dead in line
    line = one_error_line(vmbox("status", "clitest", "--etcd", dead))
    assert dead in line


def test_busy_port_is_reported(etcd: EtcdServer, tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no SO_REUSEPORT
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        spec = write_spec(tmp_path / "s.yaml", port, free_udp_port())
        line = one_error_line(vmbox("up", str(spec), "--etcd", etcd.endpoint, "--no-live"))
        assert f"127.0.0.1:{port}" in line and "in use" in line
    finally:
        holder.close()


def test_up_scale_status_and_clean_stop(etcd: EtcdServer, tmp_path: Path) -> None:
    env = os.environ | {"VMBOX_STATE_DIR": str(tmp_path / "state")}
    spec = write_spec(tmp_path / "s.yaml", free_udp_port(), free_udp_port())
    up = subprocess.Popen(
        [*VMBOX, "up", str(spec), "--etcd", etcd.endpoint, "--no-live"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_replicas(env, 1)
        scaled = vmbox("scale", "clitest", "3", env=env)
        assert scaled.returncode == 0, scaled.stderr
        t0 = time.monotonic()
        status = _wait_replicas(env, 3)
        assert time.monotonic() - t0 < 15
        for rid in ("clitest-1", "clitest-2", "clitest-3"):
            assert rid in status
        assert "scale" in status  # the recent events
        for column in ("SHARE", "RECEIVED/s", "MEM%", "CPU%", "STORE"):
            assert column in status  # piped output keeps every column whole
        assert "controller metrics: http://127.0.0.1:" in status, status
        assert "aggregator (demand and ack summaries): clitest-" in status, status
        line = one_error_line(vmbox("scale", "clitest", "9", env=env))
        assert "1 to 4" in line
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
    assert up.returncode == 0, err
    assert "Traceback" not in err
    pids = subprocess.run(
        ["pgrep", "-f", "vmbox replica --service clitest"], capture_output=True, text=True
    ).stdout.split()
    assert pids == []


def _wait_replicas(env: dict[str, str], count: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        result = vmbox("status", env=env, timeout=30)
        out = result.stdout
        if result.returncode == 0 and f"{count} replicas" in out:
            return out
        time.sleep(0.3)
    pytest.fail(f"never saw {count} replicas: {out}")


def test_a_killed_up_with_a_private_etcd_leaves_nothing_running(tmp_path: Path) -> None:
    """kill -9 of `vmbox up` takes its private etcd along, so its replicas must go too."""
    env = os.environ | {"VMBOX_STATE_DIR": str(tmp_path / "state")}
    spec = write_spec(tmp_path / "s.yaml", free_udp_port(), free_udp_port())
    spec.write_text(spec.read_text().replace("service: clitest", "service: orphan"))
    up = subprocess.Popen(
        [*VMBOX, "up", str(spec), "--no-live"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_replicas(env, 1)
        record = json.loads((tmp_path / "state" / "services" / "orphan.json").read_text())
        endpoint = record["endpoints"][0]
    finally:
        up.kill()
        up.wait(timeout=10)
    deadline = time.monotonic() + 15
    left = ["?"]
    while left and time.monotonic() < deadline:
        left = subprocess.run(
            ["pgrep", "-f", "vmbox replica --service orphan"], capture_output=True, text=True
        ).stdout.split()
        time.sleep(0.2)
    assert left == []
    host, port = endpoint.rsplit(":", 1)
    with socket.socket() as probe:  # the private etcd died with its parent
        assert probe.connect_ex((host, int(port))) != 0
