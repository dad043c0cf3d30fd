"""Wake an event loop the moment a process ends: its pidfd, watched with add_reader.

Used by vmbox.runtime.local (`LocalRuntime.watch_exits`), so the controller
reconciles when a replica exits instead of at its next tick. A pidfd
(pidfd_open(2), Linux 5.3 and later) becomes readable once its process has
ended, whether it is our child or an adopted replica whose parent is another;
each is closed once it fires, or when watching stops. Where there is no pidfd
the watch quietly does nothing and the controller's tick still reaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


class PidWatch:
    """Calls `wake` on `loop` when any watched process ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        self.loop = loop
        self.wake = wake
        self.pidfds: set[int] = set()  # open and watched; each closed once it fires
        self.closed = False

    def watch(self, pid: int) -> None:
        """Watch `pid` from here on; callable from any thread (add_reader is not
        thread-safe, so another thread hands the work to the loop's)."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self.loop:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self._open, pid)
            return
        self._open(pid)

    def _open(self, pid: int) -> None:
        if self.closed:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            self.loop.call_soon(self.wake)
            return
        except OSError as exc:  # no pidfd here (Linux before 5.3): the tick reaps
            log.debug("no pidfd for pid %d (%s): its exit is seen at the next tick", pid, exc)
            return
        self.pidfds.add(fd)
        self.loop.add_reader(fd, self._ended, fd)

    def _ended(self, fd: int) -> None:
        self._forget(fd)
        self.wake()

    def _forget(self, fd: int) -> None:
        if fd not in self.pidfds:  # closed already: the number may be another file's now
            return
        self.pidfds.discard(fd)
        if not self.loop.is_closed():
            self.loop.remove_reader(fd)
        os.close(fd)

    def close(self) -> None:
        """Stop watching (on the loop's thread): every pidfd closed, no wake after."""
        self.closed = True
        for fd in list(self.pidfds):
            self._forget(fd)
