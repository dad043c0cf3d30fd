"""Which replica processes of a service are alive: what the faults check for leaks.

Used by vmbox.faults.churn (no replica left once the service stopped) and
vmbox.faults.controller_restart (the same processes before and after a
restart, none left after Ctrl-C). A replica is recognised by the command line
LocalRuntime.command builds (`... replica --service S ... --etcd E ...`);
a zombie counts as exited, since nobody may be left to reap it (pid 1 here
does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import psutil


def alive(proc: psutil.Process) -> bool:
    """The same process (pid and start time) still runs (a zombie does not)."""
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def _replica_of(proc: psutil.Process, service: str, etcd: str) -> bool:
    with contextlib.suppress(psutil.Error):
        cmdline = proc.cmdline()
        flags = dict(itertools.pairwise(cmdline))  # --flag value ...
        mine = (flags.get("--service"), flags.get("--etcd")) == (service, etcd)
        return "replica" in cmdline and mine and proc.status() != psutil.STATUS_ZOMBIE
    return False


def replica_processes(service: str, etcd: str) -> list[psutil.Process]:
    """Live replicas of `service` on the etcd endpoints `etcd` (comma-separated)."""
    return [proc for proc in psutil.process_iter() if _replica_of(proc, service, etcd)]


def leftovers(service: str, etcd: str) -> list[str]:
    """Replica processes of this service still alive, and zombie children of this process."""
    found = [f"replica process {proc.pid} still runs" for proc in replica_processes(service, etcd)]
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(f"zombie child {child.pid} ({child.name()})")
    return found


async def leaks(service: str, etcd: str, within: float = 3.0) -> list[str]:
    """What `leftovers` still finds after `within` seconds (a process may be exiting)."""
    deadline = time.monotonic() + within
    while (found := leftovers(service, etcd)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return found
