"""A service stood up on loopback, for the demo, experiments, faults, benches and tests.

Free ports; a private etcd (one member or three) with auth on, as `vmbox up`'s
managed one (a `vmbox` user limited to /vmbox/, its password in a 0600 file in
the etcd's own 0700 directory), a store connected to it and the real etcdctl
to write to it by hand (both as that user); an echo server as the protected
upstream; and `running_service`, which turns a spec into a controller, the
local runtime and its replicas, picking new ports when one was taken between
its pick and its bind. One readiness rule for all of them (`wait_ready`):
`count` replicas are ready when exactly that many are registered and each
one's metrics answer vmbox_ready 1 (registered, and holding its share: its
resize guard is down). Everything started here is stopped here. It sits above
control, runtime and state; none of them imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from vmbox.control import events
from vmbox.control.controller import Controller, PermanentError
from vmbox.dataplane.sockets import Address, AddressInUse
from vmbox.etcdserver import EtcdCluster, EtcdServer, find_etcdctl, free_port
from vmbox.lab import GATEWAY_CLIENT_IF, LabPlan
from vmbox.lab.plan import NODE_CLIENT_IF
from vmbox.metrics import scrape
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import Spec, parse_spec
from vmbox.state import access, keys
from vmbox.state.access import StoreSpec
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import MemberInfo, list_members
from vmbox.state.store import Store
from vmbox.tools.echo import EchoServer

READY_TIMEOUT = 30.0  # seconds replicas get to be ready (2 shared cores, noise)
CONNECT_TIMEOUT = 10.0  # seconds a store gets to connect to a fresh etcd


def inpath_spec(
    service: str,
    lab: LabPlan,
    replicas: int = 1,
    *,
    fail: str = "static",
    spread: str = "flow",
    **middlebox: object,
) -> Spec:
    """An in-path ratelimit service in `lab`'s gateway, on the client side's packets."""
    return parse_spec(
        {
            "service": service,
            "dataplane": "nfqueue",
            "gateway": {
                "namespace": lab.namespace("gateway"),
                "interface": GATEWAY_CLIENT_IF,
                "spread": spread,
            },
            "middlebox": {"function": "ratelimit", "limit": 100} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": 4},
            "fail": fail,
            "lease_ttl": 2,
        },
        f"in-path {service}",
    )


def kernel_spec(service: str, lab: LabPlan, replicas: int = 1, **middlebox: object) -> Spec:
    """A ratelimit service enforced in the kernel of `lab`'s nodes (`--nodes N`), one
    replica per node, on the packets entering each node from the router."""
    return parse_spec(
        {
            "service": service,
            "dataplane": "nfqueue",
            "gateway": {
                "namespace": lab.node_template,
                "interface": NODE_CLIENT_IF,
                "enforce": "kernel",
                "lab": lab.prefix,  # its router's route follows the ready nodes
            },
            "middlebox": {"function": "ratelimit", "limit": 100} | middlebox,
            "replicas": {"count": replicas, "min": 1, "max": max(replicas, lab.nodes)},
            "lease_ttl": 2,
        },
        f"kernel {service}",
    )


class SetupError(RuntimeError):
    """A service the testbed could not stand up; str() is the one line to show."""


class PortTaken(SetupError):
    """A port picked for a service was taken by another program before it was bound."""


class NotReady(SetupError):
    """The replicas were not ready in time."""


# -- ports ---------------------------------------------------------------------


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it, as for etcd members)."""
    return free_port(host)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A free UDP port below the kernel's ephemeral range (32768 up).

    A port the kernel handed out for port 0 can be handed out again, to one of
    the thousands of sockets a load generator or a replica's flows bind,
    between this pick and the service's bind; below the range it cannot.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20_000, 32_768)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- etcd and the upstream -----------------------------------------------------


# The user and password file of each private etcd started here, by its endpoints:
# what connected(), etcdctl() and the replicas of running_service() log in with.
_SECURED: dict[tuple[str, ...], StoreSpec] = {}


def store_access(endpoints: Sequence[str]) -> StoreSpec | None:
    """How to log in to `endpoints` when they are a private etcd of the testbed's, else None."""
    return _SECURED.get(tuple(endpoints))


@asynccontextmanager
async def connected(endpoints: Sequence[str]) -> AsyncIterator[EtcdStore]:
    """A store connected to `endpoints` (as the `vmbox` user of a private etcd), closed
    afterwards."""
    target = store_access(endpoints)
    login = access.connect_kwargs(target) if target is not None else {}
    store = await connect(list(endpoints), timeout=CONNECT_TIMEOUT, **login)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def private_etcd(members: int = 1) -> AsyncIterator[tuple[EtcdCluster, EtcdStore]]:
    """A private etcd of `members` on loopback and a store connected to all of them;
    both gone afterwards. The cluster is there for faults that stop its members."""
    server = EtcdServer() if members == 1 else EtcdCluster(members)
    password_file = server.root / "vmbox.password"  # its folder is 0700, removed on stop
    key = tuple(server.endpoints)
    try:
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(server.secure, password_file)
        _SECURED[key] = access.from_settings(
            server.endpoints,
            {"username": "vmbox", "password_file": str(password_file)},
            "private etcd",
        )
        async with connected(server.endpoints) as store:
            yield server, store
    finally:
        _SECURED.pop(key, None)
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def private_store() -> AsyncIterator[EtcdStore]:
    """A private etcd on loopback and a store connected to it; both gone afterwards."""
    async with private_etcd() as (_, store):
        yield store


async def etcdctl(endpoints: Iterable[str], *args: str, timeout: float = 10.0) -> str:
    """Run the real etcdctl (v3 API) against `endpoints`, as an operator would; its output.

    RuntimeError with etcdctl's output when it fails. subprocess.run in a
    thread: uvloop's own subprocesses fork beside gRPC's threads.
    """
    command = [find_etcdctl(), "--endpoints", ",".join(endpoints), *args]
    env = {"ETCDCTL_API": "3"}
    target = store_access(list(endpoints))
    if target is not None:  # in the environment, which only our own uid can read
        env["ETCDCTL_USER"] = f"{target.username}:{_password(target)}"
    shown = " ".join(args)[:60]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"etcdctl {shown} took over {timeout:g}s") from None
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {shown} failed: {out.strip()}")
    return out


def _password(target: StoreSpec) -> str:
    return access.connect_kwargs(target).get("password", "")


@asynccontextmanager
async def upstream_echo(address: Address) -> AsyncIterator[EchoServer]:
    """An echo server at `address` (the protected upstream); PortTaken if it is busy.

    Its `history` (received per epoch second) stays readable after it closed.
    """
    echo = EchoServer(address)
    try:
        await echo.start()
    except AddressInUse as exc:
        raise PortTaken(str(exc)) from None
    try:
        yield echo
    finally:
        await echo.close()


async def echo_seconds(echo: EchoServer, last: int, within: float = 3.0) -> dict[int, int]:
    """The echo's per-second counts once epoch second `last` is closed (or `within` passes)."""
    deadline = time.monotonic() + within
    while not any(second >= last for second, _ in echo.history):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return dict(echo.history)


async def until_second(into: float = 0.0) -> int:
    """Sleep until `into` s past a whole wall-clock second (the limiter's windows start on
    them), the next such moment; returns that second."""
    now = time.time()
    target = int(now) + into if now % 1.0 < into else int(now) + 1 + into
    await asyncio.sleep(max(0.0, target - time.time()))
    return int(target)


# -- readiness -----------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """One look at a service's replicas: those registered, and those of them that are ready."""

    registered: dict[str, MemberInfo]
    ready: dict[str, MemberInfo]  # registered, and their metrics answer vmbox_ready 1

    def complete(self, count: int, exclude_pids: Collection[int] = ()) -> bool:
        """Exactly `count` registered, all ready, and none of them one of `exclude_pids`."""
        pids = {member.info.get("pid") for member in self.registered.values()}
        return len(self.registered) == len(self.ready) == count and not pids & set(exclude_pids)


async def readiness(store: Store, service: str) -> Readiness:
    """Which replicas of `service` are registered and which of them report vmbox_ready 1."""
    members = await list_members(store, service)

    async def is_ready(member: MemberInfo) -> bool:
        with contextlib.suppress(Exception):  # starting or stopping: not ready
            metrics = await scrape(str(member.info["metrics"]), timeout=0.5)
            return metrics.get("vmbox_ready", 0.0) == 1.0
        return False

    answers = await asyncio.gather(*map(is_ready, members.values()))
    ready = {rid: m for (rid, m), ok in zip(members.items(), answers, strict=True) if ok}
    return Readiness(members, ready)


async def wait_ready(
    store: Store,
    service: str,
    count: int,
    *,
    timeout: float = READY_TIMEOUT,
    exclude_pids: Collection[int] = (),
    check: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, MemberInfo]:
    """Until exactly `count` replicas of `service` are registered and ready; those replicas.

    `exclude_pids` (a replica killed and restarted) must not be among them.
    `check`, awaited before each look, raises to stop waiting (what starts the
    replicas has stopped). NotReady after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            await check()
        seen = await readiness(store, service)
        if seen.complete(count, exclude_pids):
            return seen.ready
        if time.monotonic() > deadline:
            raise NotReady(
                f"{service}: {count} replicas were not ready within {timeout:.0f}s "
                f"({len(seen.registered)} registered, {len(seen.ready)} ready)"
            )
        await asyncio.sleep(0.1)


# -- a running service ---------------------------------------------------------


@dataclass
class Service:
    """A service the testbed runs: spec, store, upstream echo, controller, runtime, logs."""

    spec: Spec
    store: EtcdStore
    # A relay service's echo at spec.relay.upstream; its history stays readable
    # after the service has ended. None for an in-path one (its servers run in the
    # lab) or when the caller runs the upstream server itself (`echo=False`).
    upstream: EchoServer | None
    controller: Controller
    runtime: LocalRuntime
    log_dir: Path

    @property
    def echo(self) -> EchoServer:
        if self.upstream is None:
            raise SetupError(
                f"{self.spec.service} has no echo upstream of vmbox's (in-path, or its "
                "upstream server is the caller's)"
            )
        return self.upstream

    async def members(self) -> dict[str, MemberInfo]:
        return await list_members(self.store, self.spec.service)

    async def gauges(self) -> dict[str, dict[str, float]]:
        """Each live replica's metrics, scraped now (those that answer)."""
        out = {}
        for rid, member in (await self.members()).items():
            with contextlib.suppress(Exception):
                out[rid] = await scrape(str(member.info["metrics"]))
        return out

    async def scale(self, count: int) -> None:
        """Write the desired replica count, as `vmbox scale` does."""
        await self.store.put(keys.desired_key(self.spec.service), str(count).encode())

    async def wait_ready(
        self, count: int, timeout: float = READY_TIMEOUT, exclude_pids: Collection[int] = ()
    ) -> dict[str, MemberInfo]:
        """`wait_ready` for this service: exactly `count` replicas registered and ready."""
        return await wait_ready(
            self.store, self.spec.service, count, timeout=timeout, exclude_pids=exclude_pids
        )


@asynccontextmanager
async def running_service(
    store: EtcdStore,
    spec: Spec | Callable[[], Spec],
    *,
    log_dir: Path | None = None,
    tick: float = 0.2,
    metrics_port: int | None = None,
    adoptable: bool = False,
    on_event: Callable[[events.Event], None] | None = None,
    attempts: int = 3,
    echo: bool = True,
) -> AsyncIterator[Service]:
    """An echo server at the spec's upstream and the spec's replicas, all ready.

    Given a function that makes specs (each with new ports), a port taken
    between its pick and its bind costs a retry with a new spec, up to
    `attempts` times. Replica logs go to `log_dir`, or to a temporary directory
    that is removed unless the service failed (the error names it). The
    controller ticks every `tick` s and serves its metrics on `metrics_port`
    (None: none); `on_event` sees its events (starts, scale decisions) as they
    happen. Replicas of a runtime that is not `adoptable` die with this process.
    With `echo=False` no echo is started: the caller runs the relay's upstream
    server (a real one, such as `iperf3 -s`) and counts what it received.
    """
    make = spec if callable(spec) else (lambda: spec)
    tries = attempts if callable(spec) else 1
    options = _Options(log_dir, tick, metrics_port, adoptable, on_event, echo)
    for attempt in range(1, tries + 1):
        async with contextlib.AsyncExitStack() as stack:
            try:
                service = await stack.enter_async_context(_one_service(store, make(), options))
            except PortTaken:
                if attempt == tries:
                    raise
                continue
            yield service
            return


@dataclass(frozen=True)
class _Options:
    log_dir: Path | None
    tick: float
    metrics_port: int | None
    adoptable: bool
    on_event: Callable[[events.Event], None] | None
    echo: bool = True


@asynccontextmanager
async def _one_service(store: EtcdStore, spec: Spec, options: _Options) -> AsyncIterator[Service]:
    temporary = options.log_dir is None
    relay = spec.dataplane == "relay" and options.echo
    async with upstream_echo(spec.relay.upstream) if relay else _no_echo() as echo:
        log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix=f"vmbox-{spec.service}-"))
        runtime = LocalRuntime(
            spec.service,
            store.endpoints,
            log_dir,
            adoptable=options.adoptable,
            memory_limit=spec.replicas.memory_limit,
            access=store_access(store.endpoints),
        )
        controller = Controller(
            spec,
            store,
            runtime,
            tick=options.tick,
            on_event=options.on_event,
            metrics_port=options.metrics_port,
        )
        reconcile: asyncio.Task[None] | None = None
        try:
            await controller.setup()
            reconcile = asyncio.create_task(controller.run())
            await _wait_started(store, spec, reconcile, log_dir, temporary)
            yield Service(spec, store, echo, controller, runtime, log_dir)
        finally:
            if reconcile is not None:
                reconcile.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reconcile
            await controller.shutdown()
            await store.delete_prefix(keys.service_prefix(spec.service))
    if temporary:  # reached only when nothing failed
        shutil.rmtree(log_dir, ignore_errors=True)


@asynccontextmanager
async def _no_echo() -> AsyncIterator[None]:
    yield None


async def _wait_started(
    store: EtcdStore, spec: Spec, reconcile: asyncio.Task[None], log_dir: Path, temporary: bool
) -> None:
    """`wait_ready` for the spec's count, stopping if the controller stops (a busy port)."""

    async def controller_runs() -> None:
        if not reconcile.done():
            return
        cause = reconcile.exception() if not reconcile.cancelled() else None
        if isinstance(cause, PermanentError) and "already in use" in str(cause):
            if temporary:
                shutil.rmtree(log_dir, ignore_errors=True)
            raise PortTaken(str(cause))
        raise SetupError(f"{spec.service}: the controller stopped ({cause}); logs in {log_dir}")

    try:
        await wait_ready(store, spec.service, spec.replicas.count, check=controller_runs)
    except NotReady as exc:
        raise NotReady(f"{exc}; logs in {log_dir}") from None
