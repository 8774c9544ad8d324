"""Counters, sets, registers and vector clocks of protocols.crdt: lattice laws, deltas,
wire round trips, hostile wire input, value semantics, counter folding, clock pruning.

The merge loops run in whichever core_cy kernel is active; the law tests repeat each
check with every kernel bundle patched in (``kernels``), so the twin and the compiled
module are both exercised.
"""

from __future__ import annotations

import contextlib
import random

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


# -- counter folding -----------------------------------------------------------------
OWNER, ZOMBIE, GONE = 0, 1, 2  # replica indexes: the owner folds ZOMBIE's and GONE's rows
fold_step_st = st.one_of(
    st.tuples(st.just("inc"), st.integers(0, 2), st.integers(-3, 6)),
    st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("snap"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("fold"), st.just(OWNER), st.just(0)),
)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([GCounter, PNCounter]), st.lists(fold_step_st, max_size=25),
       st.randoms(use_true_random=False))
def test_fold_then_stale_copies_in_any_order_count_once(cls, steps, rnd):
    objs = [cls().bind(r) for r in REPLICAS]
    total, snaps, deltas = 0, [], []
    for kind, i, n in steps:
        if kind == "inc":
            n = abs(n) if cls is GCounter else n
            deltas.append(objs[i].increment(n))
            total += n
        elif kind == "sync":
            objs[i].merge(objs[n])
        elif kind == "snap":
            snaps.append(objs[i].copy())
        else:
            deltas.append(objs[OWNER].fold([REPLICAS[ZOMBIE], REPLICAS[GONE]], REPLICAS[OWNER],
                                           now_ns=1000, ttl_ns=10))
    copies = snaps + [o.copy() for o in objs] + deltas
    for order in range(2):
        rnd.shuffle(copies)
        assert joined(cls, copies).value() == total
        owner = objs[OWNER].copy()
        for c in copies:
            owner.merge(c)
        assert owner.value() == total
    assert owner.expire_folds(1009) == 0
    owner.expire_folds(1010)  # a zombie's unfolded excess keeps its marker
    assert owner.value() == total
    owner.fold([REPLICAS[ZOMBIE], REPLICAS[GONE]], REPLICAS[OWNER], now_ns=2000, ttl_ns=10)
    owner.expire_folds(2010)  # all folded: every marker goes, the value stands
    assert owner.value() == total and owner.folds() == {}


def test_fold_moves_rows_and_a_zombie_counts_only_its_excess():
    owner, zombie = GCounter().bind(1), GCounter().bind(2)
    zombie.increment(5)
    owner.merge(zombie)
    stale = zombie.copy()
    delta = owner.fold([2], into=1, now_ns=100, ttl_ns=50)
    assert owner.to_wire() == [[1], [5], [[2, 5, 150]]] and owner.value() == 5
    owner.merge(stale)
    assert owner.value() == 5 and owner.to_wire()[0] == [1]
    zombie.increment(3)  # kept writing: its row 8 is 3 above the marker
    owner.merge(zombie)
    assert owner.value() == 8
    zombie.merge(delta)
    zombie.increment(1)
    owner.merge(zombie)
    assert owner.value() == zombie.value() == 9
    assert owner.expire_folds(10**6) == 0  # the zombie's excess row is not folded yet
    owner.fold([2], into=1, now_ns=120, ttl_ns=50)
    assert owner.to_wire() == [[1], [9], [[2, 9, 170]]]
    zombie.merge(owner)  # its own row is now covered by the marker and dropped ...
    assert zombie.value() == 9 and zombie.to_wire()[0] == [1]
    zombie.increment(2)  # ... so it counts on from the folded total, not from 0
    owner.merge(zombie.take_delta())
    assert owner.value() == zombie.value() == 11


def test_pn_fold_of_both_sides():
    owner, gone = PNCounter().bind(1), PNCounter().bind(2)
    gone.increment(4)
    gone.decrement(9)
    owner.merge(gone)
    owner.fold([2], into=1, now_ns=0, ttl_ns=10)
    owner.merge(gone)
    assert owner.value() == -5 and owner.to_wire() == [[1], [4], [9], [[2, 4, 9, 10]]]


def test_expired_markers_let_a_stale_copy_count_twice():
    """The documented limit: a copy older than the markers' TTL, merged after they
    expired, counts the folded rows again."""
    owner, gone = GCounter().bind(1), GCounter().bind(2)
    gone.increment(5)
    owner.merge(gone)
    owner.fold([2], into=1, now_ns=0, ttl_ns=10)
    assert owner.expire_folds(9) == 0 and owner.expire_folds(10) == 1
    owner.merge(gone)  # a copy from before the fold, merged too late
    assert owner.value() == 10 and owner.folds() == {}


def test_fold_refuses_a_retired_or_folded_target():
    g = GCounter().bind(1)
    g.increment()
    with pytest.raises(CrdtError):
        g.fold([1], into=1, now_ns=0, ttl_ns=1)
    g.fold([1], into=2, now_ns=0, ttl_ns=1)
    with pytest.raises(CrdtError):
        g.fold([3], into=1, now_ns=0, ttl_ns=1)
    assert g.fold([9], into=2, now_ns=0, ttl_ns=1).value() == 0 and g.take_delta() is not None


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
