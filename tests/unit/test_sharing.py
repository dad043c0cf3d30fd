"""The even split as a pure function."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmbox.state.sharing import even


def test_even_split_of_100() -> None:
    assert [even(100, ["a"], "a")] == [100]
    assert [even(100, ["a", "b"], m) for m in "ab"] == [50, 50]
    assert [even(100, ["a", "b", "c", "d"], m) for m in "abcd"] == [25, 25, 25, 25]


def test_a_replica_not_yet_registered_counts_itself_last() -> None:
    assert even(100, ["a", "b"], "c") == 33


@given(
    st.integers(1, 10_000),
    st.sets(st.text("abcdef", min_size=1, max_size=4), min_size=1, max_size=12),
)
def test_shares_always_add_up_to_the_total(total: int, members: set[str]) -> None:
    shares = [even(total, sorted(members), m) for m in members]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
