"""Keyed tables as pure logic (vmbox.keyed): each invariant of its docstring, by name.

No driver and no clock: `now` is passed in, reads and writes are reported back
by hand (`loaded`, `failed`, `written`), as vmbox.state.keyedsync would.
"""

from __future__ import annotations

import random

from vmbox.keyed import KeyedItem, KeyedTable, Wait, Write

T0 = 1_700_000_000.0  # epoch seconds, as the middleboxes' `now` is
EXP = T0 + 60.0  # an expiry for writes whose expiry does not matter


def parse(raw: bytes) -> str:
    text = raw.decode()
    if text.startswith("!"):
        raise ValueError(f"garbage: {text}")
    return text


def encode(value: object) -> bytes:
    return str(value).encode()


ITEM = KeyedItem("conn", parse, encode)


def table(
    *,
    shared: bool = True,
    max_entries: int = 1000,
    max_fetching: int = 100,
    fetch_rate: float = 1000.0,
    fetch_burst: int = 100,
) -> KeyedTable:
    return KeyedTable(
        ITEM,
        shared=shared,
        max_entries=max_entries,
        max_fetching=max_fetching,
        fetch_rate=fetch_rate,
        fetch_burst=fetch_burst,
    )


def load(t: KeyedTable, key: str, value: str, now: float = T0) -> None:
    """Bring `key` into memory as a clean entry, as a read of the store would."""
    assert t.get(key, now) == Wait("conn", key)
    t.loaded(key, value.encode())
    assert t.get(key, now) == value


# -- invariant 3: a key has at most one read in flight ---------------------------------------


def test_a_miss_asks_for_one_read_and_later_misses_share_it() -> None:
    t = table(fetch_burst=2)
    first = t.get("k", T0)
    assert first == Wait("conn", "k", commit=False)
    assert t.get("k", T0) == first  # a second packet waits for the same read
    assert t.get("k", T0 + 0.001) == first
    assert t.fetching == 1
    # The shared read cost one token of two: one more key may be read, not two.
    assert t.get("other", T0) == Wait("conn", "other")
    assert t.get("third", T0) is None
    assert t.counts.fetch_refused == 1


def test_what_a_read_found_is_what_get_answers() -> None:
    t = table()
    assert isinstance(t.get("k", T0), Wait)
    t.loaded("k", b"established")
    assert t.fetching == 0
    assert t.counts.fetches == 1
    assert t.get("k", T0) == "established"
    assert t.peek("k") == "established"
    assert "k" in t and len(t) == 1
    assert t.counts.hits == 1
    assert t.queued == 0  # a read owes the store nothing


def test_garbage_in_the_store_counts_as_absent() -> None:
    t = table()
    t.get("k", T0)
    t.loaded("k", b"!not a value")
    assert t.get("k", T0) is None
    assert "k" not in t
    assert t.fetching == 0


def test_an_absent_key_answers_none_until_settled_then_is_read_again() -> None:
    t = table()
    t.get("k", T0)
    t.loaded("k", None)
    # Every packet that waited for the read sees the same answer...
    assert t.get("k", T0) is None
    assert t.get("k", T0) is None
    assert t.fetching == 0
    # ...until the driver settles it: the next packet reads again.
    t.settled("k")
    assert t.get("k", T0) == Wait("conn", "k")
    assert t.fetching == 1


def test_a_failed_read_answers_none_and_counts() -> None:
    t = table()
    t.get("k", T0)
    t.failed("k")
    assert t.get("k", T0) is None
    assert t.counts.fetch_failed == 1
    assert t.fetching == 0
    t.settled("k")
    assert isinstance(t.get("k", T0), Wait)


def test_a_failed_read_of_a_cached_entry_keeps_what_memory_holds() -> None:
    t = table()
    load(t, "k", "v1")
    t.invalidate()
    assert t.get("k", T0) == Wait("conn", "k")
    t.failed("k")
    assert t.get("k", T0) == "v1"
    assert t.fetching == 0


# -- invariant 2: bounded reads ---------------------------------------------------------------


def test_the_fetch_budget_refuses_past_the_burst_and_refills_with_time() -> None:
    t = table(fetch_rate=10.0, fetch_burst=3)
    assert all(isinstance(t.get(f"k{i}", T0), Wait) for i in range(3))
    assert t.get("k3", T0) is None  # past the burst: as if absent
    assert t.counts.fetch_refused == 1
    assert t.get("k3", T0 + 0.05) is None  # half a token
    assert t.counts.fetch_refused == 2
    assert isinstance(t.get("k3", T0 + 0.11), Wait)  # a token each tenth of a second
    assert t.get("k4", T0 + 0.11) is None
    # A long pause refills only up to the burst.
    assert all(isinstance(t.get(f"late{i}", T0 + 100), Wait) for i in range(3))
    assert t.get("late3", T0 + 100) is None
    assert t.counts.fetch_refused == 4


def test_a_scan_of_absent_keys_costs_at_most_the_fetch_rate() -> None:
    rate, burst, seconds = 50.0, 5, 10
    t = table(fetch_rate=rate, fetch_burst=burst)
    reads = 0
    for step in range(seconds * 1000):  # 1000 new keys a second, none in the store
        now = T0 + step / 1000
        key = f"scan{step}"
        answer = t.get(key, now)
        if isinstance(answer, Wait):
            reads += 1
            t.loaded(key, None)
            assert t.get(key, now) is None
            t.settled(key)
        else:
            assert answer is None
    assert burst + rate * (seconds - 1) <= reads <= burst + rate * seconds
    assert t.counts.fetch_refused == seconds * 1000 - reads
    assert len(t) == 0


def test_at_most_max_fetching_keys_are_read_at_once() -> None:
    t = table(max_fetching=2)
    assert isinstance(t.get("a", T0), Wait)
    assert isinstance(t.get("b", T0), Wait)
    assert t.get("c", T0) is None
    assert t.counts.fetch_refused == 1
    assert t.get("a", T0) == Wait("conn", "a")  # a read in flight is still shared
    assert t.fetching == 2
    t.loaded("a", b"1")
    assert isinstance(t.get("c", T0), Wait)
    assert t.fetching == 2


# -- writes: write-behind, coalescing, durable puts --------------------------------------------


def test_a_put_changes_memory_at_once_and_queues_its_write() -> None:
    t = table()
    assert t.put("k", "v", EXP) is None
    assert t.get("k", T0) == "v"
    assert t.queued == 1
    assert t.take_writes() == [Write("k", b"v", EXP)]
    assert t.queued == 0
    assert t.take_writes() == []


def test_writes_of_one_key_coalesce_into_the_newest() -> None:
    t = table()
    t.put("k", "v1", EXP)
    t.put("other", "o", EXP)
    t.put("k", "v2", EXP + 5)
    assert t.queued == 2
    assert t.take_writes() == [Write("other", b"o", EXP), Write("k", b"v2", EXP + 5)]


def test_a_delete_forgets_the_entry_and_queues_a_write_of_none() -> None:
    t = table()
    t.put("k", "v", EXP)
    t.delete("k", EXP + 1)
    assert "k" not in t
    assert t.peek("k") is None
    assert t.take_writes() == [Write("k", None, EXP + 1)]


def test_a_durable_put_holds_its_key_until_written_reports_it() -> None:
    t = table()
    commit = t.put("k", "v", EXP, durable=True)
    assert commit == Wait("conn", "k", commit=True)
    assert t.committing("k")
    assert t.get("k", T0) == commit  # readers of the key wait for the commit too
    writes = t.take_writes()
    assert writes == [Write("k", b"v", EXP)]
    assert t.get("k", T0) == commit  # taken is not written
    assert t.written(writes, ok=True) == ["k"]
    assert not t.committing("k")
    assert t.get("k", T0) == "v"
    assert t.counts.writes == 1


def test_written_names_only_the_keys_whose_commit_ended() -> None:
    t = table()
    t.put("plain", "p", EXP)
    t.put("durable", "d", EXP, durable=True)
    assert t.written(t.take_writes(), ok=True) == ["durable"]
    assert t.written([], ok=True) == []


def test_a_failed_batch_is_queued_again_and_still_ends_the_commit() -> None:
    t = table()
    t.put("k", "v", EXP, durable=True)
    t.put("other", "o", EXP)
    writes = t.take_writes()
    assert t.written(writes, ok=False) == ["k"]
    assert t.counts.write_failures == 2
    assert t.counts.writes == 0
    assert not t.committing("k")
    assert t.get("k", T0) == "v"  # the packets pass on what memory holds
    assert t.take_writes() == writes  # tried again with the next batch
    assert t.written(writes, ok=True) == []
    assert t.counts.writes == 2


def test_a_failed_write_does_not_replace_a_newer_write_of_its_key() -> None:
    t = table()
    t.put("k", "old", EXP)
    writes = t.take_writes()
    t.put("k", "new", EXP + 1)
    t.written(writes, ok=False)
    assert t.take_writes() == [Write("k", b"new", EXP + 1)]


def test_a_newer_put_over_a_read_in_flight_wins() -> None:
    t = table()
    assert isinstance(t.get("k", T0), Wait)
    t.put("k", "mine", EXP)
    t.loaded("k", b"theirs")  # read before this replica's write reached the store
    assert t.get("k", T0) == "mine"


# -- invariant 1: bounded memory ---------------------------------------------------------------


def test_the_least_recently_used_entry_is_evicted_first() -> None:
    t = table(max_entries=3)
    for key in "abc":
        load(t, key, key.upper())
    assert t.get("a", T0) == "A"  # a is now the most recently used
    load(t, "d", "D")
    assert len(t) == 3
    assert [key for key, _ in t.items()] == ["c", "a", "d"]
    assert t.counts.evicted == 1


def test_an_entry_being_committed_is_never_evicted() -> None:
    t = table(max_entries=2)
    t.put("c", "committing", EXP, durable=True)
    for i in range(10):
        load(t, f"k{i}", str(i))
        assert len(t) <= 2
        assert t.committing("c")
        assert t.get("c", T0) == Wait("conn", "c", commit=True)
    assert t.counts.evicted == 9


def test_the_queue_keeps_at_most_twice_max_entries_writes_dropping_the_oldest() -> None:
    t = table(max_entries=2)
    for i in range(7):
        t.put(f"k{i}", str(i), EXP)
        assert t.queued <= 4
    assert t.counts.dropped_writes == 3
    assert [w.key for w in t.take_writes()] == ["k3", "k4", "k5", "k6"]


def test_items_is_a_copy_least_recently_used_first() -> None:
    t = table()
    t.put("a", "1", EXP)
    t.put("b", "2", EXP)
    t.get("a", T0)
    for key, _ in t.items():
        t.forget(key)  # safe: a copy
    assert len(t) == 0
    t.put("a", "1", EXP)
    t.put("b", "2", EXP)
    t.get("a", T0)
    assert list(t.items()) == [("b", "2"), ("a", "1")]


# -- invariant 4: local tables never ask the driver --------------------------------------------


def test_a_local_table_never_asks_the_driver_for_anything() -> None:
    t = table(shared=False, fetch_burst=1)
    for i in range(5):
        assert t.get(f"miss{i}", T0) is None  # no read, and no budget spent on it
    assert t.counts.fetch_refused == 0
    assert t.fetching == 0
    assert t.put("k", "v", EXP) is None
    assert t.put("d", "durable", EXP, durable=True) is None  # durable at once
    assert not t.committing("d")
    assert t.get("d", T0) == "durable"
    t.delete("k", EXP)
    assert t.get("k", T0) is None
    assert t.queued == 0
    assert t.take_writes() == []
    t.invalidate()
    assert t.get("d", T0) == "durable"


# -- invariant 5: invalidate() reads each clean entry again once ------------------------------


def test_invalidate_reads_each_clean_entry_again_once() -> None:
    t = table()
    load(t, "k", "v1")
    t.invalidate()
    read = t.get("k", T0)
    assert read == Wait("conn", "k")
    assert t.get("k", T0) == read  # one read, shared
    assert t.fetching == 1
    t.loaded("k", b"v2")  # another replica changed it meanwhile
    assert t.get("k", T0) == "v2"
    assert t.get("k", T0) == "v2"  # once: no read at the next use
    assert t.fetching == 0


def test_invalidate_leaves_dirty_and_committing_entries_alone() -> None:
    t = table()
    t.put("dirty", "mine", EXP)
    t.put("committing", "mine too", EXP, durable=True)
    t.invalidate()
    assert t.get("dirty", T0) == "mine"
    assert t.get("committing", T0) == Wait("conn", "committing", commit=True)
    assert t.fetching == 0


def test_after_invalidate_an_entry_the_budget_cannot_read_keeps_its_value() -> None:
    t = table(fetch_rate=1.0, fetch_burst=2)
    load(t, "a", "A")
    load(t, "b", "B", now=T0 + 1)  # the burst refills: both tokens again at T0 + 2
    t.invalidate()
    now = T0 + 2
    assert t.get("a", now) == Wait("conn", "a")
    assert t.get("fill", now) == Wait("conn", "fill")  # the last token
    assert t.get("b", now) == "B"  # no budget: the cached value stands
    assert t.get("b", now + 10) == "B"  # and is not read later either
    assert t.fetching == 2


def test_an_entry_read_again_and_found_absent_is_forgotten() -> None:
    t = table()
    load(t, "k", "v")
    t.invalidate()
    t.get("k", T0)
    t.loaded("k", None)  # another replica deleted it
    assert t.get("k", T0) is None
    assert "k" not in t


# -- every bound after every step of random operations -----------------------------------------


def test_random_operations_keep_every_bound() -> None:
    rng = random.Random(1)
    max_entries, max_fetching, rate, burst = 8, 4, 20.0, 5
    t = table(
        max_entries=max_entries, max_fetching=max_fetching, fetch_rate=rate, fetch_burst=burst
    )
    keys = [f"k{i}" for i in range(30)]
    now = T0
    reads = 0
    taken: list[Write] = []
    pending: set[str] = set()  # keys whose read the driver owes the table
    for _ in range(20_000):
        now += rng.expovariate(200.0)
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.35:
            before = t.fetching
            answer = t.get(key, now)
            if isinstance(answer, Wait) and not answer.commit:
                reads += t.fetching - before
                pending.add(key)
        elif op < 0.5:
            t.put(key, str(rng.randrange(100)), now + 30, durable=rng.random() < 0.3)
        elif op < 0.55:
            t.delete(key, now + 30)
        elif op < 0.7 and pending:
            done = rng.choice(sorted(pending))  # the driver's side: finish one read
            pending.discard(done)
            if rng.random() < 0.9:
                t.loaded(done, rng.choice([None, b"1", b"!bad"]))
            else:
                t.failed(done)
            t.settled(done)
        elif op < 0.8:
            taken.extend(t.take_writes())
        elif op < 0.9 and taken:
            t.written(taken, ok=rng.random() < 0.8)
            taken = []
        elif op < 0.92:
            t.invalidate()
        assert len(t) <= max_entries
        assert t.fetching == len(pending) <= max_fetching
        assert t.queued <= 2 * max_entries
        assert reads <= burst + rate * (now - T0) + 1e-9
    assert reads > 0 and t.counts.evicted > 0 and t.counts.fetch_refused > 0


# -- found by these tests and fixed: each a way the table could break its contract --------


def test_an_older_write_landing_does_not_end_a_newer_commit() -> None:
    t = table()
    t.put("k", "v1", EXP, durable=True)
    in_flight = t.take_writes()
    t.put("k", "v2", EXP, durable=True)  # queued, not in flight
    assert t.written(in_flight, ok=True) == []
    assert t.committing("k")


def test_a_dropped_write_still_ends_its_commit() -> None:
    t = table(max_entries=1)  # the outbox holds 2
    t.put("a", "1", EXP, durable=True)
    t.put("b", "2", EXP)
    t.put("c", "3", EXP)  # drops a's write
    assert t.counts.dropped_writes == 1
    writes = t.take_writes()
    t.written(writes, ok=True)
    t.written(t.take_writes(), ok=True)
    assert not t.committing("a")
    assert t.get("a", T0) != Wait("conn", "a", commit=True)  # its packets go on


def test_a_durable_put_into_a_full_table_of_commits_is_kept_and_committing() -> None:
    t = table(max_entries=1)
    t.put("a", "1", EXP, durable=True)
    assert t.put("b", "2", EXP, durable=True) == Wait("conn", "b", commit=True)
    assert t.committing("b")
    assert t.get("b", T0) == Wait("conn", "b", commit=True)


def test_a_read_does_not_bring_back_a_key_deleted_meanwhile() -> None:
    t = table()
    assert isinstance(t.get("k", T0), Wait)
    t.delete("k", EXP)  # the connection ended while its entry was being read
    t.loaded("k", b"old")  # the read saw the store before the delete reached it
    assert t.get("k", T0) != "old"
    assert t.peek("k") is None


def test_clean_entries_are_evicted_before_dirty_ones() -> None:
    t = table(max_entries=2)
    t.put("dirty", "new", EXP)  # least recently used, its write still queued
    load(t, "b", "B")
    load(t, "c", "C")
    assert "dirty" in t
    assert t.get("dirty", T0) == "new"


def test_an_entry_whose_write_is_in_flight_is_not_read_back_older() -> None:
    t = table()
    load(t, "k", "old")
    t.put("k", "new", EXP)
    in_flight = t.take_writes()
    t.invalidate()  # the group changed while the batch was on its way
    answer = t.get("k", T0)
    if isinstance(answer, Wait):
        t.loaded("k", b"old")  # read before the batch landed
        answer = t.get("k", T0)
    assert answer == "new"
    t.written(in_flight, ok=True)
