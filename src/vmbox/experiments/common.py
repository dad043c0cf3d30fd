"""What every experiment shares: the result type, CSV files, machine facts, progress bars,
and a private etcd with services running on it.

Called by the experiment modules (correctness, overhead and whichever others
the registry in vmbox.experiments lists) and by report.py. Nothing here needs a
server started by hand: `private_store` starts a private etcd the way
`vmbox demo` does, and `running_service` an echo server (the protected
service), a controller and its replicas as local processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from vmbox.control import events
from vmbox.control.controller import Controller, PermanentError
from vmbox.dataplane.sockets import AddressInUse
from vmbox.etcdserver import EtcdCluster, EtcdServer, find_etcd
from vmbox.metrics import scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import list_members
from vmbox.state.store import Store
from vmbox.tools.echo import EchoServer

Scale = Literal["full", "small"]
START_TIMEOUT = 30.0  # seconds a service's replicas get to register


class ExperimentError(Exception):
    """An experiment that could not run to the end; str() is the one line to show."""


@dataclass(frozen=True)
class ReportRow:
    """One line of the report: a published figure beside vmbox's."""

    metric: str
    published: str
    vmbox: str
    ok: bool | None = None  # None: nothing published to judge against


@dataclass
class ExperimentResult:
    """What one experiment produced: files, report rows and notes."""

    name: str
    csvs: list[Path] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run, filled in by whoever ran it
    error: str | None = None  # set when the run failed or ran out of time

    @property
    def ok(self) -> bool:
        return self.error is None and all(row.ok is not False for row in self.rows)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write `rows` under `header`; floats get 4 decimals so the files diff well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])
    return path


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def etcd_version() -> str:
    try:
        out = subprocess.run(
            [find_etcd(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.split(":", 1)[1].strip() if ":" in first else first or "unknown"


def machine_info() -> dict[str, str]:
    """The facts a reader needs to weigh the figures, in report order."""
    try:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop = "none running"
    return {
        "cores": str(os.cpu_count() or "unknown"),
        "CPU": cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "etcd": etcd_version(),
        "event loop": loop,
    }


def new_progress(console: Console) -> Progress:
    """The progress display every phase of every experiment uses."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@asynccontextmanager
async def private_etcd(members: int = 1) -> AsyncIterator[tuple[EtcdCluster, EtcdStore]]:
    """A private etcd of `members` on loopback and a store connected to all of them;
    both gone afterwards. The cluster is there for faults that stop its members."""
    server = EtcdServer() if members == 1 else EtcdCluster(members)
    await asyncio.to_thread(server.start)
    try:
        store = await connect(server.endpoints, timeout=10)
        try:
            yield server, store
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def private_store() -> AsyncIterator[EtcdStore]:
    """A private etcd on loopback and a store connected to it; both gone afterwards."""
    async with private_etcd() as (_, store):
        yield store


@dataclass
class Service:
    spec: Spec
    store: EtcdStore
    echo: EchoServer  # its history stays readable after the service has ended
    controller: Controller
    runtime: LocalRuntime


class PortTaken(ExperimentError):
    """A port picked for a service was taken by another program before it was bound."""


@asynccontextmanager
async def running_service(
    store: EtcdStore,
    make_spec: Callable[[], Spec],
    attempts: int = 3,
    on_event: Callable[[events.Event], None] | None = None,
) -> AsyncIterator[Service]:
    """An echo server at the spec's upstream and the spec's replicas, all registered.

    A port taken between its pick and its bind costs a retry with a new spec
    (`make_spec` picks new ports), up to `attempts` times. `on_event` sees the
    controller's events (starts, scale decisions) as they happen.
    """
    for attempt in range(1, attempts + 1):
        async with contextlib.AsyncExitStack() as stack:
            try:
                one = _one_service(store, make_spec(), on_event)
                service = await stack.enter_async_context(one)
            except PortTaken:
                if attempt == attempts:
                    raise
                continue
            yield service
            return


@asynccontextmanager
async def _one_service(
    store: EtcdStore, spec: Spec, on_event: Callable[[events.Event], None] | None
) -> AsyncIterator[Service]:
    """Replica logs go to a temporary directory, kept (and named in the error) on a failure."""
    echo = EchoServer(spec.upstream)
    try:
        await echo.start()
    except AddressInUse as exc:
        raise PortTaken(str(exc)) from None
    log_dir = Path(tempfile.mkdtemp(prefix=f"vmbox-{spec.service}-"))
    runtime = LocalRuntime(
        spec.service,
        store.endpoints,
        log_dir,
        adoptable=False,
        memory_limit=spec.replicas.memory_limit,
    )
    controller = Controller(spec, store, runtime, tick=0.2, on_event=on_event, metrics_port=None)
    reconcile: asyncio.Task[None] | None = None
    try:
        await controller.setup()
        reconcile = asyncio.create_task(controller.run())
        await _wait_members(store, spec, reconcile, log_dir)
        yield Service(spec, store, echo, controller, runtime)
    finally:
        if reconcile is not None:
            reconcile.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reconcile
        await controller.shutdown()
        await echo.close()
        await store.delete_prefix(keys.service_prefix(spec.service))
    shutil.rmtree(log_dir, ignore_errors=True)


async def _wait_members(
    store: EtcdStore, spec: Spec, reconcile: asyncio.Task[None], log_dir: Path
) -> None:
    count = spec.replicas.count
    deadline = time.monotonic() + START_TIMEOUT
    while await count_ready(store, spec.service) != count:
        if reconcile.done():
            cause = reconcile.exception() if not reconcile.cancelled() else None
            if isinstance(cause, PermanentError) and "already in use" in str(cause):
                shutil.rmtree(log_dir, ignore_errors=True)
                raise PortTaken(str(cause))
            raise ExperimentError(
                f"{spec.service}: the controller stopped ({cause}); logs in {log_dir}"
            )
        if time.monotonic() > deadline:
            raise ExperimentError(
                f"{spec.service}: {count} replicas were not ready within "
                f"{START_TIMEOUT:.0f}s; logs in {log_dir}"
            )
        await asyncio.sleep(0.1)


async def ready_members(store: Store, service: str) -> tuple[int, dict[str, int]]:
    """(replicas registered, the pid of each that reports vmbox_ready: holding its share)."""
    members = await list_members(store, service)
    ready: dict[str, int] = {}
    for rid, member in members.items():
        with contextlib.suppress(Exception):  # starting or stopping: not ready
            metrics = await scrape(str(member.info["metrics"]), timeout=0.5)
            if metrics.get("vmbox_ready", 0.0) == 1.0:
                ready[rid] = int(member.info["pid"])
    return len(members), ready


async def count_ready(store: Store, service: str) -> int:
    """How many replicas are registered and report vmbox_ready (holding their share)."""
    return len((await ready_members(store, service))[1])


async def until_epoch_second() -> int:
    """Sleep to the next wall-clock second and return it (the limiter's windows start there)."""
    target = int(time.time()) + 1
    await asyncio.sleep(max(0.0, target - time.time()))
    return target


async def echo_seconds(echo: EchoServer, last: int, within: float = 3.0) -> dict[int, int]:
    """The echo's per-second counts once epoch second `last` is closed (or `within` passes)."""
    deadline = time.monotonic() + within
    while not any(second >= last for second, _ in echo.history):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return dict(echo.history)
