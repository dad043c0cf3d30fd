"""vmbox: elastic network middleboxes whose shared state lives in etcd.

Public API re-exports only; see DESIGN.md for the architecture.
"""

from vmbox.middlebox import Group, Middlebox, StateItem, get_function, register
from vmbox.packet import Packet, Verdict

__all__ = [
    "Group",
    "Middlebox",
    "Packet",
    "StateItem",
    "Verdict",
    "get_function",
    "register",
]
__version__ = "0.1.0"
