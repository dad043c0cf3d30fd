"""Several services in one `vmbox up`, changed live with `vmbox apply`, removed with `vmbox delete`.

As an operator runs it: `vmbox up a.yaml b.yaml` with its private etcd (auth
on), `vmbox status` listing both, a third service added with `vmbox apply`,
a limit changed live (the same replica processes, the new limit in their
metrics), the same spec applied twice (nothing written: the spec key's
revision does not move), a listen address change refused before anything is
written, a consistency change rolled out (every replica replaced, one at a
time, while a steady load keeps passing at the limit), and one service
removed with `vmbox delete` (its replicas drained and gone, the others
untouched). Ctrl-C then leaves nothing running.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_cli import VMBOX, one_error_line, vmbox
from vmbox import context
from vmbox.state import access, keys
from vmbox.state.access import StoreSpec
from vmbox.state.etcd import connect
from vmbox.state.membership import list_members
from vmbox.testbed import free_udp_port

LOAD_RATE = 200  # datagrams/s offered to service a, over 16 flows; its limit is 50 then
LIMIT = 50


def spec_text(name: str, listen: int, upstream: int, limit: int, consistency: str) -> str:
    return f"""service: {name}
listen: 127.0.0.1:{listen}
upstream: 127.0.0.1:{upstream}
middlebox: {{function: ratelimit, limit: {limit}, consistency: {consistency}}}
replicas: {{count: 2, min: 1, max: 4, drain_timeout: 1s}}
"""


def pgrep(service: str) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-f", f"vmbox replica --service {service} "], capture_output=True, text=True
    )
    return found.stdout.split()


def members(env: dict[str, str], service: str) -> dict[str, dict[str, object]]:
    """member id -> info, read through the etcd and login `vmbox up` recorded."""

    async def read() -> dict[str, dict[str, object]]:
        target = recorded(env, service)
        store = await connect(target.endpoints, **access.connect_kwargs(target))
        try:
            return {r: m.info for r, m in (await list_members(store, service)).items()}
        finally:
            await store.close()

    return asyncio.run(read())


def spec_revision(env: dict[str, str], service: str) -> int:
    async def read() -> int:
        target = recorded(env, service)
        store = await connect(target.endpoints, **access.connect_kwargs(target))
        try:
            kv = await store.get(keys.spec_key(service))
            assert kv is not None
            return kv.mod_revision
        finally:
            await store.close()

    return asyncio.run(read())


def recorded(env: dict[str, str], service: str) -> StoreSpec:
    old = os.environ.get("VMBOX_STATE_DIR")
    os.environ["VMBOX_STATE_DIR"] = env["VMBOX_STATE_DIR"]
    try:
        _, endpoints, settings = context.lookup_settings(service)
    finally:
        if old is None:
            del os.environ["VMBOX_STATE_DIR"]
        else:
            os.environ["VMBOX_STATE_DIR"] = old
    return access.from_settings(endpoints, settings)


def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"not within {within:.0f}s: {what}")


def listed(env: dict[str, str], starting: bool = False) -> dict[str, list[str]]:
    """`vmbox status` with no argument: service -> its row's cells (none while `starting`
    and nothing is recorded yet)."""
    result = vmbox("status", env=env, timeout=30)
    if starting and result.returncode != 0:
        return {}
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0].startswith("svc-"):
            rows[cells[0]] = cells
    return rows


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, Path], dict[str, int]]]:
    env = os.environ | {"VMBOX_STATE_DIR": str(tmp_path / "state")}
    ports = {name: free_udp_port() for name in ("a", "b", "c", "a-up", "b-up", "c-up", "x")}
    specs = {}
    for name in ("a", "b", "c"):
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(
            spec_text(f"svc-{name}", ports[name], ports[f"{name}-up"], 100, "watch")
        )
    up = subprocess.Popen(
        [*VMBOX, "up", str(specs["a"]), str(specs["b"]), "--no-live"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        until(
            lambda: len(listed(env, True)) == 2 or up.poll() is not None, 40, "two services listed"
        )
        assert up.poll() is None, up.communicate()[1]
        yield env, specs, ports
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=40)
        assert up.returncode == 0, err
        assert "Traceback" not in err
        for name in ("a", "b", "c"):
            assert pgrep(f"svc-{name}") == [], name


def test_apply_add_change_refuse_roll_out_and_delete(
    running_up: tuple[dict[str, str], dict[str, Path], dict[str, int]], tmp_path: Path
) -> None:
    env, specs, ports = running_up
    rows = listed(env)
    assert set(rows) == {"svc-a", "svc-b"} and rows["svc-a"][1] == "2/2", rows

    added = vmbox("apply", str(specs["c"]), env=env)
    assert added.returncode == 0, added.stderr
    assert "svc-c: created" in added.stdout
    until(lambda: listed(env).get("svc-c", ["", ""])[1] == "2/2", 30, "svc-c ready")

    # A live change: the same processes, the new limit in their metrics.
    before = members(env, "svc-a")
    limited = tmp_path / "a-limit.yaml"
    limited.write_text(specs["a"].read_text().replace("limit: 100", f"limit: {LIMIT}"))
    changed = vmbox("apply", str(limited), env=env)
    assert changed.returncode == 0, changed.stderr
    assert f"~ middlebox.limit: 100 -> {LIMIT}  (live:" in changed.stdout, changed.stdout
    until(lambda: listed(env)["svc-a"][3] == str(LIMIT), 10, "the new limit in the metrics")
    assert {r: i["pid"] for r, i in members(env, "svc-a").items()} == {
        r: i["pid"] for r, i in before.items()
    }

    # The same spec again writes nothing.
    revision = spec_revision(env, "svc-a")
    again = vmbox("apply", str(limited), env=env)
    assert again.returncode == 0 and "unchanged (nothing written)" in again.stdout, again
    assert spec_revision(env, "svc-a") == revision

    # What cannot change live is refused before anything is written.
    moved = tmp_path / "a-moved.yaml"
    moved.write_text(
        limited.read_text()
        .replace(f":{ports['a']}\n", f":{ports['x']}\n")
        .replace(f"limit: {LIMIT}", "limit: 7")
    )
    line = one_error_line(vmbox("apply", str(moved), env=env))
    assert "cannot change live: listen" in line and "nothing was written" in line, line
    assert "limit" not in line.split("nothing was written")[0].split("listen")[1]
    assert spec_revision(env, "svc-a") == revision

    # A rollout: every replica replaced, one at a time, under a steady load.
    fenced = tmp_path / "a-fenced.yaml"
    fenced.write_text(limited.read_text().replace("consistency: watch", "consistency: fenced"))
    counts = tmp_path / "echo.csv"
    echo = subprocess.Popen(
        [*VMBOX, "echo", "--listen", f"127.0.0.1:{ports['a-up']}", "--csv", str(counts)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    load = subprocess.Popen(
        [
            *VMBOX,
            "load",
            "--target",
            f"127.0.0.1:{ports['a']}",
            "--rate",
            str(LOAD_RATE),
            "--flows",
            "16",
            "--duration",
            "25",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.5)
        old_pids = {i["pid"] for i in members(env, "svc-a").values()}
        rolled_at = time.time()
        rolled = vmbox("apply", str(fenced), env=env)
        assert rolled.returncode == 0, rolled.stderr
        assert "(rollout: replicas replaced one at a time)" in rolled.stdout, rolled.stdout

        def replaced() -> bool:
            now = members(env, "svc-a")
            return len(now) == 2 and not {i["pid"] for i in now.values()} & old_pids

        until(replaced, 40, "every replica of svc-a replaced")
        done_at = time.time()
        time.sleep(1.5)
    finally:
        load.terminate()
        load.wait(timeout=10)
        echo.send_signal(signal.SIGINT)
        echo.wait(timeout=10)
    seconds = {int(r["second"]): int(r["received"]) for r in csv.DictReader(counts.open())}
    during = [seconds.get(s, 0) for s in range(int(rolled_at), int(done_at) + 1)]
    print(f"rollout took {done_at - rolled_at:.1f}s; the server's seconds meanwhile: {during}")
    # The limit held and the service kept passing while it was replaced (never under
    # half the limit: a replica is always serving beside the one that leaves).
    assert max(during) <= LIMIT * 1.1 and min(during) >= LIMIT // 2, during
    assert listed(env)["svc-a"][2] == "2"  # UP-TO-DATE: both run the applied spec

    # Delete one service: drained and gone; the others go on.
    b_pids = pgrep("svc-b")
    assert b_pids
    deleted = vmbox("delete", "svc-b", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "svc-b: deleted; 2 replicas drained and stopped" in deleted.stdout
    assert pgrep("svc-b") == []
    assert set(listed(env)) == {"svc-a", "svc-c"}
    line = one_error_line(vmbox("delete", "svc-b", env=env))
    assert "svc-b" in line
