"""The spec's `store:` for an external etcd (TLS, a user) and what every process makes of it.

No etcd here: validation lines, relative paths, replica flags, context records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmbox import context
from vmbox.runtime.local import LocalRuntime
from vmbox.spec import SpecError, load_spec, parse_spec
from vmbox.state.access import (
    AccessError,
    StoreSpec,
    connect_kwargs,
    from_settings,
    replica_flags,
    settings,
    with_endpoints,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def spec_with(store: Any) -> dict[str, Any]:
    return {
        "service": "web",
        "listen": "127.0.0.1:9000",
        "upstream": "127.0.0.1:9100",
        "middlebox": {"function": "ratelimit", "limit": 100},
        "store": store,
    }


def test_todays_forms_still_load() -> None:
    assert parse_spec(spec_with("managed")).store == "managed"
    for form in ("127.0.0.1:2379, 127.0.0.1:2380", ["127.0.0.1:2379", "127.0.0.1:2380"]):
        store = parse_spec(spec_with(form)).store
        assert isinstance(store, StoreSpec)
        assert store.endpoints == ("127.0.0.1:2379", "127.0.0.1:2380") and not store.tls


def test_the_full_form_round_trips_through_json() -> None:
    spec = parse_spec(
        spec_with(
            {
                "endpoints": ["https://etcd-0:2379", "https://etcd-1:2379"],
                "ca_cert": "/etc/vmbox/ca.pem",
                "cert": "/etc/vmbox/client.pem",
                "key": "/etc/vmbox/client-key.pem",
                "server_name": "etcd.local",
                "username": "vmbox",
                "password_file": "/etc/vmbox/etcd-password",
            }
        )
    )
    assert isinstance(spec.store, StoreSpec) and spec.store.tls
    assert parse_spec(spec.model_dump(mode="json")) == spec  # what replicas read from etcd


@pytest.mark.parametrize(
    ("store", "line"),
    [
        ([], "store: needs at least one etcd endpoint"),
        ("managd", "store.endpoints: endpoint 'managd': expected HOST:PORT"),
        ({"ca_cert": "/ca.pem"}, "store.endpoints: is required"),
        ({"endpoints": ["ftp://e:1"]}, "the scheme must be http:// or https://"),
        ({"endpoints": ["http://a:1", "https://b:2"]}, "mixes http:// and https://"),
        ({"endpoints": ["https://e:1"]}, "store: https endpoints need ca_cert"),
        ({"endpoints": ["http://e:1"], "ca_cert": "/c"}, "endpoints say http://"),
        ({"endpoints": ["e:1"], "ca_cert": "/c", "cert": "/x"}, "store: cert and key go together"),
        ({"endpoints": ["e:1"], "cert": "/x", "key": "/k"}, "store: cert needs ca_cert"),
        ({"endpoints": ["e:1"], "server_name": "etcd"}, "server_name needs ca_cert"),
        ({"endpoints": ["e:1"], "username": "u"}, "username needs password_file or password_env"),
        ({"endpoints": ["e:1"], "password_file": "/p"}, "password_file needs username"),
        (
            {"endpoints": ["e:1"], "username": "u", "password_file": "/p", "password_env": "P"},
            "give password_file or password_env, not both",
        ),
        ({"endpoints": ["e:1"], "username": "u", "password_env": "1X"}, "store.password_env: must"),
        ({"endpoints": ["e:1"], "bogus": 1}, "store.bogus: unknown field"),
    ],
)
def test_each_problem_is_one_line_naming_the_field(store: Any, line: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_with(store), "web.yaml")
    message = str(caught.value)
    assert message.startswith("web.yaml: store") and "\n" not in message
    assert line in message, message


def test_an_inline_password_is_refused_without_being_echoed() -> None:
    store = {"endpoints": ["e:1"], "username": "u", "password": "hunter2"}
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_with(store), "web.yaml")
    assert "store.password: never write the password in a spec" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def write_store_spec(folder: Path, store: str) -> Path:
    path = folder / "web.yaml"
    path.write_text(
        "service: web\nlisten: 127.0.0.1:9000\nupstream: 127.0.0.1:9100\n"
        f"middlebox: {{limit: 100}}\nstore:\n{store}"
    )
    return path


def test_paths_are_taken_from_the_spec_files_folder(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (tmp_path / "tls" / name).write_text(PEM)
    (tmp_path / "pw").write_text("secret\n")
    path = write_store_spec(
        tmp_path,
        "  endpoints: [https://127.0.0.1:2379]\n  ca_cert: tls/ca.pem\n"
        "  cert: tls/client.pem\n  key: tls/client-key.pem\n"
        "  username: vmbox\n  password_file: pw\n",
    )
    store = load_spec(path).store
    assert isinstance(store, StoreSpec)
    assert store.ca_cert == tmp_path / "tls" / "ca.pem"
    assert store.password_file == tmp_path / "pw"
    kwargs = connect_kwargs(store)
    assert kwargs["password"] == "secret"  # the file's newline is no part of it
    assert kwargs["user"] == "vmbox" and kwargs["key"] == tmp_path / "tls" / "client-key.pem"


@pytest.mark.parametrize(
    ("files", "line"),
    [
        ({}, "store.ca_cert: cannot read"),
        ({"ca.pem": "not a certificate"}, "store.ca_cert: "),
        ({"ca.pem": PEM, "pw": "\n"}, "store.password_file: "),
    ],
)
def test_unusable_files_are_named_when_the_spec_loads(
    tmp_path: Path, files: dict[str, str], line: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = write_store_spec(
        tmp_path,
        "  endpoints: [127.0.0.1:2379]\n  ca_cert: ca.pem\n  username: u\n  password_file: pw\n",
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: {line}"), caught.value
    assert "\n" not in str(caught.value)


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    store = from_settings(["e:1"], {"username": "u", "password_env": "VMBOX_PW"})
    monkeypatch.delenv("VMBOX_PW", raising=False)
    with pytest.raises(AccessError, match=r"password_env: \$VMBOX_PW is not set"):
        connect_kwargs(store)
    monkeypatch.setenv("VMBOX_PW", "from-env")
    assert connect_kwargs(store)["password"] == "from-env"


def test_replicas_get_flags_naming_files_never_the_password(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2")
    store = from_settings(
        ["https://127.0.0.1:2379"],
        {
            "ca_cert": "/tls/ca.pem",
            "cert": "/tls/c.pem",
            "key": "/tls/k.pem",
            "username": "vmbox",
            "password_file": str(tmp_path / "pw"),
        },
    )
    runtime = LocalRuntime("web", store.endpoints, tmp_path / "logs", access=store)
    argv = runtime.command("web-1")
    assert argv[argv.index("--etcd") + 1] == "https://127.0.0.1:2379"
    assert argv[argv.index("--etcd-ca") + 1] == "/tls/ca.pem"
    assert argv[argv.index("--etcd-password-file") + 1] == str(tmp_path / "pw")
    assert argv[argv.index("--etcd-user") + 1] == "vmbox"
    assert "hunter2" not in " ".join(argv)
    plain = LocalRuntime("web", ["e:1"], tmp_path / "logs").command("web-1")
    assert replica_flags(None) == [] and not any(a.startswith("--etcd-") for a in plain)


def test_up_records_settings_for_status_and_scale_not_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBOX_STATE_DIR", str(tmp_path))
    store = from_settings(
        ["https://127.0.0.1:2379"],
        {"ca_cert": "/tls/ca.pem", "username": "vmbox", "password_env": "VMBOX_PW"},
    )
    context.record("web", list(store.endpoints), settings=settings(store))
    name, endpoints, recorded = context.lookup_settings(None)
    assert name == "web"
    assert from_settings(endpoints, recorded) == store
    assert context.lookup("web") == ("web", ["https://127.0.0.1:2379"])


def test_up_with_etcd_keeps_the_specs_tls() -> None:
    store = from_settings(["https://a:1"], {"ca_cert": "/ca.pem"})
    moved = with_endpoints(store, ["b:2"])
    assert moved.endpoints == ("b:2",) and moved.ca_cert == Path("/ca.pem")
    with pytest.raises(AccessError, match="endpoints say http://"):
        with_endpoints(store, ["http://b:2"])


def test_metrics_host_is_loopback_unless_said() -> None:
    assert parse_spec(spec_with("managed")).metrics_host == "127.0.0.1"
    assert parse_spec(spec_with("managed") | {"metrics_host": "0.0.0.0"}).metrics_host == "0.0.0.0"
    with pytest.raises(SpecError, match="metrics_host: must be an IP address"):
        parse_spec(spec_with("managed") | {"metrics_host": ""})
