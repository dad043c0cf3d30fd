"""vmbox.experiments.results.side_by_side: runs at once, results in order, one-line failures."""

from __future__ import annotations

import asyncio

import pytest

from vmbox.experiments.results import ExperimentError, side_by_side


def test_runs_go_at_once_and_their_results_come_in_order() -> None:
    seen: list[str] = []

    async def run(name: str, delay: float) -> str:
        seen.append(f"{name} start")
        await asyncio.sleep(delay)
        seen.append(f"{name} end")
        return name

    assert asyncio.run(side_by_side(run("a", 0.05), run("b", 0.01))) == ["a", "b"]
    assert seen == ["a start", "b start", "b end", "a end"]


def test_a_failure_cancels_the_others_and_is_raised_as_it_is() -> None:
    cancelled: list[bool] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise ExperimentError("the lab could not be built")

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(ExperimentError, match="the lab could not be built"):
        asyncio.run(side_by_side(fails(), waits()))
    assert cancelled == [True]
