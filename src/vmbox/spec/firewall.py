"""The spec's `function: firewall` section: who may open connections, the connection
table's place, its timeouts and its bounds (vmbox.functions.firewall runs it).

```yaml
middlebox:
  - function: ratelimit          # a chain: each function in order (vmbox.chain)
    limit: 100
  - function: firewall
    allow:                       # who may open a connection; replies always pass
      - {proto: tcp, src: 198.18.0.0/24, dst: 198.19.0.0/24, dport: 80}
      - {proto: udp, dport: 53}
      - {proto: icmp}
    state: shared                # the connection table in etcd; local: this replica's only
```
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from vmbox.spec.rules import MatchSpec
from vmbox.spec.sections import SpecModel
from vmbox.spec.values import Duration

Timeout = Annotated[Duration, Field(gt=0, le=7 * 86400)]


class TimeoutsSpec(SpecModel):
    """How long a connection lives without a packet, by protocol and state (conntrack's
    names; shorter defaults for the half-open, which a SYN flood fills)."""

    tcp_syn: Timeout = 5.0
    tcp_established: Timeout = 600.0
    tcp_fin: Timeout = 30.0
    tcp_time_wait: Timeout = 10.0
    udp: Timeout = 30.0
    udp_stream: Timeout = 120.0
    icmp: Timeout = 30.0


class FirewallSpec(SpecModel):
    """A stateful firewall: connections opened as `allow` says pass both ways, nothing else."""

    function: Literal["firewall"]
    # Matches (as a rule's `match`) of the packets that may open a connection:
    # a TCP SYN, the first UDP datagram of a flow, an ICMP echo request.
    allow: tuple[MatchSpec, ...] = ()
    # shared: established connections in etcd, so any replica carries any of them;
    # local: in this replica's memory only (connections break when they move).
    state: Literal["shared", "local"] = "shared"
    timeouts: TimeoutsSpec = TimeoutsSpec()
    # Stored connections for the whole service (each replica creates at most its
    # share, max_connections / n); half-open ones per replica, and per source.
    max_connections: Annotated[int, Field(gt=0, le=10**7)] = 65536
    max_half_open: Annotated[int, Field(gt=0, le=10**6)] = 4096
    max_half_open_per_source: PositiveInt = 64
    # Connections a replica keeps in memory (least recently used go first; they
    # are in etcd) and reads of connections it has not seen, per second.
    max_entries: Annotated[int, Field(gt=0, le=10**7)] = 65536
    fetch_rate: Annotated[float, Field(gt=0, le=10**6)] = 2000.0
