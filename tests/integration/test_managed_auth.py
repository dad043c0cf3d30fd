"""Only vmbox writes the firewall's state: the managed etcd runs with auth on.

`vmbox up` with `store: managed` (and the testbed's private etcd) create a
`vmbox` user whose role may use /vmbox/ only, its password in a 0600 file;
every vmbox process finds the file through the context record. Another
local user, without the file, is refused by etcd; the file refuses them too
(checked by reading it as uid 65534 with setpriv when this runs as root).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import Aio
from tests.integration.harness import make_spec
from vmbox import testbed
from vmbox.etcdserver import find_etcdctl
from vmbox.state import keys
from vmbox.state.access import StoreSpec, connect_kwargs, from_settings
from vmbox.state.etcd import connect
from vmbox.state.store import StoreError
from vmbox.testbed import free_udp_port, wait_ready

VMBOX = [sys.executable, "-m", "vmbox"]
NOBODY = 65534


def etcdctl(
    endpoints: tuple[str, ...], *args: str, user: str | None = None, as_uid: int | None = None
) -> subprocess.CompletedProcess[str]:
    """etcdctl as an operator (or, with `as_uid`, another local user) would run it."""
    env = {"ETCDCTL_API": "3"} | ({"ETCDCTL_USER": user} if user else {})
    argv = [find_etcdctl(), "--endpoints", ",".join(endpoints), "--command-timeout=3s", *args]
    if as_uid is not None:
        argv = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=15)


def can_switch_uid() -> bool:
    return os.getuid() == 0 and shutil.which("setpriv") is not None


def assert_refused_without_the_file(endpoints: tuple[str, ...], service: str) -> None:
    """No user, a wrong password, or another uid: every read and write under /vmbox/ fails."""
    key = keys.desired_key(service)
    for args in (("put", key, "4"), ("get", "--prefix", keys.ROOT), ("del", key)):
        done = etcdctl(endpoints, *args)
        assert done.returncode != 0 and "user name is empty" in done.stderr, (args, done)
        done = etcdctl(endpoints, *args, user="vmbox:guessed")
        assert done.returncode != 0 and "authentication failed" in done.stderr, (args, done)
        done = etcdctl(endpoints, *args, user="root:root")
        assert done.returncode != 0 and "authentication failed" in done.stderr, (args, done)
    if can_switch_uid():
        done = etcdctl(endpoints, "put", key, "4", as_uid=NOBODY)
        assert done.returncode != 0 and "user name is empty" in done.stderr, done


def assert_private(password_file: Path) -> None:
    """0600 and ours, in a 0700 folder; another uid cannot read it (if we can be one)."""
    info = password_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert stat.S_IMODE(password_file.parent.stat().st_mode) == 0o700
    if can_switch_uid():
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        done = subprocess.run(
            [*argv, "cat", str(password_file)], capture_output=True, text=True, timeout=10
        )
        assert done.returncode != 0 and "Permission denied" in done.stderr, done
        assert done.stdout == ""


async def assert_role_is_vmbox_only(target: StoreSpec) -> None:
    """With the file: /vmbox/ is read and written; nothing outside it, nor auth itself."""
    store = await connect(target.endpoints, timeout=5, **connect_kwargs(target))
    try:
        await store.put("/vmbox/t/auth", b"1")
        assert (await store.get("/vmbox/t/auth")) is not None
        for key in ("/elsewhere", "/vmbox", "/vmbox0"):
            with pytest.raises(StoreError, match=f"denied put {key} to user 'vmbox'"):
                await store.put(key, b"1")
    finally:
        await store.close()


def test_vmbox_up_runs_its_etcd_with_auth_and_finds_the_password(tmp_path: Path, aio: Aio) -> None:
    state = tmp_path / "state"
    env = os.environ | {"VMBOX_STATE_DIR": str(state)}
    spec = tmp_path / "guarded.yaml"
    spec.write_text(f"""service: guarded
listen: 127.0.0.1:{free_udp_port()}
upstream: 127.0.0.1:{free_udp_port()}
middlebox: {{function: ratelimit, limit: 100, consistency: watch}}
replicas: {{count: 2, min: 1, max: 4}}
lease_ttl: 2
""")
    up = subprocess.Popen(
        [*VMBOX, "up", str(spec), "--no-live"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    record = state / "services" / "guarded.json"
    try:
        deadline = time.monotonic() + 20
        while not record.exists():
            assert up.poll() is None, up.communicate()[1]
            assert time.monotonic() < deadline, "no context record"
            time.sleep(0.05)
        data = json.loads(record.read_text())
        settings = data["settings"]
        password_file = Path(settings["password_file"])
        assert settings["username"] == "vmbox"
        assert password_file.parent == state / "secrets"
        password = password_file.read_text().strip()
        assert len(password) >= 24 and password not in record.read_text()
        assert_private(password_file)
        target = from_settings(data["endpoints"], settings)
        endpoints = target.endpoints

        async def replicas_logged_in() -> None:
            store = await connect(endpoints, timeout=5, **connect_kwargs(target))
            try:
                ready = await wait_ready(store, "guarded", 2, timeout=25)
            finally:
                await store.close()
            for member in ready.values():  # the controller handed them the file, not the secret
                argv = psutil.Process(int(str(member.info["pid"]))).cmdline()
                assert argv[argv.index("--etcd-user") + 1] == "vmbox"
                assert argv[argv.index("--etcd-password-file") + 1] == str(password_file)
                assert password not in " ".join(argv)
            await assert_role_is_vmbox_only(target)

        aio.run(replicas_logged_in(), timeout=40)
        assert_refused_without_the_file(endpoints, "guarded")
        status = subprocess.run(  # no flags: endpoints and login from the record
            [*VMBOX, "status"], env=env, capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0 and "2 replicas" in status.stdout, status
        scaled = subprocess.run(
            [*VMBOX, "scale", "guarded", "1"], env=env, capture_output=True, text=True, timeout=30
        )
        assert scaled.returncode == 0, scaled.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
    assert up.returncode == 0, err
    assert "user vmbox" in err  # the first line names how etcd is reached
    assert not password_file.exists() and not record.exists()  # gone with its etcd


def test_the_testbeds_private_etcd_is_guarded_too(tmp_path: Path, aio: Aio) -> None:
    async def main() -> None:
        async with testbed.private_etcd() as (server, store):
            target = testbed.store_access(store.endpoints)
            assert target is not None and target.password_file is not None
            assert target.password_file.parent == server.root
            assert_private(target.password_file)
            assert server.root_password is None  # root's is forgotten once auth is on
            await assert_role_is_vmbox_only(target)
            await testbed.etcdctl(store.endpoints, "put", "/vmbox/t/by-hand", "1")  # as vmbox
            await asyncio.to_thread(assert_refused_without_the_file, store.endpoints, "web")
            spec = make_spec("guardedtb")
            async with testbed.running_service(store, spec, log_dir=tmp_path) as service:
                assert len(await service.members()) == 1  # its replica logged in
        assert testbed.store_access(store.endpoints) is None

    aio.run(main(), timeout=60)
