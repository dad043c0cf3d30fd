"""One worker process of the control-plane experiment: many real replicas, headless, fed traffic.

`python -m vmbox.experiments.controlplane.worker PLAN.json`, started by
run.py (workers.py), a few per point so the simulation spreads over the
cores. The plan (points.WorkerPlan) names the replicas it runs, the one it
starts at the resize, when to start (wall-clock) and by when to be gone.
Each replica is the real vmbox.replica.Replica with `headless=True`: its
membership lease and keep-alive, views, resize guard acks, demand reports and
health probe run as in production, on etcd connections the worker's replicas
share; packets come from the feeder (feeder.py) through `decide`.

A line protocol, one JSON object a line. It writes on stdout:
{"event": "ready", ...} once all its replicas hold their shares (once only),
{"event": "limited"} once they all applied the new limit, {"event":
"settled", ...} once the resized service's replicas here have settled,
{"event": "frozen"} once it stopped feeding and watching, {"event": "done"}
when its result is written. It reads on stdin: {"cmd": "schedule",
"measure": [t1, t2], "resize_at": t3, "limit": L}, {"cmd": "freeze"} and
{"cmd": "stop"} (end of input stops it too: its parent is gone). Whatever happens, it stops
its replicas and writes its result (JSON, the plan's `result` path) by the
plan's deadline; a watchdog thread ends the process 10 s after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vmbox.experiments.controlplane.feeder import Feeder
from vmbox.experiments.controlplane.observe import LoopLag, SettleWatch, Watched, record_limits
from vmbox.experiments.controlplane.points import WorkerPlan, replica_id, service_name
from vmbox.replica import Replica, load_service_spec
from vmbox.spec import Spec
from vmbox.state import access
from vmbox.state.etcd import EtcdStore, connect

# Replicas start this many at a time, this far apart: a hundred registering, reading and
# opening their watches at once would make a herd no deployment starts with (their
# calls time out, leases are lost, and they start over).
START_BATCH = 16
START_PAUSE = 0.1
STOP_WAIT = 5.0  # seconds the replicas get to leave (a revoke each)
WATCHDOG_GRACE = 10.0  # after the deadline the process ends, stuck or not
WORKER_NICE = 10


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


class Worker:
    """The replicas of one plan, their traffic and what is watched in them."""

    def __init__(self, plan: WorkerPlan, stores: list[EtcdStore], specs: dict[int, Spec]) -> None:
        self.plan = plan
        self.replicas: dict[tuple[int, int], Replica] = {}
        for k, (s, r) in enumerate(plan.mine):
            self.replicas[(s, r)] = self._replica(specs[s], r, stores[k % len(stores)])
        # The resize's replica is made when it starts, as a new process would be (its
        # registration waits for a moment in the window that suits a starting process).
        self.spare_spec = specs[plan.spare[0]] if plan.spare is not None else None
        self.spare_store = stores[-1]
        self.spare: Replica | None = None
        self.limits: list[list[float]] = []
        record_limits(self.replicas.items(), self.limits)
        model = plan.traffic()
        flows = [f for s in range(plan.services) for f in model.flows(s, plan.replicas)]
        self.feeder = Feeder(flows, self.replicas, plan.start_at)
        self.lag = LoopLag()
        self.settle: SettleWatch | None = None
        self.ready_at: float | None = None
        self.measure: tuple[float, float] = (0.0, 0.0)
        self.tasks: list[asyncio.Task[None]] = []  # the replicas'
        self.background: list[asyncio.Task[None]] = []  # feeding, watching
        self.frozen = False
        self.errors: list[str] = []
        self.holding = 0  # replicas holding their share when told to stop
        self.settle_state: dict[str, list[Any]] = {}

    def _replica(self, spec: Spec, index: int, store: EtcdStore) -> Replica:
        return Replica(
            spec, replica_id(index), store, headless=True, aggregated=self.plan.aggregated
        )

    async def run(self, commands: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Start at the plan's time, tell when ready, follow the commands until stop."""
        await asyncio.sleep(max(0.0, self.plan.start_at - time.time()))
        self.background += [asyncio.create_task(c) for c in (self.feeder.run(), self.lag.run())]
        self.background.append(asyncio.create_task(self._ready()))
        try:
            for k, replica in enumerate(self.replicas.values()):
                if k and k % START_BATCH == 0:
                    await asyncio.sleep(START_PAUSE)
                self.tasks.append(asyncio.create_task(replica.run()))
            while (command := await commands.get()) is not None:
                kind = command.get("cmd")
                if kind == "stop":
                    break
                if kind == "schedule":
                    self.measure = (command["measure"][0], command["measure"][1])
                    resize = self._resize(command["resize_at"])
                    limited = self._limited(float(command["limit"]))
                    self.background += [asyncio.create_task(c) for c in (resize, limited)]
                elif kind == "freeze":
                    await self.freeze()
                    say(event="frozen", worker=self.plan.index)
        finally:
            await self.freeze()
            await self.stop()

    async def freeze(self) -> None:
        """Stop feeding and watching, and keep what was seen: run.py freezes every worker
        before it stops any, so none sees another's replicas leave."""
        if self.frozen:
            return
        self.frozen = True
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.settle is not None:
            self.settle_state = self.settle.state()

    async def _ready(self) -> None:
        while not all(r.holding_share for r in self.replicas.values()):
            self._failures()
            await asyncio.sleep(0.05)
        self.ready_at = time.time()
        say(event="ready", worker=self.plan.index, at=self.ready_at, replicas=len(self.replicas))

    async def _limited(self, value: float) -> None:
        """Say when every replica here (the resize's aside) has applied the limit `value`."""
        mine = set(self.replicas)
        while True:
            applied = {(int(s), int(r)) for s, r, _, v in self.limits if v == value}
            if mine <= applied:
                say(event="limited", worker=self.plan.index)
                return
            await asyncio.sleep(0.02)

    def _failures(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = f"{type(task.exception()).__name__}: {task.exception()}"
                if error not in self.errors:
                    self.errors.append(error)
                    say(event="failed", worker=self.plan.index, error=error)

    async def _resize(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        if self.spare_spec is not None and self.plan.spare is not None:
            self.spare = self._replica(self.spare_spec, self.plan.spare[1], self.spare_store)
            self.tasks.append(asyncio.create_task(self.spare.run()))
        watched: list[Watched] = [
            r for (s, _), r in self.replicas.items() if s == self.plan.watched
        ]
        if self.spare is not None:
            watched.append(self.spare)
        if not watched:
            say(event="settled", worker=self.plan.index, at=None)
            return

        def settled(now: float) -> None:
            say(event="settled", worker=self.plan.index, at=now)

        self.settle = SettleWatch(lambda: watched, self.plan.replicas + 1, settled)
        await self.settle.run()

    async def stop(self) -> None:
        self.holding = sum(r.holding_share for r in self.replicas.values())
        for replica in self.replicas.values():
            replica.stop()
        if self.spare is not None:
            self.spare.stop()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=STOP_WAIT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self._failures()

    def result(self) -> dict[str, Any]:
        start, end = self.measure
        return {
            "index": self.plan.index,
            "pid": os.getpid(),
            "replicas": len(self.replicas),
            "holding": self.holding,
            "ready_at": self.ready_at,
            "counts": self.feeder.rows(),
            "fed": self.feeder.fed,
            "limits": self.limits,
            "watched": self.settle is not None,
            "settled_at": self.settle.settled_at if self.settle is not None else None,
            "settle_state": self.settle_state,
            "lag": self.lag.within(start, end),
            "errors": self.errors,
        }


async def _specs(store: EtcdStore, plan: WorkerPlan) -> dict[int, Spec]:
    wanted = sorted({s for s, _ in plan.mine} | ({plan.spare[0]} if plan.spare else set()))
    specs: dict[int, Spec] = {}
    for chunk in range(0, len(wanted), 50):
        some = wanted[chunk : chunk + 50]
        loaded = await asyncio.gather(*(load_service_spec(store, service_name(s)) for s in some))
        specs.update(zip(some, loaded, strict=True))
    return specs


def _read_commands(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    """stdin's lines onto the loop's queue; None at the end of input."""
    for line in sys.stdin:
        with contextlib.suppress(ValueError):
            loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def serve(plan: WorkerPlan) -> dict[str, Any]:
    """Run the plan; its result (also when it ended early: `error` says why)."""
    target = access.from_settings(plan.endpoints, plan.access, "controlplane worker plan")
    login = access.connect_kwargs(target)
    stores: list[EtcdStore] = []
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
    worker: Worker | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(max(1.0, plan.deadline - time.time())):
            for _ in range(plan.connections):
                stores.append(await connect(list(plan.endpoints), timeout=10.0, **login))
            worker = Worker(plan, stores, await _specs(stores[0], plan))
            await worker.run(commands)
    except TimeoutError:
        error = "the worker's deadline passed"
    except Exception as exc:  # one line in the result: run.py shows it
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for store in stores:
            with contextlib.suppress(Exception):
                await store.close()
    result: dict[str, Any] = {"index": plan.index, "pid": os.getpid()}
    if worker is not None:
        result = worker.result()
    result["error"] = error
    return result


def _watchdog(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()) + WATCHDOG_GRACE)
    os._exit(3)


def main(argv: list[str]) -> int:
    import uvloop

    plan = WorkerPlan.loads(Path(argv[0]).read_text())
    # Below etcd, which it measures: on a machine the simulation fills, the store's
    # figures are its own, not those of a store starved by its clients.
    os.nice(WORKER_NICE)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    threading.Thread(target=_watchdog, args=(plan.deadline,), daemon=True).start()
    result = uvloop.run(serve(plan))
    Path(plan.result).write_text(json.dumps(result))
    say(event="done", worker=plan.index, error=result["error"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
