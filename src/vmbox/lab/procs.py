"""Bounded processes inside a lab's namespaces: start, wait for a listener, finish, stop.

Used by vmbox.labtraffic for the clients and servers it runs in a lab. `spawn`
runs a command under coreutils' `timeout` in a process group of its own, so it
ends by itself past its bound even if its owner never stops it (a test that
died half-way), and `stop` / `kill` end it with the tool under it (`ip netns
exec` execs, so the pid is timeout's) and reap both. `finish` waits for the
output up to a deadline and stops it past that; `wait_listening`
polls `ss` inside the namespace until a server listens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from vmbox.lab.netlab import exec_argv
from vmbox.lab.plan import LabError, LabPlan

READY_TIMEOUT = 5.0  # seconds for a server to listen
KILL_AFTER = 2.0  # seconds between timeout's SIGINT at the bound and its SIGKILL
STOP_GRACE = 2.0  # seconds between our SIGTERM and SIGKILL


def spawn(plan: LabPlan, role: str, argv: Sequence[str], bound: float) -> subprocess.Popen[str]:
    """`argv` in the lab's `role` namespace, interrupted (SIGINT) after `bound` seconds and
    killed KILL_AFTER later, whatever else happens; stdout and stderr piped, as text."""
    limit = ["timeout", "-s", "INT", "-k", f"{KILL_AFTER:g}", f"{bound:.1f}"]
    return subprocess.Popen(
        exec_argv(role, [*limit, *argv], plan.prefix),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """End the process and the tool under it, and reap it (a no-op once it ended).

    SIGTERM to timeout first: it passes the signal on, reaps the tool and exits, so
    nothing is left for anyone else to reap. SIGKILL to the whole group if that takes
    over STOP_GRACE (the tool is then init's to reap: wait until the group is gone)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + STOP_GRACE
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # ProcessLookupError once no process is left in it
            time.sleep(0.01)


def kill(proc: subprocess.Popen[str]) -> None:
    """`stop` the process and close its pipes."""
    stop(proc)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


def finish(proc: subprocess.Popen[str], deadline: float) -> tuple[int, str, str]:
    """Exit code, stdout and stderr once `proc` ends; stopped at `deadline`
    (time.monotonic())."""
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
    return proc.returncode, out or "", err or ""


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def wait_listening(plan: LabPlan, role: str, port: int, server: subprocess.Popen[str]) -> None:
    """Return once a TCP socket listens on `port` in `role`'s namespace (`ss` says so); a
    LabError with the server's last word if it exits or READY_TIMEOUT passes first."""
    deadline = time.monotonic() + READY_TIMEOUT
    argv = exec_argv(role, ["ss", "-Htln", f"sport = :{port}"], plan.prefix)
    while not subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip():
        if server.poll() is not None or time.monotonic() > deadline:
            _, _, err = finish(server, time.monotonic())
            kill(server)
            raise LabError(
                f"nothing listens on port {port} in {plan.namespace(role)}: "
                f"{last_line(err) or 'no output'}"
            )
        time.sleep(0.05)
