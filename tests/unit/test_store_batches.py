"""vmbox.state.store.transactions: how Store.apply splits a batch (both stores split alike)."""

from __future__ import annotations

import pytest

from vmbox.state.store import MAX_TXN_OPS, Put, StoreError, transactions


def _puts(n: int) -> list[Put]:
    return [Put(f"/p/{i}", b"v") for i in range(n)]


def test_a_batch_splits_into_transactions_of_at_most_max_txn_ops_puts_first() -> None:
    assert transactions([], []) == [([], [])]  # one empty transaction: it reads the revision
    assert [(len(p), len(d)) for p, d in transactions(_puts(MAX_TXN_OPS), [])] == [(128, 0)]
    deletes = [f"/d/{i}" for i in range(100)]
    split = transactions(_puts(200), deletes)
    assert [(len(p), len(d)) for p, d in split] == [(128, 0), (72, 56), (0, 44)]
    assert [put for p, _ in split for put in p] == _puts(200)
    assert [key for _, d in split for key in d] == deletes


def test_repeated_deletes_count_once_and_a_key_named_twice_otherwise_is_refused() -> None:
    assert transactions([], ["/a", "/b", "/a"]) == [([], ["/a", "/b"])]
    with pytest.raises(StoreError, match="names /a twice"):
        transactions([Put("/a", b"1")], ["/a"])
    with pytest.raises(StoreError, match="names /a twice"):
        transactions([Put("/a", b"1"), Put("/a", b"2")], [])
    with pytest.raises(StoreError, match="key is not provided"):
        transactions([Put("", b"1")], [])
