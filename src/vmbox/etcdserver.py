"""Find, start, health-check and stop a private etcd (one member or a small cluster).

Called by the CLI when a spec says `store: managed`, and by the test suite
(tests/conftest.py) to get a real etcd on loopback. Members listen on free
loopback ports, keep their data in a temporary directory unless one is given,
and die with the process that started them (PR_SET_PDEATHSIG). For the tests of
a secured store, members can serve TLS (`ServerTLS`, clients' certificates
required) and `enable_auth` turns on etcd's users with etcdctl.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from vmbox.proc import pid_alive, with_parent_death_signal

# Short raft timers: a lost leader is replaced in about a second, which keeps
# failover tests fast and is still far above loopback latency.
_TUNING = ("--heartbeat-interval", "50", "--election-timeout", "500")


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
            "--cert-file", str(self.cert), "--key-file", str(self.key),
            "--client-cert-auth", "--trusted-ca-file", str(self.ca),
        ]  # fmt: skip

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def etcdctl_args(self) -> list[str]:
        return [
            "--cacert", str(self.ca), "--cert", str(self.client_cert),
            "--key", str(self.client_key),
        ]  # fmt: skip


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


class _Member:
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
            find_etcd(), "--name", self.name, "--data-dir", str(self.root / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", token,
            "--enable-v2=false", "--logger", "zap", "--log-outputs", "stderr", *_TUNING,
            *(self.tls.args() if self.tls else []),
        ]  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in reap()
        # If the parent dies (even by SIGKILL), the kernel kills etcd too, so
        # no orphan keeps the ports.
        argv, preexec = with_parent_death_signal(args, signal.SIGKILL)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=preexec, start_new_session=True,
        )  # fmt: skip

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            answer = _http_json(f"{self.client_url}/health", timeout, tls=self.tls)
        except (OSError, ValueError):
            return False
        return isinstance(answer, dict) and answer.get("health") == "true"

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


def _wait_healthy(members: Sequence[_Member], timeout: float) -> None:
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


def _dir_prefix(pid: int | None = None) -> str:
    # The owner's pid is in the name, so a later start can tell orphans apart.
    return f"vmbox-etcd-{os.getpid() if pid is None else pid}-"


def remove_orphaned_dirs(base: str | None = None) -> int:
    """Remove private etcd directories whose owner died without cleaning up (kill -9)."""
    removed = 0
    for path in Path(base or tempfile.gettempdir()).glob("vmbox-etcd-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and not pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


class EtcdCluster:
    """N etcd members on loopback; `with EtcdCluster(3) as c: c.endpoints`."""

    def __init__(
        self,
        size: int = 3,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self._owned = data_dir is None
        if data_dir is None:
            remove_orphaned_dirs()
        self.root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix=_dir_prefix()))
        self.tls = tls
        self.members = [
            _Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}", tls)
            for i in range(size)
        ]
        self.root_password: str | None = None  # set by enable_auth
        self._initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        # One token per cluster, so members of two test clusters never merge.
        self._token = f"vmbox-{os.getpid()}-{id(self)}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def client_urls(self) -> list[str]:
        """The endpoints with their scheme: https:// when serving TLS."""
        return [m.client_url for m in self.members]

    def etcdctl(self, *args: str, stdin: str = "", timeout: float = 10) -> str:
        """Run etcdctl against this cluster (with the client certificate of `tls`); its output."""
        command = [
            find_etcdctl(), "--endpoints", ",".join(self.client_urls),
            *(self.tls.etcdctl_args() if self.tls else []), *args,
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, input=stdin,
            env=os.environ | {"ETCDCTL_API": "3"},
        )  # fmt: skip
        if done.returncode != 0:
            raise EtcdStartError(f"etcdctl {' '.join(args[:2])} failed: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self, password: str, user: str = "vmbox", prefix: str = "/vmbox/") -> None:
        """Turn on etcd's users: root (a random password, kept in `root_password`) and
        `user`, whose role may read and write keys under `prefix` and nothing else."""
        self.root_password = secrets.token_urlsafe(12)
        # Passwords go through stdin: a command line is readable by every user.
        self.etcdctl("user", "add", "root", "--interactive=false", stdin=self.root_password)
        self.etcdctl("role", "add", user)
        self.etcdctl("role", "grant-permission", user, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "add", user, "--interactive=false", stdin=password)
        self.etcdctl("user", "grant-role", user, user)
        self.etcdctl("auth", "enable")  # also gives root the root role

    def start(self, timeout: float = 15) -> Self:
        """Start every member and wait until all report healthy."""
        # All members must be running before any can elect a leader.
        try:
            for member in self.members:
                member.spawn(self._initial, "new", self._token)
            _wait_healthy(self.members, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM every member, SIGKILL stragglers, remove a temp data dir."""
        # One at a time, leader last: members told to stop together try to hand
        # leadership to each other and each waits seconds for it.
        leader = self.leader_index() if len(self.members) > 1 else None
        for index in sorted(range(len(self.members)), key=lambda i: i == leader):
            self.stop_member(index, timeout)
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)

    def stop_member(self, index: int, timeout: float = 5) -> None:
        self.members[index].signal(signal.SIGTERM)
        self.members[index].reap(timeout)

    def kill_member(self, index: int) -> None:
        self.members[index].signal(signal.SIGKILL)
        self.members[index].reap(5)

    def start_member(self, index: int, timeout: float = 15) -> None:
        """Restart a stopped member on its old ports and data; it rejoins the cluster."""
        member = self.members[index]
        if member.running():
            return
        member.spawn(self._initial, "existing", self._token)
        _wait_healthy([member], timeout)

    def leader_index(self, timeout: float = 1.0) -> int | None:
        """Index of the member that is the raft leader, None if none answers as such."""
        for index, member in enumerate(self.members):
            if not member.running():
                continue
            try:
                status = _http_json(
                    f"{member.client_url}/v3/maintenance/status", timeout, b"{}", member.tls
                )
            except (OSError, ValueError):
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return index
        return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()


class EtcdServer(EtcdCluster):
    """One private etcd member: `with EtcdServer() as etcd: etcd.endpoint`."""

    def __init__(
        self,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        super().__init__(1, data_dir=data_dir, tls=tls)
        member = self.members[0]
        member.client_port = client_port or member.client_port
        member.peer_port = peer_port or member.peer_port
        member.root = self.root
        member.log_path = self.root / "etcd.log"
        self._initial = f"{member.name}={member.peer_url}"

    @property
    def endpoint(self) -> str:
        return self.members[0].endpoint

    @property
    def log_path(self) -> Path:
        return self.members[0].log_path

    def restart(self, timeout: float = 15) -> None:
        """Start again after stop_member(0)/kill_member(0), with the same data."""
        self.start_member(0, timeout)

    def healthy(self) -> bool:
        return self.members[0].healthy()
