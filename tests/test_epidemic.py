"""Gossip broadcast (``protocols/epidemic.py``): unit tests and properties.

Machines here talk through a list of ``Send`` effects handed over in process (and
through the peer codec where the wire matters); the simulator runs in
``tests/test_epidemic_sim.py``.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import peer
from protocols.effects import GOSSIP, GroupDeliver, Send
from protocols.epidemic import (COPIES_SLACK, DIGEST, DIGEST_RANGES_MAX, ENVELOPE_BYTES_MAX,
                                ITEM_OVERHEAD, KINDS, PUSH, PUSH_BYTES_MAX, PUSH_ITEMS_MAX, WANT,
                                WANT_IDS_MAX, Epidemic, EpidemicError, EpidemicFull)

SEQ0 = 1_700_000_000 * 10**9


def machine(node_id: str = "a", peers=("b", "c", "d", "e"), seed: int = 1, **kwargs) -> Epidemic:
    m = Epidemic(node_id, rng=random.Random(seed), seq_start=kwargs.pop("seq_start", SEQ0),
                 **kwargs)
    m.set_peers(peers)
    m.start(0.0)
    return m


def delivered(effects: list) -> list[GroupDeliver]:
    return [e for e in effects if type(e) is GroupDeliver]


def sends(effects: list, kind: str | None = None) -> list[Send]:
    return [e for e in effects if type(e) is Send and (kind is None or e.message["kind"] == kind)]


def push(origin: str, seq: int, envelope: bytes = b"x", age_ms: int = 0, group: str = "g",
         repair: bool = False) -> dict:
    message = {"v": 2, "kind": PUSH, "m": [{"o": origin, "s": seq, "g": group, "a": age_ms,
                                             "e": envelope}]}
    if repair:
        message["r"] = True
    return message


def next_interval(m: Epidemic) -> float:
    """Tick ``m`` until its next anti-entropy exchange (a fresh repair budget)."""
    digests = m.stats["digests"]
    while m.stats["digests"] == digests:
        now = m.next_deadline()
        m.tick(now)
    return now


def digest_of(m: Epidemic, now: float) -> dict:
    """The digest ``m`` sends on its next anti-entropy tick."""
    out = sends(m.tick(max(now, m.next_deadline())), DIGEST)
    assert len(out) == 1
    return out[0].message


# --------------------------------------------------------------------------- publish

def test_publish_delivers_here_and_pushes_to_fanout_peers():
    m = machine(fanout=3)
    effects = m.publish("room", b"hello", 0.5)
    assert delivered(effects) == [GroupDeliver("room", b"hello")]
    out = sends(effects, PUSH)
    assert len(out) == 3 and len({s.to for s in out}) == 3
    assert all(s.channel == GOSSIP and s.to != "a" for s in out)
    item = out[0].message["m"][0]
    assert item == {"o": "a", "s": SEQ0, "g": "room", "a": 0, "e": b"hello"}
    assert m.stats["published"] == 1 and m.stats["delivered"] == 1 and m.stats["pushed"] == 3


def test_ids_count_up_from_seq_start():
    m = machine(seq_start=42)
    seqs = [sends(m.publish("g", b"", t))[0].message["m"][0]["s"] for t in (0.1, 0.2, 0.3)]
    assert seqs == [42, 43, 44]


@pytest.mark.parametrize("group, envelope", [
    ("", b"x"), ("g" * 256, b"x"), (b"g", b"x"), ("\ud800", b"x"), (None, b"x"),
    ("g", "text"), ("g", bytearray(b"x")), ("g", bytes(ENVELOPE_BYTES_MAX + 1))])
def test_publish_refuses_bad_group_or_envelope(group, envelope):
    m = machine()
    with pytest.raises(ValueError):
        m.publish(group, envelope, 0.1)
    assert m.stats["published"] == 0 and m.held == 0


def test_publish_with_no_peers_delivers_and_sends_nothing():
    m = machine(peers=())
    effects = m.publish("g", b"alone", 0.1)
    assert effects == [GroupDeliver("g", b"alone")]


# --------------------------------------------------------------------------- dedup

def test_new_message_delivered_once_then_counted_as_duplicate():
    m = machine("b", peers=("a", "c", "d", "e", "f"))
    first = m.receive("c", push("a", 7, b"env"), 1.0)
    assert delivered(first) == [GroupDeliver("g", b"env")]
    assert {s.to for s in sends(first)}.isdisjoint({"a", "c", "b"})  # origin, sender, me
    again = m.receive("d", push("a", 7, b"env"), 1.1)
    assert again == []
    assert m.stats["delivered"] == 1 and m.stats["duplicates"] == 1


def test_same_seq_from_two_origins_are_two_messages():
    m = machine("b")
    assert delivered(m.receive("c", push("a", 1), 1.0))
    assert delivered(m.receive("c", push("c", 1), 1.0))


def test_small_cluster_pushes_only_to_who_may_lack_it():
    """Three nodes: the publisher pushes to both others; a receiver never pushes
    back to the origin or its sender, so only to the third, and once: then every
    peer is known to hold it, and its rounds are over."""
    a = machine("a", peers=("b", "c"))
    b = machine("b", peers=("a", "c"))
    out = sends(a.publish("g", b"x", 0.1))
    assert sorted(s.to for s in out) == ["b", "c"]
    assert [s.to for s in sends(b.receive("a", out[0].message, 0.11))] == ["c"]
    for _ in range(3):
        assert sends(b.tick(b.next_deadline()), PUSH) == []


# --------------------------------------------------------------------------- rounds

def test_copies_grow_like_ln_n():
    for n in (3, 10, 100, 1000):
        m = machine(peers=[f"p{i}" for i in range(n - 1)])
        assert m.copies() == math.ceil(math.log(n) + COPIES_SLACK)
    assert machine(fanout=2, rounds=4).copies() == 8


def test_rounds_push_the_remaining_copies_then_stop():
    peers = [f"p{i:03d}" for i in range(999)]
    m = machine(peers=peers, fanout=3, round_interval_s=0.2)
    effects = m.publish("g", b"x", 1.0)
    pushed = [s.to for s in sends(effects)]
    ticks = 0
    while m.stats["pushed"] < m.copies():
        now = m.next_deadline()
        assert now <= 1.0 + 0.2 * 4
        pushed += [s.to for s in sends(m.tick(now), PUSH)]
        ticks += 1
    assert len(pushed) == len(set(pushed)) == m.copies() == 9  # ceil(ln 1000 + 2)
    assert m.stats["rounds"] == 2
    quiet = m.next_deadline()
    assert quiet >= 1.0 + 0.2 * 2 and sends(m.tick(quiet), PUSH) == []  # no more rounds


def test_rounds_batch_messages_per_peer_within_a_body():
    """The hot messages of a round go to each peer as few pushes (at most three
    of the largest envelopes each), every one a body the peer codec carries."""
    m = machine(peers=("b", "d"), fanout=1, rounds=2)
    for i in range(10):  # each pushed at once to b or d, on the round to the other
        m.receive("c", push("c", i, bytes(ENVELOPE_BYTES_MAX)), 1.0)
    out = sends(m.tick(1.2), PUSH)
    per_peer = {p: sum(len(s.message["m"]) for s in out if s.to == p) for p in ("b", "d")}
    assert sum(per_peer.values()) == 10
    assert len(out) == sum(math.ceil(k / 3) for k in per_peer.values())
    for s in out:
        frames = peer.encode(GOSSIP, "a", s.message)  # ValueError beyond 1 MiB
        assert peer.decode(frames).message == s.message


def test_repaired_message_is_delivered_but_not_pushed_on():
    m = machine("b")
    effects = m.receive("c", push("a", 1, repair=True), 1.0)
    assert delivered(effects) and sends(effects) == []
    assert m.stats["repaired"] == 1


# --------------------------------------------------------------------------- bounds

def test_count_bound_refuses_new_ids_and_never_forgets_early():
    m = machine(window_ids_max=2, window_s=90.0, keep_s=30.0)
    m.publish("g", b"1", 0.0)
    m.receive("c", push("c", 1), 0.1)
    with pytest.raises(EpidemicFull):
        m.publish("g", b"3", 0.2)
    assert m.receive("c", push("c", 2), 0.3) == []  # refused, not delivered
    assert m.receive("c", push("c", 1), 0.3) == []  # still remembered: a duplicate
    assert m.stats["dropped_by_bounds"] == 2 and m.stats["duplicates"] == 1
    m.tick(90.0)  # the first id is forgotten: room for one
    assert m.held == 1
    assert delivered(m.receive("c", push("c", 2), 90.05))


def test_bytes_bound_drops_oldest_envelope_but_keeps_its_id():
    m = machine(keep_bytes_max=ENVELOPE_BYTES_MAX)
    m.receive("c", push("c", 1, bytes(200_000)), 1.0)
    m.receive("c", push("c", 2, bytes(200_000)), 1.1)
    assert m.kept_bytes == 200_000 and m.stats["dropped_by_bounds"] == 1
    assert digest_of(m, 1.2)["d"] == [["c", 2, 2]]
    assert m.receive("d", push("c", 1, bytes(200_000)), 1.3) == []  # dedup holds
    assert m.stats["duplicates"] == 1


def test_time_bounds_keep_then_forget():
    m = machine(keep_s=30.0, window_s=90.0)
    m.receive("c", push("c", 1, age_ms=10_000), 5.0)  # 10 s old: born at -5 s here
    assert digest_of(m, 6.0)["d"] == [["c", 1, 1]]
    m.tick(25.0)  # born + keep_s
    assert m.kept_bytes == 0 and digest_of(m, 25.0)["d"] == []
    assert m.held == 1 and m.receive("d", push("c", 1), 60.0) == []
    m.tick(95.0)  # arrived + window_s
    assert m.held == 0


def test_stale_message_is_refused():
    m = machine(keep_s=30.0)
    assert m.receive("c", push("c", 1, age_ms=30_000), 1.0) == []
    assert m.stats["dropped_by_bounds"] == 1 and m.held == 0


def test_next_deadline_covers_rounds_anti_entropy_and_expiry():
    m = Epidemic("a", rng=random.Random(1), seq_start=0, keep_s=5.0, window_s=10.0,
                 anti_entropy_interval_s=20.0)
    assert m.next_deadline() is None  # no clock yet
    m.set_peers(["b"])
    m.start(100.0)
    first = m.next_deadline()
    assert 100.0 <= first <= 120.0  # the first exchange, at a random phase
    m.tick(first)
    assert m.next_deadline() == first + 20.0
    m.receive("b", push("b", 1, age_ms=4_500), first + 0.1)
    assert m.next_deadline() == pytest.approx(first + 0.6)  # its envelope expires at 5 s
    m.tick(first + 0.6)
    assert m.next_deadline() == pytest.approx(first + 10.1)  # its id is forgotten
    m.tick(first + 10.1)
    assert m.held == 0 and m.next_deadline() == first + 20.0
    m.publish("g", b"x", first + 11.0)  # pushed to b at once; a round follows
    assert m.next_deadline() == pytest.approx(first + 11.0 + m.round_interval_s)


@pytest.mark.parametrize("kwargs", [
    dict(fanout=0), dict(rounds=0), dict(rounds=13), dict(keep_s=30.0, window_s=30.0),
    dict(window_ids_max=0), dict(keep_bytes_max=1000), dict(round_interval_s=0),
    dict(repair_bytes_per_interval=1000), dict(repair_messages_per_interval=1),
    dict(seq_start=-1), dict(seq_start=2**63)])
def test_bad_configuration_is_refused(kwargs):
    kwargs.setdefault("seq_start", 0)
    with pytest.raises(ValueError):
        Epidemic("a", rng=random.Random(1), **kwargs)


# --------------------------------------------------------------------------- repair

def test_digest_answered_with_what_the_asker_lacks_and_a_want_for_the_rest():
    a, b = machine("a", peers=("b",)), machine("b", peers=("a",))
    for envelope in (b"1", b"2", b"3"):
        a.publish("g", envelope, 1.0)
    b.receive("a", push("a", SEQ0 + 1), 1.0)  # b has a's second message only
    b.receive("c", push("c", 5, b"c5"), 1.0)  # and one a lacks
    answer = a.receive("b", digest_of(b, 1.5), 2.0)
    repair = sends(answer, PUSH)[0].message
    assert repair["r"] is True
    assert [i["s"] for i in repair["m"]] == [SEQ0, SEQ0 + 2]
    want = sends(answer, WANT)[0].message
    assert want["w"] == [["c", 5]]
    got = b.receive("a", repair, 2.1)
    assert [d.envelope for d in delivered(got)] == [b"1", b"3"] and sends(got) == []
    back = b.receive("a", want, 2.1)
    assert delivered(a.receive("b", sends(back, PUSH)[0].message, 2.2)) == [
        GroupDeliver("g", b"c5")]
    assert a.stats["repaired"] == 1 and b.stats["repaired"] == 2


def test_digest_compresses_consecutive_seqs_into_ranges():
    m = machine()
    for seq in (1, 2, 3, 5, 7, 8):
        m.receive("c", push("c", seq), 1.0)
    m.receive("d", push("d", 9), 1.0)
    assert digest_of(m, 1.1)["d"] == [["d", 9, 9], ["c", 1, 3], ["c", 5, 5], ["c", 7, 8]]


def test_digest_is_bounded():
    m = machine(window_ids_max=10_000)
    for seq in range(0, 2 * (DIGEST_RANGES_MAX + 10), 2):  # no two consecutive
        m.receive("c", push("c", seq), 1.0)
    assert len(digest_of(m, 1.1)["d"]) == DIGEST_RANGES_MAX


def test_want_is_bounded():
    m = machine("b")
    answer = m.receive("a", {"v": 2, "kind": DIGEST, "d": [["a", 0, 10_000]]}, 1.0)
    assert len(sends(answer, WANT)[0].message["w"]) == WANT_IDS_MAX


def test_repair_traffic_is_bounded_per_interval():
    """A node keeping 40 large messages, asked by several empty peers in one
    interval, answers within its budget; the next interval it answers again."""
    m = machine(peers=("b",), repair_bytes_per_interval=2 << 20,
                repair_messages_per_interval=4)
    for seq in range(40):
        m.receive("c", push("c", seq, bytes(100_000)), 1.0)
    now = next_interval(m)
    empty = {"v": 2, "kind": DIGEST, "d": []}
    answers = [m.receive("b", empty, now + 0.1) for _ in range(6)]
    sizes = [len(s.message["m"]) for a in answers for s in sends(a)]
    assert sizes == [10, 10]  # 1 MiB bodies, 2 MiB an interval
    assert m.stats["repair_skipped"] == 6 * 40 - 20
    now = next_interval(m)
    assert len(sends(m.receive("b", empty, now + 0.1))) == 1


def test_restarted_node_is_repaired_from_one_digest():
    a = machine("a", peers=("b",))
    a.publish("g", b"x", 1.0)
    fresh = machine("b", peers=("a",), seq_start=SEQ0 + 10**9)
    repair = sends(a.receive("b", digest_of(fresh, 2.0), 2.0))[0].message
    assert delivered(fresh.receive("a", repair, 2.1)) == [GroupDeliver("g", b"x")]


# --------------------------------------------------------------------------- junk

JUNK = [
    None, [], "bc.push", {"kind": PUSH}, {"v": 1, "kind": PUSH, "m": []}, {"v": "2", "kind": PUSH},
    {"v": True, "kind": PUSH, "m": []}, {"v": 2, "kind": "ping"}, {"v": 2, "kind": None},
    {"v": 2, "kind": PUSH}, {"v": 2, "kind": PUSH, "m": []}, {"v": 2, "kind": PUSH, "m": {}},
    {"v": 2, "kind": PUSH, "m": [None]},
    {"v": 2, "kind": PUSH, "m": [{"o": "a", "s": 1, "g": "g", "a": 0}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "", "s": 1, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "a" * 256, "s": 1, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": -1, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 2**63, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1.0, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": True, "g": "g", "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": 5, "a": 0, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": "g", "a": -1, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": "g", "a": 0.5, "e": b""}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": "g", "a": 0, "e": "text"}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": "g", "a": 0,
                                  "e": bytes(ENVELOPE_BYTES_MAX + 1)}]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": i, "g": "g", "a": 0,
                                  "e": bytes(ENVELOPE_BYTES_MAX)} for i in range(5)]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": i, "g": "g", "a": 0, "e": b""}
                                 for i in range(PUSH_ITEMS_MAX + 1)]},
    {"v": 2, "kind": PUSH, "m": [{"o": "c", "s": 1, "g": "g", "a": 0, "e": b""}], "r": 1},
    {"v": 2, "kind": PUSH, "m": [{"o": "a", "s": SEQ0, "g": "g", "a": 0, "e": b""}]},  # unminted
    {"v": 2, "kind": DIGEST}, {"v": 2, "kind": DIGEST, "d": None},
    {"v": 2, "kind": DIGEST, "d": [["c", 1]]}, {"v": 2, "kind": DIGEST, "d": [["c", 5, 1]]},
    {"v": 2, "kind": DIGEST, "d": [[1, 1, 2]]}, {"v": 2, "kind": DIGEST, "d": ["c"]},
    {"v": 2, "kind": DIGEST, "d": [["c", 0, 1]] * (DIGEST_RANGES_MAX + 1)},
    {"v": 2, "kind": WANT}, {"v": 2, "kind": WANT, "w": []}, {"v": 2, "kind": WANT, "w": [["c"]]},
    {"v": 2, "kind": WANT, "w": [["c", "1"]]},
    {"v": 2, "kind": WANT, "w": [["c", 1]] * (WANT_IDS_MAX + 1)},
]


@pytest.mark.parametrize("message", JUNK, ids=range(len(JUNK)))
def test_junk_is_refused_with_epidemic_error_and_changes_nothing(message):
    m = machine()
    m.receive("c", push("c", 1), 1.0)
    before = dict(m.stats), m.held, m.kept_bytes
    with pytest.raises(EpidemicError):
        m.receive("c", message, 1.5)
    assert (dict(m.stats), m.held, m.kept_bytes) == before


def test_a_bad_item_after_good_ones_applies_none_of_them():
    m = machine()
    message = push("c", 1)
    message["m"].append({"o": "c", "s": 2, "g": "g", "a": 0})
    with pytest.raises(EpidemicError):
        m.receive("c", message, 1.0)
    assert m.held == 0


def test_newer_version_and_unknown_keys_are_accepted():
    message = push("c", 1)
    message["v"], message["future"] = 3, [1, 2]
    assert delivered(machine().receive("c", message, 1.0))


def test_kinds_are_exported_and_prefixed():
    assert KINDS == {PUSH, DIGEST, WANT} and all(k.startswith("bc.") for k in KINDS)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=4),
    max_leaves=12)
kinds = st.sampled_from(sorted(KINDS) + ["x"])
shaped = st.fixed_dictionaries({"v": st.sampled_from([2, 1, "2"]), "kind": kinds},
                               optional={"m": values, "d": values, "w": values, "r": values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(values, shaped))
def test_arbitrary_input_raises_only_epidemic_error(message):
    m = machine()
    try:
        effects = m.receive("c", message, 1.0)
    except EpidemicError:
        return
    assert all(type(e) in (GroupDeliver, Send) for e in effects)


# --------------------------------------------------------------------------- properties

NODES = ("a", "b", "c", "d", "e")


def cluster(seed: int, **kwargs) -> dict[str, Epidemic]:
    return {n: machine(n, peers=NODES, seed=seed * 31 + i, seq_start=SEQ0 + i, **kwargs)
            for i, n in enumerate(NODES)}


def run(machines: dict, queue: list, now: float, drop, counts: dict) -> None:
    """Hand every queued Send to its machine (``drop(i)`` loses the i-th), and what
    that sends in turn, until none is left; count deliveries per node and envelope."""
    i = 0
    while queue:
        sender, effect = queue.pop(0)
        i += 1
        if drop(i):
            continue
        carry(effect.to, machines[effect.to].receive(sender, effect.message, now), queue, counts)


def carry(node: str, effects: list, queue: list, counts: dict) -> None:
    for effect in effects:
        if type(effect) is GroupDeliver:
            key = (node, effect.envelope)
            counts[key] = counts.get(key, 0) + 1
        else:
            queue.append((node, effect))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6),
       publishes=st.lists(st.tuples(st.sampled_from(NODES), st.binary(max_size=40)),
                          min_size=1, max_size=8),
       loss=st.floats(0.0, 0.95))
def test_every_node_delivers_every_message_exactly_once(seed, publishes, loss):
    """Any publishes, any messages lost while they spread: each node delivers each
    message at most once; then, with no more loss, anti-entropy brings every
    message to every node, exactly once.  The bounds hold throughout."""
    machines, counts, queue = cluster(seed, window_ids_max=64, keep_bytes_max=1 << 20), {}, []
    lossy = random.Random(seed)
    now = 1.0
    for k, (node, body) in enumerate(publishes):
        envelope = bytes([k]) + body  # distinct
        carry(node, machines[node].publish("g", envelope, now), queue, counts)
        run(machines, queue, now, lambda i: lossy.random() < loss, counts)
        now += 0.05
        for name, m in machines.items():
            if m.next_deadline() <= now:
                carry(name, m.tick(now), queue, counts)
        assert all(c == 1 for c in counts.values())
    for _ in range(40):  # healed: anti-entropy ticks, nothing lost
        now += 0.5
        for name, m in machines.items():
            if m.next_deadline() <= now:
                carry(name, m.tick(now), queue, counts)
        run(machines, queue, now, lambda i: False, counts)
    expected = {(n, bytes([k]) + body) for n in NODES for k, (_, body) in enumerate(publishes)}
    assert counts == dict.fromkeys(expected, 1)
    for m in machines.values():
        assert m.held <= 64 and m.kept_bytes <= 1 << 20


def test_same_seed_same_effects():
    def effects() -> list:
        m = machine(peers=[f"p{i}" for i in range(50)], seed=9)
        out = m.publish("g", b"x", 1.0)
        out += m.tick(m.next_deadline())
        return out
    assert effects() == effects()


# --------------------------------------------------------------------------- repair in detail

# Four of these fill one push body exactly: 4 * (envelope + "c" + "g" + 48) = PUSH_BYTES_MAX.
EXACT_FIT_ENVELOPE = PUSH_BYTES_MAX // 4 - 2 - ITEM_OVERHEAD


def test_a_repair_fills_its_byte_budget_exactly_and_the_want_still_goes():
    """A repair answer may use every byte left in the interval (a body holds
    exactly four of these); the want that follows costs no bytes, only an answer."""
    m = machine("a", peers=("b",), repair_bytes_per_interval=PUSH_BYTES_MAX)
    for seq in range(4):
        m.receive("c", push("c", seq, bytes(EXACT_FIT_ENVELOPE)), 1.0)
    now = next_interval(m)
    answer = m.receive("b", {"v": 2, "kind": DIGEST, "d": [["z", 1, 1]]}, now + 0.1)
    [repair] = sends(answer, PUSH)
    assert [i["s"] for i in repair.message["m"]] == [0, 1, 2, 3]
    assert sends(answer, WANT)[0].message["w"] == [["z", 1]]
    assert m.stats["repair_skipped"] == 0 and m.stats["wants"] == 1
    m.receive("b", {"v": 2, "kind": DIGEST, "d": [["z", 2, 2]]}, now + 0.2)
    assert m.stats["wants"] == 2


def test_repair_answers_are_bounded_in_number_per_interval():
    m = machine("a", peers=("b",), repair_messages_per_interval=2)
    m.receive("c", push("c", 1), 1.0)
    now = next_interval(m)
    empty = {"v": 2, "kind": DIGEST, "d": []}
    answered = [bool(sends(m.receive("b", empty, now + 0.1))) for _ in range(3)]
    assert answered == [True, True, False]
    assert m.stats["repair_pushes"] == 2 and m.stats["repair_skipped"] == 1
    now = next_interval(m)
    assert sends(m.receive("b", empty, now + 0.1))


def wants_for(seen: list[int], ranges: list, origin: str = "c") -> list:
    """The want a machine that holds ``origin``'s ``seen`` seqs answers ``ranges`` with."""
    m = machine("a", window_ids_max=10_000)
    for seq in seen:
        m.receive(origin, push(origin, seq), 1.0)
    answer = m.receive("b", {"v": 2, "kind": DIGEST, "d": ranges}, 1.1)
    out = sends(answer, WANT)
    return out[0].message["w"] if out else []


@pytest.mark.parametrize("seen, lo, hi", [
    ([3, 4, 7], 1, 10),     # gaps between, before and after
    ([], 5, 5),             # nothing seen
    ([5], 5, 5),            # all seen: no want at all
    (list(range(1, 11)), 3, 6),
    ([4, 9], 1, 5),         # a seen seq beyond the range
    ([1, 4], 3, 5),         # a seen seq before the range
    ([4], 3, 5),
])
def test_a_want_asks_for_exactly_the_unseen_seqs_of_a_range(seen, lo, hi):
    expected = [["c", s] for s in range(lo, hi + 1) if s not in seen]
    assert wants_for(seen, [["c", lo, hi]]) == expected


@pytest.mark.parametrize("left", [1, 2, 6])
def test_a_want_stops_at_want_ids_max_across_ranges(left):
    """The first range fills all but ``left`` slots; the second gets exactly those,
    whether they fall in a gap between seen seqs or after the last one."""
    first = [["x", 1, WANT_IDS_MAX - left]]
    for seen in ([2, 4, 6, 8, 10, 12], [1], [10]):
        wants = wants_for(seen, first + [["c", 1, 20]])
        assert len(wants) == WANT_IDS_MAX
        assert wants[-left:] == [["c", s] for s in range(1, 21) if s not in seen][:left]


def test_forgetting_one_id_keeps_the_others_of_its_origin():
    """Origin c's first id leaves the window, its second stays in it: a digest
    offering that second id is not answered with a want."""
    m = machine("a", window_s=90.0)
    m.receive("c", push("c", 1), 1.0)
    m.receive("c", push("c", 2), 50.0)
    m.tick(91.5)
    assert m.held == 1
    answer = m.receive("b", {"v": 2, "kind": DIGEST, "d": [["c", 1, 2]]}, 91.6)
    assert sends(answer, WANT)[0].message["w"] == [["c", 1]]


# --------------------------------------------------------------------------- round batches

def test_round_pushes_fill_bodies_exactly_and_hold_at_most_push_items_max():
    """Round pushes to a peer are cut when the next item would overflow a body (a
    body holds exactly four of the exact-fit envelopes) or past PUSH_ITEMS_MAX items."""
    m = machine(peers=("b", "d", "e"), fanout=1, rounds=2)
    for i in range(20):
        m.receive("d", push("c", i, bytes(EXACT_FIT_ENVELOPE)), 1.0)
    out = sends(m.tick(1.2), PUSH)
    assert all("r" not in s.message for s in out)  # rounds push on, unlike repairs
    for to in ("b", "e"):
        counts = [len(s.message["m"]) for s in out if s.to == to]
        assert counts[:-1] == [4] * (len(counts) - 1) and 0 < counts[-1] <= 4
    m = machine(peers=("b", "d", "e"), fanout=1, rounds=2, window_ids_max=10_000)
    for i in range(2 * PUSH_ITEMS_MAX + 200):
        m.receive("d", push("c", i), 1.0)
    out = sends(m.tick(1.2), PUSH)
    sizes = {to: [len(s.message["m"]) for s in out if s.to == to] for to in ("b", "e")}
    assert max(sum(v) for v in sizes.values()) > PUSH_ITEMS_MAX
    for counts in sizes.values():
        assert all(c <= PUSH_ITEMS_MAX for c in counts)
        assert counts[:-1] == [PUSH_ITEMS_MAX] * (len(counts) - 1)


def test_a_repair_push_carries_at_most_push_items_max_messages():
    m = machine("a", peers=("b",), window_ids_max=10_000)
    for seq in range(PUSH_ITEMS_MAX + 100):
        m.receive("c", push("c", seq), 1.0)
    now = next_interval(m)
    [repair] = sends(m.receive("b", {"v": 2, "kind": DIGEST, "d": []}, now + 0.1))
    assert len(repair.message["m"]) == PUSH_ITEMS_MAX
    assert m.stats["repair_skipped"] == 100


def test_a_digest_range_ending_at_seq_0_covers_seq_0_only():
    m = machine("a", peers=("b",))
    m.receive("c", push("c", 0), 1.0)
    m.receive("c", push("c", 1), 1.0)
    now = next_interval(m)
    [repair] = sends(m.receive("b", {"v": 2, "kind": DIGEST, "d": [["c", 0, 0]]}, now + 0.1))
    assert [i["s"] for i in repair.message["m"]] == [1]


def test_rounds_come_every_round_interval_until_every_copy_is_sent():
    """Nine peers: ceil(ln 10 + 2) = 5 copies, two a round (fanout 2): 2 at once,
    2 on the round 0.2 s later, the last one 0.2 s after that; then no more rounds."""
    m = machine(peers=[f"p{i}" for i in range(9)], fanout=2, anti_entropy_interval_s=5.0)
    assert m.copies() == 5
    t = next_interval(m)
    first = sends(m.publish("g", b"x", t))
    assert len(first) == 2 and m.next_deadline() == pytest.approx(t + 0.2)
    second = sends(m.tick(t + 0.2), PUSH)
    assert len(second) == 2 and m.next_deadline() == pytest.approx(t + 0.4)
    third = sends(m.tick(t + 0.4), PUSH)
    assert len(third) == 1
    assert len({s.to for s in first + second + third}) == 5
    assert m.next_deadline() == t + 5.0 and m.stats["rounds"] == 2


def test_a_bad_publish_is_a_plain_value_error_naming_what_is_wrong():
    """The caller's mistake, not a peer's: ValueError, never EpidemicError."""
    with pytest.raises(ValueError, match=r"^group must be 1\.\.255 bytes of UTF-8, got ''$") as bad:
        machine().publish("", b"x", 0.1)
    assert type(bad.value) is ValueError
    with pytest.raises(ValueError, match=r"^an envelope is bytes of at most 262144$") as bad:
        machine().publish("g", bytes(ENVELOPE_BYTES_MAX + 1), 0.1)
    assert type(bad.value) is ValueError


def test_an_envelope_of_exactly_the_limit_is_published_and_counted():
    m = machine()
    m.publish("g", bytes(ENVELOPE_BYTES_MAX), 0.1)
    m.publish("g", b"", 0.2)
    assert m.stats["published"] == 2 and m.held == 2


def test_a_full_window_refuses_every_publish_saying_how_full():
    m = machine(window_ids_max=2, window_s=90.0)
    m.publish("g", b"1", 0.0)
    m.publish("g", b"2", 0.0)
    for _ in range(2):
        with pytest.raises(EpidemicFull, match=r"^2 broadcasts in the last 90\.0 s$"):
            m.publish("g", b"3", 0.1)
    assert m.stats["dropped_by_bounds"] == 2


# --------------------------------------------------------------------------- errors, exactly

def item(**fields) -> dict:
    """One pushed message from origin c, with ``fields`` replaced."""
    return {"o": "c", "s": 1, "g": "g", "a": 0, "e": b"x", **fields}


def pushed(*items: dict) -> dict:
    return {"v": 2, "kind": PUSH, "m": list(items)}


SEQ_MAX = 2**63 - 1
REFUSED = {
    "not a map": ([], r"a broadcast message must be a map"),
    "old v": ({"v": 1, "kind": PUSH}, r"broadcast messages need an integer 'v' >= 2, got 1"),
    "v a string": ({"v": "2", "kind": PUSH}, r"broadcast messages need an integer 'v' >= 2, got '2'"),
    "unknown kind": ({"v": 2, "kind": "ping"}, r"unknown broadcast message kind 'ping'"),
    "no items": (pushed(), r"'m' must be a list of 1\.\.1024 messages"),
    "too many bytes": (pushed(*(item(s=i, e=bytes(ENVELOPE_BYTES_MAX)) for i in range(4)),
                              item(s=9, e=b"x")),
                       r"a push carries at most 1048576 envelope bytes"),
    "unminted": (pushed(item(o="a", s=SEQ0)), rf"message id \(a, {SEQ0}\) not minted here yet"),
    "item not a map": (pushed("x"), r"a pushed message must be a map"),
    "age negative": (pushed(item(a=-1)), r"'a' must be an age in ms, 0\.\.2147483647"),
    "age too big": (pushed(item(a=2**31)), r"'a' must be an age in ms, 0\.\.2147483647"),
    "envelope text": (pushed(item(e="x")), r"'e' must be bytes \(bin\) of at most 262144"),
    "envelope too big": (pushed(item(e=bytes(ENVELOPE_BYTES_MAX + 1))),
                         r"'e' must be bytes \(bin\) of at most 262144"),
    "origin empty": (pushed(item(o="")), r"'o' must be 1\.\.255 bytes of UTF-8, got ''"),
    "origin 256 bytes": (pushed(item(o="é" * 128)), r"'o' must be 1\.\.255 bytes of UTF-8, got '.*'"),
    "group a number": (pushed(item(g=5)), r"'g' must be 1\.\.255 bytes of UTF-8, got 5"),
    "group a surrogate": (pushed(item(g="\ud800")), r"'g' must be 1\.\.255 bytes of UTF-8, got '\\ud800'"),
    "seq negative": (pushed(item(s=-1)), rf"'s' must be an int in 0\.\.{SEQ_MAX}, got -1"),
    "seq too big": (pushed(item(s=SEQ_MAX + 1)), rf"'s' must be an int in 0\.\.{SEQ_MAX}, got {SEQ_MAX + 1}"),
    "seq a bool": (pushed(item(s=True)), rf"'s' must be an int in 0\.\.{SEQ_MAX}, got True"),
    "r not a bool": ({**pushed(item()), "r": 1}, r"'r' must be a boolean"),
    "d not a list": ({"v": 2, "kind": DIGEST, "d": "x"}, r"'d' must be a list of at most 4096 ranges"),
    "d too long": ({"v": 2, "kind": DIGEST, "d": [["c", 0, 1]] * (DIGEST_RANGES_MAX + 1)},
                   r"'d' must be a list of at most 4096 ranges"),
    "range of two": ({"v": 2, "kind": DIGEST, "d": [["c", 1]]}, r"a digest range is \[origin, lo, hi\]"),
    "range a string": ({"v": 2, "kind": DIGEST, "d": ["c12"]}, r"a digest range is \[origin, lo, hi\]"),
    "range origin": ({"v": 2, "kind": DIGEST, "d": [[1, 1, 2]]},
                     r"a range's origin must be 1\.\.255 bytes of UTF-8, got 1"),
    "range lo": ({"v": 2, "kind": DIGEST, "d": [["c", -1, 2]]},
                 rf"a range's lo must be an int in 0\.\.{SEQ_MAX}, got -1"),
    "range hi": ({"v": 2, "kind": DIGEST, "d": [["c", 1, "2"]]},
                 rf"a range's hi must be an int in 0\.\.{SEQ_MAX}, got '2'"),
    "range reversed": ({"v": 2, "kind": DIGEST, "d": [["c", 5, 1]]},
                       r"a digest range needs lo <= hi, got \[5, 1\]"),
    "w empty": ({"v": 2, "kind": WANT, "w": []}, r"'w' must be a list of 1\.\.256 ids"),
    "w too long": ({"v": 2, "kind": WANT, "w": [["c", 1]] * (WANT_IDS_MAX + 1)},
                   r"'w' must be a list of 1\.\.256 ids"),
    "w a map": ({"v": 2, "kind": WANT, "w": {"c": 1}}, r"'w' must be a list of 1\.\.256 ids"),
    "wanted id of one": ({"v": 2, "kind": WANT, "w": [["c"]]}, r"a wanted id is \[origin, seq\]"),
    "wanted id a string": ({"v": 2, "kind": WANT, "w": ["c1"]}, r"a wanted id is \[origin, seq\]"),
    "wanted origin": ({"v": 2, "kind": WANT, "w": [["", 1]]},
                      r"a wanted origin must be 1\.\.255 bytes of UTF-8, got ''"),
    "wanted seq": ({"v": 2, "kind": WANT, "w": [["c", "1"]]},
                   rf"a wanted seq must be an int in 0\.\.{SEQ_MAX}, got '1'"),
}


@pytest.mark.parametrize("message, error", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_message_names_what_is_wrong(message, error):
    with pytest.raises(EpidemicError, match=f"^{error}$"):
        machine().receive("c", message, 1.0)


@pytest.mark.parametrize("sender", ["", 5, None])
def test_the_sender_must_be_a_node_id(sender):
    with pytest.raises(EpidemicError, match=r"^the sender must be a node id$"):
        machine().receive(sender, push("c", 1), 1.0)


TAKEN = {
    "age 0": [item(s=1, a=0)],
    "envelope of the limit, empty one": [item(s=1, e=bytes(ENVELOPE_BYTES_MAX)), item(s=2, e=b"")],
    "exactly 1 MiB of envelopes": [item(s=i, e=bytes(ENVELOPE_BYTES_MAX)) for i in range(4)],
    "1024 items": [item(s=i) for i in range(PUSH_ITEMS_MAX)],
    "names of 1 and 255 bytes": [item(o="o" * 255, g="g"), item(o="c", g="é" * 127)],
    "seqs 0 and the largest": [item(s=0), item(s=SEQ_MAX)],
    "our own id, minted": [item(o="a", s=SEQ0 - 1)],
}


@pytest.mark.parametrize("items", TAKEN.values(), ids=TAKEN.keys())
def test_a_push_at_the_limits_is_taken(items):
    m = machine("a", window_ids_max=10_000)
    assert len(delivered(m.receive("c", pushed(*items), 1.0))) == len(items)


@pytest.mark.parametrize("message", [
    {"v": 2, "kind": DIGEST, "d": [["c", 0, 0], ("c", 3, SEQ_MAX)]},
    {"v": 2, "kind": DIGEST, "d": [["c", 0, 1]] * DIGEST_RANGES_MAX},
    {"v": 2, "kind": WANT, "w": [["c", 0], ("c", SEQ_MAX)]},
    {"v": 2, "kind": WANT, "w": [["c", 1]] * WANT_IDS_MAX},
], ids=["digest ranges", "digest of the limit", "want ids", "want of the limit"])
def test_digests_and_wants_at_the_limits_are_taken(message):
    machine().receive("c", message, 1.0)


CONFIG_REFUSED = [
    ({"node_id": ""}, r"node_id must be 1\.\.255 bytes of UTF-8, got ''"),
    ({"seq_start": -1}, rf"seq_start must be an int in 0\.\.{SEQ_MAX}"),
    ({"seq_start": SEQ_MAX + 1}, rf"seq_start must be an int in 0\.\.{SEQ_MAX}"),
    ({"seq_start": 1.0}, rf"seq_start must be an int in 0\.\.{SEQ_MAX}"),
    ({"fanout": 0}, r"fanout must be a positive int"),
    ({"fanout": 2.0}, r"fanout must be a positive int"),
    ({"rounds": 0}, r"rounds must be None \(from the cluster size\) or 1\.\.12"),
    ({"rounds": 13}, r"rounds must be None \(from the cluster size\) or 1\.\.12"),
    ({"rounds": 2.0}, r"rounds must be None \(from the cluster size\) or 1\.\.12"),
    ({"round_interval_s": 0}, r"intervals and keep_s must be positive"),
    ({"anti_entropy_interval_s": 0}, r"intervals and keep_s must be positive"),
    ({"keep_s": 0}, r"intervals and keep_s must be positive"),
    ({"keep_s": 30.0, "window_s": 30.0},
     r"window_s must exceed keep_s, or an id could be forgotten while a peer still offers "
     r"it \(and be delivered twice\)"),
    ({"window_ids_max": 0}, r"window_ids_max >= 1 and keep_bytes_max >= 262144"),
    ({"keep_bytes_max": ENVELOPE_BYTES_MAX - 1}, r"window_ids_max >= 1 and keep_bytes_max >= 262144"),
    ({"repair_bytes_per_interval": PUSH_BYTES_MAX - 1},
     r"repair_bytes_per_interval >= 1040384 and repair_messages_per_interval >= 2 "
     r"\(an answer and a want\)"),
    ({"repair_messages_per_interval": 1},
     r"repair_bytes_per_interval >= 1040384 and repair_messages_per_interval >= 2 "
     r"\(an answer and a want\)"),
]


@pytest.mark.parametrize("kwargs, error", CONFIG_REFUSED, ids=range(len(CONFIG_REFUSED)))
def test_a_bad_configuration_names_its_rule(kwargs, error):
    kwargs = {"node_id": "a", "seq_start": 0, **kwargs}
    with pytest.raises(ValueError, match=f"^{error}$") as bad:
        Epidemic(rng=random.Random(1), **kwargs)
    assert type(bad.value) is ValueError


def test_the_smallest_configuration_allowed():
    m = Epidemic("a", rng=random.Random(1), seq_start=SEQ_MAX, fanout=1, rounds=12,
                 keep_s=0.001, window_s=0.002, window_ids_max=1,
                 keep_bytes_max=ENVELOPE_BYTES_MAX, repair_bytes_per_interval=PUSH_BYTES_MAX,
                 repair_messages_per_interval=2)
    assert m.copies() == 12
    assert Epidemic("a", rng=random.Random(1), seq_start=0, rounds=1).copies() == 3


def test_the_largest_age_is_valid_but_stale():
    m = machine()
    assert m.receive("c", pushed(item(a=2**31 - 1)), 1.0) == []
    assert m.stats["dropped_by_bounds"] == 1



# --------------------------------------------------------------------------- sizes and bounds

def test_a_repair_counts_every_byte_of_names_and_item_overhead():
    """Envelope, origin and group bytes and ITEM_OVERHEAD all count against a body:
    three exact-fit messages and one sized to the byte with 255-byte names fill it,
    so a fifth, tiny, one waits."""
    m = machine("a", peers=("b",), repair_bytes_per_interval=PUSH_BYTES_MAX)
    for seq in range(3):
        m.receive("c", push("c", seq, bytes(EXACT_FIT_ENVELOPE)), 1.0)
    long_names = PUSH_BYTES_MAX // 4 - 255 - 255 - ITEM_OVERHEAD
    m.receive("c", pushed(item(o="o" * 255, g="p" * 255, e=bytes(long_names))), 1.0)
    m.receive("c", push("c", 9, b""), 1.0)
    now = next_interval(m)
    [repair] = sends(m.receive("b", {"v": 2, "kind": DIGEST, "d": []}, now + 0.1))
    assert len(repair.message["m"]) == 4 and m.stats["repair_skipped"] == 1


def test_copies_step_up_exactly_where_ln_n_plus_2_crosses_an_integer():
    """Two nodes: ceil(ln 2 + 2) = 3; seven: ceil(ln 7 + 2) = 4 (ln 8 + 2 would be 5);
    and never more than fanout * ROUNDS_MAX."""
    assert machine(peers=["b"]).copies() == 3
    assert machine(peers=[f"p{i}" for i in range(6)]).copies() == 4
    assert machine(peers=[f"p{i}" for i in range(30_000)], fanout=1).copies() == 12


def test_every_anti_entropy_interval_sends_one_digest():
    m = machine()
    for k in (1, 2, 3):
        next_interval(m)
        assert m.stats["digests"] == k


def test_the_bytes_bound_is_inclusive_and_drops_the_oldest_first():
    m = machine(keep_bytes_max=300_000)
    m.receive("c", push("c", 1, bytes(100_000)), 1.0)
    m.receive("c", push("c", 2, bytes(100_000)), 1.0)
    m.receive("c", push("c", 3, bytes(100_000)), 1.0)  # exactly the bound: all kept
    assert m.kept_bytes == 300_000 and m.stats["dropped_by_bounds"] == 0
    m.receive("c", push("c", 4, bytes(150_000)), 1.0)  # the two oldest go
    assert m.kept_bytes == 250_000 and m.stats["dropped_by_bounds"] == 2
    assert digest_of(m, 1.1)["d"] == [["c", 3, 4]]
    m.tick(40.0)  # every envelope's age is up, the dropped ones' too
    assert m.kept_bytes == 0 and m.held == 4


def test_duplicates_are_counted_and_their_sender_is_not_pushed_to():
    """A copy from the one peer the round would have picked: it has it, so the
    round sends nothing."""
    m = machine(peers=("b", "d", "e"), fanout=1, rounds=2)
    first = sends(m.receive("d", push("c", 1), 1.0))
    [other] = {"b", "e"} - {s.to for s in first}
    m.receive(other, push("c", 1), 1.1)
    m.receive(other, push("c", 1), 1.1)
    assert m.stats["duplicates"] == 2
    assert sends(m.tick(1.2), PUSH) == []


def test_a_duplicate_of_a_message_no_longer_pushed_is_only_counted():
    m = machine(peers=())
    m.publish("g", b"x", 1.0)
    assert m.receive("b", push("a", SEQ0), 1.1) == [] and m.stats["duplicates"] == 1


def test_pushed_counts_every_copy_sent_at_once():
    m = machine(fanout=3)
    m.publish("g", b"1", 0.5)
    m.publish("g", b"2", 0.6)
    assert m.stats["pushed"] == 6


def test_no_round_is_scheduled_when_the_first_push_sends_every_copy():
    m = machine(peers=("b", "c", "d", "e"), fanout=3, rounds=1, anti_entropy_interval_s=5.0)
    t = next_interval(m)
    assert len(sends(m.publish("g", b"x", t))) == 3
    assert m.next_deadline() == t + 5.0


def test_a_round_push_reports_the_age_in_ms_the_message_has_now():
    m = machine(peers=("b", "d", "e"), fanout=1, rounds=2)
    m.receive("d", push("c", 1, age_ms=1500), 1.0)
    [round_push] = sends(m.tick(1.2), PUSH)
    assert round_push.message["m"][0]["a"] == 1700


class CountingRandom(random.Random):
    """A seeded Random that counts single draws and samples (``stuck``: every
    draw returns index 0, as if luck kept picking one peer)."""

    def __init__(self, seed: int, stuck: bool = False):
        super().__init__(seed)
        self.stuck, self.draws, self.samples = stuck, 0, 0

    def randrange(self, *args):
        self.draws += 1
        return 0 if self.stuck else super().randrange(*args)

    def sample(self, *args, **kwargs):
        self.samples += 1
        return super().sample(*args, **kwargs)


def picking(peers: int, stuck: bool = False):
    """The first push (fanout 3) of a message from origin c by one of ``peers``:
    three nodes known to hold it (c, the sender, us).  (the rng, the targets)"""
    rng = CountingRandom(1, stuck)
    names = [f"p{i:02d}" for i in range(peers)]
    m = Epidemic("zz", rng=rng, seq_start=0, fanout=3)
    m.set_peers(names)
    m.start(0.0)
    rng.draws = rng.samples = 0
    out = sends(m.receive(names[-1], push("c", 1), 0.1))
    return rng, [s.to for s in out]


def test_with_most_peers_unknown_targets_are_drawn_one_by_one():
    """Drawing and retrying costs O(fanout) while fewer than half the peers are
    known to hold it (no scan of every peer); from half on, the unknown rest is
    sampled at once."""
    for peers in (10, 7):  # 3 known: 6 < 10, 6 < 7
        rng, targets = picking(peers)
        assert rng.samples == 0 and 3 <= rng.draws <= 12 and len(set(targets)) == 3
    rng, targets = picking(6)  # 3 known of 6: half
    assert (rng.draws, rng.samples) == (0, 1) and len(set(targets)) == 3


def test_draws_give_up_after_four_per_target_and_the_rest_is_sampled():
    rng, targets = picking(10, stuck=True)
    assert rng.draws == 4 * 3 and rng.samples == 1
    assert len(targets) == len(set(targets)) == 3


def test_the_documented_defaults():
    m = Epidemic("a", rng=random.Random(1), seq_start=0)
    assert (m.fanout, m.round_interval_s, m.anti_entropy_interval_s) == (3, 0.2, 1.0)
    assert (m.keep_s, m.window_s, m.window_ids_max, m.keep_bytes_max) == (
        30.0, 90.0, 32_768, 64 << 20)
    assert (m.repair_bytes_per_interval, m.repair_messages_per_interval) == (2 << 20, 8)
    assert m.copies() == math.ceil(math.log(1) + COPIES_SLACK)


def test_a_machine_without_peers_publishes_to_nobody():
    m = Epidemic("a", rng=random.Random(1), seq_start=0)
    assert m.publish("g", b"x", 0.0) == [GroupDeliver("g", b"x")]
    assert sends(m.tick(m.next_deadline())) == []


def test_our_own_id_is_never_a_peer():
    m = machine("a", peers=("a", "b", "b"))
    assert m.copies() == 3  # ceil(ln 2 + 2): two nodes, not three
    assert [s.to for s in sends(m.publish("g", b"x", 0.1))] == ["b"]


def test_the_first_exchange_comes_at_a_random_phase_of_the_whole_interval():
    m = Epidemic("a", rng=random.Random(1), seq_start=0, anti_entropy_interval_s=20.0)
    m.start(100.0)
    assert m.next_deadline() == 100.0 + random.Random(1).random() * 20.0
