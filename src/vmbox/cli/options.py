"""Options the `vmbox` commands share: etcd endpoints, addresses, the store's TLS and auth.

Used by vmbox.cli.main (status, scale, up, echo, load, replica).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from vmbox import context
from vmbox.spec import parse_address
from vmbox.state import access


def etcd_endpoints(value: str | None) -> list[str] | None:
    return context.parse_endpoints(value) if value else None


def parse_address_option(value: str, name: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


ETCD_HELP = "etcd endpoints HOST:PORT[,...]; default: the one `vmbox up` recorded"


def access_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --etcd-ca, --etcd-cert, ... (vmbox.state.access.FLAGS); the command gets `settings`.

    Each names a file or a variable, never a secret: a command line is public.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        settings = {field: kwargs.pop(f"etcd_{field}") for field, _, _ in access.FLAGS}
        command(*args, settings=settings, **kwargs)

    for field, flag, help_text in reversed(access.FLAGS):
        wrapper = click.option(flag, f"etcd_{field}", metavar="TEXT", help=help_text)(wrapper)
    return wrapper
