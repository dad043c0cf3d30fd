"""The steering chain written into a real namespace with iptables, rewritten and removed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.cgroup import in_ci
from vmbox.dataplane import steering
from vmbox.dataplane.steering import Steering


def _ns(name: str, *argv: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout


def strip(saved: str) -> list[str]:
    """iptables-save output without its comment lines (they carry the time)."""
    return [line for line in saved.splitlines() if not line.startswith("#")]


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI runs as root: the steering tests must run")
        pytest.skip("needs root for network namespaces")
    name = f"vsteer{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_install_rewrite_and_remove_leave_the_namespace_as_it_was(namespace: str) -> None:
    before = {tool: _ns(namespace, f"{tool}-save") for tool in steering.FAMILIES}
    chain = steering.chain_name("web")
    one = Steering(chain, (0,), fallback=0, bypass=False)
    steering.install(namespace, one, "gw-c")
    steering.install(namespace, one, "gw-c")  # twice: still one jump
    for tool in steering.FAMILIES:
        rules = _ns(namespace, tool, "-S")
        assert rules.count(f"-A FORWARD -i gw-c -j {chain}") == 1
        assert f"-A {chain} -j NFQUEUE --queue-num 0" in rules
    three = Steering(chain, (0, 1, 3), fallback=0, bypass=True)
    steering.apply(namespace, three)
    got = steering.current(namespace, chain)
    assert len(got) == 4 and "HMARK" in got[0] and "--hmark-mod 3" in got[0]
    assert got[3].endswith("--mark 0x2 -j NFQUEUE --queue-num 3 --queue-bypass")
    v6 = _ns(namespace, "ip6tables", "-S", chain)
    assert "--hmark-mod 3" in v6 and "--queue-num 3 --queue-bypass" in v6
    steering.remove(namespace, chain, "gw-c")
    steering.remove(namespace, chain, "gw-c")  # gone already is fine
    after = {tool: _ns(namespace, f"{tool}-save") for tool in steering.FAMILIES}
    assert {k: strip(v) for k, v in after.items()} == {k: strip(v) for k, v in before.items()}


def test_a_missing_namespace_is_one_line(namespace: str) -> None:
    with pytest.raises(steering.SteeringError, match="does not exist") as err:
        steering.apply("no-such-ns-vmbox", Steering("VMBOX-x", (), 0, False))
    assert "\n" not in str(err.value)
