"""A lab of network namespaces (client - gateway - server, or a fleet: client - router -
N nodes - server) to run an in-path service in.

plan.py is the pure plan (names, addresses, the commands that build and remove
it); netlab.py the driver that runs them, reads a lab back from the kernel and
removes it. Used by `vmbox lab` and by the tests, experiments and demo.
"""

from vmbox.lab.netlab import down, exec_argv, fleet, routed_nodes, set_nodes, show, up
from vmbox.lab.plan import DEFAULT_PREFIX, GATEWAY_CLIENT_IF, MAX_NODES, LabError, LabPlan

__all__ = [
    "DEFAULT_PREFIX",
    "GATEWAY_CLIENT_IF",
    "MAX_NODES",
    "LabError",
    "LabPlan",
    "down",
    "exec_argv",
    "fleet",
    "routed_nodes",
    "set_nodes",
    "show",
    "up",
]
