"""LWWMap, TTLMap and ORMap: lattice laws, deltas vs full merge, wire form, semantics.

The harness at the top (random op runs on three replicas, junk and mutated wire
forms) is shared with tests/test_crdt_sequence.py.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.crdt import maps
from protocols.crdt.base import U64_MAX, Crdt, CrdtError
from protocols.crdt.counters import GCounter, PNCounter
from protocols.crdt.maps import LWWMap, ORMap, TTLMap
from protocols.crdt.sequence import RGA

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
REPLICA_IDS = (1, 2, U64_MAX)  # the largest id checks the u64 bound end to end
KEYS = ("a", "b", "é", "")
VALUES = (0, -1, "v", b"\x00", [1, [2]], {"k": None}, 2.5, True, U64_MAX)


# -- shared harness ------------------------------------------------------------------------
def ops_st(codes: int):
    """Op lists: (replica index, code, a, b); code == codes means "merge the full state
    of replica a into this one" (a sync), the others are the type's mutators."""
    return st.lists(st.tuples(st.integers(0, 2), st.integers(0, codes), st.integers(0, 9),
                              st.integers(0, 9)), max_size=24)


skews_st = st.lists(st.integers(0, 6), min_size=3, max_size=3)  # equal skews make ties


def run_ops(cls, apply_op, codes: int, ops, skews):
    """Three replicas of ``cls`` driven by ``ops``; returns (replicas, deltas by replica)."""
    time = [1_000]
    replicas = [cls().bind(rid, lambda s=s: time[0] + s) for rid, s in zip(REPLICA_IDS, skews)]
    deltas: list[list[Crdt]] = [[], [], []]
    for who, code, a, b in ops:
        time[0] += 1
        if code == codes:
            replicas[who].merge(replicas[a % 3])
            continue
        delta = apply_op(replicas[who], code, a, b)
        if delta is not None:
            deltas[who].append(delta)
    return replicas, deltas


def joined(cls, states) -> Crdt:
    out = cls()
    for s in states:
        out.merge(s)
    return out


def shipped(state: Crdt) -> Crdt:
    """``state`` after a trip through msgpack, as a peer receives it."""
    raw = msgpack.packb(state.to_wire())
    return type(state).from_wire(msgpack.unpackb(raw, raw=False, strict_map_key=False))


def check_deltas_equal_full_merge(cls, replicas, deltas, seed: int) -> None:
    full = joined(cls, replicas)
    every = [d for ds in deltas for d in ds]
    rng = random.Random(seed)
    bag = every + rng.sample(every, len(every) // 2)  # duplicates
    rng.shuffle(bag)
    assert joined(cls, map(shipped, bag)) == full
    for replica, own in zip(replicas, deltas):  # the pending delta joins what was made
        pending = replica.take_delta()
        assert (pending is None) == (not own)
        if own:
            assert pending == joined(cls, own)


def check_laws(cls, a, b, c) -> None:
    assert joined(cls, [a, b]) == joined(cls, [b, a])
    assert joined(cls, [joined(cls, [a, b]), c]) == joined(cls, [a, joined(cls, [b, c])])
    assert joined(cls, [a, a]) == joined(cls, [a])
    twice = a.copy()
    twice.merge(a)
    assert twice == a


def check_round_trip(states) -> None:
    for s in states:
        back = shipped(s)
        assert back == s and back.to_wire() == s.to_wire()


scalar_st = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), U64_MAX),
                      st.floats(allow_nan=False), st.text(max_size=4), st.binary(max_size=4))
junk_st = st.recursive(scalar_st, lambda inner: st.one_of(
    st.lists(inner, max_size=6),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 9)), inner, max_size=3)),
    max_leaves=30)


def mutated(wire, rng: random.Random, junk):
    """``wire`` with one random change deep inside: a leaf swapped for junk, an item
    dropped or duplicated, or two items swapped (hits the checks past the outer shape)."""
    if not isinstance(wire, list) or not wire or rng.random() < 0.25:
        return junk
    i = rng.randrange(len(wire))
    out = list(wire)
    roll = rng.random()
    if roll < 0.15:
        del out[i]
    elif roll < 0.3:
        out.insert(i, out[i])
    elif roll < 0.4:
        j = rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    else:
        out[i] = mutated(out[i], rng, junk)
    return out


def check_junk(cls, data) -> None:
    """from_wire either raises CrdtError or gives a state that round-trips."""
    try:
        obj = cls.from_wire(data)
    except CrdtError:
        return
    assert type(obj) is cls
    check_round_trip([obj])


@pytest.fixture
def kernel(impl, monkeypatch):
    """Run a test with the maps merging through one core_cy implementation."""
    monkeypatch.setattr(maps, "lwwmap_merge", impl.lwwmap_merge)
    monkeypatch.setattr(maps, "orset_merge", impl.orset_merge)
    return impl


# -- the types' op tables -------------------------------------------------------------------
def lww_op(m: LWWMap, code: int, a: int, b: int):
    key = KEYS[a % len(KEYS)]
    return m.set(key, VALUES[b % len(VALUES)]) if code == 0 else m.delete(key)


def ttl_op(m: TTLMap, code: int, a: int, b: int):
    key = KEYS[a % len(KEYS)]
    return m.set(key, VALUES[b % len(VALUES)], 1 + 3 * b) if code == 0 else m.delete(key)


def _set_in(sub: str, value):
    return lambda v: v.set(sub, value)


def orm_op(m: ORMap, code: int, a: int, b: int):
    key, sub, value = KEYS[a % 3], KEYS[b % 3], VALUES[b % len(VALUES)]
    steps = {
        0: lambda: m.update(key, LWWMap, _set_in(sub, value)),
        1: lambda: m.remove(key),
        2: lambda: m.update(key, RGA, lambda v: v.append(value)),
        3: lambda: m.update(key, ORMap, lambda v: v.update(sub, LWWMap, _set_in("x", value))),
        4: lambda: m.update(key, ORMap, lambda v: v.remove(sub)),
        5: lambda: m.update(key, "lwwm"),
    }
    try:
        return steps[code]()
    except CrdtError:  # the key holds another type: refused, no delta
        return None


TABLES = {LWWMap: (lww_op, 2), TTLMap: (ttl_op, 2), ORMap: (orm_op, 6)}
TYPES_UNDER_TEST = pytest.mark.parametrize("cls", list(TABLES), ids=lambda c: c.__name__)


# -- properties -----------------------------------------------------------------------------
@TYPES_UNDER_TEST
@SETTINGS
@given(data=st.data(), skews=skews_st, seed=st.integers(0, 2**32))
def test_deltas_in_any_order_equal_full_merge(kernel, cls, data, skews, seed):
    op, codes = TABLES[cls]
    replicas, deltas = run_ops(cls, op, codes, data.draw(ops_st(codes)), skews)
    check_deltas_equal_full_merge(cls, replicas, deltas, seed)


@TYPES_UNDER_TEST
@SETTINGS
@given(data=st.data(), skews=skews_st)
def test_merge_laws_and_round_trip(kernel, cls, data, skews):
    op, codes = TABLES[cls]
    replicas, deltas = run_ops(cls, op, codes, data.draw(ops_st(codes)), skews)
    check_laws(cls, *replicas)
    check_round_trip(replicas + [d for ds in deltas for d in ds])


@TYPES_UNDER_TEST
@settings(max_examples=150, deadline=None)
@given(junk=junk_st)
def test_from_wire_junk_raises_only_crdt_error(cls, junk):
    check_junk(cls, junk)


@TYPES_UNDER_TEST
@settings(max_examples=150, deadline=None)
@given(data=st.data(), junk=junk_st, seed=st.integers(0, 2**32))
def test_from_wire_mutated_state_raises_only_crdt_error(cls, data, junk, seed):
    op, codes = TABLES[cls]
    replicas, _ = run_ops(cls, op, codes, data.draw(ops_st(codes)), [0, 0, 0])
    check_junk(cls, mutated(joined(cls, replicas).to_wire(), random.Random(seed), junk))


# -- LWWMap ---------------------------------------------------------------------------------
def clocked(cls, replica: int, now: list[int]):
    return cls().bind(replica, lambda: now[0])


def synced(*replicas: Crdt) -> None:
    """Full-state exchange until every replica holds the join."""
    total = joined(type(replicas[0]), replicas)
    for r in replicas:
        r.merge(total)


def test_lww_local_write_beats_what_it_saw_even_with_a_clock_behind():
    fast, slow = clocked(LWWMap, 1, [10**6]), clocked(LWWMap, 2, [5])
    fast.set("k", "old")
    slow.merge(fast)
    slow.set("k", "new")  # clock says 5, but the write must follow what it saw
    synced(fast, slow)
    assert fast.get("k") == slow.get("k") == "new"


def test_lww_equal_stamps_break_ties_by_replica_id():
    now = [7]
    low, high = clocked(LWWMap, 3, now), clocked(LWWMap, 9, now)
    low.set("k", "low")
    high.set("k", "high")
    synced(low, high)
    assert low.value() == high.value() == {"k": "high"}


def test_lww_delete_is_a_tombstone_that_wins_by_stamp_and_purge_drops_old_ones():
    now = [100]
    a, b = clocked(LWWMap, 1, now), clocked(LWWMap, 2, now)
    old_write = a.set("k", 1)
    now[0] = 200
    b.set("k", 2)
    b.delete("k")
    b.merge(old_write)  # an older write arriving late does not revive the key
    assert "k" not in b and b.get("k", "gone") == "gone" and len(b) == 0
    assert b.to_wire() == [["k", 201, 2]]
    assert b.purge(201) == 0 and b.purge(202) == 1 and b.to_wire() == []
    now[0] = 0  # the clock went back: a fresh write still follows the purged tombstone
    b.set("k", 3)
    assert b.to_wire() == [["k", 202, 2, 3]]


def test_lww_reads():
    m = clocked(LWWMap, 1, [1])
    for k in ("b", "é", "a"):
        m.set(k, k.upper())
    m.delete("b")
    assert m.keys() == ["a", "é"] and len(m) == 2 and m.value() == {"a": "A", "é": "É"}
    assert "a" in m and "b" not in m and 3 not in m and m.get("zz") is None


def test_lww_values_are_checked_copies():
    m = clocked(LWWMap, 1, [1])
    mine = [1, (2, {"x": 3})]
    m.set("k", mine)
    mine.append("later")
    assert m.get("k") == [1, [2, {"x": 3}]]
    too_deep: list = []
    for _ in range(maps.VALUE_DEPTH_MAX + 1):
        too_deep = [too_deep]
    for bad in (object(), {1.5j: 1}, 2**64, too_deep, "\ud800", bytearray(b"x")):
        with pytest.raises(CrdtError):
            m.set("k", bad)
    for bad_key in ("x" * 1025, 5, "\udfff"):
        with pytest.raises(CrdtError):
            m.set(bad_key, 1)
    m.set("x" * 1024, 1)


def test_lww_from_wire_checks_order_and_bounds():
    for bad in ([["b", 1, 1, 0], ["a", 1, 1, 0]], [["a", 1, 1, 0], ["a", 2, 1, 0]],
                [["a", -1, 1, 0]], [["a", 1, 2**64, 0]], [["a", 1, 1, 0, 0]], [["a", True, 1]],
                {"a": 1}, [[b"a", 1, 1]]):
        with pytest.raises(CrdtError):
            LWWMap.from_wire(bad)


def test_counters_and_clocks_at_their_bounds():
    full = LWWMap.from_wire([["k", U64_MAX, 1, 0]]).bind(2, lambda: 0)
    with pytest.raises(CrdtError):
        full.set("j", 1)  # no stamp left above what it has seen
    with pytest.raises(CrdtError):
        LWWMap().bind(1, lambda: -1).set("k", 1)
    with pytest.raises(CrdtError):
        LWWMap().set("k", 1)  # no clock bound
    spent = ORMap.from_wire([[], [[1, U64_MAX]], []]).bind(1)
    with pytest.raises(CrdtError):
        spent.update("k", LWWMap)
    with pytest.raises(CrdtError):
        LWWMap.from_wire([None] * (maps.ELEMENTS_MAX + 1))


def test_merging_another_type_raises():
    with pytest.raises(CrdtError):
        LWWMap().merge(TTLMap())


# -- TTLMap ---------------------------------------------------------------------------------
def test_ttl_entries_expire():
    now = [1_000]
    m = clocked(TTLMap, 1, now)
    m.set("k", "v", 50)
    assert m.get("k", 1_049) == "v" and m.get("k", 1_050) is None
    assert m.value() == {"k": "v"} and m.value(1_050) == {}
    now[0] = 1_050
    assert m.value() == {}
    with pytest.raises(CrdtError):
        m.set("k", "v", 0)


def test_ttl_expire_keeps_stamps_so_a_late_older_write_stays_dead():
    now = [100]
    lagging, a, b = (clocked(TTLMap, r, now) for r in (1, 2, 3))
    late = lagging.set("k", "long-lived", 10_000)  # older write, later expiry
    now[0] = 200
    a.set("k", "short", 10)  # newer write wins everywhere, expires at 210
    b.merge(a)
    assert a.expire(300) == 1 and a.to_wire() == [["k", 200, 2]]
    a.merge(late)
    b.merge(late)
    for t in (300, 5_000, 20_000):
        assert a.value(t) == b.value(t) == {}
    assert a.purge(201) == 1 and a.value(300) == {}


def test_ttl_wire_rows_carry_expiry():
    m = clocked(TTLMap, 4, [10])
    m.set("k", [1], 5)
    assert m.to_wire() == [["k", 10, 4, 15, [1]]]
    for bad in ([["k", 10, 4, 15]], [["k", 10, 4, -1, 1]]):
        with pytest.raises(CrdtError):
            TTLMap.from_wire(bad)


# -- ORMap ----------------------------------------------------------------------------------
def fixed_clock() -> int:  # nested LWW writes read the map's clock
    return 5


def test_ormap_add_wins_against_a_concurrent_remove():
    a, b = ORMap().bind(1, fixed_clock), ORMap().bind(2, fixed_clock)
    a.update("hits", GCounter, lambda c: c.increment(3))
    b.merge(a)
    b.update("hits", GCounter, lambda c: c.increment(4))
    a.merge(b)
    a.remove("hits")  # observed 3 (a's) and 4 (b's)
    b.update("hits", GCounter, lambda c: c.increment(1))  # concurrent with the remove
    synced(a, b)
    # the key stays; b's own contributions (4 + 1) survive, a's observed 3 is gone
    assert a.value() == b.value() == {"hits": 5}


def test_ormap_remove_resets_so_a_later_add_starts_empty():
    a, b = ORMap().bind(1, fixed_clock), ORMap().bind(2, fixed_clock)
    a.update("n", PNCounter, lambda c: c.increment(10))
    b.merge(a)
    b.remove("n")
    a.merge(b)
    assert a.value() == {} and "n" not in a and len(a) == 0
    a.update("n", PNCounter, lambda c: c.decrement(1))
    a.update("m", "pn")
    b.merge(a)
    assert a.value() == b.value() == {"m": 0, "n": -1} and b.keys() == ["m", "n"]


def test_ormap_nested_maps_and_deltas():
    m = ORMap().bind(1, fixed_clock)
    delta = m.update("cfg", ORMap, lambda v: v.update("limits", LWWMap, lambda w: None))
    assert delta.value() == {"cfg": {"limits": {}}}
    m2 = ORMap().bind(2, fixed_clock)
    m2.merge(shipped(delta))
    m2.update("cfg", "orm", lambda v: v.update("limits", "lwwm", lambda w: w.set("x", 1)))
    m2.update("cfg", "orm", lambda v: v.update("limits", "lwwm", lambda w: w.set("y", 2)))
    assert m2.value() == {"cfg": {"limits": {"x": 1, "y": 2}}}
    assert [row[:2] for row in m2.to_wire()[0]] == [[1, 1], [2, 2]]  # one dot per replica
    view = m2.get("cfg")
    view.remove("limits")  # a copy: the map is unchanged
    assert m2.value() == {"cfg": {"limits": {"x": 1, "y": 2}}} and m2.get("nope") is None


def _nest(levels: int):
    """fn making ``levels`` ORMaps below the one it is given, an LWWMap at the bottom."""
    if levels == 0:
        return lambda v: v.update("leaf", LWWMap, _set_in("x", 1))
    return lambda v: v.update("n", ORMap, _nest(levels - 1))


def test_ormap_nesting_is_bounded():
    ok = ORMap().bind(1, fixed_clock)
    ok.update("n", ORMap, _nest(2))  # four ORMap levels in all
    assert ORMap.from_wire(ok.to_wire()) == ok
    too_deep = ORMap().bind(1, fixed_clock)
    with pytest.raises(CrdtError):
        too_deep.update("n", ORMap, _nest(3))
    assert too_deep.value() == {} and too_deep.take_delta() is None
    wire = ["n", "orm", ok.to_wire()]  # ok one level further down: five
    with pytest.raises(CrdtError):
        ORMap.from_wire([[[1, 1, *wire]], [[1, 1]], []])


def test_ormap_type_conflicts_resolve_the_same_everywhere():
    a, b = ORMap().bind(1, fixed_clock), ORMap().bind(2, fixed_clock)
    a.update("k", LWWMap, _set_in("x", 1))
    b.update("k", RGA, lambda v: v.append("y"))
    with pytest.raises(CrdtError):
        b.update("k", LWWMap)
    synced(a, b)
    assert a.value() == b.value() == {"k": ["y"]}  # b's dot (2, 1) is the greatest
    with pytest.raises(CrdtError):
        a.update("k", LWWMap)
    a.remove("k")
    a.update("k", LWWMap, _set_in("z", 2))
    assert a.value() == {"k": {"z": 2}}


def test_ormap_failed_update_changes_nothing():
    m = ORMap().bind(1, fixed_clock)

    def boom(v):
        v.set("x", 1)
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError):
        m.update("k", LWWMap, boom)
    assert m.value() == {} and m.take_delta() is None
    with pytest.raises(CrdtError):
        m.update("k", "no-such-tag")
    with pytest.raises(CrdtError):
        m.update("k", dict)


def test_ormap_from_wire_checks_dots_and_context():
    ok_dot = [1, 1, "k", "lwwm", []]
    assert ORMap.from_wire([[ok_dot], [[1, 1]], []]).value() == {"k": {}}
    for bad in ([[ok_dot], [], []],  # dot outside the context
                [[ok_dot, ok_dot], [[1, 1]], []],  # not strictly ascending
                [[[1, 0, "k", "lwwm", []]], [[1, 1]], []],  # counter 0
                [[[1, 1, "k", "nope", []]], [[1, 1]], []],  # unknown tag
                [[[1, 1, 5, "lwwm", []]], [[1, 1]], []],  # key not str
                [[], [[2, 1], [1, 1]], []], [[], [], [[1, 2], [1, 1]]], [[], [[1, 0]], []]):
        with pytest.raises(CrdtError):
            ORMap.from_wire(bad)


# -- exact errors and boundaries (pinned for mutation testing) ------------------------------
# The messages are part of the API (clients and logs read them): each test provokes one
# error and checks its exact text; bounds are tested at the exact value.
I64_MIN = -(2**63)


def test_plain_values_at_their_bounds_and_exact_errors():
    ok: list = []
    for _ in range(maps.VALUE_DEPTH_MAX - 1):
        ok = [ok]
    assert maps.plain_value(ok) == ok  # 32 levels of lists
    assert maps.plain_value({"a": ok[0]}) == {"a": ok[0]}  # a dict and 31 lists
    dict_at_31: dict | list = {}
    for _ in range(maps.VALUE_DEPTH_MAX - 1):
        dict_at_31 = [dict_at_31]
    assert maps.plain_value(dict_at_31) == dict_at_31  # 31 lists and a dict
    assert maps.plain_value([I64_MIN, U64_MAX, (1,), {b"k": 2.5, 3: None, True: "é"}]) == [
        I64_MIN, U64_MAX, [1], {b"k": 2.5, 3: None, True: "é"}]
    for bad, message in (
            ([ok], r"^value nested deeper than 32$"),
            ({"a": ok}, r"^value nested deeper than 32$"),
            ([dict_at_31], r"^value nested deeper than 32$"),  # a dict at depth 32
            ([[{"a": ok}]], r"^value nested deeper than 32$"),
            (I64_MIN - 1, r"^value: int out of msgpack range$"),
            (U64_MAX + 1, r"^value: int out of msgpack range$"),
            ({2**64: 1}, r"^value key: int out of msgpack range$"),
            (1j, r"^value: not msgpack data \(complex\)$"),
            ({(1,): 1}, r"^value key: not msgpack data \(tuple\)$"),
            ("\ud800", r"^value: not encodable as UTF-8$"),
            ({"\ud800": 1}, r"^value key: not encodable as UTF-8$")):
        with pytest.raises(CrdtError, match=message):
            maps.plain_value(bad)


def test_wire_helpers_exact_errors():
    assert maps.wire_u64(0, "x") == 0 and maps.wire_u64(U64_MAX, "x") == U64_MAX
    for bad, shown in ((-1, "-1"), (U64_MAX + 1, str(U64_MAX + 1)), (True, "True"), ("1", "'1'")):
        with pytest.raises(CrdtError, match=rf"^ts: expected an int in 0\.\.2\*\*64-1, got {shown}$"):
            maps.wire_u64(bad, "ts")
    assert maps.wire_list((1, 2), "w", 2) == (1, 2) and maps.wire_list([], "w") == []
    with pytest.raises(CrdtError, match=r"^w: expected a list, got dict$"):
        maps.wire_list({}, "w")
    with pytest.raises(CrdtError, match=r"^w: expected 2 items, got 3$"):
        maps.wire_list([1, 2, 3], "w", 2)
    assert len(maps.wire_list([0] * maps.ELEMENTS_MAX, "w")) == maps.ELEMENTS_MAX
    with pytest.raises(CrdtError, match=r"^w: more than 1048576 entries$"):
        maps.wire_list([0] * (maps.ELEMENTS_MAX + 1), "w")


def test_lww_key_and_clock_errors_are_exact():
    m = clocked(LWWMap, 1, [0])
    m.set("k", 1)  # a clock at 0 is valid
    assert m.to_wire() == [["k", 1, 1, 1]]
    for key, shown in (("x" * 1025, r"'x+\.\.\.x+'"), (5, "5")):
        with pytest.raises(CrdtError, match=rf"^map keys are str of at most 1024 chars, got {shown}$"):
            m.set(key, 1)
    with pytest.raises(CrdtError, match=r"^map key: not encodable as UTF-8$"):
        m.delete("\udfff")
    for bad in (-1, True, 1.0):
        with pytest.raises(CrdtError, match=rf"^clock\(\) must give an int >= 0, got {bad!r}$"):
            clocked(LWWMap, 1, [bad]).set("k", 1)
    with pytest.raises(CrdtError, match=r"^this object has no clock: the node binds one \(crdt\.clock = fn\)$"):
        TTLMap().set("k", 1, 5)


def test_lww_write_stamp_stops_at_u64():
    near = LWWMap.from_wire([["k", U64_MAX - 1, 1, 0]]).bind(2, lambda: 0)
    near.set("j", 1)
    assert near.to_wire()[0] == ["j", U64_MAX, 2, 1]
    with pytest.raises(CrdtError, match=r"^write timestamp past 2\*\*64-1$"):
        near.delete("j")
    assert near.get("j") == 1


def test_a_tombstone_shows_as_deleted():
    """A deleted row's payload (seen when debugging a state's rows) reads <deleted>."""
    m = clocked(LWWMap, 1, [1])
    m.delete("k")
    assert repr(m._s.vals) == "[<deleted>]"


def test_lww_read_of_a_state_follows_its_highest_stamp():
    m = LWWMap.from_wire([["a", 9, 3, "x"], ["b", 4, 3]]).bind(1, lambda: 0)
    assert m.set("c", 1).to_wire() == [["c", 10, 1, 1]]
    assert LWWMap.from_wire([]).bind(1, lambda: 0).set("c", 1).to_wire() == [["c", 1, 1, 1]]


def test_lww_reads_past_the_last_key_and_between_keys():
    m = clocked(LWWMap, 1, [1])
    m.set("b", 1)
    m.set("d", 2)
    assert m.get("z") is None and m.get("a") is None and m.get("c", "none") == "none"
    assert "z" not in m and "c" not in m and "d" in m
    m.set("c", 3)  # inserted between rows
    m.set("b", 4)  # overwritten in place
    assert m.to_wire() == [["b", 4, 1, 4], ["c", 3, 1, 3], ["d", 2, 1, 2]]


def test_purge_keeps_live_rows_and_young_tombstones_with_their_full_stamps():
    m = LWWMap.from_wire([["a", U64_MAX - 5, U64_MAX, 1], ["b", 7, 2], ["c", U64_MAX - 2, U64_MAX],
                          ["d", 3, 4, "x"]])
    assert m.purge(U64_MAX - 2) == 1
    assert m.to_wire() == [["a", U64_MAX - 5, U64_MAX, 1], ["c", U64_MAX - 2, U64_MAX],
                           ["d", 3, 4, "x"]]
    assert m.value() == {"a": 1, "d": "x"} and len(m) == 2
    assert m.purge(U64_MAX) == 1 and m.keys() == ["a", "d"]


@pytest.mark.parametrize("cls, data, message", [
    (LWWMap, {"a": 1}, r"^LWWMap rows: expected a list, got dict$"),
    (LWWMap, ["a"], r"^LWWMap row: expected a list, got str$"),
    (LWWMap, [["a", 1, 1, 0, 0]], r"^LWWMap row: expected 3 or 4 fields$"),
    (LWWMap, [["a", 1]], r"^LWWMap row: expected 3 or 4 fields$"),
    (TTLMap, [["a", 1, 1, 5]], r"^TTLMap row: expected 3 or 5 fields$"),
    (LWWMap, [["b", 1, 1], ["a", 1, 1]], r"^LWWMap rows must be strictly ascending by key bytes$"),
    (TTLMap, [["a", 1, 1], ["a", 2, 1]], r"^TTLMap rows must be strictly ascending by key bytes$"),
    (LWWMap, [["a", -1, 1]], r"^ts: expected an int in 0\.\.2\*\*64-1, got -1$"),
    (LWWMap, [["a", 1, 2**64]], r"^replica: expected an int in 0\.\.2\*\*64-1, got 18446744073709551616$"),
    (TTLMap, [["a", 1, 1, -1, 0]], r"^expiry: expected an int in 0\.\.2\*\*64-1, got -1$"),
    (LWWMap, [[b"a", 1, 1]], r"^map keys are str of at most 1024 chars, got b'a'$"),
    (LWWMap, [["a", 1, 1, 1j]], r"^value: not msgpack data \(complex\)$"),
])
def test_lww_wire_errors_are_exact(cls, data, message):
    with pytest.raises(CrdtError, match=message):
        cls.from_wire(data)


def test_ttl_bounds_are_exact():
    now = [10]
    m = clocked(TTLMap, 1, now)
    m.set("max", "v", U64_MAX)  # the longest ttl; its expiry is capped at U64_MAX
    m.set("one", "v", 1)  # stamped 11 (after "max"), expiring at clock + ttl = 11
    assert m.to_wire() == [["max", 10, 1, U64_MAX, "v"], ["one", 11, 1, 11, "v"]]
    for bad in (0, U64_MAX + 1, True, 1.0):
        with pytest.raises(CrdtError, match=rf"^ttl_ns must be an int in 1\.\.2\*\*64-1, got {bad!r}$"):
            m.set("k", "v", bad)
    assert m.get("one", 10) == "v" and m.get("one", 11) is None and m.get("gone", 0, "d") == "d"
    assert m.value(10) == {"max": "v", "one": "v"} and m.value(11) == {"max": "v"}


def test_ttl_expire_at_the_exact_expiry_and_past_tombstones():
    m = clocked(TTLMap, 1, [10])
    m.set("a", "v", 5)  # expires at 15
    m.set("b", "w", 10)  # expires at 20 (the clock still says 10)
    m.delete("c")  # a tombstone: expire leaves it alone
    assert m.expire(14) == 0 and m.get("a", 14) == "v"
    assert m.expire(15) == 1 and m.to_wire() == [["a", 10, 1], ["b", 11, 1, 20, "w"], ["c", 12, 1]]
    assert m.expire(15) == 0 and m.expire(20) == 1 and m.value(0) == {}


def test_ormap_error_messages_are_exact():
    a, b = ORMap().bind(1, fixed_clock), ORMap().bind(2, fixed_clock)
    a.update("k", LWWMap)
    with pytest.raises(CrdtError, match=r"^key 'k' holds a LWWMap, not a RGA$"):
        a.update("k", "rga")
    with pytest.raises(CrdtError, match=r"^not a registered CRDT type: 'no-such-tag'$"):
        a.update("j", "no-such-tag")
    with pytest.raises(CrdtError, match=r"^not a registered CRDT type: <class 'dict'>$"):
        a.update("j", dict)
    with pytest.raises(CrdtError, match=r"^not a registered CRDT type: 'x{59}$"):
        a.update("j", "x" * 100)  # the name shown is cut at 60 chars

    class NotACrdt:
        TAG = "lwwm"  # a known tag on a class that is not the registered one

    class OddTag:
        TAG = ["lwwm"]  # not even hashable

    for cls in (NotACrdt, OddTag):
        with pytest.raises(CrdtError, match=r"^not a registered CRDT type: <class "):
            a.update("j", cls)
    with pytest.raises(CrdtError, match=r"^map keys are str of at most 1024 chars, got 7$"):
        b.remove(7)
    assert b.remove("absent").to_wire() == [[], [], []] and b.take_delta() is not None


def test_ormap_nesting_bound_counts_empty_inner_maps():
    """Four ORMap levels with the innermost one empty is within the bound; a fifth
    (empty) level is refused with the exact message, when updated or decoded."""
    m = ORMap().bind(1, fixed_clock)
    m.update("n", ORMap, lambda v: v.update("n", ORMap, lambda w: w.update("n", ORMap)))
    assert m.value() == {"n": {"n": {"n": {}}}}
    with pytest.raises(CrdtError, match=r"^ORMaps nest at most 4 deep$"):
        m.update("n", ORMap, lambda v: v.update("n", ORMap, lambda w: w.update(
            "n", ORMap, lambda x: x.update("n", ORMap))))
    deep = [[[1, 1, "n", "orm", [[], [], []]]], [[1, 1]], []]
    for _ in range(3):
        deep = [[[1, 1, "n", "orm", deep]], [[1, 1]], []]
    with pytest.raises(CrdtError, match=r"^ORMaps nest at most 4 deep$"):
        ORMap.from_wire(deep)
    assert ORMap.from_wire(deep[0][0][4]).value() == {"n": {"n": {"n": {}}}}


def test_ormap_reads_of_single_and_conflicting_dots():
    a, b = ORMap().bind(1, fixed_clock), ORMap().bind(2, fixed_clock)
    a.update("one", GCounter, lambda c: c.increment(2))
    assert a.get("one").value() == 2 and "one" in a and "two" not in a and len(a) == 1
    a.update("k", LWWMap, _set_in("x", 1))
    b.update("k", RGA, lambda v: v.append("y"))
    a.merge(b)
    assert type(a.get("k")) is RGA and a.get("k").value() == ["y"]  # b's greater dot
    assert a.keys() == ["k", "one"] and len(a) == 2


def test_ormap_next_dot_follows_own_cloud_entries_only():
    m = ORMap.from_wire([[], [[2, 3]], [[1, 5], [2, 9], [3, 1]]]).bind(1)
    assert m.update("k", LWWMap).to_wire()[0] == [[1, 6, "k", "lwwm", []]]
    n = ORMap.from_wire([[], [[1, 4]], [[1, 9]]]).bind(1)
    assert n.update("k", LWWMap).to_wire()[0] == [[1, 10, "k", "lwwm", []]]
    spent = ORMap.from_wire([[], [], [[1, U64_MAX]]]).bind(1)
    with pytest.raises(CrdtError, match=r"^dot counter past 2\*\*64-1$"):
        spent.update("k", LWWMap)
    last = ORMap.from_wire([[], [[1, U64_MAX - 1]], []]).bind(1)
    assert last.update("k", LWWMap).to_wire()[0][0][:2] == [1, U64_MAX]


def test_ormap_state_equality_sees_the_values():
    """Two maps with the same dots and context but different contributions differ."""
    dot = [1, 1, "k", "lwwm", [["x", 1, 1, 1]]]
    same_dots = ORMap.from_wire([[dot], [[1, 1]], []])
    assert same_dots != ORMap.from_wire([[[1, 1, "k", "lwwm", []]], [[1, 1]], []])
    assert same_dots != ORMap.from_wire([[[1, 1, "j", "lwwm", [["x", 1, 1, 1]]]], [[1, 1]], []])
    assert same_dots == ORMap.from_wire([[dot], [], [[1, 1]]])  # an unfolded cloud


@pytest.mark.parametrize("data, message", [
    ([[], []], r"^ORMap: expected 3 items, got 2$"),
    ([[], {}, []], r"^ORMap vv: expected a list, got dict$"),
    ([[], [[1]], []], r"^ORMap vv: expected 2 items, got 1$"),
    ([[], [[1, 1], [1, 2]], []], r"^ORMap vv: rows must be strictly ascending$"),
    ([[], [[2, 1], [1, 1]], []], r"^ORMap vv: rows must be strictly ascending$"),
    ([[], [[1, 0]], []], r"^ORMap vv: counters start at 1$"),
    ([[], [], {}], r"^ORMap cloud: expected a list, got dict$"),
    ([[], [], [[1, 1, 1]]], r"^ORMap cloud: expected 2 items, got 3$"),
    ([[], [], [[1, 2], [1, 2]]], r"^ORMap cloud: rows must be strictly ascending$"),
    ([[], [], [[1, 2], [1, 1]]], r"^ORMap cloud: rows must be strictly ascending$"),
    ([[], [], [[1, 0]]], r"^ORMap cloud: counters start at 1$"),
    ([[], [[-1, 1]], []], r"^replica: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[], [], [[1, "1"]]], r"^counter: expected an int in 0\.\.2\*\*64-1, got '1'$"),
    ([{}, [], []], r"^ORMap dots: expected a list, got dict$"),
    ([[[1, 1, "k", "lwwm"]], [[1, 1]], []], r"^ORMap dot: expected 5 items, got 4$"),
    ([[[-1, 1, "k", "lwwm", []]], [[1, 1]], []], r"^replica: expected an int in 0\.\.2\*\*64-1, got -1$"),
    ([[[1, "1", "k", "lwwm", []]], [[1, 1]], []], r"^counter: expected an int in 0\.\.2\*\*64-1, got '1'$"),
    ([[[1, 0, "k", "lwwm", []]], [[1, 1]], []], r"^ORMap dots must be ascending with counters >= 1$"),
    ([[[1, 1, "k", "lwwm", []], [1, 1, "j", "lwwm", []]], [[1, 1]], []],
     r"^ORMap dots must be ascending with counters >= 1$"),
    ([[[1, 2, "k", "lwwm", []]], [[1, 1]], []], r"^ORMap dot outside its causal context$"),
    ([[[1, 1, "k", "nope", []]], [[1, 1]], []], r"^unknown CRDT tag 'nope'$"),
    ([[[1, 1, "k", 5, []]], [[1, 1]], []], r"^unknown CRDT tag 5$"),
    ([[[1, 1, "k", ["pn"], []]], [[1, 1]], []], r"^unknown CRDT tag \['pn'\]$"),  # unhashable
    ([[[1, 1, 5, "lwwm", []]], [[1, 1]], []], r"^map keys are str of at most 1024 chars, got 5$"),
])
def test_ormap_wire_errors_are_exact(data, message):
    with pytest.raises(CrdtError, match=message):
        ORMap.from_wire(data)


def test_ormap_wire_accepts_dots_at_the_edge_of_their_context():
    """A cloud may hold several dots of one replica (ascending by dot); a dot equal to
    its replica's vv entry, or in the cloud, is inside the context."""
    m = ORMap.from_wire([[[1, 2, "a", "gc", [[], [], []]], [2, 7, "b", "gc", [[], [], []]]],
                         [[1, 2]], [[2, 5], [2, 7]]])
    assert m.keys() == ["a", "b"] and m.to_wire()[2] == [[2, 5], [2, 7]]


def test_ormap_refuses_keys_msgpack_cannot_send():
    """A key with a lone surrogate (JSON's "\\ud800" decodes to one) is refused at update
    and remove, as LWWMap refuses it: once stored, the map's wire form could never be
    packed, so its state and deltas could not be shipped.  (Found by these tests: the
    ORMap used to accept it.)"""
    m = ORMap().bind(1, fixed_clock)
    for change in (lambda: m.update("\ud800", LWWMap), lambda: m.remove("\udfff")):
        with pytest.raises(CrdtError, match=r"^map key: not encodable as UTF-8$"):
            change()
    assert m.to_wire() == [[], [], []] and m.take_delta() is None
    with pytest.raises(CrdtError, match=r"^map key: not encodable as UTF-8$"):
        ORMap.from_wire([[[1, 1, "\ud800", "lwwm", []]], [[1, 1]], []])
