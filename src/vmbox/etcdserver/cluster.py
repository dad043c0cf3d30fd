"""Start, health-check and stop a private etcd (one member or a small cluster).

Called by the CLI when a spec says `store: managed`, and by the test suite
(tests/conftest.py) to get a real etcd on loopback. Members listen on free
loopback ports, keep their data in a temporary directory unless one is given,
and die with the process that started them (PR_SET_PDEATHSIG). For the tests of
a secured store, members can serve TLS (`ServerTLS`, clients' certificates
required) and `enable_auth` turns on etcd's users with etcdctl; `secure` does it
with a new password kept in a 0600 file, as `store: managed` runs. One member's
process, its health and its log are vmbox.etcdserver.member.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from vmbox.etcdserver.member import (
    EtcdStartError,
    Member,
    ServerTLS,
    find_etcdctl,
    free_port,
    wait_healthy,
)
from vmbox.proc import pid_alive


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


def write_secret(path: Path, secret: str) -> None:
    """Write `secret` to a new file only its owner can read (0600 from the start, so it
    is never readable by anyone else, even for a moment); FileExistsError if one is there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as stream:
        os.fchmod(fd, 0o600)  # whatever the umask
        stream.write(secret + "\n")


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
            Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}", tls) for i in range(size)
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
            find_etcdctl(),
            "--endpoints",
            ",".join(self.client_urls),
            *(self.tls.etcdctl_args() if self.tls else []),
            *args,
        ]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env=os.environ | {"ETCDCTL_API": "3"},
        )
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

    def secure(self, password_file: Path, user: str = "vmbox", prefix: str = "/vmbox/") -> None:
        """Auth on for vmbox's own use (`store: managed`, the testbed): `user` gets a new
        random password, written to `password_file` (created, mode 0600), and a role that
        may read and write under `prefix` only. Root's password is forgotten once auth
        is on: nothing vmbox does needs it, and no one can use what is not kept."""
        password = secrets.token_urlsafe(24)
        write_secret(password_file, password)
        self.enable_auth(password, user, prefix)
        self.root_password = None

    def start(self, timeout: float = 15) -> Self:
        """Start every member and wait until all report healthy."""
        # All members must be running before any can elect a leader.
        try:
            for member in self.members:
                member.spawn(self._initial, "new", self._token)
            wait_healthy(self.members, timeout)
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
        wait_healthy([member], timeout)

    def leader_index(self, timeout: float = 1.0) -> int | None:
        """Index of the member that is the raft leader, None if none answers as such."""
        for index, member in enumerate(self.members):
            if not member.running():
                continue
            try:
                status = member.status(timeout)
            except (OSError, ValueError):
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return index
        return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
