"""A private etcd that vmbox starts itself: `from vmbox.etcdserver import ...`.

cluster.py starts, health-checks and stops one member or three (EtcdServer,
EtcdCluster); member.py is one member's process, ports, TLS, health and log.
Used by `vmbox up` (`store: managed`), the demo, the experiments, the faults,
the testbed and the test suite.
"""

from vmbox.etcdserver.cluster import EtcdCluster, EtcdServer, remove_orphaned_dirs
from vmbox.etcdserver.member import (
    EtcdNotFound,
    EtcdStartError,
    ServerTLS,
    find_etcd,
    find_etcdctl,
    free_port,
)

__all__ = [
    "EtcdCluster",
    "EtcdNotFound",
    "EtcdServer",
    "EtcdStartError",
    "ServerTLS",
    "find_etcd",
    "find_etcdctl",
    "free_port",
    "remove_orphaned_dirs",
]
