"""protocols/delivery.py: the exactly-once window (a CRDT), causal hold buffer, backoff.

Property tests check AppliedIds against a reference written straight from its
definition (the IDS_MAX greatest per-id-greatest entries at or above the floor), so
the join laws follow from "any order of merges equals the reference"; and
CausalOrder against the happened-before relation of random causal histories
delivered in random orders.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import delivery
from protocols.crdt.base import TYPES, CrdtError
from protocols.delivery import (DELIVER, DUPLICATE, HELD, AppliedId, AppliedIds, Backoff,
                                CausalOrder, deliverable, mark_delivered)
from protocols.routing import Refusal
from protocols.wire import ErrorCode

pytestmark = pytest.mark.timeout(120)

SMALL_MAX = 4  # IDS_MAX during property tests, so eviction happens with few entries


@contextlib.contextmanager
def ids_max(limit: int) -> Iterator[None]:
    saved = delivery.IDS_MAX
    delivery.IDS_MAX = limit
    try:
        yield
    finally:
        delivery.IDS_MAX = saved


# ---------------------------------------------------------------------------- AppliedIds

entries = st.tuples(st.integers(0, 20), st.sampled_from("abcdefgh"),
                    st.one_of(st.none(), st.binary(max_size=3)))
ops = st.lists(st.one_of(entries, st.integers(0, 20).map(lambda floor: ("expire", floor))),
               max_size=30)


def build(operations: list) -> AppliedIds:
    state = AppliedIds()
    for op in operations:
        if op[0] == "expire":
            state.expire(op[1])
        else:
            ts, msg_id, reply = op
            state.add(msg_id, reply, ts)
    return state


def reference(operations: list) -> list:
    """The state's wire form, from the definition: floor = max of expiries; per id the
    greatest entry (ts, then reply with None lowest) at or above the floor; the
    IDS_MAX greatest of those by (ts, id)."""
    floor = max([op[1] for op in operations if op[0] == "expire"], default=0)
    best: dict[str, tuple] = {}
    for op in operations:
        if op[0] == "expire" or op[0] < floor:
            continue
        ts, msg_id, reply = op
        rank = (ts, reply is not None, reply or b"")
        if msg_id not in best or rank > best[msg_id][0]:
            best[msg_id] = (rank, reply)
    kept = sorted((rank[0], msg_id, reply) for msg_id, (rank, reply) in best.items())
    return [floor, [list(e) for e in kept[-delivery.IDS_MAX:]]]


@settings(max_examples=300, deadline=None)
@given(ops)
def test_any_sequence_of_mutations_gives_the_reference_state(operations):
    with ids_max(SMALL_MAX):
        assert build(operations).to_wire() == reference(operations)


@settings(max_examples=300, deadline=None)
@given(ops, ops, ops)
def test_merge_is_commutative_associative_idempotent_and_equals_the_union(xs, ys, zs):
    with ids_max(SMALL_MAX):
        a, b, c = build(xs), build(ys), build(zs)
        ab = a.copy(); ab.merge(b)
        ba = b.copy(); ba.merge(a)
        assert ab == ba
        ab_c = ab.copy(); ab_c.merge(c)
        bc = b.copy(); bc.merge(c)
        a_bc = a.copy(); a_bc.merge(bc)
        assert ab_c == a_bc
        assert ab_c.to_wire() == reference(xs + ys + zs)
        aa = a.copy(); aa.merge(a)
        assert aa == a


@settings(max_examples=200, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_deltas_in_any_order_with_duplicates_rebuild_the_state(operations, rng):
    with ids_max(SMALL_MAX):
        source = AppliedIds()
        deltas = []
        for op in operations:
            delta = source.expire(op[1]) if op[0] == "expire" else source.add(op[1], op[2], op[0])
            deltas.append(delta)
        replayed = deltas + rng.sample(deltas, k=len(deltas) // 2)
        rng.shuffle(replayed)
        replica = AppliedIds()
        for delta in replayed:
            replica.merge(delta)
        assert replica == source
        pending = source.take_delta()
        from_pending = AppliedIds()
        if pending is not None:
            from_pending.merge(pending)
        assert from_pending == source


@settings(max_examples=200, deadline=None)
@given(ops)
def test_wire_round_trip_keeps_equality(operations):
    with ids_max(SMALL_MAX):
        state = build(operations)
        assert AppliedIds.from_wire(state.to_wire()) == state
        assert TYPES["ids"] is AppliedIds


junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64 + 1),
                              st.floats(allow_nan=False), st.text(max_size=3),
                              st.binary(max_size=3)),
                    lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(junk)
def test_from_wire_takes_any_junk_with_crdt_error_only(data):
    try:
        state = AppliedIds.from_wire(data)
    except CrdtError:
        return
    assert AppliedIds.from_wire(state.to_wire()) == state


@pytest.mark.parametrize("data", [
    None, [], [0], [0, [], 1], [-1, []], [True, []], [2**64, []], [0, "x"],
    [0, [[1, "a"]]], [0, [[1, "a", None, 4]]], [0, [[-1, "a", None]]], [0, [[1.0, "a", None]]],
    [0, [[1, "", None]]], [0, [[1, "x" * 129, None]]], [0, [[1, b"a", None]]],
    [0, [[1, "a", "reply"]]], [0, [[1, "a", b"r" * (64 * 1024 + 1)]]],
    [0, [[i, str(i), None] for i in range(1025)]],
])
def test_from_wire_refuses_each_bad_shape(data):
    with pytest.raises(CrdtError):
        AppliedIds.from_wire(data)


def test_add_get_and_a_long_reply_kept_as_none():
    ids = AppliedIds()
    ids.add("m1", b"reply-1", 10)
    ids.add("m2", b"r" * (delivery.REPLY_KEEP_MAX + 1), 11)
    ids.add("m3", b"r" * delivery.REPLY_KEEP_MAX, 12)
    assert ids.get("m1") == AppliedId(10, "m1", b"reply-1")
    assert ids.get("m2") == AppliedId(11, "m2", None)
    assert ids.get("m3").reply == b"r" * delivery.REPLY_KEEP_MAX
    assert ids.get("m4") is None
    with pytest.raises(CrdtError):
        ids.add("", None, 1)
    with pytest.raises(CrdtError):
        ids.add("m5", "not bytes", 1)
    with pytest.raises(CrdtError):
        ids.add("m5", None, -1)


def test_the_window_keeps_the_newest_ids_max_entries():
    ids = AppliedIds()
    for n in range(delivery.IDS_MAX + 10):
        ids.add(f"m{n}", None, n)
    assert len(ids) == delivery.IDS_MAX
    assert ids.get("m9") is None and ids.get("m10") is not None
    ids.add("old", None, 0)  # older than everything kept: evicted at once
    assert ids.get("old") is None and len(ids) == delivery.IDS_MAX


def test_an_expired_entry_never_comes_back_from_a_replica_that_kept_it():
    owner, replica = AppliedIds(), AppliedIds()
    replica.merge(owner.add("m1", b"r1", 5))
    replica.merge(owner.add("m2", b"r2", 9))
    owner.expire(8)
    assert owner.get("m1") is None and owner.get("m2") is not None
    owner.merge(replica)  # the replica has not expired m1 yet
    assert owner.get("m1") is None
    replica.merge(owner.take_delta())
    assert replica == owner and replica.floor == 8


# ---------------------------------------------------------------------------- causal

def causal_history(rng: random.Random, sessions: int, messages: int) -> list[tuple[str, dict]]:
    """Messages (sender, vc) to one agent from ``sessions`` senders.  A sender stamps
    its next message with its clock; between messages it may learn (merge) the clock
    of any earlier message, as it would from the agent's reply after that one."""
    clocks = {f"s{i}": {} for i in range(sessions)}
    sent: list[tuple[str, dict]] = []
    for _ in range(messages):
        sender = rng.choice(sorted(clocks))
        clock = clocks[sender]
        if sent and rng.random() < 0.5:
            for process, count in rng.choice(sent)[1].items():
                clock[process] = max(clock.get(process, 0), count)
        clock[sender] = clock.get(sender, 0) + 1
        sent.append((sender, dict(clock)))
    return sent


def happened_before(a: dict, b: dict) -> bool:
    return a != b and all(count <= b.get(process, 0) for process, count in a.items())


def deliver_all(order: CausalOrder, arrivals: list[tuple[str, dict]], agent: str = "a"):
    """Offer each arrival; deliver DELIVER verdicts and what ``ready`` releases."""
    delivered: dict[str, int] = {}
    log: list[tuple[str, dict]] = []
    verdicts = []
    for n, (sender, vc) in enumerate(arrivals):
        verdict = order.offer(agent, delivered, sender, vc, (sender, vc), 10, now=float(n))
        verdicts.append(verdict)
        if verdict == DELIVER:
            mark_delivered(delivered, sender, vc)
            log.append((sender, vc))
            for what, held in order.ready(agent, delivered):
                assert what == DELIVER
                mark_delivered(delivered, held.sender, held.vc)
                log.append(held.item)
    return log, verdicts, delivered


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 4), st.integers(0, 40))
def test_causal_order_never_delivers_before_a_dependency_and_delivers_all(rng, sessions, count):
    history = causal_history(rng, sessions, count)
    arrivals = list(history)
    rng.shuffle(arrivals)
    arrivals += rng.sample(history, k=len(history) // 3)  # duplicates, late
    order = CausalOrder()
    log, verdicts, _ = deliver_all(order, arrivals)
    assert sorted(map(repr, log)) == sorted(map(repr, history))  # each exactly once
    position = {repr(m): i for i, m in enumerate(log)}
    for earlier in history:
        for later in history:
            if happened_before(earlier[1], later[1]):
                assert position[repr(earlier)] < position[repr(later)]
    assert verdicts[len(history):] == [DUPLICATE] * (len(arrivals) - len(history))
    assert order.items == 0 and order.nbytes == 0 and order.next_deadline() is None


def test_bss_rule():
    assert deliverable({}, "p", {"p": 1}) == DELIVER
    assert deliverable({"p": 1}, "p", {"p": 1}) == DUPLICATE
    assert deliverable({}, "p", {"p": 2}) == HELD
    assert deliverable({"p": 1}, "p", {"p": 2, "q": 1}) == HELD
    assert deliverable({"p": 1, "q": 3}, "p", {"p": 2, "q": 1}) == DELIVER


def test_a_second_copy_of_a_held_message_is_a_duplicate():
    order = CausalOrder()
    assert order.offer("a", {}, "p", {"p": 2}, "first", 5, now=0.0) == HELD
    assert order.offer("a", {}, "p", {"p": 2}, "copy", 5, now=0.0) == DUPLICATE
    assert order.held("a") == 1


def test_ready_returns_held_copies_the_clock_passed_as_duplicates():
    order = CausalOrder()
    order.offer("a", {}, "p", {"p": 2}, "two", 1, now=0.0)
    order.offer("a", {}, "p", {"p": 4}, "four", 1, now=0.0)
    # the agent's clock jumped (state merged from a replica that delivered 1..3)
    assert [(v, h.item) for v, h in order.ready("a", {"p": 3})] == [
        (DUPLICATE, "two"), (DELIVER, "four")]
    assert order.items == 0


def test_bounds_per_agent_in_all_and_in_bytes_refuse_overloaded():
    order = CausalOrder(per_agent_max=2, items_max=3, bytes_max=100)
    for n in (2, 3):
        assert order.offer("a", {}, "p", {"p": n}, n, 10, now=0.0) == HELD
    refused = order.offer("a", {}, "p", {"p": 4}, 4, 10, now=0.0)
    assert isinstance(refused, Refusal) and refused.code == ErrorCode.OVERLOADED
    assert order.offer("b", {}, "p", {"p": 2}, 2, 10, now=0.0) == HELD
    assert order.offer("c", {}, "p", {"p": 2}, 2, 10, now=0.0).code == ErrorCode.OVERLOADED
    order.drop_agent("b")
    assert order.offer("c", {}, "p", {"p": 2}, 2, 81, now=0.0).code == ErrorCode.OVERLOADED
    assert order.offer("c", {}, "p", {"p": 2}, 2, 80, now=0.0) == HELD
    assert order.refused == 3
    # a deliverable message needs no room
    assert order.offer("c", {}, "p", {"p": 1}, 1, 10**9, now=0.0) == DELIVER


def test_held_messages_expire_at_their_deadline():
    order = CausalOrder(timeout_s=5.0)
    order.offer("a", {}, "p", {"p": 2}, "x", 1, now=1.0)
    order.offer("b", {}, "p", {"p": 3}, "y", 1, now=2.0)
    assert order.next_deadline() == 6.0
    assert order.tick(5.9) == []
    assert [h.item for h in order.tick(6.0)] == ["x"]
    assert order.next_deadline() == 7.0
    assert [h.item for h in order.tick(100.0)] == ["y"]
    assert order.next_deadline() is None and order.items == 0 and order.expired == 2


def test_drop_agent_returns_its_held_messages_and_their_deadlines_go():
    order = CausalOrder()
    order.offer("a", {}, "p", {"p": 2}, "x", 3, now=0.0)
    order.offer("a", {}, "q", {"q": 5}, "y", 4, now=0.0)
    assert sorted(h.item for h in order.drop_agent("a")) == ["x", "y"]
    assert order.items == 0 and order.nbytes == 0
    assert order.next_deadline() is None and order.tick(1e9) == []
    assert order.drop_agent("a") == []


def test_deadline_heap_stays_in_proportion_to_what_is_held():
    order = CausalOrder()
    order.offer("kept", {}, "p", {"p": 2}, "kept", 1, now=0.0)
    for n in range(5000):  # held, then gone before its deadline: a stale deadline each
        order.offer("a", {}, "p", {"p": 2}, n, 1, now=0.0)
        order.drop_agent("a")
    assert len(order._deadlines) <= 2 * order.items + 1025
    assert order.next_deadline() == order.timeout_s and order.held("kept") == 1


# ---------------------------------------------------------------------------- backoff

def test_backoff_full_jitter_capped_and_bounded_by_the_deadline():
    backoff = Backoff(deadline_s=10.0, rng=random.Random(7))
    ceilings = [min(1.0, 0.05 * 2 ** n) for n in range(12)]
    delays = [backoff.next_delay(0.0) for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert max(delays[6:]) > 0.5  # the ceiling grew to max_s
    assert Backoff(deadline_s=10.0, rng=random.Random(7)).next_delay(0.0) == delays[0]
    assert backoff.next_delay(9.95) <= 0.05 + 1e-12
    assert backoff.next_delay(10.0) is None
    assert backoff.next_delay(11.0) is None
    for _ in range(100):  # no overflow after many attempts
        assert backoff.next_delay(0.0) <= 1.0
    with pytest.raises(ValueError):
        Backoff(deadline_s=1.0, rng=random.Random(), base_s=2.0, max_s=1.0)


# ---------------------------------------------------------------------------- texts, bounds

@pytest.mark.parametrize("call, text", [
    (lambda: AppliedIds().add("", None, 1), "message id must be a string of 1..128 characters"),
    (lambda: AppliedIds().add("x" * 129, None, 1),
     "message id must be a string of 1..128 characters"),
    (lambda: AppliedIds().add("m", None, -1), "ts must be an integer 0..2**64-1"),
    (lambda: AppliedIds().add("m", None, 1 << 64), "ts must be an integer 0..2**64-1"),
    (lambda: AppliedIds().add("m", "text", 1), "reply must be bytes or None"),
    (lambda: AppliedIds().expire(-1), "before_ts must be an integer 0..2**64-1"),
    (lambda: AppliedIds().expire(1 << 64), "before_ts must be an integer 0..2**64-1"),
    (lambda: AppliedIds.from_wire(None), "ids: expected [floor, entries]"),
    (lambda: AppliedIds.from_wire([0, "x"]), "ids: entries must be a list of at most 1024"),
    (lambda: AppliedIds.from_wire([-1, []]), "ids: floor must be an integer 0..2**64-1"),
    (lambda: AppliedIds.from_wire([0, [[1, "a"]]]), "ids: an entry must be [ts, id, reply]"),
    (lambda: AppliedIds.from_wire([0, [[-1, "a", None]]]), "ids: ts must be an integer 0..2**64-1"),
    (lambda: AppliedIds.from_wire([0, [[1, "", None]]]),
     "ids: id must be a string of 1..128 characters"),
    (lambda: AppliedIds.from_wire([0, [[1, "a", "r"]]]),
     "ids: reply must be nil or bytes of at most 65536"),
    (lambda: Backoff(deadline_s=1.0, rng=random.Random(), base_s=0.0), "need 0 < base_s <= max_s"),
])
def test_each_refusal_names_what_was_wrong(call, text):
    """The exact text of each error (logs and clients read it)."""
    with pytest.raises((CrdtError, ValueError)) as info:
        call()
    assert str(info.value) == text


def test_the_largest_ids_times_and_windows_are_taken():
    """Bounds are inclusive: a 128-character id, ts and floor 2**64 - 1, IDS_MAX
    entries on the wire."""
    top = (1 << 64) - 1
    ids = AppliedIds()
    ids.add("x" * 128, None, top)
    assert ids.get("x" * 128) == AppliedId(top, "x" * 128, None)
    ids.expire(top)
    assert ids.floor == top and len(ids) == 1
    wire = [0, [[i, f"m{i:04}", None] for i in range(delivery.IDS_MAX)]]
    assert len(AppliedIds.from_wire(wire)) == delivery.IDS_MAX
    assert AppliedIds.from_wire([top, [[top, "a", b"r" * delivery.REPLY_KEEP_MAX]]]).floor == top
    assert AppliedIds.from_wire([0, [[1, "x" * 128, None]]]).get("x" * 128).ts == 1


def test_a_replaced_entry_keeps_the_eviction_order_right():
    """An id added again with a later ts moves up the eviction order: the entries
    evicted are always the oldest by (ts, id), however often ids were replaced."""
    with ids_max(3):
        ids = AppliedIds()
        for ts, msg_id in [(1, "a"), (2, "b"), (3, "c"), (10, "a"), (11, "b"), (4, "d")]:
            ids.add(msg_id, None, ts)
        assert sorted(ids.value()) == ["a", "b", "d"]
        ids.add("c", None, 3)  # older than everything kept: not taken
        assert sorted(ids.value()) == ["a", "b", "d"]
        ids.add("e", None, 5)
        assert sorted(ids.value()) == ["a", "b", "e"]


def test_the_eviction_heap_is_rebuilt_when_stale_items_pile_up():
    """Replacing entries leaves stale heap items; past 2 * IDS_MAX the heap is rebuilt
    to the live entries (and the window still evicts the right ones)."""
    with ids_max(4):
        ids = AppliedIds()
        for ts in range(1, 9):
            ids.add("same", None, ts)
        assert len(ids._heap) == 8  # 2 * 4 items: not past the bound yet
        ids.add("same", None, 9)
        assert ids._heap == [(9, "same")]  # the ninth item passed 2 * 4: rebuilt
        assert ids.get("same").ts == 9
        for n, msg_id in enumerate("abcd"):
            ids.add(msg_id, None, 20 + n)
        assert sorted(ids.value()) == ["a", "b", "c", "d"]


def test_the_hold_buffer_defaults():
    """30 s to wait, 1,000 messages per agent, 10,000 and 64 MiB in all."""
    order = CausalOrder()
    assert (order.timeout_s, order.per_agent_max, order.items_max, order.bytes_max) == (
        30.0, 1_000, 10_000, 64 << 20)
    order.offer("a", {}, "p", {"p": 2}, "x", 1, now=1.0)
    assert order.next_deadline() == 31.0


def test_overloaded_refusals_name_the_bound_reached():
    order = CausalOrder(per_agent_max=2, items_max=3, bytes_max=100)
    order.offer("a", {}, "p", {"p": 2}, "x", 10, now=0.0)
    order.offer("a", {}, "p", {"p": 3}, "y", 10, now=0.0)
    assert order.offer("a", {}, "p", {"p": 4}, "z", 10, now=0.0) == Refusal(
        ErrorCode.OVERLOADED, "agent holds 2 causal messages waiting for earlier ones (its limit)")
    order.offer("b", {}, "p", {"p": 2}, "w", 10, now=0.0)
    assert order.offer("c", {}, "p", {"p": 2}, "v", 10, now=0.0) == Refusal(
        ErrorCode.OVERLOADED, "node holds its limit of causal messages (3 messages, 30 bytes)")
    assert order.refused == 2


def test_the_byte_bound_is_inclusive_and_freed_by_delivery():
    """A message that fills bytes_max exactly is held; delivered ones free theirs."""
    order = CausalOrder(bytes_max=100)
    assert order.offer("a", {}, "p", {"p": 2}, "x", 100, now=0.0) == HELD
    assert isinstance(order.offer("a", {}, "p", {"p": 3}, "y", 1, now=0.0), Refusal)
    assert [h.item for _, h in order.ready("a", {"p": 1})] == ["x"]
    assert (order.items, order.nbytes) == (0, 0)
    assert order.offer("b", {}, "p", {"p": 2}, "z", 100, now=0.0) == HELD


def test_ready_delivers_chains_across_senders_in_causal_order():
    """A message unblocked by another's delivery goes in the same ready call, after
    it; several messages of one sender go in their order."""
    order = CausalOrder()
    order.offer("a", {}, "q", {"p": 2, "q": 1}, "q1", 1, now=0.0)
    order.offer("a", {}, "p", {"p": 3}, "p3", 1, now=0.0)
    order.offer("a", {}, "p", {"p": 2}, "p2", 1, now=0.0)
    got = [(v, h.item) for v, h in order.ready("a", {"p": 1})]
    assert got == [(DELIVER, "p2"), (DELIVER, "p3"), (DELIVER, "q1")]
    assert order.held("a") == 0 and order.ready("a", {"p": 3, "q": 1}) == []


def test_expired_messages_are_counted_and_their_agents_forgotten():
    order = CausalOrder(timeout_s=1.0)
    order.offer("a", {}, "p", {"p": 2}, "x", 3, now=0.0)
    order.offer("a", {}, "q", {"q": 2}, "y", 4, now=0.5)
    assert [h.item for h in order.tick(1.0)] == ["x"]
    assert (order.held("a"), order.nbytes, order.expired) == (1, 4, 1)
    assert [h.item for h in order.tick(1.5)] == ["y"]
    assert order.held("a") == 0 and order.expired == 2 and order._agents == {}


def test_backoff_ceiling_doubles_from_base_to_max_and_defaults():
    """Attempt k draws from [0, min(max_s, base_s * 2**k)]; base 50 ms, max 1 s."""
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(deadline_s=100.0, rng=Top())
    assert [backoff.next_delay(0.0) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert Backoff(deadline_s=100.0, rng=Top(), base_s=0.5, max_s=0.5).next_delay(0.0) == 0.5
    tiny = Backoff(deadline_s=100.0, rng=Top(), base_s=1e-12, max_s=1.0)
    tiny.attempt = 31
    assert tiny.next_delay(0.0) == 1e-12 * (1 << 31)
    assert tiny.next_delay(0.0) == 1.0 and tiny.attempt == 33  # from attempt 32: max_s
    assert Backoff(deadline_s=100.0, rng=Top(), base_s=1.0, max_s=8.0).next_delay(99.5) == 0.5


def test_a_reply_added_for_the_same_time_replaces_the_entry_in_place():
    """The same id at the same ts with a reply beats the one without; its place in
    the eviction order does not change (no second heap item)."""
    ids = AppliedIds()
    ids.add("a", None, 5)
    ids.add("a", b"r", 5)
    assert ids.get("a") == AppliedId(5, "a", b"r") and ids._heap == [(5, "a")]


def test_expire_refuses_a_time_that_is_not_an_int():
    with pytest.raises(CrdtError, match=r"^before_ts must be an integer 0\.\.2\*\*64-1$"):
        AppliedIds().expire("1")


def test_value_maps_each_id_to_its_entry():
    ids = AppliedIds()
    ids.add("m1", b"r", 5)
    ids.add("m2", None, 6)
    assert ids.value() == {"m1": AppliedId(5, "m1", b"r"), "m2": AppliedId(6, "m2", None)}


def test_messages_held_at_one_time_expire_in_the_order_they_came():
    order = CausalOrder(timeout_s=1.0)
    for item in ("first", "second", "third"):
        order.offer(item, {}, "p", {"p": 2}, item, 1, now=0.0)
    assert [h.item for h in order.tick(1.0)] == ["first", "second", "third"]


def test_the_deadline_heap_is_compacted_exactly_past_twice_the_held_plus_1024():
    """With one message held for good, offers dropped again each leave a stale
    deadline: the heap is compacted when an offer takes it past 2 * items + 1024."""
    order = CausalOrder()
    order.offer("kept", {}, "p", {"p": 2}, "kept", 1, now=0.0)
    for n in range(1027):
        order.offer("a", {}, "p", {"p": 2}, n, 1, now=0.0)
        order.drop_agent("a")
    assert len(order._deadlines) == 1028  # 2 * 2 + 1024: not past it yet
    order.offer("a", {}, "p", {"p": 2}, "last", 1, now=0.0)
    assert len(order._deadlines) == 2  # compacted to the two held
    assert order.next_deadline() == order.timeout_s


def test_ready_takes_a_held_copy_the_clock_reached_exactly_as_a_duplicate():
    order = CausalOrder()
    order.offer("a", {}, "p", {"p": 2}, "two", 1, now=0.0)
    assert [(v, h.item) for v, h in order.ready("a", {"p": 2})] == [(DUPLICATE, "two")]
    assert order.held("a") == 0 and order.held("nobody") == 0


def test_per_agent_counts_follow_each_removal():
    """An agent's own count and bytes drop with each message delivered, so its bound
    and a later drop_agent stay exact."""
    order = CausalOrder(per_agent_max=3)
    for n, size in ((2, 3), (3, 4), (4, 5)):
        order.offer("a", {}, "p", {"p": n}, n, size, now=0.0)
    assert [h.item for _, h in order.ready("a", {"p": 1})] == [2, 3, 4]
    assert order.held("a") == 0
    for n, size in ((3, 3), (4, 4), (5, 5)):
        order.offer("b", {}, "p", {"p": n}, n, size, now=0.0)
    assert [h.item for v, h in order.ready("b", {"p": 2}) if v == DELIVER] == [3, 4, 5]
    order.offer("c", {}, "p", {"p": 3}, "c3", 3, now=0.0)
    order.offer("c", {}, "p", {"p": 4}, "c4", 4, now=0.0)
    order.offer("c", {}, "q", {"q": 9}, "q9", 5, now=0.0)
    assert [h.item for _, h in order.ready("c", {"p": 2, "q": 0})] == ["c3", "c4"]
    assert order.held("c") == 1
    assert order.offer("c", {}, "p", {"p": 6}, "c6", 1, now=0.0) == HELD  # room again
    assert sorted(h.item for h in order.drop_agent("c")) == ["c6", "q9"]
    assert (order.items, order.nbytes) == (0, 0)


def test_a_stale_deadline_of_a_sender_with_nothing_held_is_skipped():
    """Once every message of one sender was delivered, its old deadlines are skipped
    while another sender's messages for the same agent still expire."""
    order = CausalOrder(timeout_s=1.0)
    order.offer("a", {}, "p", {"p": 2}, "p2", 1, now=0.0)
    order.offer("a", {}, "q", {"q": 2}, "q2", 1, now=0.0)
    assert [h.item for _, h in order.ready("a", {"p": 1})] == ["p2"]
    assert [h.item for h in order.tick(1.0)] == ["q2"]
