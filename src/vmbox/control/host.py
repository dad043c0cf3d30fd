"""A host: the services one `vmbox up` runs, one Controller each, as they come and go.

`vmbox up A.yaml B.yaml` runs one host with one etcd for all its services
(vmbox.service). What the host runs is in etcd, so other commands can change
it: `/vmbox/_hosts/<host>/services/<service>` (vmbox.state.keys) is there
while the host is to run that service. `vmbox up` writes its own specs' keys;
`vmbox apply` of a new service writes the spec and a key for the host;
`vmbox delete` removes the key. The host follows level-based: every second
(and at once on a change, by a watch) it compares the keys with what it runs,
starts a controller for a new key (the spec read from etcd; `prepare` checks
it can run here, e.g. that its port is free) and retires the service of a
key that is gone: its replicas drain (SIGTERM: flows in flight finish) and
the service's keys are deleted.

A service a command line named that cannot run (a busy port, a replica that
exits with a config error) ends `vmbox up` with its one line, as before
there were several. One that `vmbox apply` added instead fails alone: the
host writes why to `failed/<service>` (on its lease, for `vmbox apply` to
print), removes its key and its keys, and goes on with the others.

`alive` (JSON: pid, hostname, start time) lives on the host's lease: a host
killed with -9 disappears from etcd within HOST_TTL, and `vmbox apply` picks
only hosts that are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from vmbox.control.controller import PermanentError
from vmbox.spec import Spec, SpecError, parse_spec
from vmbox.state import keys
from vmbox.state.store import Store, StoreError

log = logging.getLogger(__name__)

HOST_TTL = 10  # seconds: the alive key's lease
RESYNC = 1.0  # seconds between level-based passes without a change seen


def host_id() -> str:
    """This process's host name in etcd: `<hostname>-<pid>`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceController(Protocol):
    """What a host needs of a service's controller (vmbox.control.controller.Controller)."""

    async def setup(self) -> None: ...

    async def run(self) -> None: ...

    async def drain_all(self) -> None: ...

    async def shutdown(self) -> None: ...


@dataclass
class Hosted:
    controller: ServiceController
    task: asyncio.Task[None]
    named: bool  # given on the command line: its failure ends `vmbox up`


class HostFailed(PermanentError):
    """A service named on the command line cannot run; `vmbox up` ends with this."""


Prepare = Callable[[Spec], Awaitable[ServiceController]]


class Host:
    """Runs the services its keys name; see the module docstring."""

    def __init__(
        self,
        store: Store,
        prepare: Prepare,
        *,
        name: str | None = None,
        on_started: Callable[[Spec], None] = lambda spec: None,
        on_stopped: Callable[[str], None] = lambda service: None,
    ) -> None:
        self.store = store
        self.prepare = prepare
        self.name = name or host_id()
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.hosted: dict[str, Hosted] = {}
        self.lease = 0
        self.wake = asyncio.Event()

    @property
    def services(self) -> list[str]:
        return sorted(self.hosted)

    async def start(self, specs: list[Spec]) -> None:
        """Announce the host and start the command line's services; the first that cannot
        run raises (its controller's error), after the ones started are stopped."""
        await self._announce()
        for spec in specs:
            await self.store.put(keys.host_service_key(self.name, spec.service), b"")
            try:
                await self._start(spec, named=True)
            except BaseException:
                await self.shutdown()
                raise

    async def run(self) -> None:
        """Follow the host's keys until cancelled; raises HostFailed (or the controller's
        error) when a service named on the command line stops."""
        tasks = [
            asyncio.create_task(self._keep_alive()),
            asyncio.create_task(self._watch()),
        ]
        try:
            while True:
                await self._check_controllers()
                with contextlib.suppress(StoreError):
                    await self.sync()
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESYNC):
                        await self.wake.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def sync(self) -> None:
        """One pass: start what the keys name and is not running, retire what they do not."""
        kvs, _ = await self.store.get_prefix(keys.host_services_prefix(self.name))
        wanted = {keys.last_segment(kv.key) for kv in kvs}
        for service in sorted(wanted - self.hosted.keys()):
            await self._add(service)
        for service in sorted(self.hosted.keys() - wanted):
            await self.retire(service)

    async def _add(self, service: str) -> None:
        """A service `vmbox apply` gave this host: its spec from etcd, then its controller."""
        kv = await self.store.get(keys.spec_key(service))
        try:
            if kv is None:
                raise SpecError(f"{service}: no spec at {keys.spec_key(service)}")
            spec = parse_spec(json.loads(kv.value), f"{service}: stored spec")
            await self._start(spec, named=False)
        except StoreError:
            raise
        except Exception as exc:  # one service that cannot run must not stop the others
            await self._failed(service, str(exc))

    async def _start(self, spec: Spec, named: bool) -> None:
        controller = await self.prepare(spec)
        try:
            await controller.setup()
        except BaseException:
            await controller.shutdown()
            raise
        task = asyncio.create_task(controller.run(), name=f"controller-{spec.service}")
        self.hosted[spec.service] = Hosted(controller, task, named)
        self.on_started(spec)
        log.info("host %s: running %s", self.name, spec.service)

    async def _check_controllers(self) -> None:
        """A controller that stopped on its own: end `vmbox up` for a named service,
        else report it and retire the service."""
        for service, hosted in list(self.hosted.items()):
            if not hosted.task.done():
                continue
            cause = hosted.task.exception() if not hosted.task.cancelled() else None
            if hosted.named:
                if cause is not None:
                    raise cause
                raise HostFailed(f"{service}: the controller stopped")
            await self._failed(service, str(cause) if cause else "the controller stopped")

    async def _failed(self, service: str, why: str) -> None:
        log.warning("host %s: cannot run %s: %s", self.name, service, why)
        with contextlib.suppress(StoreError):
            await self.store.put(
                keys.host_failed_key(self.name, service), why.encode(), lease=self.lease
            )
        await self.retire(service, drain=False)
        with contextlib.suppress(StoreError):
            await self.store.delete(keys.host_service_key(self.name, service))

    async def retire(self, service: str, drain: bool = True) -> None:
        """Stop a service for good: its replicas drained (or stopped), its keys deleted."""
        hosted = self.hosted.pop(service, None)
        if hosted is not None:
            hosted.task.cancel()
            await asyncio.gather(hosted.task, return_exceptions=True)
            if drain:
                await hosted.controller.drain_all()
            await hosted.controller.shutdown()
        with contextlib.suppress(StoreError):
            await self.store.delete_prefix(keys.service_prefix(service))
        self.on_stopped(service)
        log.info("host %s: removed %s", self.name, service)

    async def shutdown(self) -> None:
        """Stop every service (replicas leave at once, as Ctrl-C on `vmbox up` always did;
        their specs and state stay, so `vmbox up` again adopts them), then the host's keys."""
        for service, hosted in list(self.hosted.items()):
            hosted.task.cancel()
            await asyncio.gather(hosted.task, return_exceptions=True)
            await hosted.controller.shutdown()
            self.on_stopped(service)
        self.hosted.clear()
        with contextlib.suppress(StoreError):
            await self.store.delete_prefix(f"{keys.hosts_prefix()}{self.name}/")
            lease, self.lease = self.lease, 0
            if lease:
                await self.store.revoke_lease(lease)

    async def _announce(self) -> None:
        self.lease = await self.store.grant_lease(HOST_TTL)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time()}
        await self.store.put(
            keys.host_alive_key(self.name), json.dumps(info).encode(), lease=self.lease
        )

    async def _keep_alive(self) -> None:
        """Refresh the lease every third of its TTL; announce again once it was lost."""
        while True:
            await asyncio.sleep(HOST_TTL / 3)
            try:
                await self.store.refresh_lease(self.lease)
            except StoreError as exc:
                log.warning("host %s: lease not refreshed (%s)", self.name, exc)
                with contextlib.suppress(StoreError):
                    await self._announce()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(StoreError):
                async for _ in self.store.watch_prefix(keys.host_services_prefix(self.name)):
                    self.wake.set()
            await asyncio.sleep(1.0)


async def live_hosts(store: Store) -> dict[str, dict[str, object]]:
    """The hosts whose alive key is there: name -> its JSON info."""
    kvs, _ = await store.get_prefix(keys.hosts_prefix())
    out: dict[str, dict[str, object]] = {}
    for kv in kvs:
        rest = kv.key.removeprefix(keys.hosts_prefix())
        name, _, leaf = rest.partition("/")
        if leaf == "alive":
            with contextlib.suppress(ValueError):
                info = json.loads(kv.value)
                out[name] = info if isinstance(info, dict) else {}
    return out


async def hosted_services(store: Store) -> dict[str, str]:
    """Every service a live host runs -> that host."""
    alive = await live_hosts(store)
    out: dict[str, str] = {}
    for name in sorted(alive):
        kvs, _ = await store.get_prefix(keys.host_services_prefix(name))
        for kv in kvs:
            out.setdefault(keys.last_segment(kv.key), name)
    return out


async def host_of(store: Store, service: str) -> str | None:
    """The live host whose keys name `service` (None: no host runs it)."""
    return (await hosted_services(store)).get(service)
