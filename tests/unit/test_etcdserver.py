"""Pure helpers of vmbox.etcdserver and vmbox.state.etcd: no etcd is started here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from vmbox.etcdserver import EtcdNotFound, find_etcd, free_port
from vmbox.etcdserver import member as etcdmember
from vmbox.state.etcd import normalize_endpoint


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_etcd_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(EtcdNotFound, match="apt-get install etcd-server"):
        find_etcd()


def test_last_relevant_log_line_prefers_errors(tmp_path: Path) -> None:
    log = tmp_path / "etcd.log"
    lines = [
        {"level": "info", "msg": "starting"},
        {"level": "fatal", "msg": "listen failed", "error": "address already in use"},
        {"level": "info", "msg": "bye"},
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert etcdmember._last_relevant(log) == "listen failed: address already in use"
    log.write_text('{"level": "info", "msg": "only info"}\n')
    assert etcdmember._last_relevant(log) == "only info"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:2379", "127.0.0.1:2379"),
        ("http://127.0.0.1:2379/", "127.0.0.1:2379"),
        ("https://etcd:2379", "etcd:2379"),
    ],
)
def test_endpoints_accept_urls(given: str, expected: str) -> None:
    assert normalize_endpoint(given) == expected


def test_orphaned_private_etcd_dirs_are_removed(tmp_path: Path) -> None:
    from vmbox.etcdserver.cluster import _dir_prefix, remove_orphaned_dirs

    dead = tmp_path / (_dir_prefix(2**22 + 1) + "abc")  # above any pid_max: never alive
    mine = tmp_path / (_dir_prefix() + "def")
    for path in (dead, mine):
        (path / "data").mkdir(parents=True)
    assert remove_orphaned_dirs(str(tmp_path)) == 1
    assert not dead.exists() and mine.exists()
