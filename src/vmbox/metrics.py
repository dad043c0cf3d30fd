"""Prometheus exposition of a replica's traffic, and the client side that reads it.

vmbox.replica builds a `ReplicaMetrics` over its relay's `Counters` and its
middlebox gauges, serves it on /metrics and records the bound address in its
membership info. `vmbox status` and the live views (vmbox.control.status)
`scrape` each replica twice and turn the difference into per-second rates.

Metrics live in a registry of their own (not prometheus_client's global one),
so several replicas or tests in one process never collide. The collector reads
the counters at scrape time, so the packet path pays nothing for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from vmbox.dataplane.counters import Counters
from vmbox.dataplane.sockets import bind_error

# (metric name without _total, Counters field, help)
COUNTERS = (
    ("vmbox_packets_received", "received", "Datagrams received from clients."),
    ("vmbox_packets_passed", "passed", "Datagrams the middlebox passed upstream."),
    ("vmbox_packets_dropped", "dropped", "Datagrams the middlebox dropped."),
    ("vmbox_bytes_received", "bytes_received", "Bytes received from clients."),
    ("vmbox_bytes_passed", "bytes_passed", "Bytes passed upstream."),
    ("vmbox_replies", "replies", "Datagrams relayed back from the upstream."),
    ("vmbox_upstream_errors", "upstream_errors", "Errors talking to the upstream."),
    ("vmbox_barrier_errors", "barrier_errors", "Strong-mode store reads that failed."),
    ("vmbox_queue_drops", "queue_drops", "Datagrams dropped because a queue was full."),
    ("vmbox_flows_expired", "flows_expired", "Upstream flows closed after idling."),
    ("vmbox_packets_malformed", "malformed", "Packets that did not parse (dropped)."),
    ("vmbox_queue_socket_errors", "socket_errors", "Read errors on the netfilter queue socket."),
    (
        "vmbox_kernel_queue_drops",
        "kernel_queue_drops",
        "Packets the kernel dropped because this replica's netfilter queue was full.",
    ),
    (
        "vmbox_kernel_socket_drops",
        "kernel_socket_drops",
        "Packets the kernel could not deliver to this replica's queue socket.",
    ),
)
LABELS = ("service", "replica")
MAX_RESPONSE = 8 * 1024 * 1024  # a scrape larger than this is not a vmbox replica


class ScrapeError(Exception):
    """A replica's /metrics could not be read; str() is one line."""


RuleCounters = Callable[[], Mapping[str, Mapping[str, int]]]  # rule -> verdict -> packets
RULE_VERDICTS = ("passed", "dropped", "shadow_dropped")
# function -> verdict (pass, drop, held) -> packets: each function of a chain (vmbox.chain).
FunctionVerdicts = Callable[[], Mapping[str, Mapping[str, int]]]


class _ReplicaCollector(Collector):
    def __init__(
        self,
        labels: list[str],
        counters: Counters,
        gauges: Callable[[], Mapping[str, float]],
        rules: RuleCounters | None = None,
        functions: FunctionVerdicts | None = None,
    ) -> None:
        self.labels = labels
        self.counters = counters
        self.gauges = gauges
        self.rules = rules
        self.functions = functions

    def collect(self) -> Iterator[Metric]:
        for name, attr, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.labels, float(getattr(self.counters, attr)))
            yield family
        flows = GaugeMetricFamily("vmbox_flows", "Active upstream flows.", labels=LABELS)
        flows.add_metric(self.labels, float(self.counters.flows))
        yield flows
        for key, value in sorted(self.gauges().items()):
            gauge = GaugeMetricFamily(f"vmbox_{key}", f"Middlebox gauge {key}.", labels=LABELS)
            gauge.add_metric(self.labels, float(value))
            yield gauge
        yield from self._rule_families()
        yield from self._function_families()

    def _function_families(self) -> Iterator[Metric]:
        """Per-function verdicts of a chain: vmbox_function_packets_total{function,verdict}."""
        counts = self.functions() if self.functions is not None else {}
        if not counts:
            return
        family = CounterMetricFamily(
            "vmbox_function_packets",
            "Packets each function of the chain decided (held: waited for its state first).",
            labels=(*LABELS, "function", "verdict"),
        )
        for function, by_verdict in counts.items():
            for verdict, count in by_verdict.items():
                family.add_metric([*self.labels, function, verdict], float(count))
        yield family

    def _rule_families(self) -> Iterator[Metric]:
        """Per-rule counts (vmbox.functions.rules), when the middlebox has rules."""
        counts = self.rules() if self.rules is not None else {}
        if not counts:
            return
        packets = CounterMetricFamily(
            "vmbox_rule_packets",
            "Packets each rule decided, by verdict (shadow_dropped: a shadow rule would drop).",
            labels=(*LABELS, "rule", "verdict"),
        )
        matched = CounterMetricFamily(
            "vmbox_rule_matched", "Packets each rule matched.", labels=(*LABELS, "rule")
        )
        for rule, by_verdict in counts.items():
            matched.add_metric([*self.labels, rule], float(by_verdict["matched"]))
            for verdict in RULE_VERDICTS:
                packets.add_metric([*self.labels, rule, verdict], float(by_verdict[verdict]))
        yield packets
        yield matched


class MetricsServer:
    """Serves one registry on /metrics from a thread (replicas and the controller use it)."""

    def __init__(self, registry: CollectorRegistry, what: str = "metrics port") -> None:
        self.registry = registry
        self.what = what
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve /metrics on host:port; returns the bound port. A busy port raises one line."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise bind_error(exc, (host, port), self.what) from None
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving (blocks up to the server's 0.5 s poll interval)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


class ReplicaMetrics(MetricsServer):
    """The /metrics endpoint of one replica.

    `gauges`, `rules` (per-rule counts, vmbox_rule_packets_total{rule,verdict})
    and `functions` (a chain's per-function verdicts) are called from the HTTP
    server's thread at scrape time: they must only read (the middlebox's
    gauges() and rule_counters() do).
    """

    def __init__(
        self,
        service: str,
        replica: str,
        counters: Counters,
        gauges: Callable[[], Mapping[str, float]],
        rules: RuleCounters | None = None,
        functions: FunctionVerdicts | None = None,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ReplicaCollector([service, replica], counters, gauges, rules, functions))
        super().__init__(registry)


# Families whose label sets a reader needs apart: also kept as name/label/label
# (e.g. 'vmbox_function_packets_total/firewall/drop'), beside the sum.
APART = {"vmbox_function_packets_total": ("function", "verdict")}


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value summed over label sets (e.g. 'vmbox_packets_received_total');
    the families in APART also by their labels ('vmbox_function_packets_total/firewall/drop')."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
            labels = APART.get(sample.name)
            if labels:
                name = "/".join((sample.name, *(sample.labels.get(label, "") for label in labels)))
                values[name] = values.get(name, 0.0) + float(sample.value)
    return values


def _split(address: str) -> tuple[str, int]:
    address = address.removeprefix("http://").split("/", 1)[0]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ScrapeError(f"metrics address {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def scrape(address: str, timeout: float = 1.0) -> dict[str, float]:
    """GET http://address/metrics and parse it; raises ScrapeError (one line) on any failure.

    Raising rather than returning {} lets callers tell "no traffic" from
    "unreachable"; `vmbox status` shows the error in the replica's row.
    """
    host, port = _split(address)
    try:
        body = await asyncio.wait_for(_get(host, port, "/metrics"), timeout)
    except TimeoutError:
        raise ScrapeError(f"{address}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise ScrapeError(f"{address}: {exc.strerror or exc}") from None
    try:
        return parse_metrics(body.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise ScrapeError(f"{address}: not Prometheus text: {exc}") from None


async def _get(host: str, port: int, path: str) -> bytes:
    """A minimal HTTP/1.0 GET: the server closes the connection after the body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode("ascii"))
        await writer.drain()
        response = await reader.read(MAX_RESPONSE)
        while chunk := await reader.read(MAX_RESPONSE):
            if len(response) + len(chunk) > MAX_RESPONSE:
                raise ScrapeError(f"{host}:{port}: response larger than {MAX_RESPONSE} bytes")
            response += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in f"{status} ":
        raise ScrapeError(f"{host}:{port}{path}: HTTP status {status!r}")
    return body
