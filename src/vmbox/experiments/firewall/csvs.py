"""The firewall experiment's CSV files, one per part (and the stream's bytes over time).

Called by run.py with the parts' results once they are all in. Times are in
ms or s as the column says; a missing figure (no data packet seen, a replica
that did not answer) is an empty cell.

- firewall_sessions.csv: the stream and the download of each failover and
  resize run (completed, connections, longest stall at the server,
  retransmits, whether the download was on the killed replica);
- firewall_resize.csv: each resize step (the stream's stall over it, how long
  the replicas took to be ready);
- firewall_timeline.csv: the stream's bytes at the server per 0.1 s, around
  each kill (s from it) and over each resize (s from the stream's start);
- firewall_policy.csv: a row per replica count;
- firewall_flood.csv: a row per replica, the flood's figures beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from vmbox.experiments.firewall.failover import Failover
from vmbox.experiments.firewall.flood import FloodRun
from vmbox.experiments.firewall.policy import PolicyCheck
from vmbox.experiments.firewall.resize import Resize
from vmbox.experiments.firewall.sessions import SessionRun
from vmbox.experiments.results import write_csv

SESSION_COLUMNS = (
    "part",
    "state",
    "round",
    "session",
    "completed",
    "connections",
    "stall_ms",
    "kill_stall_ms",
    "capture_stall_ms",
    "empty_ms",
    "retransmits",
    "on_killed_replica",
    "error",
)
RESIZE_COLUMNS = ("state", "step", "ready_s", "stall_ms")
TIMELINE_COLUMNS = ("part", "state", "round", "t", "bytes")
POLICY_COLUMNS = (
    "replicas",
    "server_opened",
    "server_curl_exit",
    "stream_completed",
    "stream_mbps",
    "scan_sent",
    "scan_reached",
    "scan_answered",
    "dropped_no_connection",
    "dropped_not_allowed",
    "fetches",
    "fetch_refused",
)
FLOOD_COLUMNS = (
    "replica",
    "half_open_max",
    "max_half_open",
    "evicted",
    "writes",
    "queue_drops",
    "rss_before_mib",
    "rss_after_mib",
    "sent",
    "seconds",
    "offered_per_s",
    "routable",
    "reached",
    "legit",
    "legit_ok",
    "legit_connect_max_ms",
    "keys_after",
    "flood_keys",
    "etcd_db_before",
    "etcd_db_after",
    "etcd_puts",
)


def ms(seconds: float | None) -> str:
    return "" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:.0f}"


def session_rows(
    run: SessionRun, round_: int, kill_stall: float | None = None
) -> list[tuple[object, ...]]:
    """The stream's row (stall_ms: the longest gap at the server until its planned end,
    stopping for good included; kill_stall_ms: from the last packet before the kill) and
    the download's (stall_ms: labtraffic's)."""
    s, d = run.stream, run.download
    on = "" if run.on_killed is None else run.on_killed
    return [
        (run.part, run.state, round_, "stream", s.completed, s.data_connections, ms(run.gap),
         ms(kill_stall), ms(s.capture_stall), ms(s.stall), s.retransmits, "", s.error),
        (run.part, run.state, round_, "download", d.completed, d.num_connects, ms(d.stall),
         "", ms(d.stall), "", "", on, d.error),
    ]  # fmt: skip


def policy_row(c: PolicyCheck) -> tuple[object, ...]:
    n = c.counters
    return (
        c.replicas,
        c.opened.connected,
        c.opened.exit_code,
        c.stream.completed,
        f"{c.stream.bits_per_second / 1e6:.1f}",
        c.scan.sent,
        c.scan.reached,
        c.scan.answered,
        f"{n['dropped_no_connection']:.0f}",
        f"{n['dropped_not_allowed']:.0f}",
        f"{n['fetches']:.0f}",
        f"{n['fetch_refused']:.0f}",
    )


def flood_rows(f: FloodRun) -> list[tuple[object, ...]]:
    r, legit = f.flood, f.legit
    puts = f.etcd_after["puts"] - f.etcd_before["puts"]
    common = (
        r.sent,
        f"{r.seconds:.2f}",
        f"{r.offered_rate:.0f}",
        r.routable,
        r.reached,
        legit.total,
        legit.ok,
        f"{max(legit.connect_ms, default=math.nan):.1f}",
        f.keys_after,
        f.flood_keys,
        f"{f.etcd_before['db_bytes']:.0f}",
        f"{f.etcd_after['db_bytes']:.0f}",
        f"{puts:.0f}",
    )
    return [
        (p.replica, f"{p.half_open_max:.0f}", f.bound, f"{p.evicted:.0f}", f"{p.writes:.0f}",
         f"{p.queue_drops:.0f}", f"{p.rss_before:.1f}", f"{p.rss_after:.1f}", *common)
        for p in f.replicas
    ]  # fmt: skip


def write_all(
    out_dir: Path,
    kills: Sequence[Failover],
    resizes: Sequence[Resize],
    checks: Sequence[PolicyCheck],
    flooded: FloodRun,
) -> list[Path]:
    sessions = [row for k in kills for row in session_rows(k.run, k.round, k.stall)]
    sessions += [row for r in resizes for row in session_rows(r.run, 1)]
    steps = [
        (r.run.state, s.change, f"{s.ready:.2f}", ms(s.stall)) for r in resizes for s in r.steps
    ]
    timeline = [("failover", k.run.state, k.round, t, n) for k in kills for t, n in k.timeline()]
    timeline += [("resize", r.run.state, 1, t, n) for r in resizes for t, n in r.timeline()]
    return [
        write_csv(out_dir / "firewall_sessions.csv", SESSION_COLUMNS, sessions),
        write_csv(out_dir / "firewall_resize.csv", RESIZE_COLUMNS, steps),
        write_csv(out_dir / "firewall_timeline.csv", TIMELINE_COLUMNS, timeline),
        write_csv(out_dir / "firewall_policy.csv", POLICY_COLUMNS, map(policy_row, checks)),
        write_csv(out_dir / "firewall_flood.csv", FLOOD_COLUMNS, flood_rows(flooded)),
    ]
