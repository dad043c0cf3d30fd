"""Prometheus metrics of the controller: desired and current replicas, decisions, samples.

Started by vmbox.control.controller when `vmbox up` runs; its address is
recorded at /vmbox/<service>/controller so `vmbox status` can name it. The
collector reads the controller's state at scrape time (from the HTTP
server's thread; it only reads), so nothing is updated on the control path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmbox.control.scaling import ScaleStats
from vmbox.metrics import MetricsServer

# (gauge name, Sample field, help)
SAMPLE_GAUGES = (
    ("vmbox_replica_memory_bytes", "memory_bytes", "Working set of the replica."),
    ("vmbox_replica_memory_percent", "memory_percent", "Working set as % of the memory limit."),
    ("vmbox_replica_cpu_percent", "cpu_percent", "CPU use in % of one core."),
    ("vmbox_replica_packets_in_per_second", "pps_in", "Datagrams received from clients per s."),
    ("vmbox_replica_packets_out_per_second", "pps_out", "Datagrams passed upstream per s."),
    ("vmbox_replica_bytes_in_per_second", "bytes_in_per_s", "Bytes received from clients per s."),
    ("vmbox_replica_bytes_out_per_second", "bytes_out_per_s", "Bytes passed upstream per s."),
    ("vmbox_replica_drops_per_second", "drops_per_s", "Datagrams dropped per s."),
)


@dataclass(frozen=True, slots=True)
class ControllerView:
    """Read-only accessors the collector calls at scrape time."""

    service: str
    desired: Callable[[], int]
    running: Callable[[], int]
    restarts: Callable[[], int]
    stats: Callable[[], ScaleStats]
    spares: Callable[[], int] = lambda: 0


class _Collector(Collector):
    def __init__(self, view: ControllerView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        labels, svc = ["service"], [self.view.service]
        for name, doc, count in (
            ("vmbox_controller_desired_replicas", "Desired replica count.", self.view.desired()),
            (
                "vmbox_controller_replicas",
                "Replicas running now (not spares).",
                self.view.running(),
            ),
            ("vmbox_controller_spares", "Warm spares standing by now.", self.view.spares()),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(svc, float(count))
            yield gauge
        restarts = CounterMetricFamily(
            "vmbox_controller_restarts", "Replicas restarted after a crash.", labels=labels
        )
        restarts.add_metric(svc, float(self.view.restarts()))
        yield restarts
        stats = self.view.stats()
        decisions = CounterMetricFamily(
            "vmbox_controller_decisions", "Autoscaling decisions.", labels=["service", "direction"]
        )
        for direction, count in sorted(stats.decisions.items()):
            decisions.add_metric([self.view.service, direction], float(count))
        yield decisions
        if stats.value is not None:
            value = GaugeMetricFamily(
                "vmbox_autoscale_value", "The metric value the policy saw last.", labels=labels
            )
            value.add_metric(svc, stats.value)
            yield value
        yield from self._samples(stats)

    def _samples(self, stats: ScaleStats) -> Iterator[Metric]:
        for name, attr, doc in SAMPLE_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["service", "replica"])
            for rid, sample in sorted(stats.samples.items()):
                value = getattr(sample, attr)
                if value is not None:
                    gauge.add_metric([self.view.service, rid], float(value))
            yield gauge


class ControllerMetrics(MetricsServer):
    """The controller's /metrics endpoint."""

    def __init__(self, view: ControllerView) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(view))
        super().__init__(registry, "controller metrics port")
