"""The control-plane experiment's points, sizes, specs and worker plans (pure).

Called by run.py (what to run, in which order, how long each part may take),
by worker.py (its plan, read back from JSON) and by the unit tests. A point
is one series (`N`: one service of N replicas; `S`: S services of 2
replicas each) at one size, in one mode: `before`, every replica watching
every other replica's demand report and resize ack (`aggregated=False`), or
`after`, through the service's aggregator (`aggregated=True`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vmbox.experiments.controlplane.traffic import TrafficModel, fitted
from vmbox.spec import Spec, parse_spec

NAME = "controlplane"
Mode = Literal["before", "after"]
Series = Literal["N", "S"]
AGGREGATED: dict[str, bool] = {"before": False, "after": True}
S_REPLICAS = 2  # replicas of each service in the S series

# A point's schedule, in seconds. The workers' replicas (and traffic) start this long
# after the workers are spawned; a worker that comes up later starts them at once (its
# feeder catches up), which only moves its readiness.
SPAWN_MARGIN = 0.3
# The measured windows begin at the first whole second at least this long after every
# replica holds its share, and after the traffic has run long enough for each source to
# be in the demand reports a window's shares are fixed from (DESIGN.md, Rate limiting:
# a report every 0.1 s, a new source's share within 85 ms).
READY_LEAD = 0.3
TRAFFIC_LEAD = 0.5
LIMIT_AFTER = 0.05  # after the measured windows: the new limit is written
RESIZE_AFTER = 0.6  # after the measured windows: one more replica of the first service
# At most this long after the last limit write the workers are stopped, whether or not
# every replica applied it: one that has not by then misses the verdict's 1 s anyway.
LIMIT_HOLD = 1.1
STOP_TIMEOUT = 10.0  # a worker that has not written its result this long after `stop` is killed
NEW_LIMIT = 1.5  # the limit change: the limit times this


@dataclass(frozen=True)
class Size:
    """What one scale runs."""

    ns: tuple[int, ...]  # N series: replicas of the one service
    ss: tuple[int, ...]  # S series: services of S_REPLICAS replicas
    n_modes: tuple[Mode, ...]
    s_modes: tuple[Mode, ...]
    members: int  # etcd members (a fresh private etcd per point; see etcd_members)
    measure: float  # seconds of measured windows (whole seconds)
    budget: float  # packets/s offered at most, all services together
    resize_span: float  # seconds a resize gets to settle
    ready_timeout: float  # seconds the replicas get to hold their shares (plus per replica)


SIZES: dict[str, Size] = {
    # Three etcd members where the machine has the cores for them, as a production store
    # runs; the before series stops where it saturates the machine (run.py).
    "full": Size((1, 4, 16, 64, 256), (1, 10, 100, 1000), ("after", "before"),
                 ("after", "before"), 3, 8.0, 2500.0, 5.0, 20.0),
    # The suite's run (about a minute): the contrast on N, the after mode on S.
    "small": Size((1, 4, 16), (1, 10), ("after", "before"), ("after",), 1, 3.0, 1500.0,
                  3.0, 12.0),
}  # fmt: skip

# The N series' service: three heavy sources (3x the limit over one flow, 2.5x over 4,
# 2x over 8) and twice as many light sources as replicas (at least 40), so nearly every
# replica sees flows (each 1-3) and writes demand reports.
N_MODEL = TrafficModel(100, ((3.0, 1), (2.5, 4), (2.0, 8)), 40, 0.5, 0.8, 3)
# Each service of the S series: one heavy source over 2 flows and a few light ones,
# made smaller as S grows so that all of them together stay within the budget.
S_MODEL = TrafficModel(100, ((2.5, 2),), 6, 0.5, 0.8, 2)


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    series: Series
    mode: Mode
    services: int
    replicas: int  # per service, before the resize
    model: TrafficModel

    @property
    def x(self) -> int:
        """The point's size on its series' axis: N, or S."""
        return self.replicas if self.series == "N" else self.services

    @property
    def total(self) -> int:
        return self.services * self.replicas

    @property
    def label(self) -> str:
        return f"{self.series}={self.x} {self.mode}"

    @property
    def aggregated(self) -> bool:
        return AGGREGATED[self.mode]

    @property
    def offered(self) -> float:
        """Packets/s offered, all services together."""
        return self.services * self.model.rate()


def points(size: Size, series: Series) -> list[Point]:
    """The series' points, smallest first, each size's modes side by side (after first),
    so both modes of a size see the machine in the same state."""
    out = []
    for x in size.ns if series == "N" else size.ss:
        for mode in size.n_modes if series == "N" else size.s_modes:
            out.append(point(series, mode, x, size.budget))
    return out


def point(series: Series, mode: Mode, x: int, budget: float) -> Point:
    if series == "N":
        model = fitted(replace(N_MODEL, light=max(40, 2 * x)), budget)
        return Point(series, mode, 1, x, model)
    return Point(series, mode, x, S_REPLICAS, fitted(S_MODEL, budget / x))


def service_name(index: int) -> str:
    return f"cp-{index}"


def replica_id(index: int) -> str:
    return f"r{index}"


def service_spec(index: int, point: Point, limit: int | None = None) -> Spec:
    """A relay service whose addresses are never bound (the replicas run headless)."""
    return parse_spec(
        {
            "service": service_name(index),
            "listen": f"127.0.0.1:{40_000 + index}",
            "upstream": f"127.0.0.1:{30_000 + index}",
            "middlebox": {
                "function": "ratelimit",
                "limit": point.model.limit if limit is None else limit,
                "window": 1,
                "split": "demand",
                "consistency": "watch",
            },
            "replicas": {"count": point.replicas, "min": 1, "max": point.replicas + 1},
        },
        f"controlplane {service_name(index)}",
    )


def new_limit(point: Point) -> int:
    return max(point.model.limit + 1, round(point.model.limit * NEW_LIMIT))


def etcd_members(size: Size, cores: int) -> int:
    """The size's etcd members, or one on fewer than 4 cores: on 2 shared cores three
    members took 0.6 of a core that the replicas needed (N=256 lost its leases)."""
    return size.members if cores >= 4 else 1


def worker_count(replicas: int, cores: int) -> int:
    """Processes to spread `replicas` over: one for one or two, else one per core (2 to 4)."""
    return 1 if replicas <= 2 else min(4, max(2, cores), replicas)


def ready_timeout(size: Size, point: Point) -> float:
    """A join of N replicas costs each O(N) member events of O(N) work, which a
    deployment spreads over N processes and the simulation puts on a few cores:
    256 took 24-37 s on 2."""
    return size.ready_timeout + min(0.1 * point.total, 40.0)


def point_budget(size: Size, point: Point) -> float:
    """Seconds a whole point may take, etcd's start and the workers' stop included."""
    return SPAWN_MARGIN + ready_timeout(size, point) + size.measure + size.resize_span + 30.0


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker process runs (written as JSON, read by worker.py)."""

    index: int
    endpoints: tuple[str, ...]
    access: dict[str, str]  # vmbox.state.access settings: the user, the password's file
    aggregated: bool
    services: int
    replicas: int  # per service, before the resize
    model: dict[str, Any]  # the TrafficModel of every service
    mine: tuple[tuple[int, int], ...]  # (service, replica) indices it runs from the start
    spare: tuple[int, int] | None  # the one it starts at the resize, if it is its
    start_at: float  # wall-clock time its replicas start (and the traffic)
    deadline: float  # wall-clock time by which it leaves whatever happens
    result: str  # where it writes its result (JSON)
    connections: int = 1  # etcd connections its replicas share
    watched: int = 0  # the service that is resized

    def traffic(self) -> TrafficModel:
        model = dict(self.model)
        model["heavy"] = tuple(tuple(pair) for pair in model["heavy"])
        return TrafficModel(**model)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> WorkerPlan:
        data = json.loads(text)
        data["endpoints"] = tuple(data["endpoints"])
        data["mine"] = tuple(tuple(pair) for pair in data["mine"])
        data["spare"] = tuple(data["spare"]) if data["spare"] is not None else None
        data["model"]["heavy"] = tuple(tuple(pair) for pair in data["model"]["heavy"])
        return cls(**data)


@dataclass(frozen=True)
class Layout:
    """Which worker runs which replicas of a point."""

    mine: list[list[tuple[int, int]]] = field(default_factory=list)
    spare_worker: int = 0

    @property
    def workers(self) -> int:
        return len(self.mine)


def layout(point: Point, workers: int) -> Layout:
    """The point's replicas dealt round robin over `workers`; the resize's replica goes to
    the worker dealt the fewest."""
    mine: list[list[tuple[int, int]]] = [[] for _ in range(workers)]
    for k, pair in enumerate((s, r) for s in range(point.services) for r in range(point.replicas)):
        mine[k % workers].append(pair)
    spare = min(range(workers), key=lambda w: (len(mine[w]), w))
    return Layout(mine, spare)


def connections(replicas: int, per: int = 64) -> int:
    """etcd connections a worker opens for `replicas` replicas: one per `per`."""
    return max(1, math.ceil(replicas / per))


def plans(
    point: Point,
    lay: Layout,
    endpoints: list[str],
    access: dict[str, str],
    start_at: float,
    deadline: float,
    out: Path,
) -> list[WorkerPlan]:
    return [
        WorkerPlan(
            index=w,
            endpoints=tuple(endpoints),
            access=access,
            aggregated=point.aggregated,
            services=point.services,
            replicas=point.replicas,
            model=asdict(point.model),
            mine=tuple(lay.mine[w]),
            spare=(0, point.replicas) if w == lay.spare_worker else None,
            start_at=start_at,
            deadline=deadline,
            result=str(out / f"worker-{w}.json"),
            connections=connections(len(lay.mine[w]) + (w == lay.spare_worker)),
        )
        for w in range(lay.workers)
    ]
