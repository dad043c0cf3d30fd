"""What every in-path experiment starts from: a lab of its own, removed whatever happens.

Called by the modules of vmbox.experiments.inpath. A machine that cannot build
a lab (no root, a missing tool) ends the experiment in one line
(ExperimentError), not a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vmbox.experiments.results import ExperimentError
from vmbox.lab import LabError, LabPlan
from vmbox.labclients import lab_for, require_inpath, unique_prefix


@contextmanager
def experiment_lab(name: str, clients: int, tag: str = "") -> Iterator[LabPlan]:
    """A lab named after the experiment and this process, with `clients` client addresses;
    `tag` tells apart the labs of one experiment that runs several at once.

    Services whose replicas bind queues in it must stop inside the block: a
    bound queue keeps its namespace alive after the lab is removed."""
    try:
        require_inpath(f"vmbox experiment {name} --dataplane nfqueue")
        with lab_for(unique_prefix(f"vx{name[:4]}{tag}"), clients) as plan:
            yield plan
    except LabError as exc:  # no root, a missing tool, a lab that could not be built
        raise ExperimentError(str(exc)) from None
