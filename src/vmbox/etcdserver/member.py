"""One private etcd member: the binary, its ports, its process, its health and its log.

Used by vmbox.etcdserver.cluster, whose EtcdCluster and EtcdServer start, stop and
restart `Member`s and wait for them with `wait_healthy`. Also here, and
re-exported there: finding etcd and etcdctl (`find_etcd`), `ServerTLS` (the
certificates a member serves and its health checks present), `free_port`, the
two errors, and the reading of a member's zap JSON log for a one-line cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vmbox.proc import with_parent_death_signal

# Short raft timers: a lost leader is replaced in about a second, which keeps
# failover tests fast and is still far above loopback latency.
_TUNING = ("--heartbeat-interval", "50", "--election-timeout", "500")
# bcrypt's lowest cost: the passwords of a private etcd are random (`secure`:
# 192 bits), which no cost makes harder to guess, while cost 10 (etcd's
# default) spends ~70 ms of CPU on every login: each replica's, each command's.
_BCRYPT = ("--bcrypt-cost", "4")


class EtcdNotFound(RuntimeError):
    """No etcd binary on this machine."""


class EtcdStartError(RuntimeError):
    """etcd exited or did not become healthy; str() names the cause."""


def find_etcd() -> str:
    """The path of the etcd binary, or EtcdNotFound with what to install."""
    found = shutil.which("etcd")
    if found:
        return found
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    raise EtcdNotFound("etcd is not installed: run `apt-get install etcd-server` (or `make setup`)")


def find_etcdctl() -> str:
    """etcdctl, found beside etcd (Debian ships both in etcd-client/etcd-server)."""
    beside = Path(find_etcd()).with_name("etcdctl")
    return str(beside) if beside.exists() else shutil.which("etcdctl") or "etcdctl"


@dataclass(frozen=True)
class ServerTLS:
    """Certificates for a private etcd that serves clients over TLS.

    `ca` verifies clients' certificates (etcd's --client-cert-auth) and
    `client_cert`/`client_key` are what this module's own health checks and
    etcdctl calls present. The server certificate must name 127.0.0.1.
    """

    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path

    def args(self) -> list[str]:
        return [
            "--cert-file",
            str(self.cert),
            "--key-file",
            str(self.key),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(self.ca),
        ]

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def etcdctl_args(self) -> list[str]:
        return [
            "--cacert",
            str(self.ca),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _http_json(
    url: str, timeout: float, body: bytes | None = None, tls: ServerTLS | None = None
) -> Any:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    context = tls.context() if tls is not None else None
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read())


def _last_relevant(log: Path) -> str:
    """The last error line of an etcd (zap JSON) log, else its last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return "no log"
    for line in reversed(lines):
        entry = _parse_log_line(line)
        if entry and entry.get("level") in {"error", "fatal", "panic"}:
            return _describe_log(entry)
    last = _parse_log_line(lines[-1]) if lines else None
    return _describe_log(last) if last else (lines[-1] if lines else "empty log")


def _parse_log_line(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _describe_log(entry: dict[str, Any]) -> str:
    error = entry.get("error")
    return f"{entry.get('msg')}: {error}" if error else str(entry.get("msg"))


class Member:
    """One etcd process: its ports, its directory, its log."""

    def __init__(
        self, name: str, client_port: int, peer_port: int, root: Path, tls: ServerTLS | None
    ) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.root = root
        self.tls = tls
        self.log_path = root / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"  # members talk plainly over loopback

    def spawn(self, initial_cluster: str, state: str, token: str) -> None:
        # A busy port would let /health reach somebody else's etcd and pass.
        for port in (self.client_port, self.peer_port):
            if not _port_free(port):
                raise EtcdStartError(
                    f"cannot start etcd {self.name}: 127.0.0.1:{port} is already in use"
                )
        client_url = self.client_url
        args = [
            find_etcd(),
            "--name",
            self.name,
            "--data-dir",
            str(self.root / "data"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            token,
            "--enable-v2=false",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            *_TUNING,
            *_BCRYPT,
            *(self.tls.args() if self.tls else []),
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in reap()
        # If the parent dies (even by SIGKILL), the kernel kills etcd too, so
        # no orphan keeps the ports.
        argv, preexec = with_parent_death_signal(args, signal.SIGKILL)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            answer = _http_json(f"{self.client_url}/health", timeout, tls=self.tls)
        except (OSError, ValueError):
            return False
        return isinstance(answer, dict) and answer.get("health") == "true"

    def status(self, timeout: float) -> Any:
        """This member's answer to /v3/maintenance/status; OSError or ValueError if none."""
        return _http_json(f"{self.client_url}/v3/maintenance/status", timeout, b"{}", self.tls)

    def failure(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        tail = _last_relevant(self.log_path)
        return f"etcd {self.name} on {self.endpoint} exited ({code}): {tail}"

    def signal(self, sig: signal.Signals) -> None:
        if self.running() and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def reap(self, timeout: float) -> None:
        """Wait for the process (SIGKILL after `timeout`) and close its log."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_healthy(members: Sequence[Member], timeout: float) -> None:
    """Return once every member answers /health; EtcdStartError if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(members)
    while pending:
        for member in pending:
            if not member.running():
                raise EtcdStartError(member.failure())
        pending = [m for m in pending if not m.healthy()]
        if pending and time.monotonic() > deadline:
            names = ", ".join(m.endpoint for m in pending)
            tail = _last_relevant(pending[0].log_path)
            raise EtcdStartError(f"etcd at {names} not healthy after {timeout:.0f}s: {tail}")
        if pending:
            time.sleep(0.05)
