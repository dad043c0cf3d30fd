"""`vmbox experiment controlplane`: how etcd's cost grows with replicas (N) and services (S).

Many replicas of a rate-limiting service (`split: demand`), simulated: each
is the real replica (vmbox.replica.Replica, headless: membership lease and
keep-alive, views, resize guard acks, demand reports and health probe as in
production, no sockets), a few worker processes run them all against a
private etcd started for each point, and feed them a seeded skewed traffic
(heavy sources at 2-3x the per-source limit, one of them on a single flow;
many light ones; each flow pinned to one replica by a hash, as the kernel
spreads flows). Two series: N, one service of N = 1, 4, 16, 64, 256
replicas (small: 1, 4, 16); and S, S = 1, 10, 100, 1000 services of 2
replicas each (small: 1, 10). Each in two modes: `before`, every replica
watching every other replica's demand report and resize ack (N^2 watch
events), and `after`, through the service's elected aggregator (small:
`before` on the N series only). A series stops where `before` saturates
the machine or a point breaks (its replicas cannot all hold their shares in
time), and says so.

Per point, over a few seconds of whole windows: etcd's requests/s by kind,
writes/s, watch events/s delivered, CPU, RSS and bytes on the wire (its own
/metrics); the workers' CPU (is the simulation the bottleneck?); how long a
new limit takes to reach every replica; how long one more replica takes to
settle (every resize guard down); and whether each source's limit held,
summed over the replicas as a server counts it. Each cost's growth is
fitted on log-log axes (order N, N^2 or the slope).

Verdicts, on `after`: writes/s and watch events/s grow at most linearly in
N and in S; a new limit reaches every replica within 1 s; the per-source
limit holds within 5%; a one-flow heavy source gets close to its limit.

Writes controlplane.csv (a row per point and mode, each cost's order beside
it), controlplane_fits.csv and controlplane.png. traffic.py is the traffic
model, points.py the points and the workers' plans, worker.py (with
feeder.py and observe.py) a worker process, workers.py their lifetimes,
etcdmetrics.py etcd's /metrics, fit.py the growth fit, record.py what a
point measured, run.py the run, costs.py, summary.py, csvs.py, plot.py and
verdicts.py the outputs.
"""

from vmbox.experiments.controlplane.points import NAME
from vmbox.experiments.controlplane.run import run

__all__ = ["NAME", "run"]
