"""How a process reaches etcd: an external store's endpoints, TLS and user (StoreSpec).

vmbox.spec declares `store:` as `managed` or a StoreSpec. Every process that
connects turns its StoreSpec into connect() arguments with `connect_kwargs`:
`vmbox up` (vmbox.service), its replicas, `vmbox status` and `vmbox scale`, so
all use the same settings. The local runtime hands them to replicas as
command-line flags (`replica_flags`) and `vmbox up` records them for status
and scale (`settings`): file paths, a user name, the name of an environment
variable, never a secret, since /proc/*/cmdline is readable by every user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmbox.state.store import StoreError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# StoreSpec field -> the replica/status/scale flag that carries it, and its help.
FLAGS: tuple[tuple[str, str, str], ...] = (
    ("ca_cert", "--etcd-ca", "CA certificate (PEM) that signed etcd's; turns TLS on"),
    ("cert", "--etcd-cert", "client certificate (PEM) for mutual TLS"),
    ("key", "--etcd-key", "private key (PEM) of --etcd-cert"),
    ("server_name", "--etcd-server-name", "name to check etcd's certificate against"),
    ("username", "--etcd-user", "etcd user"),
    ("password_file", "--etcd-password-file", "file holding the user's password"),
    ("password_env", "--etcd-password-env", "environment variable holding the user's password"),
)


class AccessError(StoreError):
    """The store's TLS or auth settings cannot be used (a file unreadable, a variable unset)."""


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """'https://h:1/' -> ('https', 'h:1'); without a scheme ('', 'h:1'); checks HOST:PORT."""
    scheme, sep, rest = endpoint.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    elif scheme not in ("http", "https"):
        raise ValueError(f"endpoint {endpoint!r}: the scheme must be http:// or https://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: expected HOST:PORT (or `store: managed`)")
    return scheme, rest.rstrip("/")


class StoreSpec(BaseModel):
    """An external etcd: its endpoints and, when it wants them, TLS and a user.

    `ca_cert` turns TLS on (the CA that signed etcd's certificate); `cert` and
    `key` add a client certificate (mutual TLS); `server_name` is the name
    checked against etcd's certificate when it differs from the endpoint's.
    The password comes from a file or an environment variable, never from the
    spec itself: the spec is stored in etcd and every replica reads it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    FILES: ClassVar[tuple[str, ...]] = ("ca_cert", "cert", "key", "password_file")

    endpoints: tuple[str, ...]
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    # Declared only to refuse it with a reason, rather than as an unknown field.
    password: Annotated[None, Field(exclude=True)] = None

    @field_validator("password", mode="before")
    @classmethod
    def _no_inline_password(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "never write the password in a spec (etcd stores the spec and every replica "
                "reads it): use password_file or password_env"
            )
        return None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one etcd endpoint")
        if {"http", "https"} <= {split_endpoint(endpoint)[0] for endpoint in value}:
            raise ValueError("mixes http:// and https:// endpoints: etcd serves one or the other")
        return tuple(endpoint.strip() for endpoint in value)

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"must be the name of an environment variable, got {value!r}")
        return value

    @field_validator("username", "server_name")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StoreSpec:
        problem = self._tls_problem() or self._auth_problem()
        if problem:
            raise ValueError(problem)
        return self

    def _tls_problem(self) -> str:
        schemes = {split_endpoint(endpoint)[0] for endpoint in self.endpoints}
        if "https" in schemes and self.ca_cert is None:
            return "https endpoints need ca_cert (the CA that signed etcd's certificate)"
        if "http" in schemes and self.ca_cert is not None:
            return "ca_cert turns TLS on, but the endpoints say http://: write https://"
        if (self.cert is None) != (self.key is None):
            return "cert and key go together: mutual TLS needs both"
        if self.cert is not None and self.ca_cert is None:
            return "cert needs ca_cert: with TLS the client checks etcd's certificate too"
        if self.server_name is not None and self.ca_cert is None:
            return "server_name needs ca_cert (it is checked against etcd's certificate)"
        return ""

    def _auth_problem(self) -> str:
        sources = [s for s in ("password_file", "password_env") if getattr(self, s) is not None]
        if self.username is not None and not sources:
            return "username needs password_file or password_env"
        if len(sources) > 1:
            return "give password_file or password_env, not both"
        if sources and self.username is None:
            return f"{sources[0]} needs username"
        return ""

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    def read(self, field: str) -> bytes | None:
        """The contents of one of FILES; ValueError 'field: why' when it cannot be used."""
        path: Path | None = getattr(self, field)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{field}: cannot read {path}: {exc.strerror}") from None
        if field == "password_file" and not data.strip():
            raise ValueError(f"{field}: {path} is empty")
        if field != "password_file" and b"-----BEGIN " not in data:
            raise ValueError(f"{field}: {path} is not a PEM file")
        return data

    def check_files(self) -> None:
        """ValueError 'field: why' for the first file that cannot be read or is no PEM."""
        for field in self.FILES:
            self.read(field)

    def resolved(self, base: Path) -> StoreSpec:
        """A copy whose relative file paths are taken from `base` (the spec file's folder)."""
        update = {
            field: base.absolute() / path
            for field in self.FILES
            if (path := getattr(self, field)) is not None and not path.is_absolute()
        }
        return self.model_copy(update=update)


class ConnectKwargs(TypedDict, total=False):
    """The keyword arguments of vmbox.state.etcd.connect() that carry TLS and auth."""

    ca_cert: Path
    cert: Path
    key: Path
    tls_server_name: str
    user: str
    password: str


def connect_kwargs(store: StoreSpec) -> ConnectKwargs:
    """connect()'s TLS and auth arguments, the password read now; AccessError in one line."""
    try:
        store.check_files()
        password = _password(store)
    except ValueError as exc:
        raise AccessError(f"store.{exc}") from None
    kwargs = ConnectKwargs()
    if store.ca_cert is not None:
        kwargs["ca_cert"] = store.ca_cert
    if store.cert is not None and store.key is not None:
        kwargs["cert"], kwargs["key"] = store.cert, store.key
    if store.server_name is not None:
        kwargs["tls_server_name"] = store.server_name
    if store.username is not None and password is not None:
        kwargs["user"], kwargs["password"] = store.username, password
    return kwargs


def _password(store: StoreSpec) -> str | None:
    if store.password_env is not None:
        value = os.environ.get(store.password_env)
        if not value:
            raise ValueError(f"password_env: ${store.password_env} is not set")
        return value
    data = store.read("password_file")
    # A file written by `echo` ends in a newline that is no part of the password.
    return data.decode().rstrip("\r\n") if data is not None else None


def settings(store: StoreSpec) -> dict[str, str]:
    """The TLS and auth settings (paths and names, no secret), by StoreSpec field."""
    return {
        field: str(value) for field, _, _ in FLAGS if (value := getattr(store, field)) is not None
    }


def replica_flags(store: StoreSpec | None) -> list[str]:
    """The `vmbox replica` flags that carry `store`'s settings (never the password itself)."""
    if store is None:
        return []
    flags: list[str] = []
    for field, flag, _ in FLAGS:
        value = getattr(store, field)
        if value is not None:
            flags += [flag, str(value.absolute() if isinstance(value, Path) else value)]
    return flags


FROM_FLAGS = "etcd flags"


def from_settings(
    endpoints: Sequence[str], given: Mapping[str, str | None], source: str = FROM_FLAGS
) -> StoreSpec:
    """A StoreSpec from endpoints and settings by field name (flags, a context record)."""
    data: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        return StoreSpec.model_validate(data | {"endpoints": list(endpoints)})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"
        if source == FROM_FLAGS:  # say it in the words the user typed
            for field, flag, _ in FLAGS:
                message = re.sub(rf"\b{field}\b", flag, message)
        raise AccessError(f"{source}: {message}") from None


def with_endpoints(store: StoreSpec, endpoints: Sequence[str]) -> StoreSpec:
    """`store`'s settings with other endpoints (`vmbox up --etcd`)."""
    return from_settings(endpoints, settings(store), "--etcd with the spec's store")


def describe(store: StoreSpec) -> str:
    """'127.0.0.1:2379 (TLS with a client certificate, user vmbox)' for log lines."""
    notes = []
    if store.tls:
        notes.append("TLS with a client certificate" if store.cert else "TLS")
    if store.username:
        notes.append(f"user {store.username}")
    extra = f" ({', '.join(notes)})" if notes else ""
    return ",".join(store.endpoints) + extra
