"""`vmbox up`: run one or more services on this machine until Ctrl-C.

Called by the CLI. Starts the store when the specs say `store: managed` (one
etcd for all of them, with etcd's auth on: a `vmbox` user limited to
/vmbox/, its password in a 0600 file in the state directory), records its
endpoint and its TLS and auth settings (file paths and a user name, no
secret) for each service, so `status`, `scale`, `set`, `apply` and `delete`
need no flags; checks each listen port, runs a host (vmbox.control.host: a
controller per service with the local runtime, services added by `vmbox
apply` and removed by `vmbox delete` while it runs), and shows a live status.
On the way out it stops every replica, then the private etcd, and removes the
password file: nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live

from vmbox import context
from vmbox.control.controller import Controller
from vmbox.control.host import Host
from vmbox.control.status import RateTracker, ServiceStatus, render, snapshot
from vmbox.dataplane.sockets import bind_error
from vmbox.etcdserver import EtcdServer
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec, SpecError
from vmbox.state import access
from vmbox.state.access import StoreSpec
from vmbox.state.etcd import connect
from vmbox.state.store import Store, StoreError

MANAGED_USER = "vmbox"  # the managed etcd's one user besides root; its role: /vmbox/ only


def check_listen(address: tuple[str, int]) -> None:
    """Fail early, in one line (a BindError), when the service port is held by another program."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        raise bind_error(exc, address, "listen") from None
    finally:
        sock.close()


def store_access(spec: Spec, etcd: list[str] | None) -> StoreSpec | None:
    """How to reach the spec's etcd (`--etcd` replaces its endpoints); None: a private one."""
    if isinstance(spec.store, StoreSpec):
        return access.with_endpoints(spec.store, etcd) if etcd else spec.store
    return access.from_settings(etcd, {}, "--etcd") if etcd else None


@asynccontextmanager
async def open_store(
    spec: Spec, etcd: list[str] | None
) -> AsyncIterator[tuple[Store, StoreSpec, bool]]:
    """Connect to the given etcd, the spec's, or a private one started here.

    Yields the store, how it was reached (endpoints, TLS, user), and whether
    the etcd is private to this process.
    """
    server: EtcdServer | None = None
    secret: Path | None = None
    target = store_access(spec, etcd)
    try:
        if target is None:  # auth on: only who can read the 0600 password file may write
            server, secret = EtcdServer(), context.password_file()
            await asyncio.to_thread(_start_secured, server, secret)
            target = access.from_settings(
                server.endpoints,
                {"username": MANAGED_USER, "password_file": str(secret)},
                "private etcd",
            )
        store = await connect(target.endpoints, **access.connect_kwargs(target))
        try:
            yield store, target, server is not None
        finally:
            await store.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if secret is not None:
            secret.unlink(missing_ok=True)


def _start_secured(server: EtcdServer, password_file: Path) -> None:
    server.start()
    server.secure(password_file, MANAGED_USER)


async def _live(store: Store, services: Callable[[], list[str]], live: bool) -> None:
    tracker = RateTracker()
    console = Console()
    if live and console.is_terminal:
        with Live(console=console, refresh_per_second=2, transient=False) as view:
            while True:
                with contextlib.suppress(StoreError):
                    shown = [render(await snapshot(store, name, tracker)) for name in services()]
                    view.update(Group(*shown) if shown else "no services: `vmbox apply SPEC`")
                await asyncio.sleep(1.0)
    while True:  # not a terminal: one plain line per service and interval
        with contextlib.suppress(StoreError):
            for name in services():
                print(_line(await snapshot(store, name, tracker)), flush=True)
        await asyncio.sleep(5.0)


def _line(status: ServiceStatus) -> str:
    shares = ",".join(f"{r.values.get('share', 0):.0f}" for r in status.replicas)
    return (
        f"{status.service}: replicas={len(status.replicas)}/{status.desired} "
        f"shares=[{shares}] received/s={status.total_rate('packets_received_total'):.0f} "
        f"passed/s={status.total_rate('packets_passed_total'):.0f} "
        f"dropped/s={status.total_rate('packets_dropped_total'):.0f}"
    )


def where(spec: Spec) -> str:
    """Where the service's traffic passes, for the first line `vmbox up` prints."""
    if spec.gateway is not None:
        gw = spec.gateway
        entering = f" entering {gw.interface}" if gw.interface else ""
        if gw.enforce == "kernel":
            return f"in the kernel of nodes {gw.namespace}{entering} (nftables, one per replica)"
        return f"in the path of namespace {gw.namespace}{entering} (queues from {gw.queue})"
    (lhost, lport), (uhost, uport) = spec.relay
    return f"on {lhost}:{lport} -> {uhost}:{uport}"


def check_together(specs: list[Spec], etcd: list[str] | None) -> None:
    """Several specs in one `vmbox up`: distinct names and addresses, one store (SpecError)."""
    seen: dict[object, str] = {}
    for spec in specs:
        listen = spec.relay.listen if spec.gateway is None else None
        for what, key in (("service name", spec.service), ("listen address", listen)):
            if key is None:
                continue
            if (what, key) in seen:
                raise SpecError(
                    f"{spec.service}: the same {what} as {seen[(what, key)]} in this `vmbox up`"
                )
            seen[(what, key)] = spec.service
    stores = {str(store_access(spec, etcd)) for spec in specs}
    if len(stores) > 1:
        raise SpecError(
            "the specs name different stores; one `vmbox up` runs its services on one etcd"
        )


async def run_services(
    specs: list[Spec], etcd: list[str] | None, live: bool = True, metrics_port: int = 0
) -> None:
    """Run until SIGINT/SIGTERM/SIGHUP; raise BindError, PermanentError or StoreUnavailable."""
    check_together(specs, etcd)
    for spec in specs:
        if spec.dataplane == "relay":
            check_listen(spec.relay.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # HUP: the terminal closed
        loop.add_signal_handler(sig, stop.set)
    async with open_store(specs[0], etcd) as (store, target, private):
        settings = access.settings(target)
        notes: dict[str, str] = {}  # each service's replica memory, for its first lines

        async def prepare(spec: Spec) -> Controller:
            if spec.dataplane == "relay":
                check_listen(spec.relay.listen)
            log_dir = context.state_dir() / "logs" / spec.service
            runtime = LocalRuntime(
                spec.service,
                target.endpoints,
                log_dir,
                adoptable=not private,
                memory_limit=spec.replicas.memory_limit,
                access=target,
            )
            notes[spec.service] = runtime.cgroup_note
            # One /metrics per controller: a fixed --metrics-port serves the first service.
            port = metrics_port if not host.hosted else 0
            return Controller(spec, store, runtime, metrics_port=port)

        def started(spec: Spec) -> None:
            context.record(spec.service, list(target.endpoints), settings=settings, host=host.name)
            log_dir = context.state_dir() / "logs" / spec.service
            print(
                f"vmbox: service {spec.service} {where(spec)}, etcd {access.describe(target)}, "
                f"replica logs in {log_dir}",
                file=sys.stderr,
            )
            print(
                f"vmbox: {spec.service}: replica memory: {notes.get(spec.service, '')}; up to "
                f"{spec.max_flows:,} flows each",
                file=sys.stderr,
            )

        host = Host(store, prepare, on_started=started, on_stopped=context.forget)
        try:
            await host.start(specs)
            await _until_stopped(host, store, live, stop)
        finally:
            await host.shutdown()


async def _until_stopped(host: Host, store: Store, live: bool, stop: asyncio.Event) -> None:
    running = asyncio.create_task(host.run())
    tasks = [
        running,
        asyncio.create_task(_live(store, lambda: host.services, live)),
        asyncio.create_task(stop.wait()),
    ]
    try:
        await asyncio.wait({running, tasks[2]}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not running.cancelled() and running.exception() is not None:
        raise running.exception()  # type: ignore[misc]
