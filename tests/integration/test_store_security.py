"""A secured store: etcd over TLS with client certificates, etcd users, and loopback metrics.

Real etcds on loopback serving TLS (certificates made here, tests/integration/certs.py)
and/or with auth on (a `vmbox` user whose role may use /vmbox/ only). Every
failure must be one line that names the cause, never a retry loop that ends
in "cannot reach etcd" when the certificate is what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Aio
from tests.integration.certs import Certs, make_certs
from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer, ServerTLS
from vmbox.metrics import scrape
from vmbox.state import keys
from vmbox.state.access import StoreSpec, connect_kwargs, from_settings
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.store import StoreError, StoreUnavailable
from vmbox.testbed import free_udp_port, upstream_echo, wait_ready
from vmbox.tools.load import LoadPlan, run_load

PASSWORD = "s3cret-Pa55"  # the vmbox user's; must never show on a command line or in a record
VMBOX = [sys.executable, "-m", "vmbox"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def server_tls(certs: Certs) -> ServerTLS:
    return ServerTLS(
        certs.server_cert, certs.server_key, certs.ca, certs.client_cert, certs.client_key
    )


@pytest.fixture(scope="module")
def tls_etcd(certs: Certs) -> Iterator[EtcdServer]:
    """TLS with client certificates required; no users."""
    with EtcdServer(tls=server_tls(certs)) as server:
        yield server


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdServer]:
    """Plain gRPC with users: root and `vmbox` (readwrite on /vmbox/)."""
    with EtcdServer() as server:
        server.enable_auth(PASSWORD)
        yield server


@pytest.fixture(scope="module")
def secure_etcd(certs: Certs) -> Iterator[EtcdServer]:
    """Both: TLS with client certificates, and users."""
    with EtcdServer(tls=server_tls(certs)) as server:
        server.enable_auth(PASSWORD)
        yield server


def password_file(folder: Path, password: str = PASSWORD) -> Path:
    path = folder / "etcd-password"
    path.write_text(password + "\n")  # as `echo` writes it: the newline is no part of it
    path.chmod(0o600)
    return path


async def open_with(target: StoreSpec, timeout: float = 5.0) -> EtcdStore:
    return await connect(target.endpoints, timeout=timeout, **connect_kwargs(target))


def one_line_failure(
    aio: Aio, target: StoreSpec, kind: type[StoreError], timeout: float
) -> StoreError:
    """Connecting fails with `kind`, in one line, and without waiting out `timeout`."""
    start = time.monotonic()
    with pytest.raises(kind) as caught:
        aio.run(open_with(target, timeout))
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message
    assert time.monotonic() - start < timeout / 2, f"waited for the timeout: {message}"
    return caught.value


# (a) TLS with client certificates


def test_tls_with_the_right_certificates(tls_etcd: EtcdServer, certs: Certs, aio: Aio) -> None:
    for endpoint, server_name in (
        (tls_etcd.client_urls[0], None),
        (tls_etcd.endpoint, "localhost"),
    ):
        target = from_settings(
            [endpoint],
            {
                "ca_cert": str(certs.ca),
                "cert": str(certs.client_cert),
                "key": str(certs.client_key),
                "server_name": server_name,
            },
        )

        async def main(target: StoreSpec = target) -> tuple[bytes | None, bytes | None]:
            store = await open_with(target)
            try:
                await store.put("/vmbox/t/tls", b"over TLS")
                got = await store.get("/vmbox/t/tls")
                # The poll views' blocking channel (off the loop) with the same TLS files.
                off = await asyncio.to_thread(store.blocking_get, "/vmbox/t/tls", timeout=5.0)
                return (got.value if got else None), (off.value if off else None)
            finally:
                await store.close()

        assert aio.run(main()) == (b"over TLS", b"over TLS")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no client certificate", "refused the client certificate"),
        ("client certificate of another CA", "refused the client certificate"),
        ("wrong CA", "not signed by store.ca_cert"),
        ("wrong server name", "does not name this host"),
    ],
)
def test_tls_failures_are_one_clear_line(
    tls_etcd: EtcdServer, certs: Certs, aio: Aio, case: str, expected: str
) -> None:
    settings: dict[str, Path | str] = {
        "ca_cert": certs.ca,
        "cert": certs.client_cert,
        "key": certs.client_key,
    }
    if case == "no client certificate":
        settings = {"ca_cert": certs.ca}
    elif case == "client certificate of another CA":
        settings |= {"cert": certs.other_client_cert, "key": certs.other_client_key}
    elif case == "wrong CA":
        settings |= {"ca_cert": certs.other_ca}
    else:
        settings |= {"server_name": "etcd.example"}
    target = from_settings([tls_etcd.endpoint], {k: str(v) for k, v in settings.items()})
    # TLS failures do not heal by waiting: reported at once, not after the 10 s timeout.
    message = str(one_line_failure(aio, target, StoreUnavailable, timeout=10.0))
    assert expected in message and tls_etcd.endpoint in message, message


def test_plain_grpc_to_a_tls_etcd_says_tls(tls_etcd: EtcdServer, aio: Aio) -> None:
    target = from_settings([tls_etcd.endpoint], {})
    with pytest.raises(StoreUnavailable, match="does etcd want TLS"):
        aio.run(open_with(target, timeout=1.0))


# (b) username and password


def test_auth_with_the_right_password(auth_etcd: EtcdServer, tmp_path: Path, aio: Aio) -> None:
    target = from_settings(
        auth_etcd.endpoints, {"username": "vmbox", "password_file": str(password_file(tmp_path))}
    )

    async def main() -> None:
        store = await open_with(target)
        try:
            await store.put("/vmbox/t/auth", b"1")
            # The role grants /vmbox/ and nothing else.
            with pytest.raises(StoreError, match="denied put /elsewhere to user 'vmbox'"):
                await store.put("/elsewhere", b"1")
            # The blocking channel (poll views, off the loop) logs in with the same token.
            got = await asyncio.to_thread(store.blocking_get, "/vmbox/t/auth", timeout=5.0)
            assert got is not None and got.value == b"1"
            with pytest.raises(StoreError, match="denied get /elsewhere to user 'vmbox'"):
                await asyncio.to_thread(store.blocking_get, "/elsewhere", timeout=5.0)
        finally:
            await store.close()

    aio.run(main())


def test_a_restarted_etcd_forgets_its_tokens_and_the_store_logs_in_again(
    tmp_path: Path, aio: Aio
) -> None:
    """etcd keeps the simple tokens it issued in memory: after a restart every call, a
    login that carries the old token and a watch stream all get "invalid auth token".
    The store logs in again without the old token, and a watch cancelled for it logs in
    before reopening, so calls and watches go on (the `etcd member loss` fault saw a
    replica whose logins kept failing and whose watch missed a write)."""
    with EtcdServer() as server:
        server.enable_auth(PASSWORD)
        target = from_settings(
            server.endpoints,
            {"username": "vmbox", "password_file": str(password_file(tmp_path))},
        )

        async def main() -> None:
            store = await open_with(target)
            try:
                await store.put("/vmbox/t/before", b"1")
                seen: list[str] = []

                async def follow() -> None:
                    async for event in store.watch_prefix("/vmbox/t/"):
                        seen.append(event.key)
                        if event.key == "/vmbox/t/after":
                            return

                watcher = asyncio.create_task(follow())
                await asyncio.sleep(0.3)  # the stream is open, with the first token
                await asyncio.to_thread(server.stop_member, 0)
                await asyncio.to_thread(server.restart)
                async with asyncio.timeout(20):
                    while True:  # the new member may need a moment to serve
                        try:
                            await store.put("/vmbox/t/after", b"2")
                            break
                        except StoreUnavailable:
                            await asyncio.sleep(0.2)
                    got = await store.get("/vmbox/t/before")
                    assert got is not None and got.value == b"1"
                    await watcher
                assert seen[-1] == "/vmbox/t/after", seen
            finally:
                await store.close()

        aio.run(main())


def test_auth_password_from_the_environment(
    auth_etcd: EtcdServer, aio: Aio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBOX_TEST_ETCD_PASSWORD", PASSWORD)
    target = from_settings(
        auth_etcd.endpoints, {"username": "vmbox", "password_env": "VMBOX_TEST_ETCD_PASSWORD"}
    )

    async def main() -> None:
        store = await open_with(target)
        await store.put("/vmbox/t/auth", b"2")
        await store.close()

    aio.run(main())


def test_auth_failures_are_one_clear_line(auth_etcd: EtcdServer, tmp_path: Path, aio: Aio) -> None:
    wrong = from_settings(
        auth_etcd.endpoints,
        {"username": "vmbox", "password_file": str(password_file(tmp_path, "not-it"))},
    )
    error = one_line_failure(aio, wrong, StoreError, timeout=10.0)
    assert not isinstance(error, StoreUnavailable)  # etcd answered: no point in retrying
    assert "rejected user 'vmbox'" in str(error) and "invalid user ID or password" in str(error)
    nobody = from_settings(auth_etcd.endpoints, {})
    error = one_line_failure(aio, nobody, StoreError, timeout=10.0)
    assert "wants a user" in str(error) and "store.username" in str(error)


# (c) end to end, and (d) metrics on loopback


def write_spec(folder: Path, etcd: EtcdServer, certs: Certs, listen: int, upstream: int) -> Path:
    """A 2-replica spec whose store is `etcd` with TLS and a user; paths relative to it."""
    (folder / "certs").mkdir(parents=True)
    for given in (certs.ca, certs.client_cert, certs.client_key):
        (folder / "certs" / given.name).write_bytes(given.read_bytes())
    password_file(folder)
    spec = folder / "secure.yaml"
    spec.write_text(f"""service: secure
listen: 127.0.0.1:{listen}
upstream: 127.0.0.1:{upstream}
middlebox: {{function: ratelimit, limit: 1000}}
replicas: {{count: 2, min: 1, max: 4}}
lease_ttl: 2
store:
  endpoints: [{etcd.client_urls[0]}]
  ca_cert: certs/ca.pem
  cert: certs/client.pem
  key: certs/client-key.pem
  username: vmbox
  password_file: etcd-password
""")
    return spec


async def vmbox(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *VMBOX,
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def test_a_service_runs_against_a_tls_and_auth_etcd(
    secure_etcd: EtcdServer, certs: Certs, tmp_path: Path, aio: Aio
) -> None:
    listen, upstream = free_udp_port(), free_udp_port()
    spec = write_spec(tmp_path / "spec", secure_etcd, certs, listen, upstream)
    env = os.environ | {"VMBOX_STATE_DIR": str(tmp_path / "state")}
    target = from_settings(
        secure_etcd.client_urls,
        {
            "ca_cert": str(spec.parent / "certs/ca.pem"),
            "cert": str(spec.parent / "certs/client.pem"),
            "key": str(spec.parent / "certs/client-key.pem"),
            "username": "vmbox",
            "password_file": str(spec.parent / "etcd-password"),
        },
    )

    async def main() -> None:
        async with upstream_echo(("127.0.0.1", upstream)):
            up = await asyncio.create_subprocess_exec(
                *VMBOX,
                "up",
                str(spec),
                "--no-live",
                env=env,
                cwd=tmp_path,  # not the spec's folder
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            store = await open_with(target)
            try:
                ready = await wait_ready(store, "secure", 2, timeout=25, check=lambda: still_up(up))
                members = {rid: member.info for rid, member in ready.items()}
                await check_replicas(members, store)
                await check_traffic(listen, members)
                code, out, err = await vmbox("status", env=env)  # endpoints, TLS from the record
                assert code == 0, err
                assert "2 replicas" in out and "secure-1" in out and "secure-2" in out, out
                assert "controller metrics: http://127.0.0.1:" in out, out
                record = (tmp_path / "state" / "services" / "secure.json").read_text()
                assert "etcd-password" in record and PASSWORD not in record
            finally:
                await store.close()
                if up.returncode is None:
                    up.send_signal(signal.SIGINT)
                _, err_bytes = await asyncio.wait_for(up.communicate(), 20)
        assert up.returncode == 0, err_bytes.decode()
        assert "(TLS with a client certificate, user vmbox)" in err_bytes.decode()

    aio.run(main(), timeout=50)


async def still_up(up: asyncio.subprocess.Process) -> None:
    """Raises once `vmbox up` has exited (wait_ready's check), with what it said."""
    if up.returncode is not None:
        _, err = await up.communicate()
        raise AssertionError(f"vmbox up exited {up.returncode}: {err.decode()}")


async def check_replicas(members: dict[str, dict[str, object]], store: EtcdStore) -> None:
    """Replicas got the settings as flags naming files, never the password; metrics on loopback."""
    for info in members.values():
        argv = psutil.Process(int(str(info["pid"]))).cmdline()  # what every user can read
        assert "--etcd-ca" in argv and "--etcd-cert" in argv and "--etcd-key" in argv
        assert "--etcd-user" in argv and "--etcd-password-file" in argv
        assert PASSWORD not in " ".join(argv)
        assert str(info["metrics"]).startswith("127.0.0.1:"), info
    controller = await store.get(keys.controller_key("secure"))
    assert controller is not None
    assert json.loads(controller.value)["metrics"].startswith("127.0.0.1:")


async def check_traffic(listen: int, members: dict[str, dict[str, object]]) -> None:
    await asyncio.sleep(1.1)  # a replica that joins mid-window admits nothing until the next
    target = ("127.0.0.1", listen)
    plan = LoadPlan(target=target, rate=200, ramp=None, sources=1, flows=16, duration=2.0)
    result = await run_load(plan)
    assert result.received >= 0.9 * result.sent > 0, (result.sent, result.received)
    for rid, info in members.items():  # both replicas relayed: each reached etcd on its own
        scraped = await scrape(str(info["metrics"]))
        assert scraped["vmbox_packets_received_total"] > 0, (rid, scraped)


def test_metrics_host_moves_every_metrics_port(etcd: EtcdServer, tmp_path: Path) -> None:
    """metrics_host (here another loopback address) is where replicas and the controller bind."""
    spec = make_spec("metricshost", 1).model_copy(update={"metrics_host": "127.0.0.2"})

    async def main() -> None:
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            (member,) = (await svc.members()).values()
            address = str(member.info["metrics"])
            assert address.startswith("127.0.0.2:"), address
            assert "vmbox_packets_received_total" in await scrape(address)
            with socket.socket() as probe:  # bound there only, not on 127.0.0.1 as well
                assert probe.connect_ex(("127.0.0.1", int(address.split(":")[1]))) != 0
            controller = await svc.store.get(keys.controller_key(spec.service))
            assert controller is not None
            assert json.loads(controller.value)["metrics"].startswith("127.0.0.2:")

    asyncio.run(main())
