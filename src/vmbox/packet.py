"""Packet and Verdict: the values that cross between a data-plane driver and a middlebox.

Drivers build a `Packet` from each datagram and ask the middlebox for a `Verdict`.
Nothing here does I/O, so middleboxes are testable without sockets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Packet:
    """One datagram as a middlebox sees it: who sent it and how big it is."""

    src: str
    sport: int
    size: int


class Verdict(enum.Enum):
    """What the driver does with a packet."""

    PASS = "pass"
    DROP = "drop"
