"""Group: the live replicas of a service as one replica sees them.

A pure value shared by the layers that divide a budget (vmbox.sharing, the
middleboxes in vmbox.functions) and the ones that observe the membership
(vmbox.state.epoch, the resize guard, builds it; vmbox.replica hands it over).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Group:
    """The live replicas of a service as one replica sees them."""

    members: tuple[str, ...]
    me: str
    # The group before the latest change, while not every live member has
    # acknowledged the change (the resize guard, vmbox.state.epoch): shares are
    # then the smaller of the old and the new split. None once all agree.
    previous: tuple[str, ...] | None = None

    @property
    def size(self) -> int:
        """Live replicas, counting this one even before its registration is seen."""
        return len(self.members) + (0 if self.me in self.members else 1)
