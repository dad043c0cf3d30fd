"""Memory cgroups for local replicas, so each one has a limit like a pod's.

vmbox.runtime.local opens a `ReplicaCgroups` when it runs as root with
`replicas.memory_limit` set: every replica then lives in
`<our own cgroup>/vmbox-<service>/<replica>` with that limit, and the monitor
reads its working set there, as kubelet reads a pod's. cgroup v2 is used when a
cgroup2 hierarchy has the memory controller, else v1 (hybrid machines keep it
there). Whatever does not work (no controller, read-only cgroupfs, the v2 "no
internal processes" rule) raises `CgroupUnavailable` with a one-line reason and
the runtime falls back to psutil.

Every path is taken relative to `root` (normally "/"), so unit tests run the
same parsing against a directory tree of their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 2**62  # v1 reports "no limit" as a huge page-aligned number
JOIN_FAILED = 3  # runtime.base.EXIT_CONFIG: a replica that cannot join its cgroup stops


class CgroupUnavailable(Exception):
    """Memory cgroups cannot be used here; str() is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Mount:
    fstype: str  # "cgroup" or "cgroup2"
    root: str  # the hierarchy path mounted there (mountinfo field 4)
    point: str  # where it is mounted
    options: frozenset[str]  # super options: the controllers of a v1 mount


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in /proc/<pid>/mountinfo."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            options = frozenset(tail[2].split(","))
            mounts.append(Mount(tail[0], _unescape(fields[3]), _unescape(fields[4]), options))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller (or "" for the v2 line) -> the process's cgroup path, from /proc/<pid>/cgroup."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def parse_flat_keyed(text: str) -> dict[str, int]:
    """memory.stat, memory.events, memory.oom_control: "key value" lines."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _read(path: Path) -> str:
    return path.read_text()


def _within(mount: Mount, cgroup: str, root: Path) -> Path | None:
    """Where `cgroup` (a path as /proc/<pid>/cgroup names it) is in the filesystem."""
    base = mount.root.rstrip("/")
    if cgroup != base and not cgroup.startswith(base + "/"):
        return None  # the cgroup lies outside what this mount shows
    if "/.." in cgroup:
        return None  # outside our cgroup namespace
    relative = cgroup[len(base) :].strip("/")
    return root / mount.point.lstrip("/") / relative


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """The memory controller's hierarchy as this process sees it."""

    version: int  # 1 or 2
    mount: Mount
    own: Path  # this process's cgroup directory in it
    root: Path

    def of_pid(self, pid: int) -> Path | None:
        """The cgroup directory of another process in this hierarchy, None if unknown."""
        try:
            paths = parse_proc_cgroup(_read(self.root / f"proc/{pid}/cgroup"))
        except OSError:
            return None
        cgroup = paths.get("" if self.version == 2 else "memory")
        return None if cgroup is None else _within(self.mount, cgroup, self.root)


def find_hierarchy(root: Path = Path("/")) -> Hierarchy:
    """The memory controller's hierarchy and our place in it; raises CgroupUnavailable."""
    try:
        mounts = parse_mountinfo(_read(root / "proc/self/mountinfo"))
        own = parse_proc_cgroup(_read(root / "proc/self/cgroup"))
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self: {exc.strerror}") from None
    for mount in (m for m in mounts if m.fstype == "cgroup2"):
        with contextlib.suppress(OSError):
            top = root / mount.point.lstrip("/")
            if "memory" in _read(top / "cgroup.controllers").split() and "" in own:
                return _hierarchy(2, mount, own[""], root)
    for mount in (m for m in mounts if m.fstype == "cgroup" and "memory" in m.options):
        if "memory" in own:
            return _hierarchy(1, mount, own["memory"], root)
    raise CgroupUnavailable("no memory cgroup controller is mounted")


def _hierarchy(version: int, mount: Mount, cgroup: str, root: Path) -> Hierarchy:
    path = _within(mount, cgroup, root)
    if path is None or not path.is_dir():
        raise CgroupUnavailable(f"our cgroup {cgroup} is not visible under {mount.point}")
    return Hierarchy(version, mount, path, root)


@dataclass(frozen=True, slots=True)
class MemoryCgroup:
    """One replica's memory cgroup: its limit, working set and OOM kills."""

    path: Path
    version: int

    @property
    def source(self) -> str:
        return f"cgroup v{self.version}"

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.version == 1 else v2)

    def set_limit(self, limit: int) -> None:
        self._file("memory.limit_in_bytes", "memory.max").write_text(str(limit))

    def limit(self) -> int | None:
        text = _read(self._file("memory.limit_in_bytes", "memory.max")).strip()
        return None if text == "max" or int(text) >= UNLIMITED else int(text)

    def working_set(self) -> int:
        """Usage minus inactive file pages, as kubelet (cAdvisor) computes a pod's."""
        usage = int(_read(self._file("memory.usage_in_bytes", "memory.current")))
        stat = parse_flat_keyed(_read(self.path / "memory.stat"))
        inactive = stat.get("total_inactive_file" if self.version == 1 else "inactive_file", 0)
        return max(0, usage - inactive)

    def oom_kills(self) -> int:
        """Processes the kernel OOM killer killed here (0 if the kernel does not say)."""
        try:
            text = _read(self._file("memory.oom_control", "memory.events"))
        except OSError:
            return 0
        return parse_flat_keyed(text).get("oom_kill", 0)

    def pids(self) -> list[int]:
        return [int(line) for line in _read(self.path / "cgroup.procs").split()]

    def remove(self, timeout: float = 1.0) -> bool:
        """rmdir it; a cgroup is busy until its exited process is reaped, so retry a while."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    return False
            time.sleep(0.02)


class ReplicaCgroups:
    """The cgroups of one service's replicas: <own cgroup>/vmbox-<service>/<replica>."""

    def __init__(self, service: str, limit: int, *, root: Path = Path("/")) -> None:
        self.limit = limit
        self.hierarchy = find_hierarchy(root)
        self.version = self.hierarchy.version
        self.base = self.hierarchy.own / f"vmbox-{service}"
        self._prepare()

    def _prepare(self) -> None:
        own = self.hierarchy.own
        try:
            if self.version == 2:
                if "memory" not in _read(own / "cgroup.controllers").split():
                    raise CgroupUnavailable(f"the memory controller is not delegated to {own}")
                _enable_memory(own)
            self._ensure_base()
        except OSError as exc:
            raise CgroupUnavailable(_why(exc, own)) from None

    def _ensure_base(self) -> None:
        self.base.mkdir(exist_ok=True)
        if self.version == 2:
            _enable_memory(self.base)

    def path(self, replica_id: str) -> Path:
        return self.base / replica_id

    def create(self, replica_id: str) -> MemoryCgroup:
        """The replica's cgroup with the limit set (reusing one left over); OSError on failure."""
        self._ensure_base()
        cgroup = MemoryCgroup(self.path(replica_id), self.version)
        cgroup.path.mkdir(exist_ok=True)
        cgroup.set_limit(self.limit)
        return cgroup

    def of_pid(self, replica_id: str, pid: int) -> MemoryCgroup | None:
        """The cgroup an adopted replica already runs in, if it is one of ours."""
        path = self.hierarchy.of_pid(pid)
        if path is None or path.name != replica_id or path.parent.name != self.base.name:
            return None
        return MemoryCgroup(path, self.version)

    def probe(self) -> None:
        """Move a throwaway shell into a cgroup, as a replica's launch will; raises on failure."""
        try:
            cgroup = self.create(f".probe-{os.getpid()}")
        except OSError as exc:
            raise CgroupUnavailable(_why(exc, self.base)) from None
        try:
            done = subprocess.run(join_command(cgroup.path, ["true"]), capture_output=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot run /bin/sh: {exc.strerror}") from None
        finally:
            cgroup.remove()
        if done.returncode != 0:
            line = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[0]
            raise CgroupUnavailable(f"cannot move a process into {cgroup.path}: {line}")

    def sweep(self) -> None:
        """Remove leftover empty replica cgroups and the service's directory if empty."""
        with contextlib.suppress(OSError):
            for child in self.base.iterdir():
                if child.is_dir():
                    MemoryCgroup(child, self.version).remove(timeout=0)
        with contextlib.suppress(OSError):
            self.base.rmdir()


def _enable_memory(path: Path) -> None:
    control = path / "cgroup.subtree_control"
    if "memory" not in _read(control).split():
        control.write_text("+memory")


def _why(exc: OSError, own: Path) -> str:
    if exc.errno == errno.EBUSY:
        return f"cannot enable memory below {own}: it holds processes (cgroup v2 rule)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{own} is not writable ({exc.strerror})"
    return f"cannot create a cgroup under {own}: {exc.strerror or exc}"


def join_command(cgroup: Path, argv: list[str]) -> list[str]:
    """`argv` run by a shell that first moves itself into `cgroup`, then execs (same pid).

    Used instead of a preexec_fn: the controller runs gRPC threads, and a fork
    that runs Python code before exec is not safe there.
    """
    procs, where = shlex.quote(str(cgroup / "cgroup.procs")), shlex.quote(str(cgroup))
    script = (
        f"echo $$ > {procs} || {{ echo vmbox: cannot join the memory cgroup {where} >&2; "
        f'exit {JOIN_FAILED}; }}; exec "$0" "$@"'
    )
    return ["/bin/sh", "-c", script, *argv]


def is_root() -> bool:
    return os.geteuid() == 0
