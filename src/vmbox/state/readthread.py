"""ReadThread: a store read repeated on a thread of its own, handing the loop only what changed.

Poll views (and the watch view's probe) in vmbox.state.views run one per
shared item when the store can read without the event loop
(`store.BlockingReads`: EtcdStore, through a blocking gRPC channel of its
own). Why: a read through the asyncio gRPC client costs the replica's event
loop about 1 ms of CPU when it comes between packets (the interpreter and
grpc's aio layer: a task, metadata, a completion relayed through a socket),
and every packet that arrives meanwhile waits for it; poll100 cost 1.13x the
base round trip (DESIGN.md, "The store client off the packet path"). Here a
read blocks this thread in gRPC's C core with the GIL released, and the loop
hears of it only when the outcome changed: a new revision, the key gone, the
store lost or back. A quiet poll costs the packet path nothing.

Order and loss: one thread hands outcomes over with `call_soon_threadsafe`,
which the loop runs in order, and it compares each read with the last outcome
it handed over, so the newest revision always reaches the loop and an older
one never follows a newer one. `stop()` wakes the thread from its wait and
joins it (a read in flight finishes first: at most its timeout).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmbox.state.store import KeyValue, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a read found: the key (None: absent), or the error that stopped it."""

    kv: KeyValue | None = None
    error: StoreError | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision if self.kv is not None else 0


class ReadThread:
    """Calls `read()` every `interval` s on its own thread; `deliver` runs on `loop` on changes.

    While reads fail the wait doubles up to `max_backoff`. `reads` counts the
    reads that succeeded (a read that found no key included), `quiet` those of
    them the loop never heard of (nothing had changed).
    """

    def __init__(
        self,
        read: Callable[[], KeyValue | None],
        interval: float,
        deliver: Callable[[Outcome], None],
        loop: asyncio.AbstractEventLoop,
        *,
        first_delay: float = 0.0,
        max_backoff: float = 2.0,
        name: str = "vmbox-read",
    ) -> None:
        self.read = read
        self.interval = interval
        self.deliver = deliver
        self.loop = loop
        self.first_delay = first_delay
        self.max_backoff = max_backoff
        self.reads = 0
        self.quiet = 0
        self.handed = 0  # outcomes handed to the loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Wake the thread and join it; True once it has ended."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        last: Outcome | None = None
        delay = self.first_delay
        while not self._stop.wait(delay):
            outcome = self._once()
            if self._changed(last, outcome):
                if not self._hand(outcome):
                    return  # the loop is closed: nobody is left to tell
                last = outcome
            elif outcome.error is None:
                self.quiet += 1
            if outcome.error is None:
                delay = self.interval
            else:
                delay = min(max(delay * 2, self.interval), self.max_backoff)

    def _once(self) -> Outcome:
        try:
            kv = self.read()
        except StoreError as exc:
            return Outcome(error=exc)
        self.reads += 1
        return Outcome(kv)

    @staticmethod
    def _changed(last: Outcome | None, now: Outcome) -> bool:
        if last is None:
            return True
        if now.error is not None:
            return last.error is None  # lost: say so once
        return last.error is not None or now.revision != last.revision

    def _hand(self, outcome: Outcome) -> bool:
        if self._stop.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.deliver, outcome)
        except RuntimeError:
            return False
        self.handed += 1
        return True
