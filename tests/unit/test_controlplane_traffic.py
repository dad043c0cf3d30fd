"""The control-plane experiment's traffic model: seeded, skewed, pinned by flow, within budget."""

from __future__ import annotations

import collections

from vmbox.experiments.controlplane.feeder import Feeder
from vmbox.experiments.controlplane.points import N_MODEL, S_MODEL, Series, point
from vmbox.experiments.controlplane.traffic import TrafficModel, fitted, pin, source_address
from vmbox.packet import Packet, Verdict


def test_the_same_seed_gives_the_same_sources_and_flows() -> None:
    assert N_MODEL.sources() == N_MODEL.sources()
    assert N_MODEL.flows(0, 16) == N_MODEL.flows(0, 16)
    other = TrafficModel(**{**N_MODEL.__dict__, "seed": 19})
    assert other.flows(0, 16) != N_MODEL.flows(0, 16)


def test_heavy_sources_offer_two_to_three_times_the_limit_and_light_ones_less() -> None:
    sources = N_MODEL.sources()
    heavy = [s for s in sources if s.heavy]
    assert [s.rate / N_MODEL.limit for s in heavy] == [3.0, 2.5, 2.0]
    assert heavy[0].flows == 1  # the one-flow heavy source
    light = [s.rate for s in sources if not s.heavy]
    assert len(light) == N_MODEL.light and max(light) <= 0.5 * N_MODEL.limit
    assert light == sorted(light, reverse=True)  # Zipf-like: the k-th lighter than the one before
    assert len({s.address for s in sources}) == len(sources)


def test_a_flow_lands_on_one_replica_and_flows_spread_over_all() -> None:
    flows = N_MODEL.flows(0, 4)
    assert all(f.replica == pin(0, f.source, f.port, 4) for f in flows)
    assert {f.replica for f in flows} == {0, 1, 2, 3}
    # A source's flows may land on several replicas: the kernel spreads flows, not sources.
    by_source = collections.defaultdict(set)
    for f in flows:
        by_source[f.source].add(f.replica)
    assert max(len(replicas) for replicas in by_source.values()) > 1
    total = sum(f.rate for f in flows)
    assert abs(total - N_MODEL.rate()) < 1e-6


def test_a_flow_is_due_at_an_even_pace_from_its_phase() -> None:
    flow = N_MODEL.flows(0, 1)[0]  # the one-flow heavy source: 300/s
    assert flow.due(100.0, 99.0) == 0
    assert flow.due(100.0, 101.0) in (300, 301)
    assert flow.at(100.0, 0) == 100.0 + flow.phase / flow.rate
    assert flow.due(100.0, flow.at(100.0, 9)) == 10


def test_fitted_keeps_the_shape_within_the_budget() -> None:
    assert fitted(N_MODEL, 10_000) == N_MODEL
    small = fitted(S_MODEL, 100.0)
    assert small.rate() <= 100.0 and small.heavy == S_MODEL.heavy and small.limit < 100
    tiny = fitted(S_MODEL, 2.5)
    assert tiny.limit == 1 and tiny.rate() <= 2.5 and tiny.light == 0 and len(tiny.heavy) == 1


def test_every_point_stays_within_its_budget() -> None:
    full: tuple[tuple[Series, tuple[int, ...]], ...] = (
        ("N", (1, 4, 16, 64, 256)),
        ("S", (1, 10, 100, 1000)),
    )
    for series, xs in full:
        for x in xs:
            p = point(series, "after", x, 2500.0)
            assert p.offered <= 2500.0 + 1e-6, (series, x)
            if series == "N":  # nearly every replica gets flows: 2x as many light sources
                reached = {f.replica for f in p.model.flows(0, x)}
                assert len(reached) >= 0.95 * x, (x, len(reached))


def test_source_addresses_skip_zero_and_broadcast_octets() -> None:
    assert source_address(0) == "10.0.1.1"
    assert source_address(253) == "10.0.1.254"
    assert source_address(254) == "10.0.2.1"


class Counter:
    """A replica stand-in: passes the first `limit` packets of each source."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: collections.Counter[str] = collections.Counter()

    def decide(self, packet: Packet, now: float) -> Verdict:
        self.seen[packet.src] += 1
        return Verdict.PASS if self.seen[packet.src] <= self.limit else Verdict.DROP


def test_the_feeder_decides_each_due_packet_once_and_counts_by_window() -> None:
    flows = N_MODEL.flows(0, 2)
    replicas = {(0, 0): Counter(10), (0, 1): Counter(10)}
    feeder = Feeder(flows, replicas, start=1000.0)
    for step in range(1, 200):  # up to 1001.99
        now = 1000.0 + step / 100
        feeder.feed(now)
    expected = sum(f.due(1000.0, now) for f in flows)
    assert feeder.fed == expected
    rows = feeder.rows()
    assert sum(offered for *_, offered, _ in rows) == expected
    heavy = [row for row in rows if row[1] == 0]
    assert {row[2] for row in heavy} == {1000, 1001}
    # Counted in the window of the moment it was decided (the last look before 1001: 1000.99).
    assert heavy[0][3] == flows[0].due(1000.0, 1000.99)
    assert heavy[0][4] == 10  # one flow, one replica: that replica's 10
