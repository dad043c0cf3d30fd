"""Prefix watches over etcd3aio that resume where they broke, and etcd3aio's own resumes.

Called by EtcdStore (vmbox.state.etcd.etcdstore): its watch_prefix is `watch_prefix`
here, and its watch_resumes adds `client_resumes()`, the resumes that etcd3aio
makes by itself and that the loop here never sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from etcd3aio import Etcd3Client
from etcd3aio.kv import prefix_range_end

from vmbox.state.store import StoreError, WatchEvent

# The package's name, as before the package was split: operators' log lines keep it.
log = logging.getLogger("vmbox.state.etcd")

WATCH_REOPEN = 3.0  # seconds of silence after which a watch stream is reopened


class _ReconnectCount(logging.Filter):
    """Counts etcd3aio's own watch reconnects (it logs one warning per reconnect).

    etcd3aio resumes a broken watch stream by itself, from the revision after
    the last response, so those resumes never reach watch_prefix; its log line
    is the only sign. One count per process: a replica has one store.
    """

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("watch: transient error"):
            _ReconnectCount.count += 1
        return True


logging.getLogger("etcd3aio.watch").addFilter(_ReconnectCount())


def client_resumes() -> int:
    """Watch streams etcd3aio resumed by itself in this process."""
    return _ReconnectCount.count


async def watch_prefix(
    client: Etcd3Client,
    where: str,
    prefix: str,
    start_revision: int,
    resumed: Callable[[], None],
    relogin: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[WatchEvent]:
    """Events under `prefix`, resuming after the last one seen when a stream breaks.

    A stream that yields nothing for WATCH_REOPEN seconds is reopened: after
    an etcd restart a stream can stay open and silent for good, and nothing
    on the client tells it from a quiet prefix. `resumed` is called for each
    stream that broke or ended and is reopened (not for a silent one).

    If etcd compacted the history the watch must resume from, the events in
    between are lost: this raises StoreError, and the caller re-reads the
    prefix and watches again from the revision of that read.

    A stream that etcd cancels for its auth token (a member that restarted has
    forgotten the tokens it issued) calls `relogin` before it is reopened, so
    the new stream carries a token etcd knows.
    """
    next_revision = start_revision
    backoff = 0.1
    while True:
        if client.watch is None:
            raise StoreError(f"etcd store for {where} is closed")
        stream: Any = client.watch.watch(
            prefix, prefix_range_end(prefix), start_revision=next_revision
        )
        silent = unauthenticated = False
        try:
            async with contextlib.aclosing(stream):
                while True:
                    try:
                        # A stream that went silent after an etcd restart looks
                        # exactly like a quiet prefix: reopen it every so often
                        # (from the next revision, so nothing is lost).
                        # Not wait_for: on Python 3.11 it swallows a cancellation
                        # that lands as a response arrives, and a busy prefix
                        # (demand reports) then keeps its task alive for good.
                        async with asyncio.timeout(WATCH_REOPEN):
                            answer = await anext(stream)
                    except TimeoutError:
                        silent = True
                        break
                    except StopAsyncIteration:
                        break
                    _check_compaction(prefix, next_revision, answer)
                    if answer.canceled:
                        log.warning(
                            "etcd cancelled the watch of %s: %s", prefix, answer.cancel_reason
                        )
                        unauthenticated = "auth token" in str(answer.cancel_reason)
                        break
                    if next_revision == 0:
                        # Fix "now" so a restarted stream misses nothing.
                        next_revision = int(answer.header.revision) + 1
                    for event in answer.events:
                        next_revision = int(event.kv.mod_revision) + 1
                        yield _watch_event(event)
                    backoff = 0.1
        except StoreError:
            raise
        except Exception as exc:
            # Whatever broke the stream (gRPC, the client), resuming loses nothing.
            log.debug("watch of %s broke (%r); resuming at %d", prefix, exc, next_revision)
            unauthenticated = "auth token" in str(exc)
        if silent:
            continue  # reopen at once: a quiet prefix is no error to back off from
        resumed()
        if unauthenticated and relogin is not None:
            await relogin()
        # The stream ended (server closed it, or an error): reopen it.
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def _check_compaction(prefix: str, wanted: int, answer: Any) -> None:
    if int(answer.compact_revision) > 0:
        raise StoreError(
            f"watch of {prefix} cannot resume at revision {wanted}: etcd compacted history "
            f"up to {answer.compact_revision}; re-read and watch again"
        )


def _watch_event(event: Any) -> WatchEvent:
    return WatchEvent(
        kind="delete" if int(event.type) == 1 else "put",
        key=bytes(event.kv.key).decode(),
        value=bytes(event.kv.value),
        revision=int(event.kv.mod_revision),
    )
