"""What every experiment's picture shares: matplotlib's Agg backend, imported late, and saving.

Each experiment draws its own PNG (correctness_png in correctness.py, and so
on) once its runs are over, with `pyplot()` and `save()`. matplotlib is
imported only then (and never with a display), so importing the experiments,
and `vmbox --help`, stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class _Figure(Protocol):
    def savefig(self, fname: Path, **kwargs: Any) -> None: ...


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(plt: Any, fig: _Figure, path: Path) -> Path:
    """Write the figure as a PNG (making its folder) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
