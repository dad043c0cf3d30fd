"""How every `vmbox` command fails: one line on stderr and an exit code, never a traceback.

`run` drives a command's coroutine on uvloop and turns the errors a user can
cause (a bad spec, an unreachable etcd, a busy port, a missing etcd binary)
into `error: ...` and exit 1 (2 for bad usage or a bad spec). Used by every
module of vmbox.cli.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from vmbox import context
from vmbox.control.controller import PermanentError
from vmbox.dataplane.sockets import BindError
from vmbox.etcdserver import EtcdNotFound, EtcdStartError
from vmbox.spec import SpecError
from vmbox.state.store import StoreError

T = TypeVar("T")
EXIT_USAGE, EXIT_FAILED = 2, 1


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop, turning user-caused errors into one line."""
    import uvloop

    try:
        return uvloop.run(coro())
    except SpecError as exc:
        fail(str(exc), EXIT_USAGE)
    except (
        StoreError,
        PermanentError,
        EtcdNotFound,
        EtcdStartError,
        context.NoContext,
        BindError,
    ) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
