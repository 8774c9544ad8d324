"""Counters, sets, registers and vector clocks of protocols.crdt: lattice laws, deltas,
wire round trips, hostile wire input, value semantics, clock pruning.  (Counter
folding: test_crdt_folding.py.)

The merge loops run in whichever core_cy kernel is active; the law tests repeat each
check with every kernel bundle patched in (``kernels``), so the twin and the compiled
module are both exercised.
"""

from __future__ import annotations

import contextlib
import random
from array import array

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core_cy
from protocols.crdt import (
    AFTER,
    BEFORE,
    CONCURRENT,
    EQUAL,
    TYPES as CRDT_TYPES,
    VCLOCK_ENTRIES_MAX,
    Crdt,
    CrdtError,
    GCounter,
    GSet,
    LWWRegister,
    ORSet,
    PNCounter,
    TwoPSet,
    VClock,
    decode_fields,
    vc_compare,
    vc_merge,
)
from protocols.crdt import counters, sets, vclock

SETTINGS = settings(max_examples=40, deadline=None)
U64 = 2**64 - 1
REPLICAS = (7, U64, 3)  # small and extreme replica ids

KERNEL_USERS = {
    counters: ("gcounter_merge", "pncounter_merge"),
    sets: ("orset_merge",),
    vclock: ("vclock_merge", "vclock_compare"),
}


@contextlib.contextmanager
def kernels(impl):
    """Run the CRDT modules on one core_cy bundle ("python" or "cython")."""
    saved = {(m, n): getattr(m, n) for m, names in KERNEL_USERS.items() for n in names}
    try:
        for (module, name) in saved:
            setattr(module, name, getattr(impl, name))
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


# -- random histories ------------------------------------------------------------------
elem_st = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([-(2**63), U64]),
                    st.text(max_size=2), st.binary(max_size=2))
data_st = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=6)

def one_arg(names, arg):
    return st.tuples(st.sampled_from(names), st.tuples(arg))


OPS = {  # (method, args)
    GCounter: one_arg(["increment"], st.integers(0, 5)),
    PNCounter: one_arg(["increment", "decrement"], st.integers(-5, 5)),
    GSet: one_arg(["add"], elem_st),
    TwoPSet: one_arg(["add", "remove"], elem_st),
    ORSet: one_arg(["add", "add", "remove"], elem_st) | st.just(("clear", ())),
    LWWRegister: one_arg(["set"], data_st),
    VClock: st.just(("tick", ())),
}
TYPES = list(OPS)


def step_st(cls):
    """One step of a history: (replica index, op) or (replica index, ("sync", other))."""
    sync = st.tuples(st.just("sync"), st.integers(0, len(REPLICAS) - 1))
    return st.tuples(st.integers(0, len(REPLICAS) - 1), st.one_of(OPS[cls], sync))


def run(cls, steps, skews=(0, 5, -3)):
    """Play ``steps`` on one object per replica; returns (replicas, deltas returned by
    the mutators).  Each replica's clock is a shared step count plus its own skew, so
    LWW writes meet clocks that are behind and ahead of each other."""
    now = [100]
    objs = [cls().bind(r, (lambda s=s: max(0, now[0] + s))) for r, s in zip(REPLICAS, skews)]
    deltas = []
    for i, (op, args) in steps:
        now[0] += 1
        if op == "sync":
            objs[i].merge(objs[args])
        else:
            deltas.append(getattr(objs[i], op)(*args))
    return objs, deltas


def joined(cls, parts):
    out = cls()
    for p in parts:
        out.merge(p)
    return out


@st.composite
def history(draw, cls):
    return run(cls, draw(st.lists(step_st(cls), max_size=14)))


def any_history():
    return st.sampled_from(TYPES).flatmap(lambda cls: st.tuples(st.just(cls), history(cls)))


def wire_trip(obj: Crdt) -> Crdt:
    raw = msgpack.packb(obj.to_wire())
    return type(obj).from_wire(msgpack.unpackb(raw, raw=False, strict_map_key=False))


# -- laws --------------------------------------------------------------------------------
@SETTINGS
@given(any_history())
def test_merge_is_commutative_associative_idempotent(case):
    """Three replicas of one run.  (Replicas of three separate runs shared replica ids,
    so one dot could stand for two elements: a state no cluster can reach, and
    hypothesis once found that it merges differently one way round.)"""
    cls, (objs, _) = case
    a, b, c = objs
    for impl in core_cy.implementations().values():
        with kernels(impl):
            ab, ba = joined(cls, [a, b]), joined(cls, [b, a])
            assert ab == ba
            assert joined(cls, [ab, c]) == joined(cls, [a, joined(cls, [b, c])])
            assert joined(cls, [a, a]) == joined(cls, [a])
            twice = joined(cls, [a, b])
            twice.merge(b)
            assert twice == ab


@SETTINGS
@given(any_history(), st.randoms(use_true_random=False))
def test_deltas_in_any_order_with_duplicates_equal_full_state_merge(case, rnd):
    cls, (objs, deltas) = case
    full = joined(cls, objs)
    shuffled = deltas + rnd.sample(deltas, len(deltas) // 2)
    rnd.shuffle(shuffled)
    assert joined(cls, shuffled) == full
    pending = [d for d in (o.take_delta() for o in objs) if d is not None]
    assert joined(cls, pending) == full  # the pending delta is the join of all of them
    assert all(o.take_delta() is None for o in objs)


@SETTINGS
@given(any_history())
def test_wire_round_trip(case):
    cls, (objs, deltas) = case
    for obj in objs + deltas + [joined(cls, objs)]:
        back = wire_trip(obj)
        assert back == obj
        assert back.value() == obj.value()
        assert back.copy() == obj


# -- hostile wire input ------------------------------------------------------------------
junk_st = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), U64), st.sampled_from([0, 1, 2, 3, U64]),
              st.floats(allow_nan=False), st.text(max_size=3), st.binary(max_size=3)),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.integers(0, 3) | st.text(max_size=2),
                                                                inner, max_size=3),
    max_leaves=20)


def mutate(wire, rnd: random.Random, junk):
    """``wire`` with one random edit somewhere inside: a part replaced by ``junk``, an
    item dropped or duplicated, or two items swapped."""
    if not isinstance(wire, list) or not wire or rnd.random() < 0.2:
        return junk
    wire = list(wire)
    i = rnd.randrange(len(wire))
    kind = rnd.randrange(4)
    if kind == 0:
        del wire[i]
    elif kind == 1:
        wire.insert(i, wire[i])
    elif kind == 2:
        j = rnd.randrange(len(wire))
        wire[i], wire[j] = wire[j], wire[i]
    else:
        wire[i] = mutate(wire[i], rnd, junk)
    return wire


def accept_or_refuse(cls, data, partner: Crdt):
    """from_wire raises CrdtError or gives a usable object (value, wire, merge)."""
    try:
        obj = cls.from_wire(data)
    except CrdtError:
        return
    obj.value()
    assert wire_trip(obj) == obj
    try:
        obj.merge(partner)
    except CrdtError:
        assert cls is VClock  # only a clock may refuse a merge (its size bound)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(TYPES), junk_st)
def test_from_wire_refuses_random_junk(cls, junk):
    accept_or_refuse(cls, junk, cls())


@settings(max_examples=150, deadline=None)
@given(any_history(), junk_st, st.randoms(use_true_random=False))
def test_from_wire_refuses_near_miss_wire_forms(case, junk, rnd):
    cls, (objs, _) = case
    accept_or_refuse(cls, mutate(objs[0].to_wire(), rnd, junk), objs[1])


@pytest.mark.parametrize("cls, data", [
    (GCounter, [[2, 1], [1, 1], []]),            # ids not ascending
    (GCounter, [[1], [U64 + 1], []]),            # count past u64
    (GCounter, [[1], [True], []]),               # bool is not a count
    (GCounter, [[1], [1], [[2, 1]]]),            # fold marker too short
    (GCounter, [[1], [1], [[3, 1, 9], [2, 1, 9]]]),  # markers not ascending
    (PNCounter, [[1], [1], [], []]),             # columns of different length
    (GSet, [[1]]),                               # list is not an element
    (GSet, [2**64]),                             # int out of range
    (TwoPSet, [[1]]),
    (ORSet, [[1], [1], ["a"], [], [], [], []]),  # dot outside its own context
    (ORSet, [[1], [0], ["a"], [1], [1], [], []]),  # dot counter 0
    (ORSet, [[1, 1], [2, 1], ["a", "b"], [1], [2], [], []]),  # dots not ascending
    (LWWRegister, [1, 2]),
    (LWWRegister, [-1, 2, None]),
    (VClock, [list(range(VCLOCK_ENTRIES_MAX + 1)), [1] * (VCLOCK_ENTRIES_MAX + 1)]),
])
def test_from_wire_refuses_known_bad_forms(cls, data):
    with pytest.raises(CrdtError):
        cls.from_wire(data)


def test_merge_of_another_type_is_refused():
    with pytest.raises(CrdtError):
        GCounter().merge(PNCounter())


# -- value semantics ---------------------------------------------------------------------
def test_orset_add_wins_over_a_concurrent_remove():
    a, b = ORSet().bind(1), ORSet().bind(2)
    a.add("x")
    b.merge(a)
    b.remove("x")   # b removes the add it saw ...
    a.add("x")      # ... while a adds again concurrently
    a.merge(b)
    b.merge(a)
    assert "x" in a and "x" in b and a == b


def test_orset_remove_of_observed_adds_and_clear():
    a, b = ORSet().bind(1), ORSet().bind(2)
    a.add("x")
    a.add("y")
    b.merge(a)
    delta = b.remove("x")
    assert delta.value() == frozenset()  # a remove delta carries no dots
    a.merge(delta)
    assert a.value() == {"y"}
    a.clear()
    b.merge(a)
    assert a.value() == b.value() == frozenset()
    assert b.take_delta() is not None  # the remove of "x"
    assert b.remove("nothing").value() == frozenset() and b.take_delta() is None


def test_orset_re_add_replaces_the_old_dot():
    s = ORSet().bind(1)
    for _ in range(5):
        s.add("x")
    assert s.to_wire()[:3] == [[1], [5], ["x"]]


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), elem_st), max_size=20))
def test_twopset_removal_is_forever(ops):
    s = TwoPSet().bind(1)
    removed = set()
    for add, e in ops:
        (s.add if add else s.remove)(e)
        if not add:
            removed.add(e)
    assert not (s.value() & removed)
    s.add(next(iter(removed), "z"))
    assert not (s.value() & removed)


def test_gset_grows_only():
    a, b = GSet().bind(1), GSet().bind(2)
    a.add("x")
    b.add(b"y")
    a.merge(b)
    assert a.value() == {"x", b"y"} and len(a) == 2 and "x" in a


def test_lww_register_later_write_wins_even_with_a_slow_clock():
    fast, slow = LWWRegister().bind(1, lambda: 1000), LWWRegister().bind(2, lambda: 10)
    fast.set("first")
    slow.merge(fast)
    slow.set("second")  # the clock is behind, but the write follows what it saw
    fast.merge(slow)
    assert fast.value() == slow.value() == "second"
    assert slow.stamp() == (1001, 2)


def test_lww_register_ties_go_to_the_higher_replica():
    a, b = LWWRegister().bind(1, lambda: 50), LWWRegister().bind(2, lambda: 50)
    a.set("a")
    b.set("b")
    a.merge(b)
    assert a.value() == "b"


def test_lww_register_stores_plain_data_only():
    r = LWWRegister().bind(1, lambda: 1)
    with pytest.raises(CrdtError):
        r.set({1, 2})
    value = [1, (2, 3)]
    r.set(value)
    value.append(4)  # the register holds a copy
    assert r.value() == [1, [2, 3]]
    with pytest.raises(CrdtError):
        LWWRegister().bind(1).set("no clock")


def test_counters_count_and_refuse_bad_amounts():
    g, p = GCounter().bind(1), PNCounter().bind(1)
    g.increment()
    g.increment(4)
    p.increment(5)
    p.decrement(7)
    p.increment(-1)
    p.decrement(-2)
    assert g.value() == 5 and p.value() == -1
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(CrdtError):
            g.increment(bad)
    assert g.increment(0).value() == 0 and g.value() == 5


def test_counters_refuse_to_pass_u64():
    g, p = GCounter().bind(1), PNCounter().bind(1)
    g.increment(U64)
    p.decrement(U64)
    with pytest.raises(CrdtError):
        g.increment(1)
    with pytest.raises(CrdtError):
        p.decrement(1)
    assert g.value() == U64 and p.value() == -U64


# -- vector clocks -----------------------------------------------------------------------
def test_vclock_compare_and_dominates():
    a, b = VClock().bind(1), VClock().bind(2)
    assert a.compare(b) == EQUAL
    a.tick()
    assert a.compare(b) == AFTER and b.compare(a) == BEFORE and a.dominates(b)
    b.tick()
    assert a.compare(b) == CONCURRENT and not a.dominates(b)
    b.merge(a)
    assert b.compare(a) == AFTER and b.get(1) == 1 and b.get(2) == 1 and b.get(99) == 0
    assert b.value() == {1: 1, 2: 1}


def test_vclock_bound_and_prune():
    full = VClock.from_wire([list(range(VCLOCK_ENTRIES_MAX)), [1] * VCLOCK_ENTRIES_MAX])
    other = VClock().bind(10**6 + 1)
    other.tick()
    with pytest.raises(CrdtError):
        full.merge(other)
    with pytest.raises(CrdtError):
        full.bind(10**6).tick()
    assert len(full.value()) == VCLOCK_ENTRIES_MAX
    assert full.prune(range(10)) == VCLOCK_ENTRIES_MAX - 10
    full.tick()
    full.merge(other)
    assert full.get(10**6) == full.get(10**6 + 1) == 1 and len(full.value()) == 12


def test_vclock_prune_hides_order_through_departed_replicas():
    """The documented cost of pruning: order that only a pruned entry showed is gone."""
    a, b = VClock().bind(1), VClock().bind(2)
    b.tick()
    a.merge(b)
    a.tick()
    old = VClock.from_wire(b.to_wire())
    assert old.compare(a) == BEFORE
    a.prune({1})
    assert old.compare(a) == CONCURRENT


@SETTINGS
@given(st.dictionaries(st.integers(0, 5), st.integers(0, 4), max_size=5),
       st.dictionaries(st.integers(0, 5), st.integers(0, 4), max_size=5))
def test_dict_clock_helpers_agree_with_vclock(a, b):
    va, vb = (VClock.from_wire([sorted(d), [d[k] for k in sorted(d)]]) for d in (a, b))
    assert vc_compare(a, b) == va.compare(vb)
    va.merge(vb)
    assert {k: v for k, v in vc_merge(a, b).items() if v} == va.value()


@pytest.mark.parametrize("bad", [[], {1: -1}, {-1: 1}, {"a": 1}, {1: True}, {1: 2**64},
                                 dict.fromkeys(range(VCLOCK_ENTRIES_MAX + 1), 1)])
def test_dict_clock_helpers_refuse_malformed_clocks(bad):
    with pytest.raises(CrdtError):
        vc_compare(bad, {})
    with pytest.raises(CrdtError):
        vc_merge({}, bad)


def test_empty_objects_share_no_mutable_columns():
    a, b = GCounter().bind(1), GCounter().bind(2)
    a.increment()
    assert b.value() == 0 and GCounter().value() == 0
    c, d = VClock().bind(1), VClock().bind(2)
    c.tick()
    assert d.value() == {} and VClock().value() == {}


# -- exact errors and boundaries (pinned for mutation testing) ----------------------------
# The messages are part of the API (clients and logs read them): each test provokes one
# error and checks its exact text; boundaries are tested at the exact value.
def test_lww_register_clock_boundaries_and_messages():
    """A clock of 0 is valid; a negative, bool or non-int clock is refused with the
    exact message; a clock past u64 is capped at U64."""
    r = LWWRegister().bind(4, lambda: 0)
    r.set("at zero")
    assert r.stamp() == (1, 4)  # the clock says 0, the write still follows ts 0 seen
    for bad, shown in ((-1, "-1"), (True, "True"), ("12", "'12'"), (1.0, "1.0")):
        with pytest.raises(CrdtError, match=rf"^the clock must give an int >= 0, got {shown}$"):
            LWWRegister().bind(1, lambda bad=bad: bad).set(1)
    with pytest.raises(CrdtError, match=r"^the clock must give an int >= 0, got 'x{39}$"):
        LWWRegister().bind(1, lambda: "x" * 100).set(1)  # the shown clock is cut at 40 chars
    fast = LWWRegister().bind(1, lambda: U64 + 5)
    fast.set("capped")
    assert fast.stamp() == (U64, 1)


def test_lww_register_refuses_to_pass_u64_at_exactly_u64():
    """A register stamped U64 - 1 takes one more write (stamped U64); at U64 it refuses."""
    almost = LWWRegister.from_wire([U64 - 1, 1, "v"]).bind(2, lambda: 0)
    almost.set("last")
    assert almost.stamp() == (U64, 2)
    with pytest.raises(CrdtError, match=r"^register timestamp would pass 2\*\*64-1$"):
        almost.set("one too many")
    assert almost.value() == "last"


def test_lww_register_plain_data_keeps_str_and_int_keys_and_names_the_error():
    r = LWWRegister().bind(1, lambda: 1)
    r.set({1: "one", "s": b"b"})
    assert r.value() == {1: "one", "s": b"b"}  # str stays str, int keys are allowed
    assert LWWRegister.from_wire([1, 1, {2: "two"}]).value() == {2: "two"}
    for bad in ({1, 2}, 2**64, object()):
        with pytest.raises(CrdtError, match=r"^value is not msgpack data: \w"):
            r.set(bad)


def test_lww_register_equal_stamps_keep_the_larger_packed_value_both_ways():
    """Two values under one stamp (a faulty peer): both merge orders keep the value
    whose packed form is larger, and the same value under one stamp changes nothing."""
    small, large = LWWRegister.from_wire([5, 1, "a"]), LWWRegister.from_wire([5, 1, "b"])
    for first, second in ((small, large), (large, small)):
        target = LWWRegister.from_wire(first.to_wire())
        target.merge(second)
        assert target.value() == "b" and target.stamp() == (5, 1)
    older = LWWRegister.from_wire([4, 9, "z"])
    target = LWWRegister.from_wire(small.to_wire())
    target.merge(older)
    assert target.value() == "a"


def test_lww_register_wire_errors_are_exact():
    for bad in ([1, 2], (1, 2, 3), "x", [1, 2, 3, 4]):
        with pytest.raises(CrdtError, match=r"^LWWRegister wire form must be \[ts, replica, value\]$"):
            LWWRegister.from_wire(bad)
    with pytest.raises(CrdtError, match=r"^LWWRegister ts must be an int in 0\.\.2\*\*64-1, got -1$"):
        LWWRegister.from_wire([-1, 2, None])
    with pytest.raises(CrdtError, match=r"^LWWRegister replica must be an int in 0\.\.2\*\*64-1, got True$"):
        LWWRegister.from_wire([1, True, None])
    with pytest.raises(CrdtError, match=r"^value is not msgpack data: "):
        LWWRegister.from_wire([1, 2, {1, 2}])
    assert LWWRegister.from_wire([U64, U64, None]).stamp() == (U64, U64)


def _full_clock(n: int = VCLOCK_ENTRIES_MAX, first: int = 0) -> VClock:
    return VClock.from_wire([list(range(first, first + n)), [1] * n])


def test_vclock_size_bound_is_exact():
    """A clock may name exactly VCLOCK_ENTRIES_MAX replicas: ticking a known replica
    of a full clock works, a new one is refused; a merge reaching exactly the bound
    works, one past it is refused (and leaves the clock as it was)."""
    almost = _full_clock(VCLOCK_ENTRIES_MAX - 1).bind(10**6)
    almost.tick()  # the 256th replica
    assert len(almost.value()) == VCLOCK_ENTRIES_MAX
    almost.bind(3).tick()  # already named: fine although full
    assert almost.get(3) == 2
    with pytest.raises(CrdtError, match=r"^vector clock is full \(256 replicas\): prune it$"):
        almost.bind(10**6 + 1).tick()
    merged = _full_clock(VCLOCK_ENTRIES_MAX - 1)
    merged.merge(_full_clock(1, first=VCLOCK_ENTRIES_MAX - 1))
    assert len(merged.value()) == VCLOCK_ENTRIES_MAX
    with pytest.raises(CrdtError, match=r"^merged vector clock would name 257 replicas, more than 256: "
                                        r"prune departed replicas$"):
        merged.merge(_full_clock(1, first=10**6))
    assert len(merged.value()) == VCLOCK_ENTRIES_MAX and merged.get(10**6) == 0
    with pytest.raises(CrdtError, match=r"^vector clock has 257 entries, more than 256$"):
        _full_clock(VCLOCK_ENTRIES_MAX + 1)


def test_vclock_entry_stops_at_u64():
    top = VClock.from_wire([[5], [U64 - 1]]).bind(5)
    assert top.tick().value() == {5: U64}
    with pytest.raises(CrdtError, match=r"^vector clock entry of replica 5 would pass 2\*\*64-1$"):
        top.tick()
    assert top.get(5) == U64


def test_vclock_tick_delta_and_pending_delta():
    c = VClock().bind(7)
    first = c.tick()
    second = c.tick()
    assert first.value() == {7: 1} and second.value() == {7: 2}
    assert c.take_delta().value() == {7: 2} and c.take_delta() is None
    assert c.to_wire() == [[7], [2]]


def test_vclock_get_and_prune_edges():
    """get finds the first, the last and a missing replica between rows; prune to
    nothing leaves an empty clock that can tick again, and prune of nothing drops 0."""
    c = VClock.from_wire([[2, 4, 6], [1, 2, 3]]).bind(9)
    assert (c.get(2), c.get(6), c.get(3), c.get(7), c.get(0)) == (1, 3, 0, 0, 0)
    assert c.prune([2, 4, 6, 8]) == 0 and c.value() == {2: 1, 4: 2, 6: 3}
    assert c.prune([4]) == 2 and c.to_wire() == [[4], [2]]
    assert c.prune([]) == 1 and c.to_wire() == [[], []]
    c.tick()
    assert c.to_wire() == [[9], [1]]
    d = VClock().bind(5)
    d.tick()
    d.bind(1).tick()  # inserted before the first row
    d.bind(3).tick()  # and between two rows
    assert d.to_wire() == [[1, 3, 5], [1, 1, 1]]


def test_vclock_zero_entries_compare_as_missing():
    zero = VClock.from_wire([[1], [0]])
    assert zero.value() == {} and zero == VClock() and zero.compare(VClock()) == EQUAL
    assert not VClock.from_wire([[1], [1]]).compare(VClock()) == EQUAL
    assert VClock.from_wire([[1], [1]]).dominates(zero) and zero.dominates(VClock())
    assert not zero.dominates(VClock.from_wire([[1], [1]]))


@pytest.mark.parametrize("data, message", [
    ({"a": 1}, r"^vector clock must be a list of 2 columns$"),
    ([[1]], r"^vector clock must be a list of 2 columns$"),
    ([[1], [1], [1]], r"^vector clock must be a list of 2 columns$"),
    ([(1,), [1]], r"^vector clock must be a list, got tuple$"),
    ([[1], [-1]], r"^vector clock must be an int in 0\.\.2\*\*64-1, got -1$"),
    ([[1, 2], [1]], r"^vector clock: columns differ in length$"),
    ([[1], [1, 2]], r"^vector clock: columns differ in length$"),
    ([[2, 2], [1, 1]], r"^vector clock replica ids must be strictly ascending$"),
    ([[3, 2], [1, 1]], r"^vector clock replica ids must be strictly ascending$"),
])
def test_vclock_wire_errors_are_exact(data, message):
    with pytest.raises(CrdtError, match=message):
        VClock.from_wire(data)


@pytest.mark.parametrize("bad, message", [
    ([], r"^a vector clock must be a map, got list$"),
    ({"a": 1}, r"^vector clock replica must be an int in 0\.\.2\*\*64-1, got 'a'$"),
    ({1: 2**64}, r"^vector clock counter must be an int in 0\.\.2\*\*64-1, got 18446744073709551616$"),
    (dict.fromkeys(range(VCLOCK_ENTRIES_MAX + 1), 1), r"^a vector clock has 257 entries, more than 256$"),
])
def test_dict_clock_errors_are_exact(bad, message):
    with pytest.raises(CrdtError, match=message):
        vc_compare({}, bad)


def test_dict_clock_merge_bound_is_exact():
    low = dict.fromkeys(range(VCLOCK_ENTRIES_MAX - 1), 1)
    assert len(vc_merge(low, {10**6: 2})) == VCLOCK_ENTRIES_MAX
    assert vc_merge({1: 3, 2: 1}, {2: 4}) == {1: 3, 2: 4}
    with pytest.raises(CrdtError, match=r"^merged vector clock would name more than 256 replicas$"):
        vc_merge(low, {10**6: 1, 10**6 + 1: 1})
    assert vc_compare({1: 1}, {1: 2}) == BEFORE and vc_compare({}, {}) == EQUAL


def test_counter_amount_errors_are_exact_and_zero_is_a_no_op():
    g, p = GCounter().bind(1), PNCounter().bind(1)
    with pytest.raises(CrdtError, match=r"^a counter amount must be an int, got float$"):
        g.increment(1.0)
    with pytest.raises(CrdtError, match=r"^a counter amount must be an int, got bool$"):
        p.decrement(True)
    with pytest.raises(CrdtError, match=r"^a GCounter only grows: increment\(-1\) is negative$"):
        g.increment(-1)
    for counter in (g, p):  # zero changes nothing and records no delta
        assert counter.increment(0).to_wire() == type(counter)().to_wire()
        assert counter.take_delta() is None and counter.replicas() == []
    p.decrement()
    p.increment()
    assert p.to_wire() == [[1], [1], [1], []] and p.value() == 0


def test_counter_count_past_u64_names_the_replica():
    g = GCounter().bind(42)
    g.increment(U64)
    with pytest.raises(CrdtError, match=r"^count of replica 42 would pass 2\*\*64-1$"):
        g.increment(1)
    assert g.value() == U64


def test_counter_returned_deltas_stay_as_returned():
    """The pending delta is a separate object: later writes do not change a delta
    already handed to the caller, and the pending one is the join of all of them."""
    for cls in (GCounter, PNCounter):
        c = cls().bind(3)
        first = c.increment(1)
        second = c.increment(2)
        assert first.value() == 1 and second.value() == 3
        pending = c.take_delta()
        assert pending.value() == 3 and pending is not first and pending is not second
        c.increment(4)
        assert pending.value() == 3 and c.take_delta().value() == 7


# -- sets: exact errors and boundaries ------------------------------------------------------
I64_MIN = -(2**63)


def test_set_elements_at_the_int_bounds():
    """Ints are elements from -2**63 to 2**64-1 inclusive; one past either end, or any
    other type, is refused with the exact message."""
    g = GSet().bind(1)
    for ok in (I64_MIN, U64, 0, None, True, b"", ""):
        g.add(ok)
    for bad, shown in ((I64_MIN - 1, str(I64_MIN - 1)), (U64 + 1, str(U64 + 1)), (1.5, "1.5"),
                       ([1], r"\[1\]"), (bytearray(b"x"), r"bytearray\(b'x'\)")):
        with pytest.raises(CrdtError, match=r"^an element must be str, bytes, int \(i64/u64\), bool or None, "
                                            rf"got {shown}$"):
            g.add(bad)


def test_set_wire_order_is_none_then_numbers_then_bytes_then_str():
    elems = ["b", "a", b"b", b"a", U64, 2, True, -1, I64_MIN, None]
    for cls in (GSet, TwoPSet, ORSet):
        s = cls().bind(1)
        for e in elems:
            s.add(e)
        got = s.to_wire() if cls is GSet else s.to_wire()[0] if cls is TwoPSet else sorted(
            s.value(), key=sets.element_key)
        assert got == [None, I64_MIN, -1, True, 2, U64, b"a", b"b", "a", "b"]
    assert [sets.element_key(e) for e in (None, False, 3, b"x", "x")] == [
        (0, 0), (1, 0), (1, 3), (2, b"x"), (3, "x")]


def test_set_element_lists_at_their_size_bound():
    assert GSet.from_wire([0] * counters.ELEMENTS_MAX).value() == {0}
    for cls, data in ((GSet, [0] * (counters.ELEMENTS_MAX + 1)), (GSet, (1,)),
                      (TwoPSet, [[], [0] * (counters.ELEMENTS_MAX + 1)])):
        with pytest.raises(CrdtError, match=rf"^{cls.__name__} must be a list of at most 1048576 elements$"):
            cls.from_wire(data)


def test_gset_reads_and_merges_from_empty():
    a, b = GSet(), GSet().bind(2)
    assert "x" not in a and len(a) == 0 and a.value() == frozenset() and a.to_wire() == []
    a.merge(GSet())
    assert a.to_wire() == [] and a == GSet()
    b.add("x")
    a.merge(b)
    b.add("y")  # a's set is its own, not b's
    assert a.value() == {"x"} and b.value() == {"x", "y"}
    assert b.take_delta().to_wire() == ["x", "y"]
    assert GSet.from_wire([]) == GSet() and GSet.from_wire(["x", "x"]).to_wire() == ["x"]


def test_twopset_add_after_remove_still_ships_the_add():
    s = TwoPSet().bind(1)
    assert "x" not in s and len(s) == 0
    s.remove("x")  # barred in advance
    delta = s.add("x")
    assert delta.to_wire() == [["x"], []] and s.to_wire() == [[], ["x"]] and "x" not in s
    assert s.removed() == {"x"} and TwoPSet().removed() == frozenset()
    s.add("y")
    assert "y" in s and len(s) == 1 and s.value() == {"y"}
    assert s.take_delta().to_wire() == [["y"], ["x"]]
    fresh = TwoPSet()
    fresh.merge(TwoPSet.from_wire([["a", "b"], ["b"]]))
    assert fresh.to_wire() == [["a"], ["b"]] and fresh == TwoPSet.from_wire([["a"], ["b"]])
    fresh.merge(TwoPSet.from_wire([[], ["a"]]))
    assert fresh.value() == frozenset() and fresh.to_wire() == [[], ["a", "b"]]
    gone = TwoPSet().bind(1)
    gone.add("z")
    gone.remove("z")
    assert gone.to_wire() == [[], ["z"]] and gone == TwoPSet.from_wire([[], ["z"]])


@pytest.mark.parametrize("data", [[[]], [[], [], []], ([], []), "ab"])
def test_twopset_wire_shape_error_is_exact(data):
    with pytest.raises(CrdtError, match=r"^TwoPSet wire form must be \[added, removed\]$"):
        TwoPSet.from_wire(data)


def test_orset_counter_stops_at_u64():
    near = ORSet.from_wire([[5], [U64 - 1], ["a"], [5], [U64 - 1], [], []]).bind(5)
    near.add("b")
    assert near.to_wire()[:2] == [[5, 5], [U64 - 1, U64]]
    with pytest.raises(CrdtError, match=r"^dot counter of replica 5 would pass 2\*\*64-1$"):
        near.add("c")
    cloud = ORSet.from_wire([[5], [U64], ["a"], [], [], [5], [U64]]).bind(5)
    with pytest.raises(CrdtError, match=r"^dot counter of replica 5 would pass 2\*\*64-1$"):
        cloud.add("c")


def test_orset_next_counter_follows_the_context_and_the_cloud():
    s = ORSet.from_wire([[], [], [], [1, 2], [4, 9], [2, 3], [11, 2]]).bind(2)
    s.add("x")
    assert s.to_wire()[:3] == [[2], [12], ["x"]]
    t = ORSet.from_wire([[], [], [], [1, 2], [4, 9], [], []]).bind(1)
    assert t.add("y").to_wire()[:3] == [[1], [5], ["y"]]


def test_orset_reads_and_empty_removes():
    s = ORSet().bind(1)
    assert len(s) == 0 and "x" not in s and s.clear().to_wire() == ORSet().to_wire()
    assert s.take_delta() is None
    s.add("x")
    s.add("x")
    s.add("y")
    assert len(s) == 2 and "x" in s and s.value() == {"x", "y"}
    removal = s.remove("x")
    assert removal.to_wire() == [[], [], [], [], [], [1], [2]]  # the context: x's dot, no more
    assert s.to_wire() == [[1], [3], ["y"], [1], [3], [], []]


@pytest.mark.parametrize("data, message", [
    ([[], [], [], [], [], []], r"^ORSet wire form must be a list of 7 columns$"),
    ("1234567", r"^ORSet wire form must be a list of 7 columns$"),
    ([[1], [1], "a", [1], [1], [], []], r"^ORSet elems must be a list, one element per dot$"),
    ([[1], [1], [], [1], [1], [], []], r"^ORSet elems must be a list, one element per dot$"),
    ([[1], [2], ["a"], [1], [1], [], []], r"^ORSet dot \(1, 2\) is not in its own causal context$"),
    ([[1], [2], ["a"], [2], [5], [], []], r"^ORSet dot \(1, 2\) is not in its own causal context$"),
    ([[1], [], [], [], [], [], []], r"^ORSet dots: columns differ in length$"),
    (["1", [], [], [], [], [], []], r"^ORSet dots must be a list, got str$"),
    ([[], [], [], [], [], [1], {}], r"^ORSet cloud must be a list, got dict$"),
    ([[1], [0], ["a"], [1], [1], [], []], r"^ORSet dots: a dot counter is >= 1$"),
    ([[], [], [], [], [], [1], [0]], r"^ORSet cloud: a dot counter is >= 1$"),
    ([[1, 1], [1, 1], ["a", "b"], [1], [1], [], []],
     r"^ORSet dots must be strictly ascending by \(replica, counter\)$"),
    ([[], [], [], [], [], [2, 1], [1, 1]],
     r"^ORSet cloud must be strictly ascending by \(replica, counter\)$"),
    ([[], [], [], [1, 1], [1, 1], [], []], r"^ORSet context replica ids must be strictly ascending$"),
    ([[1], [1], [1.5], [1], [1], [], []], r"^an element must be str"),
])
def test_orset_wire_errors_are_exact(data, message):
    with pytest.raises(CrdtError, match=message):
        ORSet.from_wire(data)


def test_orset_wire_accepts_dots_at_the_edge_of_their_context():
    """A dot whose counter equals its replica's context entry, or that sits in the
    cloud, is inside the context; the read state is folded to its canonical form."""
    s = ORSet.from_wire([[1, 2], [3, 7], ["a", "b"], [1], [3], [2], [7]])
    assert s.value() == {"a", "b"}
    assert s == ORSet.from_wire(s.to_wire())
    folded = ORSet.from_wire([[1], [2], ["a"], [], [], [1, 1], [1, 2]])
    assert folded.to_wire() == [[1], [2], ["a"], [1], [2], [], []]
    assert ORSet.from_wire([[], [], [], [1], [0], [], []]) == ORSet()  # a zero entry is none


# -- the base contract -------------------------------------------------------------------------
def test_a_taken_tag_cannot_be_registered_twice():
    with pytest.raises(TypeError, match=r"^CRDT tag 'gc' is taken by GCounter$"):
        type("Impostor", (GCounter,), {"TAG": "gc"})
    assert CRDT_TYPES["gc"] is GCounter
    untagged = type("Untagged", (Crdt,), {})
    assert untagged.TAG == "" and "" not in CRDT_TYPES


def test_a_new_tag_registers_its_class():
    try:
        fresh = type("Fresh", (GSet,), {"TAG": "test-fresh", "__slots__": ()})
        assert CRDT_TYPES["test-fresh"] is fresh
        assert decode_fields({"f": ["test-fresh", ["x"]]})["f"].value() == {"x"}
    finally:
        CRDT_TYPES.pop("test-fresh", None)  # the registry is process-wide


def test_merge_of_another_type_names_both():
    with pytest.raises(CrdtError, match=r"^cannot merge PNCounter into GCounter$"):
        GCounter().merge(PNCounter())
    with pytest.raises(CrdtError, match=r"^cannot merge GSet into ORSet$"):
        ORSet().merge(GSet())


def test_a_fresh_object_has_no_clock_replica_zero_and_no_delta():
    r = LWWRegister()
    assert r.replica == 0 and r.take_delta() is None
    with pytest.raises(CrdtError, match=r"^this object has no clock: the node binds one \(crdt\.clock = fn\)$"):
        r.set(1)


def test_pending_delta_is_a_copy_of_the_first_delta():
    """The first delta of a turn is copied into the pending delta: later writes merge
    into that copy, never into the delta already returned to the caller."""
    s = GSet().bind(1)
    first = s.add("a")
    s.add("b")
    assert first.value() == {"a"} and s.take_delta().value() == {"a", "b"}
    r = LWWRegister().bind(1, lambda: 5)
    first = r.set("x")
    r.set("y")
    assert first.value() == "x" and r.take_delta().value() == "y"


def test_copy_bind_eq_and_repr():
    def clock():
        return 9

    g = GCounter().bind(3, clock)
    g.increment(2)
    twin = ORSet.copy(ORSet().bind(4, clock))  # the base copy: a wire round trip
    assert twin.replica == 4 and twin.clock is clock and twin.take_delta() is None
    assert g.bind(6).replica == 6 and g.clock is clock  # no clock given: kept
    assert repr(g) == "GCounter(2)" and repr(GSet()) == "GSet(frozenset())"
    assert g != 2 and GSet() != TwoPSet() and GSet() == GSet()
    with pytest.raises(TypeError):
        hash(g)


@pytest.mark.parametrize("left, right", [
    ([[1], [1], ["a"], [1, 2], [1, 1], [], []], [[2], [1], ["a"], [1, 2], [1, 1], [], []]),  # dot replica
    ([[1], [1], ["a"], [1], [2], [], []], [[1], [2], ["a"], [1], [2], [], []]),  # dot counter
    ([[1], [1], ["a"], [1], [1], [], []], [[1], [1], ["b"], [1], [1], [], []]),  # element
    ([[], [], [], [], [], [2], [5]], [[], [], [], [], [], [3], [5]]),  # cloud replica
    ([[], [], [], [], [], [2], [5]], [[], [], [], [], [], [2], [6]]),  # cloud counter
])
def test_orset_equality_sees_every_part_of_the_state(left, right):
    """Two ORSets that differ in one part of one dot or cloud entry are not equal."""
    assert ORSet.from_wire(left) != ORSet.from_wire(right)
    assert ORSet.from_wire(left) == wire_trip(ORSet.from_wire(left))  # and equal to itself


def test_vclock_equality_sees_ids_and_counts():
    one = VClock.from_wire([[1], [1]])
    assert one == VClock.from_wire([[1, 2], [1, 0]])  # a zero entry is a missing one
    assert one != VClock.from_wire([[1], [2]]) and one != VClock.from_wire([[2], [1]])
    assert one != VClock()


def test_find_row_gives_the_index_or_minus_one():
    ids = array("Q", [2, 4, 6])
    assert [vclock.find_row(ids, r) for r in (2, 4, 6)] == [0, 1, 2]
    assert [vclock.find_row(ids, r) for r in (0, 3, 7)] == [-1, -1, -1]
    assert vclock.find_row(vclock.EMPTY_Q, 1) == -1


def test_empty_columns_are_the_shared_empty_column():
    """Empty columns read from the wire, or left by a prune, are the one shared
    EMPTY_Q (no array allocated per empty clock or counter); writes replace it."""
    assert vclock.u64_column([], "x") is vclock.EMPTY_Q
    c = VClock.from_wire([[], []])
    assert c._ids is vclock.EMPTY_Q and c._counts is vclock.EMPTY_Q
    c = VClock.from_wire([[3], [1]])
    c.prune([])
    assert c._ids is vclock.EMPTY_Q and c._counts is vclock.EMPTY_Q
    c.bind(5).tick()
    assert c.to_wire() == [[5], [1]] and len(vclock.EMPTY_Q) == 0


def test_lww_register_unset_reads_none_stamped_zero_and_equality_sees_the_value():
    """An unset register reads None with stamp (0, 0), so any write beats it; two
    registers with one stamp but different values are not equal."""
    fresh = LWWRegister()
    assert fresh.value() is None and fresh.stamp() == (0, 0) and fresh.to_wire() == [0, 0, None]
    fresh.merge(LWWRegister.from_wire([0, 0, 2.5]))  # a value at stamp (0, 0) packing larger
    assert fresh.value() == 2.5 and fresh.stamp() == (0, 0)
    assert LWWRegister.from_wire([5, 1, "a"]) != LWWRegister.from_wire([5, 1, "b"])
    assert LWWRegister.from_wire([5, 1, "a"]) == LWWRegister.from_wire([5, 1, "a"])


def test_set_elements_msgpack_cannot_send_are_refused():
    """A str element with a lone surrogate is refused by every set, as LWWMap refuses
    such a key: msgpack could not pack the set's wire form.  (Found by these tests:
    the sets used to accept it.)"""
    for cls in (GSet, TwoPSet, ORSet):
        s = cls().bind(1)
        with pytest.raises(CrdtError, match=r"^a set element: not encodable as UTF-8$"):
            s.add("\ud800")
        assert s.take_delta() is None
    with pytest.raises(CrdtError, match=r"^a set element: not encodable as UTF-8$"):
        TwoPSet().remove("\udfff")
    for cls, wire in ((GSet, ["\ud800"]), (TwoPSet, [[], ["\ud800"]]),
                      (ORSet, [[1], [1], ["\ud800"], [1], [1], [], []])):
        with pytest.raises(CrdtError, match=r"^a set element: not encodable as UTF-8$"):
            cls.from_wire(wire)
