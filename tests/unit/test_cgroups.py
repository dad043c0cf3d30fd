"""Memory cgroup discovery and accounting (vmbox.runtime.cgroups) against a fake /proc and /sys.

Each test builds the files the kernel would show under a temporary root, so the
parsing and path logic run without root and without a cgroupfs; the real
cgroupfs is exercised by tests/integration/test_cgroups.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmbox.runtime.cgroups import (
    JOIN_FAILED,
    CgroupUnavailable,
    MemoryCgroup,
    ReplicaCgroups,
    find_hierarchy,
    join_command,
    parse_mountinfo,
    parse_proc_cgroup,
)

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n"
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_root(tmp_path: Path, mounts: str, own: str) -> Path:
    write(tmp_path / "proc/self/mountinfo", mounts)
    write(tmp_path / "proc/self/cgroup", own)
    return tmp_path


def hybrid(tmp_path: Path) -> Path:
    root = fake_root(tmp_path, HYBRID_MOUNTS, HYBRID_SELF)
    write(root / "sys/fs/cgroup/unified/cgroup.controllers", "")  # v2 without memory
    (root / "sys/fs/cgroup/memory/process_api/abc").mkdir(parents=True)
    return root


def pure_v2(tmp_path: Path, own_controllers: str = "cpu memory pids") -> Path:
    root = fake_root(tmp_path, V2_MOUNTS, "0::/user.slice/session-1.scope\n")
    write(root / "sys/fs/cgroup/cgroup.controllers", "cpu io memory pids")
    own = root / "sys/fs/cgroup/user.slice/session-1.scope"
    write(own / "cgroup.controllers", own_controllers)
    write(own / "cgroup.subtree_control", "")
    write(own / "vmbox-web/cgroup.subtree_control", "")  # the kernel makes it on mkdir
    return root


def test_mountinfo_lists_cgroup_mounts_with_their_controllers() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTS + r"50 31 0:40 /x /mnt/with\040space rw - cgroup2 c rw")
    assert [m.point for m in mounts] == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
        "/mnt/with space",
    ]
    assert "memory" in mounts[1].options and mounts[1].fstype == "cgroup"
    assert mounts[3].root == "/x"


def test_proc_cgroup_maps_each_controller_and_the_v2_line() -> None:
    paths = parse_proc_cgroup(HYBRID_SELF)
    assert paths["memory"] == "/process_api/abc"
    assert paths["cpu"] == paths["cpuacct"] == paths[""] == "/"


def test_hybrid_uses_v1_when_v2_has_no_memory_controller(tmp_path: Path) -> None:
    root = hybrid(tmp_path)
    found = find_hierarchy(root)
    assert found.version == 1
    assert found.own == root / "sys/fs/cgroup/memory/process_api/abc"


def test_pure_v2_with_memory_is_used(tmp_path: Path) -> None:
    root = pure_v2(tmp_path)
    found = find_hierarchy(root)
    assert found.version == 2
    assert found.own == root / "sys/fs/cgroup/user.slice/session-1.scope"


def test_a_mount_of_a_subtree_maps_paths_below_its_root(tmp_path: Path) -> None:
    # A container without a cgroup namespace: the mount shows /docker/c1 only.
    mounts = "29 23 0:26 /docker/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    root = fake_root(tmp_path, mounts, "0::/docker/c1/app\n")
    write(root / "sys/fs/cgroup/cgroup.controllers", "memory")
    (root / "sys/fs/cgroup/app").mkdir()
    assert find_hierarchy(root).own == root / "sys/fs/cgroup/app"


@pytest.mark.parametrize(
    ("mounts", "own", "reason"),
    [
        ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n", "0::/\n", "no memory cgroup"),
        (
            "29 23 0:26 /docker/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "0::/elsewhere\n",
            "not visible",
        ),
    ],
)
def test_unusable_setups_say_why_in_one_line(
    tmp_path: Path, mounts: str, own: str, reason: str
) -> None:
    root = fake_root(tmp_path, mounts, own)
    write(root / "sys/fs/cgroup/cgroup.controllers", "memory")
    with pytest.raises(CgroupUnavailable, match=reason) as info:
        find_hierarchy(root)
    assert "\n" not in str(info.value)


def test_v1_working_set_is_usage_minus_inactive_file(tmp_path: Path) -> None:
    cgroup = MemoryCgroup(tmp_path, 1)
    write(tmp_path / "memory.usage_in_bytes", "10000000\n")
    write(tmp_path / "memory.stat", "cache 5\ninactive_file 7\ntotal_inactive_file 3000000\n")
    write(tmp_path / "memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroup.working_set() == 7000000
    assert cgroup.limit() is None  # v1's "unlimited"
    assert cgroup.oom_kills() == 2
    assert cgroup.source == "cgroup v1"


def test_v2_working_set_limit_and_oom_kills(tmp_path: Path) -> None:
    cgroup = MemoryCgroup(tmp_path, 2)
    write(tmp_path / "memory.current", "4096\n")
    write(tmp_path / "memory.stat", "anon 100\ninactive_file 8192\n")
    write(tmp_path / "memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroup.working_set() == 0  # never negative
    assert cgroup.oom_kills() == 1
    write(tmp_path / "memory.max", "max\n")
    assert cgroup.limit() is None
    cgroup.set_limit(73400320)
    assert cgroup.limit() == 73400320


def test_oom_kills_are_zero_when_the_kernel_does_not_say(tmp_path: Path) -> None:
    assert MemoryCgroup(tmp_path, 2).oom_kills() == 0


def test_v1_replica_cgroups_are_made_under_our_own(tmp_path: Path) -> None:
    root = hybrid(tmp_path)
    cgroups = ReplicaCgroups("web", 73400320, root=root)
    cgroup = cgroups.create("web-1")
    assert cgroup.path == root / "sys/fs/cgroup/memory/process_api/abc/vmbox-web/web-1"
    limit = cgroup.path / "memory.limit_in_bytes"
    assert limit.read_text() == "73400320"
    assert not cgroup.remove()  # not empty
    limit.unlink()  # a real cgroup's files go with rmdir; a plain directory's do not
    assert cgroup.remove() and not cgroup.path.exists()
    cgroups.sweep()
    assert not cgroups.base.exists()


def test_v2_enables_the_memory_controller_on_the_way_down(tmp_path: Path) -> None:
    root = pure_v2(tmp_path)
    cgroups = ReplicaCgroups("web", 73400320, root=root)
    own = find_hierarchy(root).own
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    assert (own / "vmbox-web/cgroup.subtree_control").read_text() == "+memory"
    assert (cgroups.create("web-1").path / "memory.max").read_text() == "73400320"


def test_v2_without_memory_delegated_to_us_falls_back(tmp_path: Path) -> None:
    root = pure_v2(tmp_path, own_controllers="cpu pids")
    with pytest.raises(CgroupUnavailable, match="not delegated"):
        ReplicaCgroups("web", 73400320, root=root)


def test_an_adopted_replica_keeps_its_cgroup(tmp_path: Path) -> None:
    root = hybrid(tmp_path)
    cgroups = ReplicaCgroups("web", 73400320, root=root)
    write(root / "proc/4242/cgroup", "4:memory:/process_api/abc/vmbox-web/web-2\n")
    write(root / "proc/4343/cgroup", "4:memory:/process_api/abc\n")
    found = cgroups.of_pid("web-2", 4242)
    assert found is not None and found.path == cgroups.path("web-2")
    assert cgroups.of_pid("web-2", 4343) is None  # not in one of ours
    assert cgroups.of_pid("web-3", 4242) is None  # another replica's
    assert cgroups.of_pid("web-2", 999999) is None  # gone


def test_sweep_leaves_busy_cgroups(tmp_path: Path) -> None:
    root = hybrid(tmp_path)
    cgroups = ReplicaCgroups("web", 73400320, root=root)
    (cgroups.create("web-1").path / "memory.limit_in_bytes").unlink()
    busy = cgroups.create("web-2")  # the limit file left inside stands in for a process
    cgroups.sweep()
    assert not cgroups.path("web-1").exists() and busy.path.exists()


def test_join_command_keeps_the_pid_across_exec(tmp_path: Path) -> None:
    argv = join_command(tmp_path, ["sh", "-c", "echo $$", "ignored"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (tmp_path / "cgroup.procs").read_text().strip()


def test_join_command_fails_with_one_line_when_the_cgroup_is_gone(tmp_path: Path) -> None:
    done = subprocess.run(join_command(tmp_path / "gone", ["true"]), capture_output=True, text=True)
    assert done.returncode == JOIN_FAILED
    assert done.stderr.strip().splitlines()[-1].startswith("vmbox: cannot join the memory cgroup")
    assert os.path.basename(str(tmp_path / "gone")) in done.stderr


def test_probe_moves_a_shell_and_reports_a_refusal(tmp_path: Path) -> None:
    ReplicaCgroups("web", 73400320, root=hybrid(tmp_path / "ok")).probe()  # a file takes the pid
    cgroups = ReplicaCgroups("web", 73400320, root=hybrid(tmp_path / "refused"))
    (cgroups.path(f".probe-{os.getpid()}") / "cgroup.procs").mkdir(parents=True)
    with pytest.raises(CgroupUnavailable, match="cannot move a process into") as info:
        cgroups.probe()
    assert "\n" not in str(info.value)
