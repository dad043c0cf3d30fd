"""The runtime protocol: where replicas run (local processes now, pods later).

The controller (vmbox.control.controller) drives a runtime through this
protocol only, so it never knows whether a replica is a process or a pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Runtime(Protocol):
    def start(self, replica_id: str) -> ReplicaState:
        """Start one replica; returns at once (the replica registers itself in etcd)."""
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

    def stop_all(self, timeout: float = 5.0) -> None: ...
