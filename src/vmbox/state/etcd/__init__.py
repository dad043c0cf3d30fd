"""EtcdStore: the Store protocol over etcd v3, and `connect()`.

The only package that imports the etcd client (etcd3aio) or grpc. Replicas, the
controller and the CLI call `connect()` and then talk to the returned store
through the Store protocol of vmbox.state.store. Every call carries a timeout
and every client error becomes StoreUnavailable (etcd unreachable, timed out,
or without quorum) or StoreError (anything else), each with one readable line;
a TLS handshake that fails (wrong CA, no client certificate) fails at once.

Callers import from here; the modules are the package's own:
connection.py (endpoints, TLS files, `connect()` and its first read),
etcdstore.py (EtcdStore: reads, writes, leases, logins),
watch.py (prefix watches and their resumes, etcd3aio's reconnects counted),
errors.py (a client failure in a few words; Unreachable).
"""

from __future__ import annotations

import os

# gRPC's C core logs each failed TLS handshake to stderr, three lines several
# times a second; vmbox says what failed in one line instead. It reads this
# when first imported, so it is set before; an operator's own setting wins.
# Every module of this package imports grpc after this line has run: Python runs
# a package's __init__ before any of its modules.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from vmbox.state.etcd.connection import connect, normalize_endpoint
from vmbox.state.etcd.errors import Unreachable
from vmbox.state.etcd.etcdstore import DEFAULT_OP_TIMEOUT, EtcdStore
from vmbox.state.etcd.watch import WATCH_REOPEN

__all__ = [
    "DEFAULT_OP_TIMEOUT",
    "WATCH_REOPEN",
    "EtcdStore",
    "Unreachable",
    "connect",
    "normalize_endpoint",
]
