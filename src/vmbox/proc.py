"""Process helpers shared by the private etcd, the local runtime and the context files.

`pid_alive` tells whether a recorded owner still runs. `signal_on_parent_death`
returns a preexec function that asks the kernel (prctl PR_SET_PDEATHSIG) to
signal the child when the process that started it dies, even by SIGKILL, so
nothing that depends on the parent outlives it; `with_parent_death_signal`
does the same by wrapping a command line in util-linux's setpriv, which is
safe in a process with threads; `exit_with_parent` does it from inside the child.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
from collections.abc import Callable, Sequence

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: object) -> bool:
    """True when a process with this pid exists (ours or someone else's)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_on_parent_death(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen (Linux); runs between fork and exec."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def with_parent_death_signal(
    argv: Sequence[str], sig: signal.Signals
) -> tuple[list[str], Callable[[], None] | None]:
    """`argv` made to receive `sig` when its parent dies, and the preexec_fn to pass, if any.

    With setpriv (util-linux, on every Debian) the command line carries it and
    no preexec function is needed: Python code run between fork and exec in a
    process with gRPC's threads can hang or abort the child (it did: an etcd
    member restarted beside a live client died of SIGABRT before exec).
    Without setpriv, the preexec function is the fallback. setpriv asks for
    the signal just before it execs the command, so a parent that dies within
    those first milliseconds leaves the child running; the preexec function
    has no such window.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv), signal_on_parent_death(sig)
    return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--", *argv], None


def exit_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask for `sig` when the parent dies, from inside the child itself.

    Preferred over a preexec function where the parent runs gRPC: a preexec
    function forces a plain fork, whose gRPC fork handlers complain on stderr.
    Returns False when the parent is already gone (it died before the call).
    """
    signal_on_parent_death(sig)()
    return os.getppid() == parent_pid
