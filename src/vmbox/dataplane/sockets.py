"""Binding and resolving addresses with errors a user can act on.

The UDP relay (vmbox.dataplane.udp), the echo server (vmbox.tools.echo) and
the metrics endpoint (vmbox.metrics) bind addresses the user chose; a port in
use or a privileged port must end in one line naming the cause and the fix,
so they all bind through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

Address = tuple[str, int]
RCVBUF = 4 * 1024 * 1024


class BindError(OSError):
    """An address the user chose cannot be bound; str() is one line naming cause and fix."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class AddressInUse(BindError):
    """Another socket (without SO_REUSEPORT, or another program) holds the port."""


class AddressPermissionError(BindError):
    """The process may not bind the port (e.g. below 1024 without privileges)."""


def format_address(address: tuple[str, int]) -> str:
    """host:port, with IPv6 hosts in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(exc: OSError, address: tuple[str, int], setting: str) -> OSError:
    """Turn a bind failure into a one-line error naming `setting`, the config key to change."""
    where = format_address(address)
    if exc.errno == errno.EADDRINUSE:
        return AddressInUse(
            f"{where} is already in use by another program: "
            f"choose another `{setting}` port or stop it",
            exc.errno,
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AddressPermissionError(
            f"{where}: permission denied binding this port (ports below 1024 need root "
            f"or CAP_NET_BIND_SERVICE): choose another `{setting}` port",
            exc.errno,
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return BindError(
            f"{where} is not an address of this machine: fix the `{setting}` address",
            exc.errno,
        )
    return BindError(f"cannot bind {where}: {exc.strerror or exc}", exc.errno or 0)


async def resolve(address: Address) -> tuple[socket.AddressFamily, Address]:
    """Resolve a host name once, at start, rather than per flow."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {format_address(address)}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


async def bind_udp(
    listen: Address,
    setting: str,
    *,
    reuse_port: bool = False,
    resolved: tuple[socket.AddressFamily, Address] | None = None,
) -> socket.socket:
    """A non-blocking UDP socket bound to `listen`; `setting` names the config key in errors.
    `resolved`: `resolve(listen)` done earlier, so binding takes no trip to a resolver thread."""
    family, addr = resolved or await resolve(listen)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with contextlib.suppress(OSError):
            # A bigger buffer absorbs bursts; the kernel caps it at rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setblocking(False)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise bind_error(exc, listen, setting) from None
    return sock


def bound_address(transport: asyncio.BaseTransport | None, what: str) -> Address:
    """The address a started transport is bound to (the real port when 0 was asked)."""
    if transport is None:
        raise RuntimeError(f"the {what} is not started")
    name = transport.get_extra_info("sockname")
    return (str(name[0]), int(name[1]))


def write_backlog(transport: asyncio.DatagramTransport) -> int:
    """Bytes buffered in user space (asyncio and uvloop transports both have it)."""
    return int(transport.get_write_buffer_size())  # type: ignore[attr-defined]
