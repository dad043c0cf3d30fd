"""examples/inpath.yaml as an operator runs it: `vmbox lab up`, `vmbox up`, status, scale, down.

Every step is the real command line (a private etcd that `vmbox up` starts, the
default lab `vmbox`), and what the server received is counted at the server by
tcpdump. Afterwards the gateway holds no rule of vmbox's, and once the lab is
down the host's network state is what it was before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cgroup import in_ci
from tests.integration.labs import host_network_state, require_lab
from tests.integration.test_cli import VMBOX, vmbox
from vmbox import netns
from vmbox.lab import LabPlan
from vmbox.lab.plan import CLIENT_IF, SERVER_IF
from vmbox.tools.capture import Capture, full_seconds, per_second

EXAMPLE = Path(__file__).parents[2] / "examples" / "inpath.yaml"


@pytest.fixture
def bare_lab() -> Iterator[LabPlan]:
    """The lab a bare `vmbox lab up` builds (name `vmbox`), by the command; always removed."""
    require_lab()
    plan = LabPlan()
    if any(netns.exists(ns) for ns in plan.namespaces):
        reason = "a lab named vmbox exists already (`vmbox lab down` removes it)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    before = host_network_state()
    up = vmbox("lab", "up")
    assert up.returncode == 0, up.stderr
    try:
        yield plan
    finally:
        down = vmbox("lab", "down")
    assert down.returncode == 0, down.stderr
    assert host_network_state() == before


def wait_for(env: dict[str, str], text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        result = vmbox("status", "inpath", env=env, timeout=30)
        out = result.stdout
        if result.returncode == 0 and text in out:
            return out
        time.sleep(0.3)
    pytest.fail(f"never saw {text!r}: {out}")


def server_per_second(plan: LabPlan) -> list[int]:
    """hping3 at 300/s for 4 s through `vmbox lab exec`; whole seconds at the server.

    The seconds measured are those the client was sending through, from its first
    packet to its last as tcpdump saw them leave the client: `vmbox lab exec` is a
    Python process, and on a loaded machine hping3 starts a second or more after
    it was asked to, so a clock started before the command would count a second
    the client sent only part of.
    """
    client = plan.client_addresses[0]
    sent_from = Capture(plan.namespace("client"), CLIENT_IF, f"udp and src host {client}")
    server = Capture(plan.namespace("server"), SERVER_IF, f"udp and src host {client}")
    with server as cap, sent_from:
        sent = vmbox(
            "lab",
            "exec",
            "client",
            "--",
            "hping3",
            "--udp",
            "-p",
            "9000",
            "-i",
            "u3333",
            "-c",
            "1200",
            "198.19.0.2",
            timeout=30,
        )
        assert "packets transmitted" in sent.stdout + sent.stderr, sent.stderr
        time.sleep(0.3)
    assert sent_from.packets, "tcpdump saw nothing leave the client"
    first, last = sent_from.packets[0][0], sent_from.packets[-1][0]
    return full_seconds(per_second(cap.packets, client), first, last)


def test_the_inpath_example_runs_as_it_is_in_a_bare_lab(bare_lab: LabPlan, tmp_path: Path) -> None:
    env = os.environ | {"VMBOX_STATE_DIR": str(tmp_path / "state")}
    up = subprocess.Popen(
        [*VMBOX, "up", str(EXAMPLE), "--no-live"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    gateway = ["ip", "netns", "exec", bare_lab.namespace("gateway")]
    try:
        wait_for(env, "1 replicas")
        time.sleep(1.5)  # the replica binds its queue at a new window; the controller steers
        one = server_per_second(bare_lab)
        assert vmbox("scale", "inpath", "2", env=env).returncode == 0
        status = wait_for(env, "2 replicas")
        time.sleep(2.0)
        chain = subprocess.run(
            [*gateway, "iptables", "-S", "VMBOX-inpath"], capture_output=True, text=True
        ).stdout
        two = server_per_second(bare_lab)
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
    print(f"1 replica: {one}; 2 replicas: {two}")
    assert up.returncode == 0, err
    assert "in the path of namespace vmbox-gw entering gw-c" in err
    assert "inpath-1" in status and "inpath-2" in status
    assert "--hmark-mod 2" in chain and "--queue-num 1" in chain, chain
    assert all(abs(count - 100) <= 5 for count in one) and len(one) >= 2, one
    assert all(abs(count - 100) <= 5 for count in two) and len(two) >= 2, two
    rules = subprocess.run([*gateway, "iptables-save"], capture_output=True, text=True).stdout
    assert "VMBOX" not in rules  # vmbox took itself out of the path
