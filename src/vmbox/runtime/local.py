"""The local runtime: each replica is a child process of `vmbox up`.

Called by the controller through the Runtime protocol. Replicas run
`python -m vmbox replica ...` in their own session, so a Ctrl-C at the terminal
reaches the controller only, which then stops them in order. With an external
etcd they outlive a controller that dies (kill -9) on purpose: one that starts
again adopts the replicas still running, as a level-based controller should.
With a private etcd (`adoptable=False`) there is nothing to come back to, since
the etcd dies with the controller, so they get SIGTERM when it dies.

As root with a `memory_limit`, each replica runs in a memory cgroup of its own
with that limit (vmbox.runtime.cgroups), like a pod; `usage()` then reads the
cgroup, else psutil. `cgroup_note` says which and why.

Each replica's output goes to a log file whose last line explains a crash.
A controller that asks (`watch_exits`, vmbox.runtime.base.ExitWatch) is woken
the moment a replica exits (vmbox.runtime.pidwatch: each replica's pidfd on
the controller's event loop), so a crash is seen in milliseconds, not at the
next tick; `reap` still says what ended.
An external etcd's TLS and auth settings reach replicas as flags naming files
(`--etcd-ca`, `--etcd-password-file`, ...), never as the password itself:
every user can read a process's command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from vmbox import allocator
from vmbox.runtime.base import Exited, ReplicaState, Usage
from vmbox.runtime.cgroups import (
    CgroupUnavailable,
    MemoryCgroup,
    ReplicaCgroups,
    is_root,
    join_command,
)
from vmbox.runtime.pidwatch import PidWatch
from vmbox.state.access import StoreSpec, replica_flags

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class _Proc:
    replica_id: str
    pid: int
    popen: subprocess.Popen[bytes] | None  # None when adopted: not our child
    log_path: Path | None
    cgroup: MemoryCgroup | None = None
    oom_kills: int = 0  # the cgroup's count when we took the replica on
    started: float = field(default_factory=time.monotonic)


def last_line(path: Path | None, limit: int = 4096) -> str:
    """The last non-empty line of a log file, or '' when there is none."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def open_cgroups(service: str, memory_limit: int | None) -> tuple[ReplicaCgroups | None, str]:
    """The service's replica cgroups if they can be used here, and a note saying why or why not."""
    if memory_limit is None:
        return None, "psutil: no memory_limit in the spec"
    if not is_root():
        return None, "psutil: not running as root"
    try:
        cgroups = ReplicaCgroups(service, memory_limit)
        cgroups.probe()
    except CgroupUnavailable as exc:
        return None, f"psutil: no writable memory cgroup ({exc})"
    cgroups.sweep()  # leftovers of an earlier controller; busy ones stay
    limit = f"{memory_limit / MIB:.1f} MiB"
    return cgroups, f"cgroup v{cgroups.version} memory limit {limit} per replica"


class LocalRuntime:
    """Replicas of one service as local processes."""

    def __init__(
        self,
        service: str,
        endpoints: Sequence[str],
        log_dir: Path,
        *,
        adoptable: bool = True,
        memory_limit: int | None = None,
        access: StoreSpec | None = None,
    ) -> None:
        self.service = service
        self.adoptable = adoptable
        self.endpoints = list(endpoints)
        self.access = access  # TLS and auth settings; its endpoints are `endpoints`
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.memory_limit = memory_limit
        self._cgroups, self.cgroup_note = open_cgroups(service, memory_limit)
        self._procs: dict[str, _Proc] = {}
        self._unremoved: list[MemoryCgroup] = []  # busy at removal; retried by reap()
        # stop() runs in worker threads (drains) while start() and reap() run on
        # the event loop: cgroup creation and removal must not interleave.
        self._lock = threading.Lock()
        self._exits: PidWatch | None = None  # watch_exits: wakes the controller at an exit

    def command(self, replica_id: str, standby: bool = False) -> list[str]:
        tie = [] if self.adoptable else ["--parent-pid", str(os.getpid())]
        role = ["--standby"] if standby else []  # a warm spare (vmbox.state.standby)
        return [
            sys.executable,
            "-m",
            "vmbox",
            "replica",
            "--service",
            self.service,
            "--id",
            replica_id,
            "--etcd",
            ",".join(self.endpoints),
            *replica_flags(self.access),
            *tie,
            *role,
        ]

    def _cgroup_for(self, replica_id: str) -> MemoryCgroup | None:
        if self._cgroups is None:
            return None
        try:
            return self._cgroups.create(replica_id)
        except OSError as exc:
            log.warning("replica %s runs without its memory cgroup: %s", replica_id, exc)
            return None

    def start(self, replica_id: str, standby: bool = False) -> ReplicaState:
        if replica_id in self._procs:
            raise ValueError(f"replica {replica_id} is already running")
        with self._lock:  # a sweep must not remove the new cgroup before the replica joins
            cgroup = self._cgroup_for(replica_id)
            popen = self._spawn(replica_id, cgroup, standby)
            oom = cgroup.oom_kills() if cgroup else 0
            log_path = self.log_dir / f"{replica_id}.log"
            self._procs[replica_id] = _Proc(replica_id, popen.pid, popen, log_path, cgroup, oom)
        if self._exits is not None:
            self._exits.watch(popen.pid)
        return ReplicaState(replica_id, popen.pid, running=True)

    def _spawn(
        self, replica_id: str, cgroup: MemoryCgroup | None, standby: bool = False
    ) -> subprocess.Popen[bytes]:
        argv = self.command(replica_id, standby)
        # The shell joins the cgroup and execs the replica, so it is limited from
        # its first instruction (a preexec_fn is unsafe beside gRPC's threads).
        # The allocator's environment lets the replica's memory go back to the
        # kernel when its flows idle out (vmbox.allocator).
        with (self.log_dir / f"{replica_id}.log").open("ab") as log_file:
            return subprocess.Popen(
                join_command(cgroup.path, argv) if cgroup else argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ | allocator.ENVIRONMENT,
            )

    def adopt(self, replica_id: str, pid: int) -> bool:
        if replica_id in self._procs or not _is_replica(pid, replica_id):
            return False
        cgroup = self._cgroups.of_pid(replica_id, pid) if self._cgroups else None
        if cgroup is not None and self.memory_limit is not None:
            with contextlib.suppress(OSError):  # v1 refuses a limit below current use
                cgroup.set_limit(self.memory_limit)  # the spec may have changed meanwhile
        oom = cgroup.oom_kills() if cgroup else 0
        log_path = self.log_dir / f"{replica_id}.log"
        self._procs[replica_id] = _Proc(replica_id, pid, None, log_path, cgroup, oom)
        if self._exits is not None:
            self._exits.watch(pid)
        return True

    def watch_exits(self, wake: Callable[[], None] | None) -> None:
        """Call `wake` on the running event loop as soon as a replica (running now,
        started or adopted later) exits, whoever ended it; None stops watching.

        Only a wake-up: the controller's next pass reaps and reads what is."""
        if self._exits is not None:
            self._exits.close()
            self._exits = None
        if wake is None:
            return
        self._exits = PidWatch(asyncio.get_running_loop(), wake)
        for proc in list(self._procs.values()):
            self._exits.watch(proc.pid)

    def stop(self, replica_id: str, timeout: float = 5.0) -> None:
        """SIGTERM (the replica drains its flows and leaves), SIGKILL after `timeout`."""
        proc = self._procs.pop(replica_id, None)
        if proc is not None:
            _terminate([proc], signal.SIGTERM, timeout)
            self._remove_cgroups([proc])

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGINT (each replica leaves and exits at once), SIGKILL after `timeout`."""
        procs = list(self._procs.values())
        self._procs.clear()
        _terminate(procs, signal.SIGINT, timeout)
        self._remove_cgroups(procs)

    def reap(self) -> list[Exited]:
        exited: list[Exited] = []
        for replica_id, proc in list(self._procs.items()):
            code = _exit_code(proc)
            if code is not False:
                del self._procs[replica_id]
                ran_for = time.monotonic() - proc.started
                exited.append(Exited(replica_id, code, self._why_exited(proc, code), ran_for))
                self._remove_cgroups([proc], wait=0.0)
        with self._lock:
            self._unremoved = [c for c in self._unremoved if not c.remove(timeout=0.0)]
        return exited

    def _why_exited(self, proc: _Proc, code: int | None) -> str:
        """The log's last line, unless the kernel's OOM killer did it."""
        if proc.cgroup is not None and code in (None, -signal.SIGKILL):
            with contextlib.suppress(OSError):
                if proc.cgroup.oom_kills() > proc.oom_kills:
                    limit = proc.cgroup.limit() or self.memory_limit or 0
                    return f"killed by the OOM killer at the {limit / MIB:.1f} MiB memory limit"
        return last_line(proc.log_path)

    def _remove_cgroups(self, procs: list[_Proc], wait: float = 1.0) -> None:
        for proc in procs:
            if proc.cgroup is not None and not proc.cgroup.remove(timeout=wait):
                with self._lock:
                    self._unremoved.append(proc.cgroup)
        with self._lock:
            if self._cgroups is not None and not self._procs and not self._unremoved:
                self._cgroups.sweep()  # the service's own directory, now empty

    def running(self) -> dict[str, ReplicaState]:
        # list() copies in one step: stop() pops entries from worker threads.
        return {
            rid: ReplicaState(rid, p.pid, running=True, adopted=p.popen is None)
            for rid, p in list(self._procs.items())
        }

    def usage(self, replica_id: str) -> Usage | None:
        """Memory and CPU of a running replica, from its cgroup or else psutil.

        psutil's figure is RSS, which also counts shared library pages a cgroup
        would not charge to the replica (they were first touched elsewhere), so
        it reads higher than a cgroup's working set for the same process.
        """
        proc = self._procs.get(replica_id)
        if proc is None:
            return None
        try:
            process = psutil.Process(proc.pid)
            times = process.cpu_times()
            cpu = times.user + times.system
            if proc.cgroup is not None:
                with contextlib.suppress(OSError, ValueError):
                    memory, limit = proc.cgroup.working_set(), proc.cgroup.limit()
                    return Usage(memory, limit, cpu, proc.cgroup.source)
            return Usage(process.memory_info().rss, self.memory_limit, cpu, "psutil")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None


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


def _terminate(procs: list[_Proc], sig: signal.Signals, timeout: float) -> None:
    """Send `sig` to all, wait up to `timeout` for them to exit, then SIGKILL what is left."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    deadline = time.monotonic() + timeout
    for proc in procs:
        while _exit_code(proc) is False and time.monotonic() < deadline:
            time.sleep(0.02)
        if _exit_code(proc) is False:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            if proc.popen is not None:
                proc.popen.wait(timeout=5)
