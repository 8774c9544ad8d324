"""An agent's state as named CRDT fields: wire round trips, per-name merge, deltas,
binding, and hostile input to decode_fields."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.crdt import (
    FIELD_NAME_MAX,
    FIELDS_MAX,
    TYPES,
    CrdtError,
    GCounter,
    LWWRegister,
    ORMap,
    ORSet,
    PNCounter,
    VClock,
    bind_fields,
    decode_fields,
    encode_fields,
    expire_fold_markers,
    merge_fields,
    prune_fields,
    take_deltas,
)
from test_crdt_core import OPS, junk_st, run

SETTINGS = settings(max_examples=40, deadline=None)
NAMES = ["a", "count", "ß" * FIELD_NAME_MAX, "x.y"]
# each name always holds one type, as in an agent whose behavior declares its fields
KIND = dict(zip(NAMES, [GCounter, ORSet, LWWRegister, PNCounter]))


@st.composite
def histories(draw):
    """Three replicas' field dicts after random ops on random names (a replica may lack
    a name: it never heard of it), and every object's fields with their pending deltas."""
    replicas = [dict(), dict(), dict()]
    everyone = []
    for name in draw(st.sets(st.sampled_from(NAMES))):
        steps = draw(st.lists(st.tuples(st.integers(0, 2), OPS[KIND[name]]), max_size=6))
        objs, _ = run(KIND[name], steps)
        for i, obj in enumerate(objs):
            if draw(st.booleans()):
                replicas[i][name] = obj.copy()
        everyone += [{name: obj} for obj in objs]
    return replicas, everyone


def merged(*field_dicts):
    out = {}
    for fields in field_dicts:
        merge_fields(out, fields)
    return out


def wire_trip(fields):
    raw = msgpack.packb(encode_fields(fields))
    return decode_fields(msgpack.unpackb(raw, raw=False, strict_map_key=False))


@SETTINGS
@given(histories())
def test_round_trip_through_msgpack(case):
    replicas, _ = case
    for fields in replicas:
        back = wire_trip(fields)
        assert back == fields
        assert {n: f.value() for n, f in back.items()} == {n: f.value() for n, f in fields.items()}


@SETTINGS
@given(histories())
def test_merge_fields_is_a_join(case):
    (a, b, c), _ = case
    assert merged(a, b) == merged(b, a)
    assert merged(merged(a, b), c) == merged(a, merged(b, c))
    assert merged(a, a) == merged(a)


@SETTINGS
@given(histories())
def test_taken_deltas_rebuild_the_merged_state(case):
    _, everyone = case
    # a field never mutated has no delta: compare the fields holding something
    full = {n: f for n, f in merged(*everyone).items() if f != type(f)()}
    assert merged(*(take_deltas(f) for f in everyone)) == full
    assert all(take_deltas(f) == {} for f in everyone)


def test_a_new_name_gets_an_independent_unbound_copy():
    theirs = {"n": GCounter().bind(5)}
    theirs["n"].increment(2)
    mine = {}
    merge_fields(mine, theirs)
    assert mine["n"] == theirs["n"] and mine["n"] is not theirs["n"]
    assert mine["n"].replica == 0
    bind_fields(mine, 9, clock=lambda: 1)
    mine["n"].increment()
    assert theirs["n"].value() == 2 and mine["n"].value() == 3
    assert mine["n"].to_wire()[0] == [5, 9]


def test_same_name_different_type_leaves_into_unchanged():
    mine = {"a": GCounter().bind(1), "b": ORSet().bind(1)}
    mine["a"].increment()
    before = encode_fields(mine)
    theirs = {"b": ORSet().bind(2), "a": PNCounter().bind(2)}
    theirs["b"].add("x")
    with pytest.raises(CrdtError):
        merge_fields(mine, theirs)
    assert encode_fields(mine) == before


def test_merge_past_fields_max_is_refused_whole():
    mine = {f"m{i}": GCounter() for i in range(FIELDS_MAX)}
    with pytest.raises(CrdtError):
        merge_fields(mine, {"m0": GCounter(), "extra": GCounter()})
    assert len(mine) == FIELDS_MAX and "extra" not in mine


def test_bind_fields_stamps_every_field():
    fields = {"r": LWWRegister(), "s": ORSet()}
    bind_fields(fields, 42, lambda: 7)
    fields["r"].set("v")
    fields["s"].add("e")
    assert fields["r"].stamp() == (7, 42) and fields["s"].to_wire()[0] == [42]


def test_encode_refuses_what_is_not_a_field_map():
    for bad in ({"": GCounter()}, {"a": 1}, {1: GCounter()},
                {f"f{i}": GCounter() for i in range(FIELDS_MAX + 1)}):
        with pytest.raises(CrdtError):
            encode_fields(bad)


@pytest.mark.parametrize("data", [
    [],                                           # not a map
    {"": ["gc", [[], [], []]]},                   # empty name
    {"x" * (FIELD_NAME_MAX + 1): ["gc", [[], [], []]]},
    {1: ["gc", [[], [], []]]},                    # name not a str
    {"a": ["nope", []]},                          # unknown tag
    {"a": [None, []]},
    {"a": ["gc"]},                                # not [tag, wire]
    {"a": "gc"},
    {"a": ["gc", [[1], [1]]]},                    # bad wire inside
    {f"f{i}": ["gc", [[], [], []]] for i in range(FIELDS_MAX + 1)},
])
def test_decode_refuses_bad_input(data):
    with pytest.raises(CrdtError):
        decode_fields(data)


field_junk_st = st.dictionaries(
    st.one_of(st.sampled_from(NAMES), st.text(max_size=3), st.integers(0, 3)),
    st.one_of(junk_st, st.tuples(st.sampled_from(sorted(TYPES)), junk_st).map(list)),
    max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.one_of(junk_st, field_junk_st))
def test_decode_refuses_junk_with_crdt_error_only(data):
    try:
        fields = decode_fields(data)
    except CrdtError:
        return
    assert wire_trip(fields) == fields


# -- exact errors and boundaries (pinned for mutation testing) ------------------------------
EMPTY_GC = ["gc", [[], [], []]]


def test_field_names_and_counts_at_their_bounds():
    """Names of 1 and FIELD_NAME_MAX chars and exactly FIELDS_MAX fields are fine; one
    more char or field is refused, with the exact message."""
    edge = {"a": GCounter(), "n" * FIELD_NAME_MAX: GCounter()}
    assert sorted(decode_fields(encode_fields(edge))) == sorted(edge)
    full = {f"f{i}": GCounter() for i in range(FIELDS_MAX)}
    assert len(decode_fields(encode_fields(full))) == FIELDS_MAX
    long_name = "n" * (FIELD_NAME_MAX + 1)
    for bad, shown in (({long_name: GCounter()}, repr(long_name)), ({"": GCounter()}, "''"),
                       ({7: GCounter()}, "7")):
        with pytest.raises(CrdtError, match=rf"^a field name must be a str of 1\.\.64 chars, got {shown}$"):
            encode_fields(bad)
    with pytest.raises(CrdtError, match=r"^a field name must be a str of 1\.\.64 chars, got 'x{79}$"):
        decode_fields({"x" * 200: EMPTY_GC})  # the name shown is cut at 80 chars
    with pytest.raises(CrdtError, match=r"^fields has 65 entries, more than 64$"):
        encode_fields({**full, "one more": GCounter()})
    with pytest.raises(CrdtError, match=r"^fields must be a map, got list$"):
        decode_fields([])


def test_field_value_errors_are_exact():
    from protocols.crdt.base import Crdt

    with pytest.raises(CrdtError, match=r"^field 'a' is not a CRDT: int$"):
        encode_fields({"a": 1})
    with pytest.raises(CrdtError, match=r"^field 'a' is not a CRDT: Crdt$"):
        encode_fields({"a": Crdt()})  # the untagged base class is not a field type
    for bad in (["gc"], "gc", ["gc", [], 1]):
        with pytest.raises(CrdtError, match=r"^field 'a' must be \[tag, wire\]$"):
            decode_fields({"a": bad})
    for tag, shown in (("nope", "'nope'"), (None, "None"), (["gc"], r"\['gc'\]")):
        with pytest.raises(CrdtError, match=rf"^field 'a' has an unknown type tag {shown}$"):
            decode_fields({"a": [tag, []]})
    assert decode_fields({"a": ("gc", [[1], [2], []])})["a"].value() == 2  # a tuple is fine


def test_merge_fields_errors_are_exact_and_the_bound_is_exact():
    mine = {"a": GCounter()}
    with pytest.raises(CrdtError, match=r"^field 'a' is a GCounter here and a PNCounter in the merged state$"):
        merge_fields(mine, {"a": PNCounter()})
    with pytest.raises(CrdtError, match=r"^field 'b' is not a CRDT: str$"):
        merge_fields(mine, {"b": "x"})
    full = {f"m{i}": GCounter() for i in range(FIELDS_MAX - 1)}
    merge_fields(full, {"m0": GCounter(), "last": GCounter()})  # exactly FIELDS_MAX
    assert len(full) == FIELDS_MAX
    with pytest.raises(CrdtError, match=r"^merged state would have more than 64 fields$"):
        merge_fields(full, {"extra": GCounter()})


def test_bind_fields_without_a_clock_keeps_each_fields_clock():
    def clock():
        return 3

    fields = {"r": LWWRegister().bind(1, clock), "g": GCounter()}
    bind_fields(fields, 8)
    assert fields["r"].replica == fields["g"].replica == 8 and fields["r"].clock is clock
    fields["r"].set("v")
    assert fields["r"].stamp() == (3, 8)
    assert take_deltas(fields) == {"r": LWWRegister.from_wire([3, 8, "v"])}
    assert take_deltas(fields) == {}


def test_field_names_msgpack_cannot_send_are_refused():
    """A field name with a lone surrogate is refused: the state's wire form could not
    be packed.  (Found by these tests: such a name used to be accepted.)"""
    message = r"^a field name: not encodable as UTF-8$"
    with pytest.raises(CrdtError, match=message):
        encode_fields({"\ud800": GCounter()})
    with pytest.raises(CrdtError, match=message):
        decode_fields({"\ud800": ["gc", [[], [], []]]})
    mine = {"a": GCounter()}
    with pytest.raises(CrdtError, match=message):
        merge_fields(mine, {"\ud800": GCounter()})
    assert list(mine) == ["a"]


# -- prune_fields: the node's pruning rule -------------------------------------------
LIVE, GONE, OWNER = 11, 22, 33


def pruned_state():
    """Fields as an owner holds them: rows of a live member, a retired one, its own."""
    counter, pn, clock = GCounter().bind(GONE), PNCounter().bind(GONE), VClock().bind(GONE)
    counter.increment(5), pn.decrement(2), clock.tick()
    for r in (LIVE, OWNER):
        counter.merge(GCounter.from_wire([[r], [1], []]))
        clock.merge(VClock.from_wire([[r], [1]]))
    nested = ORMap().bind(GONE)
    nested.update("k", GCounter, lambda c: c.increment(4))
    fields = {"c": counter, "p": pn, "v": clock, "m": nested, "s": ORSet().bind(GONE)}
    bind_fields(fields, OWNER)
    take_deltas(fields)
    return fields


def test_prune_fields_folds_retired_counter_rows_and_ships_the_folds():
    fields = pruned_state()
    values = {name: field.value() for name, field in fields.items() if name != "v"}
    removed = prune_fields(fields, frozenset((LIVE, OWNER)), OWNER, now_ns=100, ttl_ns=10)
    assert removed == 3  # c's and p's GONE rows, v's GONE entry
    assert fields["c"].replicas() == [LIVE, OWNER] and fields["p"].replicas() == [OWNER]
    assert fields["v"].value() == {LIVE: 1, OWNER: 1}
    assert {name: field.value() for name, field in fields.items() if name != "v"} == values
    deltas = take_deltas(fields)
    assert sorted(deltas) == ["c", "p"]  # the folds are deltas; a clock's prune is not
    assert deltas["c"].folds() == {GONE: (110, {OWNER: (5,)})}
    assert fields["m"].get("k").replicas() == [GONE]  # fields inside maps: left alone


def test_prune_fields_with_nothing_retired_removes_nothing_and_expires_markers():
    fields = pruned_state()
    live = frozenset((LIVE, OWNER, GONE))
    assert prune_fields(fields, live, OWNER, now_ns=0, ttl_ns=10) == 0
    assert take_deltas(fields) == {}
    retired = frozenset((LIVE, OWNER))  # GONE is no member now
    prune_fields(fields, retired, OWNER, now_ns=0, ttl_ns=10)
    assert fields["c"].folds() and fields["p"].folds()
    assert prune_fields(fields, retired, OWNER, now_ns=9, ttl_ns=10) == 0 and fields["c"].folds()
    assert prune_fields(fields, live, OWNER, now_ns=10, ttl_ns=10) == 0  # GONE is back
    assert fields["c"].folds() and fields["p"].folds()
    assert prune_fields(fields, retired, OWNER, now_ns=10, ttl_ns=10) == 0
    assert fields["c"].folds() == {} and fields["p"].folds() == {}
    assert fields["c"].value() == 7 and fields["p"].value() == -2


def test_prune_fields_never_folds_the_owner_into_itself():
    """The owner's own replica is never retired, even if no member advertises it yet."""
    fields = pruned_state()
    assert prune_fields(fields, frozenset((LIVE,)), OWNER, now_ns=0, ttl_ns=1) == 3
    assert fields["c"].replicas() == [LIVE, OWNER]
    assert fields["v"].value() == {LIVE: 1, OWNER: 1}


def test_prune_fields_drops_a_clocks_retired_entries_whoever_else_it_names():
    clock = VClock.from_wire([[GONE, OWNER], [2, 1]]).bind(OWNER)
    fields = {"v": clock}
    assert prune_fields(fields, frozenset((LIVE,)), OWNER, now_ns=0, ttl_ns=1) == 1
    assert clock.value() == {OWNER: 1}
    assert prune_fields(fields, frozenset((LIVE,)), OWNER, now_ns=0, ttl_ns=1) == 0


def test_prune_fields_leaves_a_counter_whose_fold_would_pass_u64():
    """The write that runs the pruning goes on; the counter keeps its rows."""
    big = PNCounter.from_wire([[GONE, OWNER], [2**64 - 1, 1], [0, 0], []]).bind(OWNER)
    clock = VClock.from_wire([[GONE, OWNER], [1, 1]])
    fields = {"a": big, "v": clock}
    assert prune_fields(fields, frozenset((OWNER,)), OWNER, now_ns=0, ttl_ns=1) == 1
    assert big.replicas() == [GONE, OWNER] and big.folds() == {} and big.value() == 2**64
    assert clock.value() == {OWNER: 1} and take_deltas(fields) == {}



def test_expire_fold_markers_reads_the_clock_only_for_markers():
    reads = []

    def clock():
        reads.append(1)
        return 10

    fields = pruned_state()
    assert expire_fold_markers(fields, clock, ()) == 0 and reads == []
    prune_fields(fields, frozenset((LIVE, OWNER)), OWNER, now_ns=0, ttl_ns=10)
    assert expire_fold_markers(fields, clock, {GONE}) == 0 and len(reads) == 2  # GONE lives
    assert expire_fold_markers(fields, clock, {LIVE}) == 2 and len(reads) == 4
    assert fields["c"].folds() == {} and fields["p"].folds() == {}
    assert fields["c"].value() == 7 and fields["p"].value() == -2
