"""Where `vmbox up` records the etcd it uses, so `status` and `scale` need no flags.

Written by `vmbox up` and `vmbox demo`, read by `vmbox status` and `vmbox scale`.
One small JSON file per service under the state directory ($VMBOX_STATE_DIR,
else ~/.local/state/vmbox), like kubectl's current context. With an external
etcd it also holds the TLS and auth settings (vmbox.state.access.settings):
file paths, a user name, the name of an environment variable; never a secret.
The managed etcd's `vmbox` password is the one secret kept here, in its own
0600 file under secrets/ (a 0700 folder), and the record names that file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbox.proc import pid_alive


class NoContext(LookupError):
    """No running service recorded an etcd; the user must pass --etcd."""


def state_dir() -> Path:
    base = os.environ.get("VMBOX_STATE_DIR")
    path = Path(base) if base else Path.home() / ".local" / "state" / "vmbox"
    path.mkdir(parents=True, exist_ok=True)
    return path


def password_file() -> Path:
    """Where this `vmbox up` keeps its managed etcd's password: secrets/etcd-PID.password.

    The folder is made 0700; files that a `vmbox up` no longer running left
    behind (kill -9) are removed first. The file itself is written by
    vmbox.etcdserver's `secure` (0600) and removed by the caller when it stops.
    """
    folder = state_dir() / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    for stale in folder.glob("etcd-*.password"):
        owner = stale.name.removeprefix("etcd-").removesuffix(".password")
        if owner.isdigit() and not pid_alive(int(owner)):
            stale.unlink(missing_ok=True)
    path = folder / f"etcd-{os.getpid()}.password"
    path.unlink(missing_ok=True)
    return path


def _file(service: str) -> Path:
    return state_dir() / "services" / f"{service}.json"


def record(
    service: str,
    endpoints: list[str],
    pid: int | None = None,
    settings: Mapping[str, str] | None = None,
    host: str | None = None,
) -> None:
    path = _file(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"service": service, "endpoints": endpoints, "pid": pid or os.getpid()}
    if settings:
        data["settings"] = dict(settings)
    if host:
        data["host"] = host  # the `vmbox up` running it (vmbox.control.host), for `vmbox apply`
    path.write_text(json.dumps(data))


def forget(service: str) -> None:
    _file(service).unlink(missing_ok=True)


def known_services() -> list[str]:
    folder = state_dir() / "services"
    if not folder.exists():
        return []
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files]


def lookup(service: str | None) -> tuple[str, list[str]]:
    """(service, endpoints) for `service`, or for the most recently started one."""
    name, endpoints, _ = lookup_settings(service)
    return name, endpoints


def lookup_settings(service: str | None) -> tuple[str, list[str], dict[str, str]]:
    """(service, endpoints, TLS and auth settings) for `service`, or the newest one.

    Records left by a `vmbox up` that no longer runs (killed, or its terminal
    closed) are skipped and removed: their etcd may be gone with it.
    """
    names = [service] if service else known_services()
    for name in names:
        try:
            data = json.loads(_file(name).read_text())
            endpoints = [str(e) for e in data["endpoints"]]
            settings = {str(k): str(v) for k, v in data.get("settings", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if pid_alive(data.get("pid")):
            return name, endpoints, settings
        forget(name)
    what = f"service {service!r}" if service else "any service"
    raise NoContext(f"no running `vmbox up` recorded an etcd for {what}: pass --etcd HOST:PORT")


def running() -> list[tuple[str, list[str], dict[str, str]]]:
    """(service, endpoints, settings) of every service a running `vmbox up` recorded,
    newest first; records of one that no longer runs are removed, as lookup does."""
    out = []
    for name in known_services():
        try:
            out.append(lookup_settings(name))
        except NoContext:
            continue
    return out


def recorded_host(service: str) -> str | None:
    """The host (vmbox.control.host) that recorded `service`, if it still runs."""
    try:
        data = json.loads(_file(service).read_text())
    except (OSError, ValueError):
        return None
    host = data.get("host") if isinstance(data, dict) and pid_alive(data.get("pid")) else None
    return str(host) if host else None


def parse_endpoints(value: str) -> list[str]:
    """'a:1,b:2' -> ['a:1', 'b:2'] (http:// is dropped; https:// is kept: it asks for TLS)."""
    return [part.strip().removeprefix("http://") for part in value.split(",") if part.strip()]
