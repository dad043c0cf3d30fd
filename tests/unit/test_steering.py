"""The gateway's steering chain as text, and which replicas it serves (both pure)."""

from __future__ import annotations

import re

import pytest

from vmbox.control.plan import Backoff, serving
from vmbox.dataplane.steering import Steering, chain_name, queue_of, restore_text


def test_a_chain_name_fits_iptables_and_stays_distinct() -> None:
    assert chain_name("web") == "VMBOX-web"
    long_a, long_b = "a" * 40 + "-one", "a" * 40 + "-two"
    assert len(chain_name(long_a)) <= 28 and len(chain_name(long_b)) <= 28
    assert chain_name(long_a) != chain_name(long_b)


def test_replica_n_consumes_the_nth_queue_from_the_first() -> None:
    assert queue_of("web", "web-1", 0) == 0
    assert queue_of("web", "web-4", 10) == 13
    assert queue_of("my-web", "my-web-2", 0) == 1
    for bad in ("web-0", "web-x", "other-1", "web"):
        with pytest.raises(ValueError, match="is not web-<n>"):
            queue_of("web", bad, 0)


def test_one_queue_needs_no_hash_and_bypass_follows_the_fail_policy() -> None:
    closed = Steering("VMBOX-web", (3,), fallback=0, bypass=False)
    assert closed.rules() == ["-j NFQUEUE --queue-num 3"]
    nobody = Steering("VMBOX-web", (), fallback=0, bypass=True)
    assert nobody.rules() == ["-j NFQUEUE --queue-num 0 --queue-bypass"]


@pytest.mark.parametrize(
    ("spread", "tuple_"), [("flow", "src,dst,sport,dport,proto"), ("addresses", "src,dst,proto")]
)
def test_n_queues_take_one_mark_each_from_the_hash(spread: str, tuple_: str) -> None:
    steer = Steering("VMBOX-web", (0, 2, 5), fallback=0, bypass=False, spread=spread)
    text = restore_text(steer)
    lines = text.splitlines()
    assert lines[:2] == ["*filter", ":VMBOX-web - [0:0]"]  # declared: flushed and refilled
    assert lines[-1] == "COMMIT"
    assert f"--hmark-tuple {tuple_} --hmark-mod 3" in lines[2]
    marks = [re.search(r"--mark (\d+) -j NFQUEUE --queue-num (\d+)$", line) for line in lines[3:-1]]
    assert [(int(m[1]), int(m[2])) for m in marks if m] == [(0, 0), (1, 2), (2, 5)]


def test_serving_takes_registered_running_replicas_but_never_leaving_ones() -> None:
    waiting = {"web-3": Backoff(failures=1, not_before=5.0, waiting=True)}
    got = serving(
        bound={"web-1", "web-2", "web-10", "web-4"},
        running={"web-1", "web-2", "web-10", "web-5"},
        backoff=waiting,
        leaving={"web-2"},
    )
    # web-4 bound but not running (a stale key), web-5 running but its queue not yet
    # bound, web-3 crashed while others serve: all out. Ordered by number.
    assert got == ("web-1", "web-10")
    assert serving(set(), set(), {}, set()) == ()


def test_a_crashed_replica_leaves_the_path_while_another_serves() -> None:
    """Its flows re-hash onto the living replicas rather than meet a queue nobody reads."""
    crashed = {"web-2": Backoff(failures=1, not_before=5.0, waiting=True)}
    bound = running = {"web-1", "web-3"}
    assert serving(bound, running, crashed, set()) == ("web-1", "web-3")
    # Restarted (no longer waiting, the backoff kept) but its queue not bound yet: still
    # out, as any new replica is; in again once its member info says bound.
    restarted = {"web-2": Backoff(failures=1, not_before=5.0, waiting=False)}
    assert serving(bound, {*running, "web-2"}, restarted, set()) == ("web-1", "web-3")
    everyone = {"web-1", "web-2", "web-3"}
    assert serving(everyone, everyone, restarted, set()) == ("web-1", "web-2", "web-3")


def test_a_crashed_replica_stays_when_no_other_serves() -> None:
    """Nowhere to move its flows: they meet the fail policy in the kernel until it binds."""
    crashed = {"web-1": Backoff(failures=1, not_before=5.0, waiting=True)}
    assert serving(set(), set(), crashed, set()) == ("web-1",)
    # The only other one is leaving (draining), or not bound yet: none other serves.
    assert serving({"web-2"}, {"web-2"}, crashed, {"web-2"}) == ("web-1",)
    assert serving(set(), {"web-2"}, crashed, set()) == ("web-1",)
    # Two crashed at once with nobody else: both stay, as before.
    both = crashed | {"web-3": Backoff(failures=2, not_before=6.0, waiting=True)}
    assert serving(set(), set(), both, set()) == ("web-1", "web-3")
    # A crashed replica that is forgotten (leaving) is out even then.
    assert serving(set(), set(), crashed, {"web-1"}) == ()


def test_kernel_enforcement_keeps_a_crashed_replicas_node() -> None:
    """enforce: kernel: the dead replica's table goes on enforcing its share meanwhile."""
    crashed = {"web-2": Backoff(failures=1, not_before=5.0, waiting=True)}
    got = serving({"web-1"}, {"web-1"}, crashed, set(), keep_crashed=True)
    assert got == ("web-1", "web-2")
