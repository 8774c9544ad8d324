"""CRDT merge kernels: examples, agreement between implementations, semilattice laws."""

from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_cy
from core_cy import AFTER, BEFORE, CONCURRENT, EQUAL, LWWMapState, ORSetState
from conftest_core import both, impl  # noqa: F401 (fixtures)

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
Q = "Q"
U64 = 2**64 - 1


def cols(d: dict):
    ids = sorted(d)
    return array(Q, ids), array(Q, [d[r] for r in ids])


# -- strategies ----------------------------------------------------------------------
rep_st = st.one_of(st.integers(0, 6), st.integers(0, U64))
counter_st = st.dictionaries(rep_st, st.one_of(st.integers(0, 9), st.integers(0, U64)), max_size=20)


def elem_of(r: int, c: int):
    """Every replica agrees on which element a dot added."""
    return ("e", (r * 7 + c) % 5)


@st.composite
def orset_st(draw):
    vv = draw(st.dictionaries(st.integers(0, 3), st.integers(0, 6), max_size=4))
    cloud = sorted(draw(st.sets(st.tuples(st.integers(0, 3), st.integers(1, 10)), max_size=6)))
    ctx_dots = sorted({(r, c) for r, n in vv.items() for c in range(1, n + 1)} | set(cloud))
    live = [d for d in ctx_dots if draw(st.booleans())]
    return ORSetState(
        array(Q, [r for r, _ in live]), array(Q, [c for _, c in live]),
        [elem_of(r, c) for r, c in live],
        *cols(vv), array(Q, [r for r, _ in cloud]), array(Q, [c for _, c in cloud]),
    )


@st.composite
def lww_st(draw):
    rows = draw(st.dictionaries(st.binary(max_size=3), st.tuples(st.integers(0, 4), st.integers(0, 3)),
                                max_size=12))
    keys = sorted(rows)
    return LWWMapState(keys, array(Q, [rows[k][0] for k in keys]), array(Q, [rows[k][1] for k in keys]),
                       [(k, *rows[k]) for k in keys])  # value determined by (key, ts, rep)


def canon(impl, s):
    return impl.orset_merge(s, core_cy.empty_orset())


# -- examples -------------------------------------------------------------------------
def test_gcounter_and_vclock_examples(impl):
    a = cols({1: 5, 3: 2, 9: 0})
    b = cols({1: 3, 2: 4, 3: 7})
    ids, counts = impl.gcounter_merge(*a, *b)
    assert (list(ids), list(counts)) == ([1, 2, 3, 9], [5, 4, 7, 0])
    assert impl.vclock_merge(*a, *b) == (ids, counts)
    assert impl.gcounter_merge(array(Q), array(Q), array(Q), array(Q)) == (array(Q), array(Q))
    assert impl.vclock_compare(*a, *a) == EQUAL
    assert impl.vclock_compare(*a, ids, counts) == BEFORE
    assert impl.vclock_compare(ids, counts, *a) == AFTER
    assert impl.vclock_compare(*a, *b) == CONCURRENT
    assert impl.vclock_compare(*cols({1: 0}), *cols({})) == EQUAL  # zero == missing
    assert impl.vclock_compare(*cols({}), *cols({4: 1})) == BEFORE
    assert impl.vclock_compare(*cols({4: 1}), *cols({})) == AFTER


def test_pncounter_example(impl):
    ids, p, n = impl.pncounter_merge(array(Q, [1, 2]), array(Q, [5, 1]), array(Q, [0, 3]),
                                     array(Q, [2, 4]), array(Q, [2, 1]), array(Q, [1, 9]))
    assert (list(ids), list(p), list(n)) == ([1, 2, 4], [5, 2, 1], [0, 3, 9])
    assert sum(p) - sum(n) == -4


def test_input_validation(impl):
    good = array(Q, [1, 2])
    with pytest.raises(TypeError):
        impl.gcounter_merge([1, 2], good, good, good)
    with pytest.raises(TypeError):
        impl.gcounter_merge(array("q", [1, 2]), good, good, good)
    with pytest.raises(ValueError):
        impl.gcounter_merge(array(Q, [2, 1]), good, good, good)
    with pytest.raises(ValueError):
        impl.vclock_compare(array(Q, [1, 1]), good, good, good)
    with pytest.raises(ValueError):
        impl.gcounter_merge(array(Q, [1]), good, good, good)
    with pytest.raises(TypeError):
        impl.orset_merge((1, 2), core_cy.empty_orset())
    bad_dots = core_cy.empty_orset()._replace(dot_reps=array(Q, [1, 1]), dot_ctrs=array(Q, [2, 1]),
                                             elems=["x", "y"])
    with pytest.raises(ValueError):
        impl.orset_merge(bad_dots, core_cy.empty_orset())
    e = core_cy.empty_lwwmap()
    with pytest.raises(ValueError):
        impl.lwwmap_merge(LWWMapState([b"b", b"a"], array(Q, [1, 1]), array(Q, [1, 1]), [1, 2]), e)
    with pytest.raises(TypeError):
        impl.lwwmap_merge(LWWMapState(["a"], array(Q, [1]), array(Q, [1]), [1]), e)
    with pytest.raises(ValueError):
        impl.lwwmap_merge(LWWMapState([b"a"], array(Q, [1, 2]), array(Q, [1]), [1]), e)


def test_inputs_not_mutated(impl):
    a = cols({1: 5, 3: 2})
    b = cols({1: 7, 2: 1})
    snapshot = [x.tobytes() for x in (*a, *b)]
    impl.gcounter_merge(*a, *b)
    assert [x.tobytes() for x in (*a, *b)] == snapshot


def _orset(dots: dict, vv: dict, cloud=()):
    d = sorted(dots)
    cl = sorted(cloud)
    return ORSetState(array(Q, [x[0] for x in d]), array(Q, [x[1] for x in d]), [dots[x] for x in d],
                      *cols(vv), array(Q, [x[0] for x in cl]), array(Q, [x[1] for x in cl]))


def test_orset_add_wins_and_observed_remove(impl):
    A, B = 1, 2
    base = _orset({(A, 1): "x", (A, 2): "y"}, {A: 2})
    # replica B removes x (it observed dot (A,1)): empty store, context still covers it
    removed = _orset({(A, 2): "y"}, {A: 2})
    # replica A concurrently re-adds x with a fresh dot
    readded = _orset({(A, 1): "x", (A, 2): "y", (A, 3): "x"}, {A: 3})
    m = impl.orset_merge(removed, readded)
    assert set(zip(m.dot_reps, m.dot_ctrs)) == {(A, 2), (A, 3)}
    assert set(m.elems) == {"x", "y"}  # add wins
    assert impl.orset_merge(readded, removed) == m
    # an unobserved remove cannot delete, an observed one does
    m2 = impl.orset_merge(base, removed)
    assert list(m2.elems) == ["y"]
    # causal context compaction: cloud (B,1),(B,2) folds into the vector, (B,5) stays
    s = _orset({(B, 5): "z"}, {}, cloud=[(B, 1), (B, 2), (B, 5)])
    c = canon(impl, s)
    assert (list(c.ctx_ids), list(c.ctx_ctrs)) == ([B], [2])
    assert (list(c.cloud_reps), list(c.cloud_ctrs)) == ([B], [5])
    e = impl.orset_merge(core_cy.empty_orset(), core_cy.empty_orset())
    assert e == core_cy.empty_orset()


def test_lwwmap_example(impl):
    a = LWWMapState([b"a", b"c"], array(Q, [5, 1]), array(Q, [1, 1]), ["a1", "c1"])
    b = LWWMapState([b"a", b"b", b"c"], array(Q, [5, 2, 1]), array(Q, [2, 2, 0]), ["a2", "b2", "c2"])
    m = impl.lwwmap_merge(a, b)
    assert m.keys == [b"a", b"b", b"c"]
    assert m.vals == ["a2", "b2", "c1"]  # (5,2) > (5,1); (1,1) > (1,0)
    assert list(m.ts) == [5, 2, 1] and list(m.reps) == [2, 2, 1]


# -- agreement ----------------------------------------------------------------------
@SETTINGS
@given(a=counter_st, b=counter_st, n1=counter_st, n2=counter_st)
def test_counters_agree(both, a, b, n1, n2):
    py, cy = both
    ca, cb = cols(a), cols(b)
    assert py.gcounter_merge(*ca, *cb) == cy.gcounter_merge(*ca, *cb)
    assert py.vclock_compare(*ca, *cb) == cy.vclock_compare(*ca, *cb)
    pa = (ca[0], ca[1], array(Q, [n1.get(r, 0) for r in ca[0]]))
    pb = (cb[0], cb[1], array(Q, [n2.get(r, 3) for r in cb[0]]))
    assert py.pncounter_merge(*pa, *pb) == cy.pncounter_merge(*pa, *pb)


@SETTINGS
@given(a=orset_st(), b=orset_st())
def test_orset_agree(both, a, b):
    py, cy = both
    assert py.orset_merge(a, b) == cy.orset_merge(a, b)


@SETTINGS
@given(a=lww_st(), b=lww_st())
def test_lwwmap_agree(both, a, b):
    py, cy = both
    assert py.lwwmap_merge(a, b) == cy.lwwmap_merge(a, b)


def test_large_inputs_agree(both):
    py, cy = both
    rnd = random.Random(11)
    a = {rnd.getrandbits(64): rnd.getrandbits(64) for _ in range(50_000)}
    b = dict(list(a.items())[:20_000])
    b.update({r: rnd.getrandbits(64) for r in list(a)[::3]})
    b.update({rnd.getrandbits(64): 1 for _ in range(10_000)})
    assert py.gcounter_merge(*cols(a), *cols(b)) == cy.gcounter_merge(*cols(a), *cols(b))
    assert py.vclock_compare(*cols(a), *cols(b)) == cy.vclock_compare(*cols(a), *cols(b))
    # OR-Set: 3 replicas, 20k dots each, half seen by the other side
    def state(seen_upto, own):
        dots = {(r, c): elem_of(r, c) for r in range(3) for c in range(1, seen_upto + 1)
                if (r + c) % 3}
        dots.update({(own, c): ("own", c) for c in range(seen_upto + 1, seen_upto + 10_000)})
        vv = {r: seen_upto for r in range(3)}
        vv[own] = seen_upto + 9_999
        return _orset(dots, vv, cloud=[(7, 5), (7, 9)])
    sa, sb = state(10_000, 0), state(8_000, 1)
    assert py.orset_merge(sa, sb) == cy.orset_merge(sa, sb)
    keys = sorted({rnd.randbytes(rnd.randrange(12)) for _ in range(30_000)})
    la = LWWMapState(keys, array(Q, [rnd.randrange(100) for _ in keys]),
                     array(Q, [rnd.randrange(4) for _ in keys]), list(range(len(keys))))
    kb = sorted(set(keys[::2]) | {b"\xff\xfe" + k for k in keys[:500]})
    kb.sort()
    lb = LWWMapState(kb, array(Q, [rnd.randrange(100) for _ in kb]),
                     array(Q, [5 for _ in kb]), [-i for i in range(len(kb))])
    assert py.lwwmap_merge(la, lb) == cy.lwwmap_merge(la, lb)


# -- semilattice laws (each implementation) ------------------------------------------
@SETTINGS
@given(a=counter_st, b=counter_st, c=counter_st)
def test_counter_laws(impl, a, b, c):
    A, B, C = cols(a), cols(b), cols(c)
    m = impl.gcounter_merge
    assert m(*A, *B) == m(*B, *A)
    assert m(*m(*A, *B), *C) == m(*A, *m(*B, *C))
    assert m(*A, *A) == A
    ab = m(*A, *B)
    assert impl.vclock_compare(*A, *ab) in (EQUAL, BEFORE)
    swap = {EQUAL: EQUAL, BEFORE: AFTER, AFTER: BEFORE, CONCURRENT: CONCURRENT}
    assert impl.vclock_compare(*B, *A) == swap[impl.vclock_compare(*A, *B)]
    # reference semantics of compare
    keys = set(a) | set(b)
    le = all(a.get(k, 0) <= b.get(k, 0) for k in keys)
    ge = all(a.get(k, 0) >= b.get(k, 0) for k in keys)
    expect = EQUAL if le and ge else BEFORE if le else AFTER if ge else CONCURRENT
    assert impl.vclock_compare(*A, *B) == expect


@SETTINGS
@given(a=orset_st(), b=orset_st(), c=orset_st())
def test_orset_laws(impl, a, b, c):
    m = impl.orset_merge
    assert m(a, b) == m(b, a)
    assert m(m(a, b), c) == m(a, m(b, c))
    ca = canon(impl, a)
    assert m(a, a) == ca and m(ca, ca) == ca
    # result dots are all inside the result context; cloud is canonical
    r = m(a, b)
    vv = dict(zip(r.ctx_ids, r.ctx_ctrs))
    cloud = set(zip(r.cloud_reps, r.cloud_ctrs))
    for d in zip(r.dot_reps, r.dot_ctrs):
        assert d[1] <= vv.get(d[0], 0) or d in cloud
    for rr, cc in cloud:
        assert cc > vv.get(rr, 0) + 1


@SETTINGS
@given(a=lww_st(), b=lww_st(), c=lww_st())
def test_lwwmap_laws(impl, a, b, c):
    m = impl.lwwmap_merge
    assert m(a, b) == m(b, a)
    assert m(m(a, b), c) == m(a, m(b, c))
    assert m(a, a) == a


# -- input errors: each names the argument and the rule it breaks ---------------------
# Both implementations give the same texts (a caller's log is all that tells which
# column of which side was wrong).  One fault per case, every argument once.


def _clock_args(**bad):
    args = {"a_ids": array(Q, [1, 2]), "a_counts": array(Q, [5, 6]),
            "b_ids": array(Q, [1, 3]), "b_counts": array(Q, [7, 8])}
    return [bad.get(k, v) for k, v in args.items()]


def _pn_args(**bad):
    args = {"a_ids": array(Q, [1, 2]), "a_p": array(Q, [5, 6]), "a_n": array(Q, [1, 1]),
            "b_ids": array(Q, [1, 3]), "b_p": array(Q, [7, 8]), "b_n": array(Q, [0, 2])}
    return [bad.get(k, v) for k, v in args.items()]


def _orset_with(**cols):
    good = ORSetState(array(Q, [1, 1, 2]), array(Q, [1, 2, 1]), ["x", "y", "z"],
                      array(Q, [1, 2]), array(Q, [2, 1]), array(Q, [3, 3]), array(Q, [2, 4]))
    return good._replace(**cols)


def _lww_with(**cols):
    return LWWMapState([b"a", b"b"], array(Q, [1, 2]), array(Q, [1, 1]), [10, 20])._replace(**cols)


CLOCK_KERNELS = ("gcounter_merge", "vclock_merge", "vclock_compare")
COL = r"must be array\('Q'\), got list$"
INPUT_ERRORS = [
    *[(k, _clock_args(**{n: [1, 2]}), TypeError, f"^{n} {COL}")
      for k in CLOCK_KERNELS for n in ("a_ids", "a_counts", "b_ids", "b_counts")],
    *[(k, _clock_args(a_counts=array(Q, [5])), ValueError,
       r"^a: columns differ in length \(2 != 1\)$") for k in CLOCK_KERNELS],
    *[(k, _clock_args(b_counts=array(Q, [5, 6, 7])), ValueError,
       r"^b: columns differ in length \(2 != 3\)$") for k in CLOCK_KERNELS],
    *[(k, _clock_args(**{side: array(Q, ids), side.replace("ids", "counts"): array(Q, [1, 1])}),
       ValueError, f"^{side} must be strictly ascending$")
      for k in CLOCK_KERNELS for side in ("a_ids", "b_ids") for ids in ([2, 1], [4, 4])],
    *[("pncounter_merge", _pn_args(**{n: [1, 2]}), TypeError, f"^{n} {COL}")
      for n in ("a_ids", "a_p", "a_n", "b_ids", "b_p", "b_n")],
    *[("pncounter_merge", _pn_args(**{n: array(Q, [9])}), ValueError,
       rf"^{n[0]}: columns differ in length \(2 != 1\)$") for n in ("a_p", "a_n", "b_p", "b_n")],
    *[("pncounter_merge", _pn_args(**{side: array(Q, ids)}), ValueError,
       f"^{side} must be strictly ascending$")
      for side in ("a_ids", "b_ids") for ids in ([2, 1], [4, 4])],
    ("orset_merge", ((1, 2), _orset_with()), TypeError, r"^a must be an ORSetState$"),
    ("orset_merge", (_orset_with(), list(_orset_with())), TypeError, r"^b must be an ORSetState$"),
    ("orset_merge", (_orset_with(elems=("x", "y", "z")), _orset_with()), TypeError,
     r"^a\.elems must be a list$"),
    ("orset_merge", (_orset_with(), _orset_with(elems=("x", "y", "z"))), TypeError,
     r"^b\.elems must be a list$"),
    *[("orset_merge", (_orset_with(**{c: [1]}), _orset_with()) if side == "a" else (_orset_with(), _orset_with(**{c: [1]})),
       TypeError, f"^{side}\\.{c} {COL}")
      for side in ("a", "b")
      for c in ("dot_reps", "dot_ctrs", "ctx_ids", "ctx_ctrs", "cloud_reps", "cloud_ctrs")],
    *[("orset_merge", (bad, _orset_with()) if side == "a" else (_orset_with(), bad), ValueError,
       f"^{side} {what}: columns differ in length \\({n1} != {n2}\\)$")
      for side in ("a", "b")
      for bad, what, n1, n2 in (
          (_orset_with(dot_ctrs=array(Q, [1, 2])), "dots", 3, 2),
          (_orset_with(elems=["x"]), "dots/elems", 3, 1),
          (_orset_with(ctx_ctrs=array(Q, [2])), "context", 2, 1),
          (_orset_with(cloud_ctrs=array(Q, [2])), "cloud", 2, 1))],
    *[("orset_merge", (bad, _orset_with()) if side == "a" else (_orset_with(), bad), ValueError,
       f"^{side}{what} must be strictly ascending{tail}$")
      for side in ("a", "b")
      for bad, what, tail in (
          (_orset_with(ctx_ids=array(Q, [2, 1])), ".ctx_ids", ""),
          (_orset_with(ctx_ids=array(Q, [2, 2])), ".ctx_ids", ""),
          (_orset_with(dot_reps=array(Q, [2, 1, 2])), " dots", r" by \(replica, counter\)"),
          (_orset_with(dot_ctrs=array(Q, [2, 2, 1])), " dots", r" by \(replica, counter\)"),
          (_orset_with(dot_ctrs=array(Q, [2, 1, 1])), " dots", r" by \(replica, counter\)"),
          (_orset_with(cloud_reps=array(Q, [4, 3])), " cloud", r" by \(replica, counter\)"),
          (_orset_with(cloud_ctrs=array(Q, [4, 4])), " cloud", r" by \(replica, counter\)"))],
    ("lwwmap_merge", (_lww_with()[:3], _lww_with()), TypeError, r"^a must be an LWWMapState$"),
    ("lwwmap_merge", (_lww_with(), list(_lww_with())), TypeError, r"^b must be an LWWMapState$"),
    *[("lwwmap_merge", (bad, _lww_with()) if side == "a" else (_lww_with(), bad), TypeError,
       f"^{side}\\.keys and {side}\\.vals must be lists$")
      for side in ("a", "b") for bad in (_lww_with(keys=(b"a", b"b")), _lww_with(vals=(10, 20)))],
    *[("lwwmap_merge", (_lww_with(**{c: [1, 2]}), _lww_with()) if side == "a" else (_lww_with(), _lww_with(**{c: [1, 2]})),
       TypeError, f"^{side}\\.{c} {COL}") for side in ("a", "b") for c in ("ts", "reps")],
    *[("lwwmap_merge", (bad, _lww_with()) if side == "a" else (_lww_with(), bad), ValueError,
       rf"^{side}: columns differ in length \(2 != 1\)$")
      for side in ("a", "b")
      for bad in (_lww_with(ts=array(Q, [1])), _lww_with(reps=array(Q, [1])), _lww_with(vals=[1]))],
    *[("lwwmap_merge", (bad, _lww_with()) if side == "a" else (_lww_with(), bad), err,
       f"^{side}\\.keys must be {rule}$")
      for side in ("a", "b")
      for bad, err, rule in ((_lww_with(keys=[b"a", "b"]), TypeError, "bytes"),
                             (_lww_with(keys=[b"b", b"a"]), ValueError, "strictly ascending"),
                             (_lww_with(keys=[b"a", b"a"]), ValueError, "strictly ascending"))],
]


@pytest.mark.parametrize("kernel, args, error, message", INPUT_ERRORS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(INPUT_ERRORS)])
def test_input_errors_name_the_argument_and_the_rule(impl, kernel, args, error, message):
    with pytest.raises(error, match=message):
        getattr(impl, kernel)(*args)


@pytest.mark.parametrize("kernel", ["gcounter_merge", "vclock_compare", "pncounter_merge",
                                    "orset_merge", "lwwmap_merge"])
def test_one_row_and_empty_inputs_are_valid(impl, kernel):
    """The ordering checks start at the second row: one row is always in order."""
    one = {"gcounter_merge": (array(Q, [7]), array(Q, [1]), array(Q), array(Q)),
           "vclock_compare": (array(Q, [7]), array(Q, [1]), array(Q), array(Q)),
           "pncounter_merge": (array(Q, [7]), array(Q, [1]), array(Q, [0]), array(Q), array(Q), array(Q)),
           "orset_merge": (_orset_with(dot_reps=array(Q, [1]), dot_ctrs=array(Q, [1]), elems=["x"],
                                  ctx_ids=array(Q, [1]), ctx_ctrs=array(Q, [1]),
                                  cloud_reps=array(Q, [3]), cloud_ctrs=array(Q, [3])),
                           core_cy.empty_orset()),
           "lwwmap_merge": (_lww_with(keys=[b"k"], ts=array(Q, [1]), reps=array(Q, [1]), vals=[1]),
                            core_cy.empty_lwwmap())}[kernel]
    getattr(impl, kernel)(*one)


def test_lwwmap_equal_stamps_keep_the_row_from_a(impl):
    """Equal (ts, rep) identify one write: the merge keeps a's row, never b's."""
    a = LWWMapState([b"k"], array(Q, [5]), array(Q, [2]), ["from a"])
    b = LWWMapState([b"k"], array(Q, [5]), array(Q, [2]), ["from b"])
    assert impl.lwwmap_merge(a, b).vals == ["from a"]
    assert impl.lwwmap_merge(b, a).vals == ["from b"]


def test_pncounter_columns_hold_the_whole_u64_range(impl):
    """Every output column is array('Q'): counts up to 2**64-1 from either side."""
    out = impl.pncounter_merge(array(Q, [1]), array(Q, [1]), array(Q, [1]),
                               array(Q, [1, 2]), array(Q, [U64, U64]), array(Q, [U64, 3]))
    assert [col.typecode for col in out] == ["Q", "Q", "Q"]
    assert [list(col) for col in out] == [[1, 2], [U64, U64], [U64, 3]]
