"""The local runtime: each replica is a child process of `vmbox up`.

Called by the controller through the Runtime protocol. Replicas run
`python -m vmbox replica ...` in their own session, so a Ctrl-C at the terminal
reaches the controller only, which then stops them in order. With an external
etcd they outlive a controller that dies (kill -9) on purpose: one that starts
again adopts the replicas still running, as a level-based controller should.
With a private etcd (`adoptable=False`) there is nothing to come back to, since
the etcd dies with the controller, so they get SIGTERM when it dies.

Each replica's output goes to a log file whose last line explains a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from vmbox.runtime.base import Exited, ReplicaState


@dataclass
class _Proc:
    replica_id: str
    pid: int
    popen: subprocess.Popen[bytes] | None  # None when adopted: not our child
    log_path: Path | None
    started: float = field(default_factory=time.monotonic)


def last_line(path: Path | None, limit: int = 4096) -> str:
    """The last non-empty line of a log file, or '' when there is none."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


class LocalRuntime:
    """Replicas of one service as local processes."""

    def __init__(
        self, service: str, endpoints: Sequence[str], log_dir: Path, *, adoptable: bool = True
    ) -> None:
        self.service = service
        self.adoptable = adoptable
        self.endpoints = list(endpoints)
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, _Proc] = {}

    def command(self, replica_id: str) -> list[str]:
        tie = [] if self.adoptable else ["--parent-pid", str(os.getpid())]
        return [
            sys.executable, "-m", "vmbox", "replica",
            "--service", self.service,
            "--id", replica_id,
            "--etcd", ",".join(self.endpoints),
            *tie,
        ]  # fmt: skip

    def start(self, replica_id: str) -> ReplicaState:
        if replica_id in self._procs:
            raise ValueError(f"replica {replica_id} is already running")
        log_path = self.log_dir / f"{replica_id}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                self.command(replica_id),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[replica_id] = _Proc(replica_id, popen.pid, popen, log_path)
        return ReplicaState(replica_id, popen.pid, running=True)

    def adopt(self, replica_id: str, pid: int) -> bool:
        if replica_id in self._procs or not _is_replica(pid, replica_id):
            return False
        self._procs[replica_id] = _Proc(replica_id, pid, None, self.log_dir / f"{replica_id}.log")
        return True

    def stop(self, replica_id: str, timeout: float = 5.0) -> None:
        proc = self._procs.pop(replica_id, None)
        if proc is not None:
            _terminate([proc], timeout)

    def stop_all(self, timeout: float = 5.0) -> None:
        procs = list(self._procs.values())
        self._procs.clear()
        _terminate(procs, timeout)

    def reap(self) -> list[Exited]:
        exited: list[Exited] = []
        for replica_id, proc in list(self._procs.items()):
            code = _exit_code(proc)
            if code is not False:
                del self._procs[replica_id]
                ran_for = time.monotonic() - proc.started
                exited.append(Exited(replica_id, code, last_line(proc.log_path), ran_for))
        return exited

    def running(self) -> dict[str, ReplicaState]:
        return {
            rid: ReplicaState(rid, p.pid, running=True, adopted=p.popen is None)
            for rid, p in self._procs.items()
        }


def _is_replica(pid: int, replica_id: str) -> bool:
    """True when `pid` is alive and really is that vmbox replica (pids get reused)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "replica" in cmdline and replica_id in cmdline


def _exit_code(proc: _Proc) -> int | bool | None:
    """The exit code if the process ended (None if unknown), False while it runs."""
    if proc.popen is not None:
        code = proc.popen.poll()
        return False if code is None else code
    try:
        status = psutil.Process(proc.pid).status()
    except psutil.NoSuchProcess:
        return None
    return None if status == psutil.STATUS_ZOMBIE else False


def _terminate(procs: list[_Proc], timeout: float) -> None:
    """SIGTERM all (they leave the membership first), then SIGKILL what is left."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        while _exit_code(proc) is False and time.monotonic() < deadline:
            time.sleep(0.02)
        if _exit_code(proc) is False:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            if proc.popen is not None:
                proc.popen.wait(timeout=5)
