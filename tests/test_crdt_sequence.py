"""RGA: lattice laws, deltas vs full merge, wire form, and the RGA ordering rules."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crdt_maps import (
    VALUES,
    check_deltas_equal_full_merge,
    check_junk,
    check_laws,
    check_round_trip,
    joined,
    junk_st,
    mutated,
    ops_st,
    run_ops,
    shipped,
    synced,
)

from protocols.crdt.base import CrdtError
from protocols.crdt.sequence import RGA

SETTINGS = settings(max_examples=60, deadline=None)
CODES = 3


def rga_op(s: RGA, code: int, a: int, b: int):
    value = VALUES[b % len(VALUES)]
    if code == 0:
        return s.insert(a % (len(s) + 1), value)
    if code == 1:
        return s.append(value)
    return s.delete(a % len(s)) if len(s) else None


def runs(data, skews=(0, 0, 0)):
    return run_ops(RGA, rga_op, CODES, data.draw(ops_st(CODES)), skews)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_deltas_in_any_order_equal_full_merge(data, seed):
    replicas, deltas = runs(data)
    check_deltas_equal_full_merge(RGA, replicas, deltas, seed)


@SETTINGS
@given(data=st.data())
def test_merge_laws_round_trip_and_one_order_everywhere(data):
    replicas, deltas = runs(data)
    check_laws(RGA, *replicas)
    check_round_trip(replicas + [d for ds in deltas for d in ds])
    synced(*replicas)
    assert replicas[0].value() == replicas[1].value() == replicas[2].value()


@settings(max_examples=200, deadline=None)
@given(junk=junk_st)
def test_from_wire_junk_raises_only_crdt_error(junk):
    check_junk(RGA, junk)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), junk=junk_st, seed=st.integers(0, 2**32))
def test_from_wire_mutated_state_raises_only_crdt_error(data, junk, seed):
    replicas, _ = runs(data)
    check_junk(RGA, mutated(joined(RGA, replicas).to_wire(), random.Random(seed), junk))


def replicas_with(prefix: list, n: int = 2) -> list[RGA]:
    """``n`` replicas (ids 1..n) that all hold ``prefix``, written by replica 1."""
    first = RGA().bind(1)
    for v in prefix:
        first.append(v)
    others = [RGA().bind(r) for r in range(2, n + 1)]
    for o in others:
        o.merge(first)
    return [first, *others]


def test_concurrent_inserts_at_one_place_order_newest_id_first():
    a, b, c = replicas_with(["x", "z"], 3)
    a.insert(1, "a")
    b.insert(1, "b")
    c.insert(1, "c")  # same ts everywhere: ties go to the higher replica id
    synced(a, b, c)
    assert a.value() == b.value() == c.value() == ["x", "c", "b", "a", "z"]


def test_concurrent_runs_do_not_interleave():
    a, b = replicas_with(["start"])
    for ch in "abc":
        a.append(ch)
    b.merge(RGA())  # nothing: b has not seen a's run
    for ch in "xyz":
        b.insert(len(b), ch)
    synced(a, b)
    assert a.value() == b.value()
    assert "".join(a.value()[1:]) in ("abcxyz", "xyzabc")


def test_delete_leaves_a_tombstone_that_later_inserts_hang_off():
    a, b = replicas_with(["p", "q", "r"])
    a.delete(1)  # q
    b.insert(2, "after-q")  # concurrent: inserted after q, which a deleted
    synced(a, b)
    assert a.value() == b.value() == ["p", "after-q", "r"]
    wire = a.to_wire()
    assert [2, 1, 1, 1, None] in wire[0] and wire[1] == [[2, 1]]  # q's value is dropped


def test_out_of_order_deltas_wait_for_their_origin():
    a = RGA().bind(1)
    first = a.append("one")
    second = a.append("two")
    gone = a.delete(0)
    b = RGA()
    b.merge(shipped(gone))
    b.merge(shipped(second))
    assert b.value() == []  # "two" hangs off an element b does not have yet
    b.merge(shipped(first))
    assert b.value() == ["two"] == a.value()


def test_local_edits_land_where_asked():
    s = RGA().bind(7)
    for i, v in enumerate("abc"):
        s.insert(i, v)
    s.insert(0, "^")
    s.insert(2, "+")
    s.delete(len(s) - 1)
    assert s.value() == ["^", "a", "+", "b"] and len(s) == 4
    with pytest.raises(IndexError):
        s.insert(6, "x")
    with pytest.raises(IndexError):
        s.delete(4)
    with pytest.raises(CrdtError):
        s.append(object())


def test_a_long_log_is_walked_without_recursion():
    log = RGA().bind(1)
    for i in range(5_000):
        log.append(i)
    back = shipped(log)  # no cached order: the walk follows a 5,000-long chain
    assert back.value() == list(range(5_000)) and back == log


def test_ids_stop_at_the_u64_bound():
    full = RGA.from_wire([[[2**64 - 1, 1, 0, 0, "a"]], []])
    with pytest.raises(CrdtError):
        full.append("b")
    assert full.value() == ["a"]


def test_from_wire_checks_ids_and_origins():
    ok = [[1, 1, 0, 0, "a"], [2, 1, 1, 1, "b"]]
    assert RGA.from_wire([ok, [[1, 1]]]).value() == ["b"]
    for bad in ([[[1, 1, 1, 1, "a"]], []],  # its own origin
                [[[1, 1, 2, 1, "a"], [2, 1, 1, 1, "b"]], []],  # origins in a cycle
                [[[0, 1, 0, 0, "a"]], []],  # ts 0
                [list(reversed(ok)), []],  # not ascending
                [ok, [[2, 1], [1, 1]]], [ok, [[1, 1], [1, 1]]],  # deleted ids unsorted / twice
                [[[1, 1, 0, 0]], []], [ok], [[[1, 1, 0, 0, object()]], []]):
        with pytest.raises(CrdtError):
            RGA.from_wire(bad)


# -- exact errors and boundaries (pinned for mutation testing) ------------------------------
def test_index_bounds_are_exact_with_their_messages():
    s = RGA().bind(1)
    with pytest.raises(IndexError, match=r"^delete index 0 outside 0\.\.-1$"):
        s.delete(0)
    s.insert(0, "a")  # index == len is allowed
    s.insert(1, "c")
    s.insert(1, "b")
    assert s.value() == ["a", "b", "c"]
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=rf"^insert index {bad} outside 0\.\.3$"):
            s.insert(bad, "x")
    for bad in (-1, 3):
        with pytest.raises(IndexError, match=rf"^delete index {bad} outside 0\.\.2$"):
            s.delete(bad)
    assert s.delete(2).to_wire() == [[], [[2, 1]]] and s.delete(0).to_wire() == [[], [[1, 1]]]
    assert s.value() == ["b"] and len(s) == 1


def test_deltas_carry_their_id_and_origin():
    s = RGA().bind(4)
    assert s.append("a").to_wire() == [[[1, 4, 0, 0, "a"]], []]
    assert s.insert(0, "z").to_wire() == [[[2, 4, 0, 0, "z"]], []]
    assert s.insert(2, "b").to_wire() == [[[3, 4, 1, 4, "b"]], []]
    gone = s.delete(1)
    assert gone.to_wire() == [[], [[1, 4]]]
    fresh = RGA().bind(5)
    fresh.merge(gone)  # a delete's delta carries its ts: the next id follows it
    assert fresh.append("c").to_wire()[0][0][:2] == [2, 5]
    assert s.take_delta().to_wire() == [[[1, 4, 0, 0, None], [2, 4, 0, 0, "z"], [3, 4, 1, 4, "b"]],
                                        [[1, 4]]]


def test_ids_stop_exactly_at_the_u64_bound():
    near = RGA.from_wire([[[2**64 - 2, 1, 0, 0, "a"]], []]).bind(2)
    near.append("b")
    assert near.to_wire()[0][1][:2] == [2**64 - 1, 2]
    with pytest.raises(CrdtError, match=r"^RGA counter past 2\*\*64-1$"):
        near.insert(0, "c")
    assert near.value() == ["a", "b"]


def test_merge_keeps_deleted_values_dropped_and_the_highest_ts():
    a = RGA().bind(1)
    a.append("x")
    kill = a.delete(0)
    b = RGA().bind(2)
    b.merge(kill)  # the delete arrives before the element
    b.merge(RGA.from_wire([[[1, 1, 0, 0, "x"], [9, 3, 0, 0, "y"]], []]))
    assert b.value() == ["y"] and b.to_wire()[0][0] == [1, 1, 0, 0, None]
    b.merge(RGA.from_wire([[], [[9, 3]]]))  # a known element deleted by a merge
    assert b.value() == [] and b.to_wire() == [[[1, 1, 0, 0, None], [9, 3, 0, 0, None]], [[1, 1], [9, 3]]]
    b.merge(RGA())
    assert b.append("z").to_wire()[0][0][:2] == [10, 2]


def test_wire_ts_follows_deleted_ids_too():
    s = RGA.from_wire([[[1, 1, 0, 0, "a"]], [[7, 2]]]).bind(3)
    assert s.value() == ["a"] and s.append("b").to_wire()[0][0][:2] == [8, 3]
    assert RGA.from_wire([[[1, 1, 0, 0, "a"]], [[1, 1]]]).to_wire() == [[[1, 1, 0, 0, None]], [[1, 1]]]


@pytest.mark.parametrize("data, message", [
    ([[]], r"^RGA: expected 2 items, got 1$"),
    ({}, r"^RGA: expected a list, got dict$"),
    ([{}, []], r"^RGA elements: expected a list, got dict$"),
    ([[], {}], r"^RGA deleted: expected a list, got dict$"),
    ([[0] * (2**20), [0]], r"^RGA: more than 1048576 entries$"),
    ([[0] * (2**20 - 1), [0]], r"^RGA deleted id: expected a list, got int$"),
    ([[], [[1]]], r"^RGA deleted id: expected 2 items, got 1$"),
    ([[], [[0, 1]]], r"^RGA deleted id: ts starts at 1$"),
    ([[], [[-1, 1]]], r"^RGA deleted id ts: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[], [[1, -1]]], r"^RGA deleted id replica: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[], [[1, 1], [1, 1]]], r"^RGA deleted ids must be strictly ascending$"),
    ([[[1, 1, 0, 0]], []], r"^RGA element: expected 5 items, got 4$"),
    ([[[0, 1, 0, 0, "a"]], []], r"^RGA element id: ts starts at 1$"),
    ([[[1, "r", 0, 0, "a"]], []], r"^RGA element id replica: expected an int in 0\.\.2\*\*64-1, got 'r'$"),
    ([[[1, 1, -1, 0, "a"]], []], r"^origin ts: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[[1, 1, 0, -1, "a"]], []], r"^origin replica: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[[1, 1, 0, 0, "a"], [1, 1, 0, 0, "a"]], []], r"^RGA elements must be strictly ascending by id$"),
    ([[[2, 1, 2, 0, "a"]], []], r"^RGA element origin must be ROOT or have a smaller ts$"),
    ([[[2, 1, 0, 5, "a"]], []], r"^RGA element origin must be ROOT or have a smaller ts$"),
    ([[[1, 1, 0, 0, 1j]], []], r"^value: not msgpack data \(complex\)$"),
])
def test_wire_errors_are_exact(data, message):
    with pytest.raises(CrdtError, match=message):
        RGA.from_wire(data)


def test_wire_accepts_an_origin_one_ts_below_and_replica_zero_ids():
    s = RGA.from_wire([[[1, 0, 0, 0, "a"], [2, 0, 1, 0, "b"], [2, 1, 1, 9, "c"]], []])
    assert s.value() == ["a", "b"]  # "c" hangs off (1, 9), which has not arrived


def test_next_id_follows_the_highest_ts_seen_not_a_replica_id():
    """An insert's delta carries its ts: a replica merging it numbers its next insert
    one above that ts (not above the inserter's replica id); an empty state read from
    the wire starts at ts 1."""
    first = RGA().bind(100).append("a")
    other = RGA().bind(2)
    other.merge(first)
    assert other.append("b").to_wire()[0][0][:2] == [2, 2]
    assert RGA.from_wire([[], []]).bind(1).append("a").to_wire()[0][0][:2] == [1, 1]
