"""Pure: the firewall experiment's report rows and their verdicts, from the parts' results.

Called by run.py. What is judged (a row's `ok`, which `vmbox experiment`'s exit
status follows): with `state: shared` the stream and the download survive the
kill of their replica and a 1 -> 4 -> 1 resize on their one connection; with
`state: local` the killed replica's stream breaks (the contrast that shows what
the shared table carries); on every replica count a connection the server side
opens is refused, the client's stream completes and no ACK of a connection that
never existed reaches the server; during a SYN flood every legitimate
connection succeeds, no replica holds more half-open connections than its bound
and the flood leaves no key in etcd. Stalls (against the 100 ms goal), rates,
etcd's size and the replicas' memory are shown, not judged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from vmbox.experiments.firewall.failover import Failover
from vmbox.experiments.firewall.flood import FloodRun
from vmbox.experiments.firewall.policy import PolicyCheck
from vmbox.experiments.firewall.resize import Resize
from vmbox.experiments.firewall.sessions import SessionRun
from vmbox.experiments.results import ReportRow

GOAL = 0.1  # s: the stall a failover should stay under (the design's aim)


def _ms(seconds: float | None) -> str:
    return "none seen" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:.0f} ms"


def _kib(size: float) -> str:
    return f"{size / 1024:.0f} KiB"


def stream_text(run: SessionRun) -> str:
    s = run.stream
    head = "completed" if s.completed else f"NOT completed ({s.error or 'no report'})"
    n = s.data_connections
    return (
        f"{head}, {n} data connection{'s' if n != 1 else ''}, longest stall at the server "
        f"{_ms(run.gap)} (iperf3: {_ms(s.stall)} of empty intervals), {s.retransmits} "
        "retransmits"
    )


def download_text(run: SessionRun) -> str:
    d = run.download
    head = "completed" if d.completed else f"NOT completed ({d.error or f'curl {d.exit_code}'})"
    where = {True: "; on the killed replica", False: "; not on the killed replica"}
    return (
        f"{head}, {d.num_connects} connect(s), longest stall {_ms(d.stall)}"
        f"{where.get(run.on_killed, '') if run.on_killed is not None else ''}"
    )


def killed_text(k: Failover) -> str:
    others = ", ".join(f"{v:.0f}" for r, v in sorted(k.rates.items()) if r != k.killed)
    return (
        f"killed {k.killed}, which passed {k.rates.get(k.killed, 0.0):.0f} packets/s "
        f"(the others {others})"
    )


def failover_rows(kills: Sequence[Failover]) -> list[ReportRow]:
    shared = [k for k in kills if k.run.state == "shared"]
    rows = [row for k in shared for row in _shared_kill(k, len(shared) > 1)]
    if shared:
        stalls = [k.stall for k in shared]
        under = sum(s < GOAL for s in stalls)
        rows.append(
            ReportRow(
                "state: shared: the stream's longest stall at the server over the kill",
                f"< {1000 * GOAL:.0f} ms (the goal; shown, not judged)",
                f"{', '.join(_ms(s) for s in stalls)}: {under} of {len(stalls)} under the goal",
                None,
            )
        )
    for k in (k for k in kills if k.run.state == "local"):
        rows.append(
            ReportRow(
                "state: local (the contrast): the stream after the kill of its replica",
                "breaks (not completed, or stalled to the end)",
                f"{stream_text(k.run)}; {killed_text(k)}",
                k.run.stream_broke,
            )
        )
        rows.append(
            ReportRow("state: local: the curl download", "breaks when on the killed replica",
                      download_text(k.run), None)
        )  # fmt: skip
    return rows


def _shared_kill(k: Failover, several: bool) -> list[ReportRow]:
    tag = f" (kill {k.round})" if several else ""
    return [
        ReportRow(
            f"kill -9 of the stream's replica of 3, state: shared{tag}: the iperf3 stream",
            "completes on its 1 data connection",
            f"{stream_text(k.run)}; {killed_text(k)}",
            k.run.stream_held,
        ),
        ReportRow(
            f"state: shared{tag}: the curl download",
            "completes on 1 connection",
            download_text(k.run),
            k.run.download_held,
        ),
    ]


def resize_rows(resizes: Sequence[Resize]) -> list[ReportRow]:
    rows = []
    for r in resizes:
        steps = ", ".join(
            f"{s.change}: {_ms(s.stall)} ({s.change[-1]} ready after {s.ready:.1f} s)"
            for s in r.steps
        )
        shared = r.run.state == "shared"
        rows.append(
            ReportRow(
                f"1 -> 4 -> 1 replicas under the stream, state: {r.run.state}: the stream",
                "completes on its 1 data connection" if shared else "breaks if its flow moves",
                stream_text(r.run),
                r.run.stream_held if shared else None,
            )
        )
        rows.append(
            ReportRow(f"state: {r.run.state}: the stream's stall per step", "", steps, None)
        )
        rows.append(
            ReportRow(
                f"state: {r.run.state}: the curl download over the resize",
                "completes on 1 connection" if shared else "",
                download_text(r.run),
                r.run.download_held if shared else None,
            )
        )
    return rows


def policy_rows(checks: Sequence[PolicyCheck]) -> list[ReportRow]:
    rows = []
    for c in checks:
        n, counts = c.replicas, c.counters
        replicas = f"{n} replica{'s' if n > 1 else ''}"
        opened = "connected" if c.opened.connected else f"refused (curl exit {c.opened.exit_code})"
        rows += [
            ReportRow(f"{replicas}: a connection the server side opens", "refused", opened,
                      not c.opened.connected),
            ReportRow(f"{replicas}: the client's stream (its replies must pass)", "completes",
                      stream_text_short(c), c.stream.completed),
            ReportRow(
                f"{replicas}: {c.scan.sent} ACKs of no connection (hping3 -A)",
                "0 reach the server",
                f"{c.scan.reached} reached; dropped no_connection "
                f"+{counts['dropped_no_connection']:.0f}, etcd reads +{counts['fetches']:.0f}, "
                f"reads refused +{counts['fetch_refused']:.0f}",
                c.scan.reached == 0,
            ),
        ]  # fmt: skip
    return rows


def stream_text_short(c: PolicyCheck) -> str:
    s = c.stream
    state = "completed" if s.completed else f"NOT completed ({s.error})"
    return f"{state}, {s.bits_per_second / 1e6:.1f} Mbit/s"


def flood_rows(f: FloodRun) -> list[ReportRow]:
    """What the flood must not do (judged), then what it cost (shown)."""
    r, legit = f.flood, f.legit
    most = [p.half_open_max for p in f.replicas]
    connect = statistics.median(legit.connect_ms) if legit.connect_ms else math.nan
    return [
        ReportRow(
            f"SYN flood ({r.sent:,} spoofed SYNs, 3 replicas): legitimate connections during it",
            f"all {legit.total} succeed",
            f"{legit.ok} of {legit.total} (connect median {connect:.1f} ms, max "
            f"{max(legit.connect_ms, default=math.nan):.1f} ms; made {legit.began:.1f}-"
            f"{legit.ended:.1f} s into the flood's {r.seconds:.1f} s)",
            legit.ok == legit.total,
        ),
        ReportRow(
            "SYN flood: half-open connections per replica (the most seen)",
            f"<= {f.bound:,} (max_half_open)",
            f"{', '.join(f'{m:,.0f}' for m in most)}; evicted "
            f"{', '.join(f'{p.evicted:,.0f}' for p in f.replicas)}",
            max(most, default=0.0) <= f.bound,
        ),
        ReportRow(
            "SYN flood: keys under /vmbox/<service>/keyed/ after it",
            "0 from the flood",
            f"{f.keys_after} ({f.keys_after - f.flood_keys} the legitimate client's, "
            f"{f.flood_keys} from the flood)",
            f.flood_keys == 0,
        ),
        *flood_figures(f),
    ]


def flood_figures(f: FloodRun) -> list[ReportRow]:
    """The flood's rate, etcd's size and puts and the replicas' memory: shown, not judged."""
    r = f.flood
    puts = f.etcd_after["puts"] - f.etcd_before["puts"]
    return [
        ReportRow(
            "SYN flood: the rate hping3 reached (-i u1)",
            "",
            f"{r.offered_rate:,.0f} SYNs/s offered; {r.routable:,} routable, {r.reached:,} "
            f"reached the server; the kernel dropped "
            f"{sum(p.queue_drops for p in f.replicas):,.0f} on their way to a replica",
            None,
        ),
        ReportRow(
            "SYN flood: etcd (its /metrics) and the replicas' RSS, before -> after",
            "",
            f"db {_kib(f.etcd_before['db_bytes'])} -> {_kib(f.etcd_after['db_bytes'])}, "
            f"{puts:.0f} puts in {f.etcd_seconds:.1f} s ({puts / f.etcd_seconds:.0f}/s); RSS "
            + ", ".join(f"{p.rss_before:.1f} -> {p.rss_after:.1f}" for p in f.replicas)
            + " MiB",
            None,
        ),
    ]
