"""Hash ring: behaviour (both implementations), the documented spec, agreement, balance."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import Counter

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_cy
from conftest_core import both, impl  # noqa: F401 (fixtures)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- an independent implementation of docs/PROTOCOL.md ("Agent placement hash") --
def spec_ring(nodes: dict, vnodes: int = 160):
    entries = []
    for name, weight in nodes.items():
        nb = name.encode() if isinstance(name, str) else name
        seed = xxhash.xxh64_intdigest(nb, 0)
        count = max(1, int(vnodes * weight + 0.5)) * 8
        entries += [(xxhash.xxh64_intdigest(t.to_bytes(8, "little"), seed), nb, name)
                    for t in range(count)]
    entries.sort(key=lambda e: (e[0], e[1]))
    return entries


def spec_preference(entries, key, n):
    kb = key.encode() if isinstance(key, str) else key
    h = xxhash.xxh64_intdigest(kb, 0)
    i = bisect_left([e[0] for e in entries], h)
    out, seen = [], set()
    for step in range(len(entries)):
        _, nb, name = entries[(i + step) % len(entries)]
        if nb not in seen and len(out) < n:
            seen.add(nb)
            out.append(name)
    return out


KEYS = [f"agent-{i}" for i in range(20_000)]


def test_golden_values(impl):
    """Pinned results: a change here breaks every deployed client (see PROTOCOL.md)."""
    assert impl.key_hash("agent-1") == 10796442433542037566
    assert impl.node_points("node-a", 1)[:3] == [
        16882348724754870097, 14006606564212654123, 7301089186623988455]
    ring = impl.HashRing(["node-a", "node-b", "node-c"])
    assert ring.owner("agent-1") == "node-b"
    assert ring.owner("agent-2") == "node-a"
    assert ring.owner("") == "node-b"
    assert ring.owner("ü-agent") == "node-a"
    assert ring.preference_list("agent-1", 3) == ["node-b", "node-a", "node-c"]
    assert ring.preference_list("agent-2", 3) == ["node-a", "node-b", "node-c"]


def test_xxh64_matches_reference(impl):
    rnd = random.Random(7)
    for n in list(range(0, 70)) + [1000, 4099]:
        data = rnd.randbytes(n)
        for seed in (0, 1, 2**64 - 1):
            assert impl.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_matches_spec(impl):
    nodes = {"node-a": 1.0, "node-b": 2.0, "n\u00e9-c": 0.5, b"raw": 1.0}
    ring = impl.HashRing(nodes, vnodes=20)
    entries = spec_ring(nodes, vnodes=20)
    for key in KEYS[:2000] + [b"bytes-key", "", "\U0001f600"]:
        assert ring.owner(key) == spec_preference(entries, key, 1)[0]
        assert ring.preference_list(key, 3) == spec_preference(entries, key, 3)


def test_api_basics(impl):
    ring = impl.HashRing(vnodes=160)
    assert len(ring) == 0 and ring.nodes == () and ring.vnodes == 160
    with pytest.raises(core_cy.EmptyRingError):
        ring.owner("x")
    with pytest.raises(LookupError):
        ring.preference_list("x", 2)
    assert ring.owners([]) == []
    with pytest.raises(LookupError):
        ring.owners(["x"])
    name_b = b"node-b"
    ring.add("node-c")
    ring.add(name_b, weight=2.0)
    ring.add("node-a")
    assert ring.nodes == ("node-a", b"node-b", "node-c")
    assert len(ring) == 3
    assert "node-a" in ring and b"node-a" in ring and "node-b" in ring and "zz" not in ring
    assert 3 not in ring
    assert ring.weight("node-b") == 2.0
    owners = {ring.owner(k) for k in KEYS[:3000]}
    assert owners == {"node-a", name_b, "node-c"}
    assert any(o is name_b for o in ring.owners(KEYS[:100]))  # returned exactly as added
    assert ring.owner("agent-7") == ring.owner(b"agent-7")
    assert ring.owners(iter(KEYS[:50])) == [ring.owner(k) for k in KEYS[:50]]
    assert ring.owners(tuple(KEYS[:50])) == [ring.owner(k) for k in KEYS[:50]]
    with pytest.raises(TypeError):
        ring.owner(12)
    with pytest.raises(TypeError):
        ring.owners(["a", 3])
    with pytest.raises(TypeError):
        ring.add(5)
    with pytest.raises(ValueError):
        ring.add("bad", weight=0)
    with pytest.raises(ValueError):
        ring.add("bad", weight=float("nan"))
    with pytest.raises(KeyError):
        ring.remove("missing")
    with pytest.raises(ValueError):
        impl.HashRing(vnodes=0)
    assert ring.preference_list("k", 0) == []
    with pytest.raises(ValueError):
        ring.preference_list("k", -1)
    pl = ring.preference_list("agent-9", 10)
    assert len(pl) == 3 and pl[0] == ring.owner("agent-9")
    ring.remove("node-b")  # str removes the node added as bytes
    assert ring.nodes == ("node-a", "node-c")
    ring.remove("node-a")
    ring.remove("node-c")
    assert len(ring) == 0
    with pytest.raises(core_cy.EmptyRingError):
        ring.owner("x")
    assert "HashRing" in repr(ring)


def test_readd_replaces_weight(impl):
    a = impl.HashRing(["x", "y"])
    a.add("x", weight=3.0)
    b = impl.HashRing({"y": 1.0, "x": 3.0})
    assert a.owners(KEYS[:3000]) == b.owners(KEYS[:3000])
    assert a.weight("x") == 3.0


def test_independent_of_insertion_order(impl):
    names = [f"10.0.0.{i}:7000" for i in range(12)]
    a = impl.HashRing(names)
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    b = impl.HashRing()
    for n in shuffled + ["tmp-1", "tmp-2"]:
        b.add(n)
    b.remove("tmp-2")
    b.remove("tmp-1")
    assert a.owners(KEYS) == b.owners(KEYS)


def test_minimal_movement_on_add_and_remove(impl):
    names = [f"node-{i}" for i in range(10)]
    ring = impl.HashRing(names)
    before = ring.owners(KEYS)
    ring.add("node-10")
    after = ring.owners(KEYS)
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(a == "node-10" for _, a in moved)
    frac = len(moved) / len(KEYS)
    assert 0.6 / 11 < frac < 1.4 / 11, frac
    ring.remove("node-3")
    after_remove = ring.owners(KEYS)
    for a, r in zip(after, after_remove):
        if a != "node-3":
            assert r == a
        else:
            assert r != "node-3"


def test_balance_10_nodes(impl):
    ring = impl.HashRing([f"node-{i}" for i in range(10)], vnodes=160)
    keys = [f"agent-{i}" for i in range(200_000)]
    counts = Counter(ring.owners(keys))
    assert len(counts) == 10
    assert max(counts.values()) / (len(keys) / 10) <= 1.10


def test_weights_scale_share(impl):
    ring = impl.HashRing({"small": 1.0, "big": 3.0, "mid": 2.0})
    counts = Counter(ring.owners(KEYS))
    assert 2.4 < counts["big"] / counts["small"] < 3.6
    assert 1.6 < counts["mid"] / counts["small"] < 2.4


def test_preference_list_replicas_distinct(impl):
    ring = impl.HashRing([f"n{i}" for i in range(7)])
    for key in KEYS[:40]:
        pl = ring.preference_list(key, 3)
        assert len(set(pl)) == 3
        assert pl[0] == ring.owner(key)
        # nodes further along the list take over in order when earlier ones leave
        r2 = impl.HashRing([n for n in ring.nodes if n != pl[0]])
        assert r2.preference_list(key, 2) == pl[1:3]


# -- agreement between the two implementations -----------------------------------
text_st = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
names_st = st.one_of(text_st, st.binary(max_size=12))
keys_st = st.lists(st.one_of(text_st, st.binary(max_size=70)), max_size=60)


def _unique_nodes(nodes: dict) -> dict:
    """A str and its UTF-8 bytes name the same node: keep the first of them."""
    seen, out = set(), {}
    for name, w in nodes.items():
        nb = name.encode() if isinstance(name, str) else name
        if nb not in seen:
            seen.add(nb)
            out[name] = w
    return out


@SETTINGS
@given(nodes=st.dictionaries(names_st, st.floats(0.05, 4.0), min_size=1, max_size=8),
       vnodes=st.integers(1, 40), keys=keys_st, n=st.integers(0, 10))
def test_implementations_agree(both, nodes, vnodes, keys, n):
    py, cy = both
    nodes = _unique_nodes(nodes)
    rp, rc = py.HashRing(nodes, vnodes=vnodes), cy.HashRing(nodes, vnodes=vnodes)
    assert rp.nodes == rc.nodes and len(rp) == len(rc)
    assert [py.key_hash(k) for k in keys] == [cy.key_hash(k) for k in keys]
    assert rp.owners(keys) == rc.owners(keys)
    assert [rp.owner(k) for k in keys] == [rc.owner(k) for k in keys]
    assert [rp.preference_list(k, n) for k in keys] == [rc.preference_list(k, n) for k in keys]


def test_unencodable_key_raises(impl):
    ring = impl.HashRing(["a"])
    with pytest.raises(UnicodeEncodeError):
        ring.owner("\ud800")
    with pytest.raises(UnicodeEncodeError):
        ring.owners(["ok", "\ud800"])


@SETTINGS
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.sampled_from([0.5, 1.0, 2.0])),
                    max_size=25))
def test_add_remove_sequences_agree(both, ops):
    py, cy = both
    rp, rc = py.HashRing(vnodes=16), cy.HashRing(vnodes=16)
    for add, i, w in ops:
        name = f"node-{i}"
        if add:
            rp.add(name, w)
            rc.add(name, w)
        elif name in rp:
            rp.remove(name)
            rc.remove(name)
    assert rp.nodes == rc.nodes
    if len(rp):
        assert rp.owners(KEYS[:500]) == rc.owners(KEYS[:500])
        assert rp.preference_list("k", 4) == rc.preference_list("k", 4)


def test_large_ring_agrees(both):
    py, cy = both
    names = [f"node-{i}" for i in range(300)]
    weights = {n: 0.5 + (i % 4) * 0.5 for i, n in enumerate(names)}
    rp, rc = py.HashRing(weights), cy.HashRing(weights)
    keys = KEYS + [k.encode() for k in KEYS[:2000]]
    assert rp.owners(keys) == rc.owners(keys)
    assert [rp.preference_list(k, 5) for k in KEYS[:300]] == \
           [rc.preference_list(k, 5) for k in KEYS[:300]]


@SETTINGS
@given(nodes=st.lists(st.tuples(names_st, st.sampled_from([0.5, 1.0, 2.0])), min_size=0, max_size=12),
       keys=keys_st)
def test_building_at_once_equals_adding_one_by_one(impl, nodes, keys):
    """The constructor builds all nodes in one merge (fast for a thousand members);
    adding them one at a time must give the same ring, a repeated name included."""
    at_once = impl.HashRing(dict(nodes), vnodes=20) if nodes else impl.HashRing(vnodes=20)
    one_by_one = impl.HashRing(vnodes=20)
    for name, weight in dict(nodes).items():
        one_by_one.add(name, weight)
    assert at_once.nodes == one_by_one.nodes
    if nodes:
        assert at_once.owners(keys) == one_by_one.owners(keys)
        assert [at_once.preference_list(k, 3) for k in keys] == \
            [one_by_one.preference_list(k, 3) for k in keys]
    names = [name for name, _ in nodes] * 2  # every name twice: the later one wins
    added = impl.HashRing(vnodes=20)
    for name in names:
        added.add(name)
    assert impl.HashRing(names, vnodes=20).nodes == added.nodes


class _Name(str):
    """A str subclass: keys of such types take the kernels' slower branch."""


class _Raw(bytes):
    """A bytes subclass, likewise."""


def test_subclassed_str_and_bytes_keys_hash_as_their_value(impl):
    ring = impl.HashRing(("a", "b", "c"), vnodes=8)
    for key in KEYS[:200]:
        assert ring.owner(_Name(key)) == ring.owner(key)
        assert ring.owner(_Raw(key.encode())) == ring.owner(key)
    assert ring.owners([_Name("k1"), _Raw(b"k2")]) == [ring.owner("k1"), ring.owner("k2")]
    assert impl.key_hash(_Name("k1")) == impl.key_hash("k1") == xxhash.xxh64_intdigest(b"k1", 0)


def test_defaults_of_the_helpers(impl):
    assert impl.xxh64(b"data") == xxhash.xxh64_intdigest(b"data", 0)  # seed 0
    assert impl.node_points("node-a") == impl.node_points("node-a", 160, 1.0)
    assert len(impl.node_points("node-a")) == 160 * core_cy.POINTS_PER_VNODE


def _message(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def test_errors_name_what_is_wrong(impl):
    empty = impl.HashRing(vnodes=8)
    ring = impl.HashRing(("a",), vnodes=8)
    assert _message(lambda: empty.owner("x")) == "EmptyRingError: hash ring has no nodes"
    assert _message(lambda: empty.owners(["x"])) == "EmptyRingError: hash ring has no nodes"
    for call in (lambda: ring.owner(12), lambda: ring.owners(["a", 12]),
                 lambda: impl.key_hash(12)):
        assert _message(call) == "TypeError: keys must be str or bytes, got int"
    assert _message(lambda: ring.preference_list("k", 1.5)) == "TypeError: n must be an int"
    assert _message(lambda: ring.preference_list("k", True)) == "TypeError: n must be an int"
    assert _message(lambda: ring.preference_list("k", -1)) == "ValueError: n must be >= 0"
    assert _message(lambda: ring.remove("missing")) == "KeyError: 'missing'"


def test_shared_helpers_of_both_kernels():
    """core_cy/_common.py: replica ids, vnode counts and their bounds, node names."""
    from core_cy import _common

    assert _common.replica_id("n1") == _common.replica_id(b"n1") == xxhash.xxh64_intdigest(
        b"n1", _common.REPLICA_SEED)
    assert _common.vnode_count(160, 0.001) == 1      # never fewer than one vnode
    assert _common.vnode_count(10, 0.25) == 3        # floor(2.5 + 0.5)
    assert _common.check_vnodes(1_000_000) == 1_000_000
    for bad, text in ((1_000_001, "vnodes must be <= 1000000, got 1000001"),
                      (0, "vnodes must be an int >= 1, got 0"),
                      (2.0, "vnodes must be an int >= 1, got 2.0"),
                      (True, "vnodes must be an int >= 1, got True")):
        assert _message(lambda: _common.check_vnodes(bad)) == f"ValueError: {text}"
    assert _message(lambda: _common.vnode_count(8, 0)) == \
        "ValueError: node weight must be a finite number > 0, got 0"
    assert _message(lambda: _common.node_bytes(5)) == \
        "TypeError: node names must be str or bytes, got int"
    assert _common.node_bytes(b"n") == b"n" and _common.node_bytes("é") == "é".encode()
