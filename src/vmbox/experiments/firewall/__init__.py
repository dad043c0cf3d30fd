"""`vmbox experiment firewall`: a stateful firewall's connections outlive their replica.

A lab of network namespaces built for the run (root; always removed), a
private etcd, and `function: firewall` services in the lab's gateway
(`dataplane: nfqueue`, both directions), with real clients (iperf3, curl,
hping3) and tcpdump at the server as the witness. Four parts:

1. **Failover.** Three replicas; an iperf3 TCP stream and a curl download on
one replica, which is killed with SIGKILL. `state: shared`: both go on,
each on its one connection (verdict), the stream's stall shown against the
100 ms goal; `state: local` (the contrast): the stream breaks.

2. **Resize** 1 -> 4 -> 1 replicas under a stream and a download: the stall at
each step, shared (must complete on one connection) and local.

3. **Policy on every replica count** (1, 2, 4; small: 1, 3): a connection the
server side opens is refused, the client's stream completes (its replies
pass), an ACK scan reaches the server 0 times; the firewall's drop and
read counters beside it.

4. **SYN flood** of 10^5 spoofed SYNs (small: 10^4) through three replicas as
fast as hping3 goes: legitimate connections made during it all succeed,
half-open connections stay within each replica's bound, no key in etcd
comes from the flood; etcd's db size and put rate and the replicas' RSS.

Writes firewall_sessions.csv, firewall_resize.csv, firewall_timeline.csv,
firewall_policy.csv, firewall_flood.csv and firewall.png. setup.py holds what
the parts share, sessions.py and witness.py the clients and what the server
saw, one module per part, csvs.py, verdicts.py and plot.py the outputs, run.py
the run.
"""

from vmbox.experiments.firewall.run import run
from vmbox.experiments.firewall.setup import NAME

__all__ = ["NAME", "run"]
