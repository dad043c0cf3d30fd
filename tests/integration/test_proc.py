"""vmbox.proc with real processes: a child started with a parent-death signal dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from vmbox.proc import with_parent_death_signal

PARENT = """
import signal, subprocess, sys, time
from vmbox.proc import with_parent_death_signal
argv, preexec = with_parent_death_signal(["sleep", "60"], signal.SIGKILL)
child = subprocess.Popen(argv, preexec_fn=preexec)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "preexec"])
def test_the_child_dies_with_its_parent(setpriv: bool) -> None:
    env = dict(os.environ)
    if not setpriv:  # no setpriv on PATH: the preexec fallback
        env["PATH"] = os.path.dirname(sys.executable) + ":/nonexistent"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.replace('"sleep"', '"/bin/sleep"')],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        # setpriv asks for the signal just before it execs the command: wait for
        # that (a parent that dies sooner would leave the child running).
        deadline = time.monotonic() + 5
        while not child.cmdline() or not child.cmdline()[0].endswith("sleep"):
            assert time.monotonic() < deadline, child.cmdline()
            time.sleep(0.01)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait(5)


def test_without_setpriv_a_preexec_function_does_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    argv, preexec = with_parent_death_signal(["etcd"], signal.SIGKILL)
    assert argv == ["etcd"] and preexec is not None


def test_with_setpriv_the_command_line_carries_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/setpriv")
    argv, preexec = with_parent_death_signal(["etcd", "--name", "m0"], signal.SIGKILL)
    assert argv == ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "etcd", "--name", "m0"]
    assert preexec is None
