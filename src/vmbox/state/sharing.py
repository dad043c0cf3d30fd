"""Pure splits of a shared budget among the live replicas of a service.

Called by middleboxes (e.g. ratelimit) whenever the limit or the group changes.
No I/O: members in, share out.
"""

from __future__ import annotations

from collections.abc import Sequence


def even(total: int, members: Sequence[str], me: str) -> int:
    """This replica's integer share of `total` under the even split.

    Shares are whole packets and add up to exactly `total`: the first
    `total % n` replicas in sorted order get one more. A replica that does not
    yet see its own registration counts itself as one more member, placed last,
    so it never claims more than its eventual share.
    """
    ordered = sorted(set(members))
    if me not in ordered:
        ordered.append(me)
    n = len(ordered)
    base, extra = divmod(total, n)
    return base + (1 if ordered.index(me) < extra else 0)
