"""The managed etcd's password file: 0600 from its first byte, in a 0700 folder, one per `up`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmbox import context
from vmbox.etcdserver.cluster import write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_secret_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask a caller could have
    try:
        write_secret(tmp_path / "new" / "secret", "pw")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "secret").read_text() == "pw\n"
    assert mode(tmp_path / "new" / "secret") == 0o600
    assert mode(tmp_path / "new") == 0o700
    assert (tmp_path / "new" / "secret").stat().st_uid == os.getuid()


def test_write_secret_never_follows_or_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_secret(tmp_path / "link", "pw")
    with pytest.raises(FileExistsError):
        write_secret(target, "pw")
    assert target.read_text() == "keep"


def test_password_file_is_per_process_and_drops_dead_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBOX_STATE_DIR", str(tmp_path))
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    dead = folder / "etcd-999999999.password"  # no such pid
    dead.write_text("old")
    mine = folder / f"etcd-{os.getpid()}.password"
    mine.write_text("left by a previous run of this pid")
    alive = folder / "etcd-1.password"  # pid 1 runs
    alive.write_text("another up's")
    path = context.password_file()
    assert path == mine and not path.exists()  # write_secret may create it afresh
    assert not dead.exists() and alive.exists()
    assert mode(folder) == 0o700
