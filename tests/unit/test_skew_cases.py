"""The skew experiments' cases at each scale: the small run keeps every case a verdict reads.

`vmbox experiment skew` (relay) and its in-path version leave the mixed case under
`even` out of the small run (nothing judges it); every judged row must still be
there, judged, and the report must not need the case left out.
"""

from __future__ import annotations

import pytest

from vmbox.experiments import skew
from vmbox.experiments.inpath import skew as inpath_skew

JUDGED = {("even", "one flow"), ("demand", "one flow"), ("demand", "mixed")}


@pytest.mark.parametrize("cases", [skew.CASES, inpath_skew.CASES], ids=["relay", "inpath"])
def test_the_small_run_keeps_every_judged_case_and_the_full_run_every_case(
    cases: dict[str, dict[str, tuple[str, ...]]],
) -> None:
    small = {(split, case) for split, names in cases["small"].items() for case in names}
    full = {(split, case) for split, names in cases["full"].items() for case in names}
    assert full == {(split, case) for split in ("even", "demand") for case in ("one flow", "mixed")}
    assert JUDGED <= small <= full
    assert small == JUDGED  # only the unjudged case is left out


def test_relay_report_judges_the_small_run_and_shows_the_unjudged_case_when_run() -> None:
    heavy = [100] * 5
    spread = {f"spread-{i + 1}": [100] * 5 for i in range(skew.SPREAD_SOURCES)}

    def runs(scale: str) -> list[skew.CaseRun]:
        out = []
        for split, names in skew.CASES[scale].items():
            for case in names:
                one = {"heavy": [25] * 5 if split == "even" else heavy}
                out.append(skew.CaseRun(split, case, one | (spread if case == "mixed" else {})))
        return out

    small = skew.report_rows(runs("small"))
    assert [row.ok for row in small] == [True, True, True]  # every row judged, and held
    full = skew.report_rows(runs("full"))
    assert [row.ok for row in full] == [True, True, None, True]  # even, mixed: unjudged


def test_inpath_report_judges_the_small_run() -> None:
    got = {
        ("even", "one flow"): {"heavy": [25] * 5},
        ("demand", "one flow"): {"heavy": [100] * 5},
        ("demand", "mixed"): {"heavy": [100] * 5, "spread-1": [100] * 5},
    }
    assert [row.ok for row in inpath_skew.report_rows(got)] == [True, True, True]
