"""The worker processes of one point, from their start to their last line, and always stopped.

Called by run.py. `Workers` is an async context manager: it starts one
`python -m vmbox.experiments.controlplane.worker PLAN` per plan (each dies
with this process: setpriv's parent-death signal), turns their stdout lines
into events on one queue, sends them commands on stdin, and on the way out,
whatever happened, asks each to stop, waits a bounded time and kills what is
left. Popen runs on a thread, not through the loop's subprocess support:
uvloop forks beside gRPC's threads (vmbox.faults.flood says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil

from vmbox.experiments.controlplane.points import STOP_TIMEOUT, WorkerPlan
from vmbox.proc import with_parent_death_signal

MODULE = "vmbox.experiments.controlplane.worker"


class Workers:
    """The processes running a point's plans; `events` gets (worker, event) pairs."""

    def __init__(self, plans: list[WorkerPlan], out: Path) -> None:
        self.plans = plans
        self.out = out
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.events: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.stopped = False
        self.backlog: list[tuple[int, dict[str, Any]]] = []  # events no wait has taken yet
        self.exited: set[int] = set()

    async def __aenter__(self) -> Workers:
        self.out.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        try:
            for plan in self.plans:
                path = self.out / f"worker-{plan.index}.plan.json"
                path.write_text(plan.dumps())
                proc = await asyncio.to_thread(self._spawn, plan.index, path)
                self.procs.append(proc)
                threading.Thread(
                    target=self._read, args=(loop, plan.index, proc), daemon=True
                ).start()
        except BaseException:
            await self._end()
            raise
        return self

    def _spawn(self, index: int, plan: Path) -> subprocess.Popen[bytes]:
        # "wb": a rerun into the same directory replaces the log, as it does the plan.
        log = open(self.out / f"worker-{index}.log", "wb")  # noqa: SIM115 - closed in _end
        self.logs.append(log)
        argv, preexec = with_parent_death_signal(
            [sys.executable, "-m", MODULE, str(plan)], signal.SIGKILL
        )
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=preexec,
            start_new_session=True,
        )

    def _read(
        self, loop: asyncio.AbstractEventLoop, index: int, proc: subprocess.Popen[bytes]
    ) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
        with contextlib.suppress(RuntimeError):  # the loop closed first
            loop.call_soon_threadsafe(self.events.put_nowait, (index, {"event": "exit"}))

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def send(self, **command: Any) -> None:
        """One command to every worker still running (a worker that is gone misses it)."""
        line = (json.dumps(command) + "\n").encode()
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.write(line)
                    proc.stdin.flush()

    async def until(self, kind: str, among: set[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Events of `kind` from each worker in `among` (those that came within `timeout`);
        a worker that exited is left out. Events of other kinds are kept for a later wait."""
        got: dict[int, dict[str, Any]] = {}
        waiting = set(among) - self.exited
        for index, event in list(self.backlog):
            if event.get("event") == kind and index in waiting:
                self.backlog.remove((index, event))
                got[index] = event
                waiting.discard(index)
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    index, event = await self.events.get()
            except TimeoutError:
                break
            if event.get("event") == kind and index in waiting:
                got[index] = event
                waiting.discard(index)
            elif event.get("event") == "exit":
                self.exited.add(index)
                waiting.discard(index)
            else:
                self.backlog.append((index, event))
        return got

    def cpu_seconds(self) -> float:
        """The workers' CPU time so far (user + system), all together."""
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def cpu_each(self) -> list[float]:
        out = []
        for proc in self.procs:
            try:
                times = psutil.Process(proc.pid).cpu_times()
                out.append(times.user + times.system)
            except psutil.Error:
                out.append(0.0)
        return out

    async def stop(self) -> list[dict[str, Any]]:
        """Ask every worker to stop; their results (a worker that wrote none: its error)."""
        self.send(cmd="stop")
        await self._end()
        return await asyncio.to_thread(self._results)

    def _results(self) -> list[dict[str, Any]]:
        results = []
        for plan, proc in zip(self.plans, self.procs, strict=False):
            try:
                results.append(json.loads(Path(plan.result).read_text()))
            except (OSError, ValueError):
                code = proc.returncode
                results.append({"index": plan.index, "error": f"no result (exit {code})"})
        return results

    async def _end(self) -> None:
        """Close stdin (a worker stops at its end), wait, kill what is left, reap all."""
        if self.stopped:
            return
        self.stopped = True
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()
        await asyncio.to_thread(self._reap)
        for log in self.logs:
            log.close()

    def _reap(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.stopped:
            # Cancelled or failed: no time for a graceful stop when the budget is gone.
            if exc is not None and not isinstance(exc, Exception):
                for proc in self.procs:
                    with contextlib.suppress(OSError):
                        proc.kill()
            await asyncio.shield(self._end())
