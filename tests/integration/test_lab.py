"""`vmbox lab` against the kernel: traffic crosses the gateway, show and exec work from the
command line, and `down` leaves no namespace, process, link, route, rule or sysctl behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import pytest

from tests.integration.labs import (
    host_network_state,
    in_lab,
    lab,  # noqa: F401 (a fixture)
    lab_running,
    require_lab,
    unique_prefix,
)
from vmbox import netns
from vmbox.lab import LabError, LabPlan, down, up
from vmbox.lab.netlab import pids_in


def vmbox(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbox", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ping(plan: LabPlan, source: str, target: str) -> subprocess.CompletedProcess[str]:
    return in_lab(plan, "client", ["ping", "-n", "-c", "1", "-W", "2", "-I", source, target])


def test_clients_reach_the_server_through_the_gateway_v4_and_v6() -> None:
    with lab_running(clients=3) as plan:
        view = plan.describe()
        server, server6 = view["server"]["address"], view["server"]["address6"]
        for source in view["client"]["addresses"]:
            done = ping(plan, source, server)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "ttl=63" in done.stdout  # one hop: the gateway forwarded it
        done = ping(plan, view["client"]["addresses6"][-1], server6)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ttl=63" in done.stdout


def test_the_gateway_has_no_route_out_of_the_lab(lab: LabPlan) -> None:  # noqa: F811
    for role, target in (("gateway", "192.0.2.1"), ("server", "1.1.1.1"), ("client", "8.8.8.8")):
        done = in_lab(lab, role, ["ip", "route", "get", target])
        assert done.returncode != 0 and "unreachable" in done.stderr, (role, done)
    done = in_lab(lab, "gateway", ["ip", "-6", "route", "get", "2001:db8::1"])
    assert done.returncode != 0, done.stdout


def test_show_json_from_the_command_line_matches_the_plan() -> None:
    with lab_running(clients=4) as plan:
        done = vmbox("show", "--json", "--name", plan.prefix)
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown == plan.describe()
        table = vmbox("show", "--name", plan.prefix)
        assert table.returncode == 0 and plan.namespace("gateway") in table.stdout


def test_exec_runs_in_the_namespace_and_keeps_the_exit_status(lab: LabPlan) -> None:  # noqa: F811
    inode = os.stat(netns.path(lab.namespace("server"))).st_ino
    script = "readlink /proc/self/ns/net; exit 3"
    done = vmbox("exec", "server", "--name", lab.prefix, "--", "sh", "-c", script)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == f"net:[{inode}]"
    assert inode != os.stat("/proc/self/ns/net").st_ino


def test_up_on_an_existing_lab_is_one_line_and_keeps_it(lab: LabPlan) -> None:  # noqa: F811
    done = vmbox("up", "--name", lab.prefix)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "already exists" in done.stderr
    assert all(netns.exists(ns) for ns in lab.namespaces)


def test_a_namespace_of_someone_else_is_never_removed_by_a_failed_up() -> None:
    require_lab()
    plan = LabPlan(unique_prefix())
    theirs = plan.namespace("server")
    subprocess.run(["ip", "netns", "add", theirs], check=True, timeout=10)
    try:
        with pytest.raises(LabError, match="already exists"):
            up(plan)
        assert netns.exists(theirs)
        assert not netns.exists(plan.namespace("client"))
    finally:
        subprocess.run(["ip", "netns", "del", theirs], timeout=10)


def test_a_failure_half_way_removes_what_up_made(monkeypatch: pytest.MonkeyPatch) -> None:
    require_lab()
    plan = LabPlan(unique_prefix())
    steps = LabPlan.up_steps(plan)
    broken = [*steps[:8], type(steps[0])(("ip", "-n", plan.namespace("gateway"), "nonsense"))]
    monkeypatch.setattr(LabPlan, "up_steps", lambda self: broken + steps[8:])
    try:
        with pytest.raises(LabError) as caught:
            up(plan)
        assert "\n" not in str(caught.value) and "nonsense" in str(caught.value)
        assert not any(netns.exists(ns) for ns in plan.namespaces)
    finally:
        down(plan.prefix)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped at the end whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def start(
    procs: list[subprocess.Popen[bytes]], prefix: str, role: str, argv: Sequence[str]
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "vmbox", "lab", "exec", role, "--name", prefix, "--", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    return proc


def test_down_leaves_the_host_as_it_was_and_stops_the_labs_processes(
    started: list[subprocess.Popen[bytes]],
) -> None:
    require_lab()
    before = host_network_state()
    prefix = unique_prefix()
    try:
        made = vmbox("up", "--clients", "5", "--name", prefix)
        assert made.returncode == 0, made.stderr
        plan = LabPlan(prefix, 5)
        waiting = [start(started, prefix, role, ["sleep", "60"]) for role in ("client", "server")]
        stubborn = start(started, prefix, "gateway", ["sh", "-c", "trap '' TERM; sleep 60"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            netns.exists(ns) and pids_in(ns) for ns in plan.namespaces
        ):
            time.sleep(0.05)
        assert all(pids_in(ns) for ns in plan.namespaces), "the lab exec processes did not start"
        gone = vmbox("down", "--name", prefix)
        assert gone.returncode == 0, gone.stderr
        for proc in [*waiting, stubborn]:
            assert proc.wait(timeout=10) != 0  # killed, not finished
        assert not any(netns.exists(ns) for ns in plan.namespaces)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        assert prefix not in listed.stdout
    finally:
        down(prefix)
    after = host_network_state()
    for what, text in before.items():
        assert after[what] == text, f"the host's `{what}` changed"
