"""`vmbox experiment scaling`: the published autoscaling figure, redone, and scaling down too.

Listed in the experiment registry (vmbox.experiments). Two phases, each a
fresh service on a private etcd, its controller run in this process so every
sample the autoscaler saw is recorded:

- memory: replicas with a 70 MiB memory limit (a cgroup's, when run as root),
  no load at first, then a rising rate of new flows from many sources (each
  one makes a replica open an upstream flow, which costs memory until it idles
  out); a new replica whenever the replicas' memory reaches 60% of the limit.
  Then the load stops and the run watches whether memory, and the replica
  count, come back down.
- pps: steps of packet rate (one source, 64 flows, a limit of 100/s) scale the
  service up on packets per second and, once the load stops, down to min; the
  server's received rate is recorded every second to show the limit held. It
  runs twice, without and with a warm spare (pps-warm), for the reaction times;
  at small scale the two side by side, paired (phases.SIDE_BY_SIDE).

Writes scaling_samples.csv (one row per replica per sample), scaling_events.csv
(decisions, with the reaction time from the first sample over the threshold to
the new replica passing traffic) and scaling.png.

phases.py holds the phases' plans and specs, record.py what a phase records,
run.py runs them, summary.py turns them into tables, CSV files and verdicts,
plot.py draws scaling.png.
"""

from vmbox.experiments.scaling.run import NAME, run

__all__ = ["NAME", "run"]
