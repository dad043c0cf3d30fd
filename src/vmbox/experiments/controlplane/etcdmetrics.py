"""etcd's own cost, from its Prometheus /metrics: parsed, summed over members, turned into rates.

Called by run.py before and after each point's measured windows, and by the
unit tests (parsing is pure: text in, a Snapshot out). etcd serves /metrics
on its client URL without auth. The series used, as etcd 3.4 and 3.5 export
them by default (checked against Debian's etcd 3.4.23):

- requests by kind: grpc_server_msg_received_total{grpc_method}: one per
  unary call (Put, Range, Txn, LeaseGrant...), one per keep-alive on a
  LeaseKeepAlive stream, one per create or cancel on a Watch stream;
- streams opened: grpc_server_started_total{grpc_method="Watch"} (each
  watch of this client is a stream of its own, reopened after 3 s of silence)
  and {"LeaseKeepAlive"} (one per refresh);
- watch events delivered: etcd_debugging_mvcc_events_total, which the watch
  server adds each response's events to as it sends them (10 puts under a
  prefix that 5 watchers follow count 50; grpc_server_msg_sent_total for
  Watch counts responses, which may carry several events, plus one per create);
- process_cpu_seconds_total, process_resident_memory_bytes, and
  etcd_network_client_grpc_{sent,received}_bytes_total.

Client-facing counters are summed over a cluster's members (each request
lands on one); what every member does for every write (proposals applied,
puts, the db) is taken from the busiest member.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WRITES = ("Put", "Txn", "DeleteRange")  # the requests that write keys
SCRAPE_TIMEOUT = 5.0

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_METHOD = re.compile(r'grpc_method="([^"]*)"')


@dataclass(frozen=True)
class Snapshot:
    """One look at etcd's counters (all members of a cluster together)."""

    requests: Mapping[str, float] = field(default_factory=dict)  # by gRPC method
    streams: Mapping[str, float] = field(default_factory=dict)  # calls started, by method
    events: float = 0.0  # watch events sent to watchers
    sent_bytes: float = 0.0
    received_bytes: float = 0.0
    cpu_seconds: float = 0.0
    rss_bytes: float = 0.0
    watchers: float = 0.0  # watchers open now (a gauge)
    proposals: float = 0.0  # raft proposals committed (the busiest member)
    db_bytes: float = 0.0


@dataclass(frozen=True)
class Rates:
    """What etcd did per second between two snapshots, and its memory at the second."""

    seconds: float
    requests: Mapping[str, float]
    streams: Mapping[str, float]
    events: float
    sent_bytes: float
    received_bytes: float
    cpu: float  # cores
    rss_mib: float
    watchers: float
    proposals: float
    db_mib: float

    @property
    def writes(self) -> float:
        return sum(self.requests.get(method, 0.0) for method in WRITES)

    @property
    def total(self) -> float:
        return sum(self.requests.values())

    def request(self, method: str) -> float:
        return self.requests.get(method, 0.0)


def parse(text: str) -> Snapshot:
    """One member's /metrics text as a Snapshot (series it lacks count 0)."""
    requests: dict[str, float] = {}
    streams: dict[str, float] = {}
    plain: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if name in ("grpc_server_msg_received_total", "grpc_server_started_total"):
            method = _METHOD.search(labels or "")
            if method is not None and value:
                into = requests if name == "grpc_server_msg_received_total" else streams
                into[method.group(1)] = into.get(method.group(1), 0.0) + value
        elif not labels:
            plain[name] = value
    return Snapshot(
        requests=requests,
        streams=streams,
        events=plain.get("etcd_debugging_mvcc_events_total", 0.0),
        sent_bytes=plain.get("etcd_network_client_grpc_sent_bytes_total", 0.0),
        received_bytes=plain.get("etcd_network_client_grpc_received_bytes_total", 0.0),
        cpu_seconds=plain.get("process_cpu_seconds_total", 0.0),
        rss_bytes=plain.get("process_resident_memory_bytes", 0.0),
        watchers=plain.get("etcd_debugging_mvcc_watcher_total", 0.0),
        proposals=plain.get("etcd_server_proposals_committed_total", 0.0),
        db_bytes=_first(
            plain, "etcd_mvcc_db_total_size_in_bytes", "etcd_debugging_mvcc_db_total_size_in_bytes"
        ),
    )


def _first(values: Mapping[str, float], *names: str) -> float:
    return next((values[n] for n in names if n in values), 0.0)


def _sum(maps: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for one in maps:
        for key, value in one.items():
            out[key] = out.get(key, 0.0) + value
    return out


def combine(members: list[Snapshot]) -> Snapshot:
    """A cluster's Snapshot from its members': client-facing counters summed, what each
    member repeats for every write from the busiest."""
    return Snapshot(
        requests=_sum(m.requests for m in members),
        streams=_sum(m.streams for m in members),
        events=sum(m.events for m in members),
        sent_bytes=sum(m.sent_bytes for m in members),
        received_bytes=sum(m.received_bytes for m in members),
        cpu_seconds=sum(m.cpu_seconds for m in members),
        rss_bytes=sum(m.rss_bytes for m in members),
        watchers=sum(m.watchers for m in members),
        proposals=max((m.proposals for m in members), default=0.0),
        db_bytes=max((m.db_bytes for m in members), default=0.0),
    )


def rates(before: Snapshot, after: Snapshot, seconds: float) -> Rates:
    """Per second from `before` to `after`, `seconds` apart (memory: as of `after`)."""

    def per_method(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
        return {k: (b[k] - a.get(k, 0.0)) / seconds for k in b if b[k] - a.get(k, 0.0) > 0}

    return Rates(
        seconds=seconds,
        requests=per_method(before.requests, after.requests),
        streams=per_method(before.streams, after.streams),
        events=(after.events - before.events) / seconds,
        sent_bytes=(after.sent_bytes - before.sent_bytes) / seconds,
        received_bytes=(after.received_bytes - before.received_bytes) / seconds,
        cpu=(after.cpu_seconds - before.cpu_seconds) / seconds,
        rss_mib=after.rss_bytes / 2**20,
        watchers=after.watchers,
        proposals=(after.proposals - before.proposals) / seconds,
        db_mib=after.db_bytes / 2**20,
    )


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
        body: bytes = answer.read()
    return body.decode("utf-8", errors="replace")


async def scrape(client_urls: list[str]) -> Snapshot:
    """Every member's /metrics now, combined (OSError if one does not answer)."""
    texts = await asyncio.gather(*(asyncio.to_thread(_get, f"{u}/metrics") for u in client_urls))
    return combine([parse(text) for text in texts])
