"""vmbox: elastic network middleboxes whose shared state lives in etcd.

Public API re-exports only; see DESIGN.md for the architecture.
"""

from vmbox.functions import get_function, register
from vmbox.group import Group
from vmbox.middlebox import Function, Middlebox, StateItem
from vmbox.packet import Packet, Verdict

__all__ = [
    "Function",
    "Group",
    "Middlebox",
    "Packet",
    "StateItem",
    "Verdict",
    "get_function",
    "register",
]
__version__ = "0.1.0"
