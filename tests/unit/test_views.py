"""The pure part of the views: applying stored values, bad values, staleness flags."""

from __future__ import annotations

from typing import Any

import pytest

from vmbox.middlebox import StateItem, encode_int, parse_positive_int
from vmbox.state.store import StoreUnavailable
from vmbox.state.views import LocalView, PollView, StrongView, View, WatchView, make_view

LIMIT = StateItem("limit", "limit", parse_positive_int, encode_int)


def _view(changes: list[Any]) -> View:
    return View(None, "/vmbox/t/state/limit", LIMIT, 100, on_change=changes.append)


def test_apply_parses_and_reports_changes_only() -> None:
    changes: list[Any] = []
    view = _view(changes)
    view.apply(b"50", 5)
    view.apply(b"50", 6)
    assert view.value == 50 and changes == [50] and view.updates == 1


def test_older_revisions_cannot_undo_newer_ones() -> None:
    view = _view([])
    view.apply(b"50", 7)
    view.apply(b"40", 6)
    assert view.value == 50


def test_garbage_is_counted_once_and_the_last_good_value_kept() -> None:
    view = _view([])
    view.apply(b"50", 2)
    view.apply(b"abc", 3)
    view.apply(b"abc", 3)  # the same stored value seen again by another read
    assert view.value == 50 and view.bad_values == 1
    assert view.last_error is not None and "abc" in view.last_error
    view.apply(b"-1", 4)
    assert view.bad_values == 2 and view.value == 50
    view.apply(b"60", 5)
    assert view.value == 60 and view.last_error is None


def test_stale_and_fresh_flags() -> None:
    view = _view([])
    view.mark_stale(StoreUnavailable("etcd at x unavailable"))
    assert view.stale and view.last_error == "etcd at x unavailable"
    view.mark_fresh()
    assert not view.stale and view.last_error is None


@pytest.mark.parametrize(
    ("mode", "cls"),
    [("local", LocalView), ("poll", PollView), ("watch", WatchView), ("strong", StrongView)],
)
def test_make_view_maps_modes(mode: str, cls: type[View]) -> None:
    view = make_view(mode, None, "/k", LIMIT, 1, poll_interval=0.5)  # type: ignore[arg-type]
    assert type(view) is cls and view.mode == mode


def test_make_view_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="unknown consistency mode"):
        make_view("eventual", None, "/k", LIMIT, 1)  # type: ignore[arg-type]
