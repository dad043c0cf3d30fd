"""The controller restart fault: kill -9 `vmbox up` under load and start it again.

Registered in vmbox.faults. The controller is the real `vmbox up` command, a
subprocess in a session of its own on a private etcd passed with --etcd, so its
replicas run in their own sessions and outlive it. The spec asks for 2
replicas and `vmbox scale` makes it 3, so the desired count in etcd differs
from the spec's. Under a steady load (three sources at 1.5 x the limit) `vmbox
up` is killed with SIGKILL (full: 3 times, small: once), stays dead for a few
seconds and is started again with the same spec. Then every replica that ran
before is the same process (pid and start time), adopted, not restarted nor
joined by another; the desired count is still 3, every earlier event is kept,
traffic passed every whole second, and the new controller acts (`vmbox scale
2` drains one, `vmbox scale 3` starts one). At the end Ctrl-C stops `vmbox up`
and with it every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from vmbox.faults import FaultResult, Say, Scale, processes
from vmbox.faults.service import LIMIT, fault_spec, steady_load
from vmbox.faults.snapshot import read_state, state_lost
from vmbox.faults.traffic import over_limit, received_between
from vmbox.runtime.local import last_line
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.state.membership import list_members
from vmbox.testbed import NotReady, private_store, store_access, upstream_echo, wait_ready
from vmbox.tools.echo import EchoServer

SERVICE = "restart"
SOURCES, FLOWS = 3, 16  # 16 flows per source: each source reaches all 3 replicas
REPLICAS = 3  # after `vmbox scale`; the spec says 2
DOWN = 3.0  # seconds the controller stays dead
SETTLE = 2.5  # after the adoption: a wrongful start would show within a few reconcile passes
WAIT = 30.0  # for replicas to be ready, adopted, drained, stopped (2 shared cores, noise)
PASSING = 0.8  # a second passed when the upstream got this share of the limit


class Up:
    """`vmbox up SPEC --etcd E` in a session of its own (a kill hits it alone), logged to a file."""

    def __init__(self, spec: Path, etcd: str, workdir: Path) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "vmbox",
            "up",
            str(spec),
            "--etcd",
            etcd,
            "--no-live",
            "--metrics-port",
            "0",
        ]
        self.env = os.environ | {"VMBOX_STATE_DIR": str(workdir / "state")}
        self.log = workdir / "up.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def kill(self) -> None:
        if self.popen is not None and self.running:
            self.popen.kill()
            await asyncio.to_thread(self.popen.wait, 10)

    async def scale(self, count: int) -> None:
        """`vmbox scale`, finding the etcd through the context `vmbox up` recorded."""
        argv = [sys.executable, "-m", "vmbox", "scale", SERVICE, str(count)]
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            env=self.env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"vmbox scale {count}: {done.stderr.decode().strip()[-200:]}")


class Run:
    """One fault run: the service, `vmbox up`, and what the checks found."""

    def __init__(
        self, store: EtcdStore, workdir: Path, result: FaultResult, spec: Spec, echo: EchoServer
    ) -> None:
        self.store, self.workdir, self.result = store, workdir, result
        self.etcd = ",".join(store.endpoints)
        self.spec, self.echo = spec, echo
        self.up = Up(workdir / "spec.yaml", self.etcd, workdir)
        self.down: list[tuple[float, float]] = []  # (killed, adopted) of each restart
        self.resized: list[tuple[float, float]] = []  # while scaling down and up again
        self.first_events: set[str] = set()  # event keys before the first kill
        self.f = result.figures
        self.f.update(adopted=0, restarted=0, leaked=0, desired_after=0, events_kept=0)

    async def until(self, what: str, done: Callable[[], Awaitable[bool]]) -> None:
        """Poll `done` until it holds; RuntimeError(what) after WAIT or if `vmbox up` exits."""
        deadline = time.monotonic() + WAIT
        while not await done():
            if not self.up.running:
                raise RuntimeError(f"vmbox up exited: {last_line(self.up.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {WAIT:.0f} s (logs in {self.workdir})")
            await asyncio.sleep(0.1)

    async def wait_ready(self, count: int) -> dict[str, int]:
        """Until exactly `count` replicas are registered and ready (the testbed's rule); pids."""

        async def up_runs() -> None:
            if not self.up.running:
                raise RuntimeError(f"vmbox up exited: {last_line(self.up.log)}")

        try:
            ready = await wait_ready(self.store, SERVICE, count, timeout=WAIT, check=up_runs)
        except NotReady as exc:
            raise NotReady(f"{exc} (logs in {self.workdir})") from None
        return {rid: int(member.info["pid"]) for rid, member in ready.items()}

    async def events(self, since: float = 0.0) -> dict[str, tuple[str, str]]:
        """Event key -> (kind, replica) of each event recorded after `since`."""
        kvs, _ = await self.store.get_prefix(keys.events_prefix(SERVICE))
        bodies = {kv.key: json.loads(kv.value) for kv in kvs}
        return {
            key: (e["kind"], str(e.get("data", {}).get("replica")))
            for key, e in bodies.items()
            if e["time"] >= since
        }

    async def restart(self) -> None:
        """kill -9 `vmbox up`, wait DOWN, start it again, check the adoption and the service."""
        procs = {rid: psutil.Process(pid) for rid, pid in (await self.wait_ready(REPLICAS)).items()}
        kept = set(await self.events())
        killed = time.time()
        await self.up.kill()
        await asyncio.sleep(DOWN)
        self.up.start()
        adopted: set[str] = set()

        async def done() -> bool:
            adopted.update(r for k, r in (await self.events(killed)).values() if k == "adopt")
            return adopted >= set(procs)

        await self.until(f"{sorted(procs)} not all adopted", done)
        self.down.append((killed, time.time()))
        self.f["adopted"] += len(adopted & set(procs))
        await asyncio.sleep(SETTLE)
        await self.check(procs, kept, killed)
        await self.rescale()

    async def check(self, procs: dict[str, psutil.Process], kept: set[str], killed: float) -> None:
        check, n = self.result.check, len(procs)
        news = [(k, r) for k, r in (await self.events(killed)).values() if k != "adopt"]
        check(not news, f"the new controller recorded {news} beside the adoptions")
        restarted = {rid for rid, proc in procs.items() if not processes.alive(proc)}
        restarted |= {rid for kind, rid in news if kind in ("start", "crash") and rid in procs}
        self.f["restarted"] += len(restarted)
        check(not restarted, f"restart {len(self.down)}: {sorted(restarted)} restarted")
        members = await list_members(self.store, SERVICE)
        running = len(processes.replica_processes(SERVICE, self.etcd))
        check(len(members) == n == running, f"{len(members)} members, {running} processes, not {n}")
        desired = await self.store.get(keys.desired_key(SERVICE))
        self.f["desired_after"] = int(desired.value) if desired else 0
        check(self.f["desired_after"] == REPLICAS, f"desired {desired} after the restart, not 3")
        now = set(await self.events())
        check(kept <= now, f"{len(kept - now)} of {len(kept)} events from before the kill gone")
        self.f["events_kept"] = len(self.first_events & now)

    async def rescale(self) -> None:
        """The new controller acts: scale to 2 drains one replica, scale to 3 starts one."""
        began = time.time()
        pids = await self.wait_ready(REPLICAS)
        await self.up.scale(REPLICAS - 1)
        left = sorted(set(pids) - set(await self.wait_ready(REPLICAS - 1)))
        procs = [psutil.Process(pids[rid]) for rid in left]

        async def stopped() -> bool:
            stops = {("stop", rid) for rid in left}
            recorded = set((await self.events(began)).values())
            return not any(map(processes.alive, procs)) and stops <= recorded

        await self.until(f"drained replica {left} did not exit", stopped)
        await self.up.scale(REPLICAS)
        await self.wait_ready(REPLICAS)
        self.resized.append((began, time.time()))

    async def stop(self) -> None:
        """Ctrl-C `vmbox up`: it must exit 0 and take every replica with it."""
        assert self.up.popen is not None
        self.up.popen.send_signal(signal.SIGINT)
        code: int | str = "nothing: killed"
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = await asyncio.to_thread(self.up.popen.wait, WAIT)
        await self.up.kill()  # when it hung
        self.result.check(code == 0, f"vmbox up exited {code} on SIGINT")
        self.result.check(
            "Traceback" not in self.up.log.read_text(errors="replace"),
            f"a traceback in {self.up.log}",
        )
        left = await processes.leaks(SERVICE, self.etcd, within=10)
        self.f["leaked"] = len(left)
        self.result.check(not left, f"10 s after vmbox up exited: {'; '.join(left)}")

    async def cleanup(self) -> None:
        """Kill whatever is left: `vmbox up` and its replicas."""
        await self.up.kill()
        for proc in processes.replica_processes(SERVICE, self.etcd):
            with contextlib.suppress(psutil.Error):
                proc.kill()


async def controller_restart(scale: Scale, say: Say) -> FaultResult:
    """kill -9 `vmbox up` under load and start it again: the replicas are adopted."""
    kills = 3 if scale == "full" else 1
    result = FaultResult("controller restart")
    workdir = Path(tempfile.mkdtemp(prefix="vmbox-restart-"))
    spec = fault_spec(SERVICE, 2)
    async with private_store() as store, upstream_echo(spec.relay.upstream) as echo:
        run = Run(store, workdir, result, spec, echo)
        try:
            # The private etcd's user and password file, as `vmbox up` would be given them.
            secured = run.spec.model_copy(
                update={"store": store_access(store.endpoints) or run.spec.store}
            )
            (workdir / "spec.yaml").write_text(secured.to_json())
            run.up.start()
            await run.wait_ready(2)
            await run.up.scale(REPLICAS)
            await run.wait_ready(REPLICAS)
            before = await read_state(store, SERVICE)
            run.first_events = set(await run.events())
            run.f["events_before"] = len(run.first_events)
            say(
                f"controller restart: {kills} x kill -9 of vmbox up, {REPLICAS} replicas, "
                f"{SOURCES} sources at 1.5 x {LIMIT}/s"
            )
            started = time.time()
            load = asyncio.create_task(steady_load(run.spec.relay.listen, SOURCES, 170, FLOWS))
            try:
                await asyncio.sleep(2.0)
                for i in range(kills):
                    await run.restart()
                    say(f"  restart {i + 1}: {run.f['adopted']:.0f} replicas adopted so far")
                await asyncio.sleep(1.0)
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
            ended = time.time()
            after = await read_state(store, SERVICE)
            await run.stop()
        finally:
            await run.cleanup()
    judge(run, list(run.echo.history), started, ended)
    result.state_lost = state_lost(before, after)
    if result.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result.notes.append(f"logs kept in {workdir}")
    return result


def judge(run: Run, history: list[tuple[int, int]], started: float, ended: float) -> None:
    """Over-limit packets, the worst second passed, survival and the table's notes."""
    result, f, cap = run.result, run.result.figures, SOURCES * LIMIT
    first, last = int(started), int(ended)
    result.over_limit = over_limit(history, lambda s: cap if first <= s <= last else None)
    # A join costs the joiner's first window (DESIGN.md): the resizes are not judged.
    resizing = {s for a, b in run.resized for s in range(int(a), int(b) + 2)}
    counts = dict(history)
    steady = [counts.get(s, 0) for s in range(first + 1, last) if s not in resizing]
    between = received_between
    down = [c for k, b in run.down for c in between(history, int(k) + 1, int(b) - 1)]
    f["down_seconds"] = len(down)
    f["worst_second_fraction"] = min(down + steady, default=0) / cap
    passed = f["worst_second_fraction"] >= PASSING and bool(down)
    result.check(passed, f"worst second passed {f['worst_second_fraction']:.0%} of the limit")
    f["kills"] = result.injected = len(run.down)
    result.survived = passed and f["restarted"] == 0 and f["adopted"] == REPLICAS * f["kills"]
    result.notes += [
        f"{f['kills']:.0f} kill -9: {f['adopted']:.0f} replicas adopted, {f['restarted']:.0f} "
        f"restarted; {f['leaked']:.0f} left after Ctrl-C",
        f"desired {f['desired_after']:.0f} kept (spec: 2); events kept "
        f"{f['events_kept']:.0f} of {f['events_before']:.0f}",
        f"worst second {f['worst_second_fraction']:.0%} of the limit "
        f"({len(down)} s without a controller)",
    ]
