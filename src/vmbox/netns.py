"""Network namespaces by name: enter one for a moment, run a command inside one.

A replica of an in-path service stays in the host's namespace (etcd, its
metrics and its siblings are on loopback there) and opens only its netfilter
queue socket inside the gateway namespace: `entered(name)` switches the
calling thread into /run/netns/<name> (`ip netns add` makes that file) and
back, and a socket created inside keeps that namespace for its lifetime. The
lab (vmbox.lab) and the queue steering (vmbox.dataplane.steering) run commands
inside with `exec_argv`, the argv of `ip netns exec`.

Only the calling thread switches (setns(2) on a thread with CLONE_NEWNET), so
call `entered` from the thread that creates the socket and do not await inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NamespaceError(OSError):
    """A named namespace is missing or cannot be entered; str() is one line."""


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace `name`; always come back."""
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(
            f"network namespace {name!r} does not exist (no {path(name)}; "
            "`vmbox lab up` makes one, `ip netns list` shows them)"
        ) from None
    except PermissionError:
        raise NamespaceError(
            f"network namespace {name!r}: permission denied (run as root)"
        ) from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except NamespaceError as exc:
            raise NamespaceError(
                f"cannot enter network namespace {name!r}: {exc.strerror}"
            ) from None
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside namespace `name`."""
    return ["ip", "netns", "exec", name, *argv]
