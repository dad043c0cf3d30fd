"""What the scaling experiment pairs with each scale-up (vmbox.experiments.scaling.record):
a started replica, or a warm spare's promotion, and never a spare's own start."""

from __future__ import annotations

from vmbox.control.events import Event
from vmbox.experiments.scaling.phases import PHASES, phase_spec
from vmbox.experiments.scaling.record import PhaseRun


def a_run() -> PhaseRun:
    plan = PHASES["small"][0]
    return PhaseRun(plan, phase_spec(plan, 20001, 20002, cgroup=False))


def test_a_promotion_is_the_new_replica_of_its_scale_up_not_the_spare_started_behind() -> None:
    run = a_run()
    up = Event(100.0, "scale-up", "1 -> 2", {"since": 99.0})
    # The spare behind is started at once; the promotion's event comes when the
    # promoted spare is a member, later, but it was decided at 100.02.
    for event in (
        up,
        Event(100.03, "start", "started spare web-3", {"replica": "web-3", "standby": True}),
        Event(100.4, "promote", "spare web-2 promoted", {"replica": "web-2", "decided_at": 100.02}),
    ):
        run.note(event)
    run.first_pass = {"web-2": [100.6], "web-3": [100.1]}
    [(decision, rid, reaction)] = run.reactions()
    assert decision is up and rid == "web-2"
    assert reaction is not None and abs(reaction - 1.6) < 1e-9  # from the crossing, 99.0


def test_without_spares_the_started_replica_is_paired_as_before() -> None:
    run = a_run()
    for event in (
        Event(10.0, "scale-up", "1 -> 2", {"since": 9.5}),
        Event(10.1, "start", "started replica web-2", {"replica": "web-2", "standby": False}),
        Event(20.0, "scale-up", "2 -> 3", {}),
        Event(20.1, "start", "started replica web-3", {"replica": "web-3"}),
    ):
        run.note(event)
    run.first_pass = {"web-2": [11.5]}
    assert [(rid, r) for _, rid, r in run.reactions()] == [("web-2", 2.0), ("web-3", None)]


def test_a_spare_started_just_after_a_scale_up_is_not_its_new_replica() -> None:
    run = a_run()
    for event in (
        Event(50.0, "scale-up", "2 -> 3", {"since": 49.0}),
        Event(50.01, "start", "started spare web-3", {"replica": "web-3", "standby": True}),
        Event(50.02, "start", "started replica web-4", {"replica": "web-4", "standby": False}),
    ):
        run.note(event)
    run.first_pass = {"web-3": [50.5], "web-4": [51.0]}
    assert [(rid, r) for _, rid, r in run.reactions()] == [("web-4", 2.0)]


def test_an_id_that_comes_back_is_paired_with_its_new_process() -> None:
    run = a_run()
    # web-2 starts, serves, is drained away, and comes back for a later scale-up.
    for event in (
        Event(10.0, "scale-up", "1 -> 2", {"since": 9.5}),
        Event(10.1, "start", "started replica web-2", {"replica": "web-2"}),
        Event(20.0, "scale-down", "2 -> 1", {}),
        Event(30.0, "scale-up", "1 -> 2", {"since": 29.8}),
        Event(30.1, "start", "started replica web-2", {"replica": "web-2"}),
    ):
        run.note(event)
    run.passed("web-2", 501, 11.2)
    run.passed("web-2", 501, 12.0)  # the same process: not a new first pass
    run.passed("web-2", 777, 31.0)
    assert run.first_pass == {"web-2": [11.2, 31.0]}
    reactions = [(rid, None if x is None else round(x, 6)) for _, rid, x in run.reactions()]
    assert reactions == [("web-2", 1.7), ("web-2", 1.2)]
