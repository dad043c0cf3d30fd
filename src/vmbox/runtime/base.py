"""The runtime protocol: where replicas run (local processes now, pods later).

The controller (vmbox.control.controller) drives a runtime through this
protocol only, so it never knows whether a replica is a process or a pod. A
runtime that can tell at once when a replica exits also offers `ExitWatch`;
the controller then reconciles at that moment instead of at its next tick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# A replica exits with this code for a problem no restart can fix (busy port,
# bad spec); the controller then stops restarting it and reports the cause.
EXIT_CONFIG = 3


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the runtime knows of one replica."""

    replica_id: str
    pid: int | None
    running: bool
    exit_code: int | None = None
    adopted: bool = False


@dataclass(frozen=True, slots=True)
class Exited:
    """A replica that stopped without being asked to."""

    replica_id: str
    exit_code: int | None
    last_log_line: str
    ran_for: float = 0.0


@dataclass(frozen=True, slots=True)
class Usage:
    """A replica's resource use as its runtime measures it (for the monitor)."""

    memory_bytes: int  # working set: what a pod's memory metric would show
    memory_limit: int | None  # the enforced limit, or the spec's figure when none is enforced
    cpu_seconds: float  # user + system, cumulative
    source: str  # "cgroup v1", "cgroup v2" or "psutil"


class Runtime(Protocol):
    def start(self, replica_id: str, standby: bool = False) -> ReplicaState:
        """Start one replica (a warm spare if `standby`: registered as standby, serving
        nothing until promoted); returns at once (the replica registers itself in etcd)."""
        ...

    def stop(self, replica_id: str, timeout: float = 5.0) -> None:
        """Ask a replica to leave and stop; force it after `timeout`."""
        ...

    def adopt(self, replica_id: str, pid: int) -> bool:
        """Take over a replica left running by an earlier controller."""
        ...

    def reap(self) -> list[Exited]:
        """Replicas that exited since the last call, not counting ones we stopped."""
        ...

    def running(self) -> dict[str, ReplicaState]: ...

    def usage(self, replica_id: str) -> Usage | None:
        """Memory and CPU of one running replica, or None if it is not running."""
        ...

    def stop_all(self, timeout: float = 5.0) -> None: ...


@runtime_checkable
class ExitWatch(Protocol):
    """A runtime that can say at once that one of its replicas exited."""

    def watch_exits(self, wake: Callable[[], None] | None) -> None:
        """Call `wake` (on the calling event loop) as soon as a replica exits, for the
        replicas running now and those started or adopted later; None stops it.

        Level-based: `wake` says only that something ended; `reap` says what."""
        ...
