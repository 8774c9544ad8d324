"""Membership (SWIM + Lifeguard): unit tests that drive single machines by hand.

Messages are built as the machine builds them (``{"v": 2, "kind": ...}``, entries
``{"id", "gen", "ep"[, "st", "by"]}``).  Timings come from ``SwimConfig()``'s
defaults: probe every 0.5 s, direct timeout 0.2 s, sync every 1 s.  The simulations
(many machines, a faulty network) are in ``tests/test_swim_sim.py``.
"""

from __future__ import annotations

import dataclasses

import math
import random
import zlib

import pytest

from protocols.effects import (GOSSIP, MembersChanged, QuorumChanged, Refuted, Send, seed_address,
                               seed_id)
from protocols.membership import (ALIVE, BUCKETS, DEAD, ENTRIES_MAX, GENERATION_AHEAD_MAX_NS,
                                  LEFT, MEMBERS_MAX, RELAYS_MAX, STATIC_QUORUM,
                                  SUSPECT, SYNC_PAGE_MAX, Member, Membership,
                                  MembershipError, SwimConfig, advertised_replicas)

CFG = SwimConfig()
GEN = 1000  # incarnation of every member built here (well below the clock limit)


def addr(k: int) -> str:
    return f"tcp://10.0.{k // 250}.{k % 250}:7400"


def nid(k: int) -> str:
    return f"n{k:04d}"


def member(k: int, gen: int = GEN, host: str | None = None) -> Member:
    """Member ``k``; ``host`` puts it at another address."""
    if host is None:
        return Member.of(nid(k), addr(k), addr(k).replace(":7400", ":7401"), gen)
    return Member.of(nid(k), f"tcp://{host}:7400", f"tcp://{host}:7401", gen)


def entry(k: int, gen: int = GEN, st: str = "a", by: int | None = None,
          host: str | None = None) -> dict:
    """The wire entry about member ``k`` (``by``: the accuser's number)."""
    item = member(k, gen, host).to_wire()
    if st != "a":
        item["st"] = st
        if by is not None:
            item["by"] = nid(by)
    return item


def sync(*entries: dict) -> dict:
    return {"v": 2, "kind": "sync", "u": list(entries)}


def machine(k: int = 0, seeds=(), **config) -> Membership:
    m = Membership(member(k), seeds, SwimConfig(**config), rng=random.Random(k))
    m.start(0.0)
    return m


def knowing(*others: int, k: int = 0, **config) -> Membership:
    """Machine ``k`` that has heard from each of ``others`` directly (so each
    counts for downing), all alive, at t=0."""
    m = machine(k, **config)
    for o in others:
        m.receive(nid(o), sync(entry(o)), 0.0)
    return m


def learn(m: Membership, others: range) -> None:
    """Tell ``m`` of many alive members, a sync page at a time."""
    for start in range(0, len(others), SYNC_PAGE_MAX):
        page = others[start:start + SYNC_PAGE_MAX]
        m.receive(nid(page[0]), sync(*(entry(k) for k in page)), 0.0)


def sends(effects) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def of_type(effects, cls) -> list:
    return [e for e in effects if isinstance(e, cls)]


def state(m: Membership, k: int) -> str | None:
    known = m.members.get(nid(k))
    return None if known is None else known.state


def ack_of(ping: Send) -> dict:
    return {"v": 2, "kind": "ack", "seq": ping.message["seq"], "u": []}


def run(m: Membership, until: float, silent=()) -> list:
    """Tick ``m`` at each of its deadlines up to ``until``; every member not in
    ``silent`` acks its pings at once.  Returns [(time, effect)] of every tick."""
    seen = []
    while (now := m.next_deadline()) is not None and now <= until:
        for effect in m.tick(now):
            seen.append((now, effect))
            if (isinstance(effect, Send) and effect.message.get("kind") == "ping"
                    and effect.to not in silent):
                seen += [(now, e) for e in m.receive(effect.to, ack_of(effect), now)]
    return seen


def probe_until_indirect(m: Membership) -> tuple[Send, list[Send]]:
    """Run ``m``'s first probe to its indirect stage: (the ping, the ping-reqs)."""
    [ping] = [s for s in sends(m.tick(CFG.probe_interval_s)) if s.message["kind"] == "ping"]
    reqs = sends(m.tick(CFG.probe_interval_s + CFG.probe_timeout_s))
    return ping, reqs


# --------------------------------------------------------------------------- joining

def test_start_sends_a_full_join_sync_to_the_seeds_but_not_to_our_own_address():
    m = Membership(member(1), [addr(0), addr(1), addr(2)], rng=random.Random(1))
    effects = m.start(0.0)
    assert of_type(effects, MembersChanged)[0].ring == frozenset({nid(1)})
    join = {"v": 2, "kind": "sync", "u": [entry(1)], "full": True}
    assert [(s.to, s.channel, s.message) for s in sends(effects)] == [
        (seed_id(addr(0)), GOSSIP, join), (seed_id(addr(2)), GOSSIP, join)]
    assert m.next_deadline() == CFG.probe_interval_s


def test_a_join_gets_every_page_and_no_page_is_larger_than_the_limit():
    seed = machine(0)
    learn(seed, range(1, 301))
    joiner = Membership(member(500), [addr(0)], rng=random.Random(5))
    [join] = sends(joiner.start(0.1))
    pages = sends(seed.receive(nid(500), join.message, 0.1))
    assert len(pages) == math.ceil(len(seed.members) / SYNC_PAGE_MAX)
    assert all(p.to == nid(500) and len(p.message["u"]) <= SYNC_PAGE_MAX for p in pages)
    for page in pages:
        joiner.receive(nid(0), page.message, 0.2)
    assert set(joiner.members) == set(seed.members)


def test_a_node_with_seeds_is_unquorate_until_every_page_of_its_join_is_in():
    seed = machine(0)
    learn(seed, range(1, 200))
    joiner = Membership(member(500), [addr(0)], rng=random.Random(5))
    start = joiner.start(0.0)
    assert not joiner.quorate and of_type(start, QuorumChanged) == [QuorumChanged(False, 1, 1)]
    *first, last = sends(seed.receive(nid(500), sends(start)[0].message, 0.1))
    for page in first:
        joiner.receive(nid(0), page.message, 0.2)
    assert first and not joiner.quorate
    effects = joiner.receive(nid(0), last.message, 0.3)
    assert joiner.quorate and [q.quorate for q in of_type(effects, QuorumChanged)] == [True]


# --------------------------------------------------------------------------- probing

def test_a_ping_gets_an_ack_with_the_same_seq_and_piggybacked_entries():
    m = knowing(1, 2)
    ping = {"v": 2, "kind": "ping", "seq": 77, "u": [entry(1)], "ag": 3}
    [ack] = sends(m.receive(nid(1), ping, 0.1))
    assert ack.to == nid(1) and ack.message["kind"] == "ack" and ack.message["seq"] == 77
    assert entry(0) in ack.message["u"]
    assert {r["node_id"]: r["agents"] for r in m.rows()}[nid(1)] == 3


def test_an_ack_relayed_through_ping_req_completes_the_probe():
    m = knowing(1, 2, 3, 4)
    ping, reqs = probe_until_indirect(m)
    target = ping.to
    assert len(reqs) == CFG.indirect_probes
    assert {r.to for r in reqs}.isdisjoint({target, nid(0)})
    assert all(r.message["kind"] == "ping-req" and r.message["target"] == target
               and r.message["seq"] == ping.message["seq"] for r in reqs)
    # A real helper pings the target for us and relays its ack.
    helper_k = int(reqs[0].to[1:])
    helper = knowing(0, int(target[1:]), k=helper_k)
    [relayed_ping] = sends(helper.receive(nid(0), reqs[0].message, 0.75))
    assert relayed_ping.to == target
    target_machine = knowing(helper_k, k=int(target[1:]))
    [target_ack] = sends(target_machine.receive(helper.me.node_id, relayed_ping.message, 0.76))
    [relayed_ack] = sends(helper.receive(target, target_ack.message, 0.77))
    assert relayed_ack.to == nid(0) and relayed_ack.message["seq"] == ping.message["seq"]
    m.receive(helper.me.node_id, relayed_ack.message, 0.78)
    m.tick(2 * CFG.probe_interval_s)
    assert state(m, int(target[1:])) == ALIVE and m.health == 0
    assert m.stats["probes_failed"] == 0


def test_no_ack_and_no_nack_makes_the_target_suspect_and_our_health_worse():
    m = knowing(1, 2, 3, 4)
    ping, _ = probe_until_indirect(m)
    m.tick(2 * CFG.probe_interval_s)
    suspect = m.members[ping.to]
    assert (suspect.state, suspect.by) == (SUSPECT, nid(0))
    assert m.health == 1 and m.stats["suspected"] == 1


def test_nacks_from_every_helper_keep_our_health():
    m = knowing(1, 2, 3, 4)
    ping, reqs = probe_until_indirect(m)
    for req in reqs:
        m.receive(req.to, {"v": 2, "kind": "nack", "seq": req.message["seq"]}, 0.8)
    m.tick(2 * CFG.probe_interval_s)
    assert state(m, int(ping.to[1:])) == SUSPECT and m.health == 0


def test_a_helper_nacks_when_the_target_stays_silent():
    helper = knowing(0, 2, k=1)
    req = {"v": 2, "kind": "ping-req", "seq": 9, "target": nid(2), "u": []}
    [ping] = sends(helper.receive(nid(0), req, 0.1))
    assert ping.to == nid(2)
    [nack] = [s for s in sends(helper.tick(helper.next_deadline())) if s.message["kind"] == "nack"]
    assert nack.to == nid(0) and nack.message == {"v": 2, "kind": "nack", "seq": 9}


# --------------------------------------------------------------------------- suspicion

def suspected(by: int = 1) -> Membership:
    """Machine 0 of five, told at t=0.1 by ``by`` that member 2 is suspect."""
    m = knowing(1, 2, 3, 4)
    m.receive(nid(by), sync(entry(2, st="s", by=by)), 0.1)
    assert state(m, 2) == SUSPECT
    return m


def dies_at(m: Membership, k: int, deadline: float, silent=()) -> None:
    """Member ``k`` stays suspect until ``deadline`` and is dead just after."""
    run(m, deadline - 0.01, silent)
    assert state(m, k) == SUSPECT
    run(m, deadline + 0.01, silent)
    assert state(m, k) == DEAD


# With 5 members: floor = suspicion_mult * max(1, log10 5) * 0.5 s = 1 s, start at
# suspicion_max_mult times that = 2 s; two independent confirmations reach the floor.
FIRST_DEADLINE, FLOOR_DEADLINE = 0.1 + 2.0, 0.1 + 1.0


def test_a_suspect_is_declared_dead_when_its_suspicion_times_out():
    m = suspected()
    run(m, FIRST_DEADLINE - 0.01)
    assert state(m, 2) == SUSPECT
    run(m, FIRST_DEADLINE + 0.01)
    dead = m.members[nid(2)]
    assert (dead.state, dead.by) == (DEAD, nid(0)) and m.stats["declared_dead"] == 1


def test_confirmations_from_distinct_members_shorten_the_suspicion():
    m = suspected()
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 0.2)
    m.receive(nid(1), sync(entry(2, st="s", by=4)), 0.3)  # relayed: the 'by' counts
    dies_at(m, 2, FLOOR_DEADLINE)


def test_duplicate_confirmations_do_not_shorten_the_suspicion():
    m = suspected()
    for t in (0.2, 0.3, 0.4):
        m.receive(nid(3), sync(entry(2, st="s", by=1)), t)
    run(m, FIRST_DEADLINE - 0.01)
    assert state(m, 2) == SUSPECT


def test_a_suspected_node_refutes_and_the_refutation_beats_the_suspicion():
    accused = knowing(1, 2, 3, 4, k=2)
    effects = accused.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    assert accused.me.generation == GEN + 1 and accused.me.state == ALIVE
    assert accused.stats["refuted"] == 1 and not of_type(effects, Refuted)
    # Its next ping carries the refutation; the suspicion elsewhere ends.
    [ping] = [s for s in sends(accused.tick(0.5)) if s.message["kind"] == "ping"]
    assert entry(2, GEN + 1) in ping.message["u"]
    m = suspected()
    m.receive(nid(2), ping.message, 0.6)
    assert m.members[nid(2)] == member(2, GEN + 1)
    run(m, FIRST_DEADLINE + 1)
    assert state(m, 2) == ALIVE


# --------------------------------------------------------------------------- merging

def test_beats_orders_incarnation_then_alive_suspect_dead_left():
    order = [replace_state(member(5, gen), st) for gen in (GEN, GEN + 1)
             for st in (ALIVE, SUSPECT, DEAD, LEFT)]
    for i, low in enumerate(order):
        for high in order[i + 1:]:
            assert high.beats(low) and not low.beats(high), (high, low)


def replace_state(m: Member, st: str) -> Member:
    return Member(m.node_id, m.generation, m.endpoints, st)


@pytest.mark.parametrize("held, news, result", [
    ((GEN, "a"), (GEN + 1, "a"), (GEN + 1, ALIVE)),
    ((GEN, "s"), (GEN, "a"), (GEN, SUSPECT)),
    ((GEN, "a"), (GEN, "s"), (GEN, SUSPECT)),
    ((GEN, "s"), (GEN, "d"), (GEN, DEAD)),
    ((GEN, "d"), (GEN, "s"), (GEN, DEAD)),
    ((GEN, "d"), (GEN, "l"), (GEN, LEFT)),
    ((GEN, "l"), (GEN, "d"), (GEN, LEFT)),
    ((GEN, "d"), (GEN + 1, "a"), (GEN + 1, ALIVE)),
    ((GEN + 1, "a"), (GEN, "d"), (GEN + 1, ALIVE)),
])
def test_merge_keeps_the_winning_entry(held, news, result):
    m = knowing(1, 5)
    m.receive(nid(5), sync(entry(5, held[0])), 0.1)
    if held[1] != "a":
        m.receive(nid(1), sync(entry(5, held[0], held[1], by=1)), 0.1)
    m.receive(nid(1), sync(entry(5, news[0], news[1], by=1)), 0.2)
    known = m.members[nid(5)]
    assert (known.generation, known.state) == result


@pytest.mark.parametrize("st", ["s", "d", "l"])
def test_only_alive_news_creates_a_member(st):
    m = knowing(1)
    m.receive(nid(1), sync(entry(9, st=st, by=1)), 0.1)
    assert nid(9) not in m.members
    m.receive(nid(1), sync(entry(9)), 0.2)
    assert state(m, 9) == ALIVE


def test_with_member_keys_an_entry_must_advertise_a_key_bound_to_its_id():
    """CURVE binds node ids to keys: a member is taken, or changed, only advertising
    a key bound to its id; the others are refused and counted."""
    m = machine()
    m.set_member_keys({nid(1): frozenset({"K1", "K1-new"}), nid(2): frozenset({"K2"})})

    def keyed(k: int, key: str | None, gen: int = GEN) -> dict:
        item = entry(k, gen)
        if key is not None:
            item["ep"]["zmq-key"] = key
        return item

    m.receive(nid(1), sync(keyed(1, "K2"), keyed(2, None), keyed(3, "K1")), 0.1)
    assert set(m.members) == {nid(0)}
    assert m.refused_entries == 3
    m.receive(nid(1), sync(keyed(1, "K1"), keyed(2, "K2")), 0.2)
    assert {nid(1), nid(2)} <= set(m.members)
    m.receive(nid(1), sync(keyed(1, "K1-new", GEN + 1)), 0.3)  # a rotated key
    assert m.members[nid(1)].endpoint("zmq-key") == "K1-new"
    m.set_member_keys(None)  # no CURVE: any id goes
    m.receive(nid(1), sync(keyed(5, None)), 0.4)
    assert nid(5) in m.members


def test_accusations_from_a_member_held_dead_or_a_stranger_are_ignored():
    m = knowing(1, 2, 3)
    m.receive(nid(2), sync(entry(1, st="d", by=2)), 0.1)
    assert state(m, 1) == DEAD
    for accuser in (nid(1), nid(99)):
        m.receive(accuser, sync(entry(3, st="s", by=1), entry(3, st="d", by=1)), 0.2)
        assert state(m, 3) == ALIVE
    m.receive(nid(1), sync(entry(1, GEN + 1)), 0.3)  # its own comeback is news
    assert state(m, 1) == ALIVE


def test_an_incarnation_from_the_future_is_refused():
    offset = 1_700_000_000 * 10**9
    m = Membership(member(0, offset), [], wall_offset_ns=offset, rng=random.Random(0))
    m.start(0.0)
    too_far = offset + 10 * 10**9 + GENERATION_AHEAD_MAX_NS + 1
    m.receive(nid(1), sync(entry(1, too_far)), 10.0)
    assert nid(1) not in m.members and m.refused_entries == 1
    m.receive(nid(1), sync(entry(1, too_far - 2)), 10.0)
    assert state(m, 1) == ALIVE
    m.receive(nid(1), sync(entry(0, too_far, "s", by=1)), 10.0)  # no refutation either
    assert m.me.generation == offset



def test_an_address_changes_only_through_its_member_or_after_its_death():
    m = knowing(1, 5)
    m.receive(nid(1), sync(entry(5, GEN + 1, host="10.9.9.9")), 0.1)
    assert m.members[nid(5)] == member(5) and m.refused_entries == 1
    m.receive(nid(5), sync(entry(5, GEN + 1, host="10.9.9.9")), 0.2)
    assert m.members[nid(5)].address == "tcp://10.9.9.9:7400"
    m.receive(nid(1), sync(entry(5, GEN + 1, "d", by=1, host="10.9.9.9")), 0.3)
    m.receive(nid(1), sync(entry(5, GEN + 2, host="10.8.8.8")), 0.4)  # restarted elsewhere
    assert m.members[nid(5)] == member(5, GEN + 2, host="10.8.8.8")


def test_a_claim_on_our_id_elsewhere_is_refuted_loudly_and_rate_limited():
    m = knowing(1, 2, 3)
    m.receive(nid(2), sync(entry(3, st="d", by=2)), 0.0)
    effects = m.receive(nid(1), sync(entry(0, host="10.6.6.6")), 0.1)
    assert of_type(effects, Refuted) == [Refuted("tcp://10.6.6.6:7400", GEN, GEN + 1)]
    announcement = sync(entry(0, GEN + 1))
    assert [(s.to, s.message) for s in sends(effects)] == [
        (nid(1), announcement), (nid(2), announcement)]
    claim = sync(entry(0, GEN + 1, host="10.6.6.6"))
    assert m.receive(nid(1), claim, 0.2) == [] and m.me.generation == GEN + 1
    later = m.receive(nid(1), claim, 0.1 + CFG.probe_interval_s)
    assert of_type(later, Refuted) == [Refuted("tcp://10.6.6.6:7400", GEN + 1, GEN + 2)]
    stale = m.receive(nid(1), sync(entry(0, GEN, host="10.6.6.6")), 5.0)
    assert not sends(stale) and not of_type(stale, Refuted) and m.me.generation == GEN + 2


# --------------------------------------------------------------------------- leave, reap

def test_leave_announces_to_alive_members_leaves_our_ring_and_stops_probing():
    m = knowing(1, 2, 3)
    m.receive(nid(2), sync(entry(3, st="d", by=2)), 0.0)
    effects = m.leave(0.1)
    note = sync(entry(0, st="l"))
    assert [(s.to, s.message) for s in sends(effects)] == [(nid(1), note), (nid(2), note)]
    [view] = of_type(effects, MembersChanged)
    assert nid(0) not in view.ring and view.members[nid(0)].state == LEFT
    assert m.leave(0.2) == []
    assert [e for _, e in run(m, 10.0) if isinstance(e, Send)] == []
    other = knowing(0, 2, k=1)
    other.receive(nid(0), note, 0.2)
    assert state(other, 0) == LEFT and nid(0) not in other.ring


def test_dead_members_are_forgotten_after_dead_reap_s():
    m = knowing(1, 2, 3, dead_reap_s=5.0)
    m.receive(nid(1), sync(entry(3, st="d", by=1)), 0.1)
    run(m, 5.0)
    assert state(m, 3) == DEAD
    run(m, 6.2)  # reaped at the first sync tick after 0.1 + 5
    assert nid(3) not in m.members


# --------------------------------------------------------------------------- anti-entropy

def digest_to(m: Membership, to: str, until: float) -> dict:
    """Tick ``m`` (its pings acked) until it starts a digest exchange with ``to``."""
    for _, effect in run_stepwise(m, until):
        if isinstance(effect, Send) and effect.to == to and "dg" in effect.message:
            return effect.message
    raise AssertionError(f"no digest to {to} before t={until}")


def run_stepwise(m: Membership, until: float):
    while (now := m.next_deadline()) <= until:
        for effect in run(m, now):
            yield effect


def bucket(node_id: str) -> int:
    return zlib.crc32(node_id.encode()) % BUCKETS


def test_a_digest_exchange_moves_only_differing_buckets_and_converges():
    a = knowing(100, 1, 2, 3, 4, 5, k=0)
    b = knowing(0, 6, 7, 8, 9, 10, k=100)
    differ = {bucket(nid(k)) for k in range(1, 11)}
    step1 = digest_to(b, nid(0), 60.0)
    assert step1["r"] == 1 and len(step1["dg"]) == BUCKETS
    [step2] = sends(a.receive(nid(100), step1, 61.0))
    assert step2.message["r"] == 2
    assert {e["id"] for e in step2.message["u"]} == {
        n for n in a.members if bucket(n) in differ}
    [step3] = sends(b.receive(nid(0), step2.message, 61.1))
    assert "r" not in step3.message and "dg" not in step3.message
    assert {e["id"] for e in step3.message["u"]} <= {
        n for n in b.members if bucket(n) in differ}
    assert sends(a.receive(nid(100), step3.message, 61.2)) == []
    assert a.members == b.members


# --------------------------------------------------------------------------- limits

def test_the_member_limit_refuses_entry_by_entry_not_whole_messages():
    m = machine(0)
    learn(m, range(1, MEMBERS_MAX - 1))
    assert len(m.members) == MEMBERS_MAX - 1
    m.receive(nid(1), sync(entry(5000), entry(5001), entry(5002), entry(1, GEN + 1)), 0.1)
    assert len(m.members) == MEMBERS_MAX and m.refused_entries == 2
    assert state(m, 5000) == ALIVE and m.members[nid(1)].generation == GEN + 1


MALFORMED = {
    "not a map": [1, 2],
    "a string": "ping",
    "v=1": {"v": 1, "kind": "ping", "seq": 1, "u": []},
    "no v": {"kind": "ping", "seq": 1, "u": []},
    "v a string": {"v": "2", "kind": "ping", "seq": 1, "u": []},
    "unknown kind": {"v": 2, "kind": "members", "u": []},
    "ping seq negative": {"v": 2, "kind": "ping", "seq": -1, "u": []},
    "ping seq a string": {"v": 2, "kind": "ping", "seq": "1", "u": []},
    "ack seq too big": {"v": 2, "kind": "ack", "seq": 2**63, "u": []},
    "ack without seq": {"v": 2, "kind": "ack", "u": []},
    "ping-req seq float": {"v": 2, "kind": "ping-req", "seq": 1.0, "target": "n0001", "u": []},
    "u not a list": {"v": 2, "kind": "sync", "u": {"id": "x"}},
    "u too long": sync(*(entry(k) for k in range(SYNC_PAGE_MAX + 1))),
    "entry not a map": sync("n0001"),
    "entry without id": sync({"gen": 1, "ep": entry(1)["ep"]}),
    "entry gen negative": sync({**entry(1), "gen": -1}),
    "entry gen float": sync({**entry(1), "gen": 1.5}),
    "entry without pub": sync({**entry(1), "ep": {"zmq": addr(1)}}),
    "entry bad endpoint": sync({**entry(1), "ep": {"zmq": "udp://x", "zmq-pub": addr(1)}}),
    "entry bad port": sync({**entry(1), "ep": {"zmq": "tcp://h:99999", "zmq-pub": addr(1)}}),
    "bad st": sync({**entry(1), "st": "x"}),
    "bad by": sync({**entry(1), "st": "s", "by": 7}),
    "join page past the last": {**sync(entry(1)), "page": 2, "pages": 2},
    "join page not an integer": {**sync(entry(1)), "page": "0", "pages": 1},
    "digest too short": {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": [0] * (BUCKETS - 1)},
    "digest value too big": {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": [2**32] * BUCKETS},
    "digest value a string": {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": ["0"] * BUCKETS},
    "digest bad step": {"v": 2, "kind": "sync", "r": 3, "u": [], "dg": [0] * BUCKETS},
}


@pytest.mark.parametrize("message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_raise_membership_error(message):
    m = knowing(1)
    before = m.members
    with pytest.raises(MembershipError):
        m.receive(nid(1), message, 0.1)
    assert m.members == before


def test_a_nack_with_a_bad_seq_raises_even_without_a_probe_in_flight():
    with pytest.raises(MembershipError):
        knowing(1).receive(nid(1), {"v": 2, "kind": "nack", "seq": "x"}, 0.1)


# --------------------------------------------------------------------------- pauses

def test_a_pause_drops_the_probe_in_flight_and_pushes_suspicions_back():
    m = suspected()
    [ping] = [s for s in sends(m.tick(0.5)) if s.message["kind"] == "ping"]
    resumed_at = 10.5
    late = resumed_at - 1.0  # the next probe was due at 1.0
    effects = m.tick(resumed_at)
    assert m.stats["pauses"] == 1 and m.health == 1
    assert not [s for s in sends(effects) if s.message["kind"] == "ping-req"]
    assert m.stats["probes_failed"] == 0 and state(m, int(ping.to[1:])) in (ALIVE, SUSPECT)
    assert state(m, 2) == SUSPECT
    for probe in [s for s in sends(effects) if s.message["kind"] == "ping"]:
        m.receive(probe.to, ack_of(probe), resumed_at)  # else our failed probe confirms it
    dies_at(m, 2, FIRST_DEADLINE + late)


# --------------------------------------------------------------------------- quorum, downing

def declare_dead(m: Membership, dead: list[int], accuser: int, now: float) -> list:
    return m.receive(nid(accuser), sync(*(entry(k, st="d", by=accuser) for k in dead)), now)


@pytest.mark.parametrize("size, k, dead, quorate", [
    (5, 0, [3, 4], True),       # 3 of 5
    (5, 0, [2, 3, 4], False),   # 2 of 5
    (4, 2, [1, 3], True),       # 2 of 4, the lowest id (n0000) on our side
    (4, 2, [0, 1], False),      # 2 of 4, the lowest id on the other side
    (4, 0, [2, 3], True),       # 2 of 4, we are the lowest id
])
def test_keep_majority_needs_more_than_half_and_a_tie_keeps_the_lowest_id(size, k, dead, quorate):
    others = [o for o in range(size) if o != k]
    m = knowing(*others, k=k)
    accuser = next(o for o in others if o not in dead)
    effects = declare_dead(m, dead, accuser, 0.1)
    assert m.quorate is quorate
    flip = [] if quorate else [QuorumChanged(False, size - len(dead), size)]
    assert of_type(effects, QuorumChanged) == flip


def test_members_only_relayed_to_us_do_not_tip_a_majority():
    """n0003 with n0004 against a lost majority: alive entries of members nobody
    has met (forged, relayed by n0004) do not make it quorate."""
    m = knowing(0, 1, 2, 4, k=3)
    declare_dead(m, [0, 1, 2], 4, 0.1)
    assert not m.quorate
    m.receive(nid(4), sync(entry(7), entry(8), entry(9)), 0.2)
    assert not m.quorate and m.stats["downed"] == 0


def test_a_minority_node_that_has_not_met_everyone_stays_unquorate():
    """Members only heard of count in the reference too: else a node that joined
    a moment before a partition counts itself a majority (split brain)."""
    m = knowing(0, 4, k=3)  # it met n0000 and n0004; n0001 and n0002 only relayed
    m.receive(nid(0), sync(entry(1), entry(2)), 0.0)
    declare_dead(m, [0, 1, 2], 4, 0.1)  # 2 of 5 left
    assert not m.quorate and m.ring == frozenset(nid(k) for k in range(5))


def test_static_quorum_needs_quorum_size_alive_members():
    m = knowing(1, 2, 3, downing=STATIC_QUORUM, quorum_size=3)
    declare_dead(m, [3], 1, 0.1)
    assert m.quorate
    effects = declare_dead(m, [2], 1, 0.2)
    assert not m.quorate and of_type(effects, QuorumChanged) == [QuorumChanged(False, 2, 4)]
    back = m.receive(nid(2), sync(entry(2, GEN + 1)), 0.3)
    assert m.quorate and of_type(back, QuorumChanged) == [QuorumChanged(True, 3, 4)]


def test_dead_members_are_downed_only_once_quorate_and_stable():
    m = knowing(1, 2, 3, 4)
    effects = declare_dead(m, [4], 1, 0.1)
    assert nid(4) in of_type(effects, MembersChanged)[-1].ring
    # stable_after_s, and at least a probe round: 3 alive members x 0.5 s here.
    stable_s = m.stable_s()
    assert stable_s == max(CFG.stable_after_s, 3 * CFG.probe_interval_s)
    seen = run(m, 0.1 + stable_s - 0.01)
    assert nid(4) in m.ring and m.stats["downed"] == 0
    seen = run(m, 0.1 + stable_s + 0.01)
    rings = [e.ring for _, e in seen if isinstance(e, MembersChanged)]
    assert rings and rings[-1] == frozenset(nid(k) for k in range(4))
    assert m.ring == rings[-1] and m.stats["downed"] == 1


def test_an_unquorate_node_downs_nobody():
    m = knowing(1, 2, 3, 4)
    declare_dead(m, [2, 3, 4], 1, 0.1)
    run(m, 5.0)
    assert not m.quorate and m.ring == frozenset(nid(k) for k in range(5))
    assert m.stats["downed"] == 0


def test_a_suspicion_holds_the_downing_back():
    m = suspected()
    declare_dead(m, [4], 1, 0.1)
    run(m, 1.5)
    assert nid(4) in m.ring  # member 2 is still suspect: the view is not stable


# --------------------------------------------------------------------------- views, contract

def test_rows_and_counts_for_the_cli():
    m = knowing(1, 2, 3)
    m.local_agents = 4
    m.receive(nid(1), sync(entry(3, st="d", by=1)), 0.1)
    rows = m.rows()
    assert [r["node_id"] for r in rows] == [nid(k) for k in range(4)]
    assert rows[0] == {"node_id": nid(0), "address": addr(0), "state": ALIVE,
                       "incarnation": GEN, "agents": 4,
                       "endpoints": {"zmq": addr(0), "zmq-pub": addr(0).replace(":7400", ":7401")},
                       "replica": 0}
    assert rows[3]["state"] == DEAD and rows[1]["agents"] is None
    assert m.counts() == {ALIVE: 3, SUSPECT: 0, DEAD: 1, LEFT: 0}


def test_next_deadline_always_advances_after_a_tick():
    rng = random.Random(7)
    m = knowing(1, 2, 3, 4, 5, 6, dead_reap_s=3.0)
    m.receive(nid(1), sync(entry(6, st="d", by=1)), 0.0)
    now = 0.0
    for step in range(400):
        now = max(now, m.next_deadline()) + rng.choice([0, 0, 0.001, 0.05, 0.3])
        if step == 200:
            now += 20.0  # a pause
        for effect in sends(m.tick(now)):
            if effect.message.get("kind") == "ping" and effect.to != nid(5) and rng.random() < 0.7:
                m.receive(effect.to, ack_of(effect), now)
        assert m.next_deadline() > now, (step, now)


# --------------------------------------------------------------------------- digest, gossip order

def held_digest(m: Membership) -> list[int]:
    """The bucket digest ``m`` sends (its answer to a step-1 exchange)."""
    ask = {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": [0] * BUCKETS}
    [answer] = sends(m.receive(nid(1), ask, m.next_deadline()))
    return answer.message["dg"]


def digest_of_entries(members) -> list[int]:
    """Per bucket, the sum (mod 2**32) of crc32(id, incarnation, state) of ``members``."""
    digest = [0] * BUCKETS
    for node in members:
        key = f"{node.node_id}\0{node.generation}\0{node.state}".encode()
        digest[bucket(node.node_id)] = (digest[bucket(node.node_id)] + zlib.crc32(key)) % 2**32
    return digest


def test_the_digest_follows_every_change_of_our_own_entry():
    """A refutation and a leave change our entry: the digest sums the new one, not
    the old one (else every exchange would move our bucket for nothing)."""
    m = knowing(1, 2, 3)
    assert held_digest(m) == digest_of_entries(m.members.values())
    m.receive(nid(1), sync(entry(0, st="s", by=1)), 0.1)
    assert m.me.generation == GEN + 1
    assert held_digest(m) == digest_of_entries(m.members.values())
    m.leave(0.2)
    assert held_digest(m) == digest_of_entries(m.members.values())


def test_the_digest_forgets_reaped_members():
    m = knowing(1, 2, 3, dead_reap_s=2.0)
    m.receive(nid(1), sync(entry(3, st="d", by=1)), 0.1)
    run(m, 4.0)
    assert nid(3) not in m.members
    assert held_digest(m) == digest_of_entries(m.members.values())


def test_a_refutation_is_the_first_entry_of_our_next_message():
    """Newest news goes first: our refuted entry leads the next ping."""
    m = knowing(1, 2, 3, 4, k=2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    [ping] = [s for s in sends(m.tick(0.5)) if s.message["kind"] == "ping"]
    assert ping.message["u"][0] == entry(2, GEN + 1)


def test_a_leave_is_the_first_entry_of_our_next_message():
    m = knowing(1, 2, 3)
    m.leave(0.1)
    [ack] = sends(m.receive(nid(1), {"v": 2, "kind": "ping", "seq": 5, "u": []}, 0.2))
    assert ack.message["u"][0] == entry(0, st="l")


def test_every_refutation_counts_and_a_suspicion_of_us_raises_our_health():
    """Being suspected means our links or our timing failed: health gets worse by
    one per refutation, and each refutation is counted."""
    m = knowing(1, 2, 3, 4, k=2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    assert m.health == 1 and m.stats["refuted"] == 1
    m.receive(nid(1), sync(entry(2, GEN + 1, st="s", by=1)), 0.2)
    assert m.health == 2 and m.stats["refuted"] == 2 and m.me.generation == GEN + 2


def test_a_leave_and_a_loud_refutation_go_on_the_gossip_channel():
    m = knowing(1, 2)
    claimed = m.receive(nid(1), sync(entry(0, host="10.6.6.6")), 0.1)
    left = m.leave(0.2)
    assert sends(claimed) and all(s.channel == GOSSIP for s in sends(claimed))
    assert sends(left) and all(s.channel == GOSSIP for s in sends(left))


# --------------------------------------------------------------------------- suspicion details

def acks_u(m: Membership, now: float, sender: int = 1) -> list[str]:
    """The ids piggybacked on ``m``'s ack to a ping from ``sender``."""
    [ack] = sends(m.receive(nid(sender), {"v": 2, "kind": "ping", "seq": 1, "u": []}, now))
    return [e["id"] for e in ack.message["u"]]


def drain(m: Membership, node_id: str, now: float, sender: int = 1) -> None:
    """Ack pings until ``node_id`` is no longer piggybacked (its retransmits spent)."""
    for _ in range(10):
        if node_id not in acks_u(m, now, sender):
            return
    raise AssertionError(f"{node_id} still piggybacked")


def test_a_new_confirmation_spreads_again_a_repeated_or_surplus_one_does_not():
    """A suspicion confirmed by a new member is gossiped again (confirmations
    spread); the same accuser again, or a confirmation past the floor's two, is not
    news."""
    m = suspected(by=1)
    drain(m, nid(2), 0.15)
    m.receive(nid(3), sync(entry(2, st="s", by=1)), 0.2)  # the same accuser
    assert nid(2) not in acks_u(m, 0.2)
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 0.3)  # a new one
    assert nid(2) in acks_u(m, 0.3)
    drain(m, nid(2), 0.3)
    m.receive(nid(4), sync(entry(2, st="s", by=4)), 0.4)  # the second: the floor
    assert nid(2) in acks_u(m, 0.4)
    drain(m, nid(2), 0.4)
    m.receive(nid(1), sync(entry(2, st="s", by=0)), 0.5)  # a third is past the floor
    assert nid(2) not in acks_u(m, 0.5)


# --------------------------------------------------------------------------- nacks, relays

def nack(seq: int) -> dict:
    return {"v": 2, "kind": "nack", "seq": seq}


def test_a_nack_without_a_probe_in_flight_or_for_another_seq_is_ignored():
    m = knowing(1, 2, 3, 4)
    assert m.receive(nid(1), nack(1), 0.1) == []
    ping, reqs = probe_until_indirect(m)
    for req in reqs:
        m.receive(req.to, nack(ping.message["seq"] + 1), 0.8)
    m.tick(2 * CFG.probe_interval_s)
    assert m.health == 1  # nacks of another probe prove nothing


def test_one_helper_silent_is_enough_to_worsen_our_health():
    """Each nack counts once: all helpers but one nacking still leaves our own
    links in doubt."""
    m = knowing(1, 2, 3, 4)
    ping, reqs = probe_until_indirect(m)
    assert len(reqs) == 3
    for req in reqs[:-1]:
        m.receive(req.to, nack(ping.message["seq"]), 0.8)
    m.tick(2 * CFG.probe_interval_s)
    assert m.health == 1


def ping_req(target, seq: int = 9) -> dict:
    return {"v": 2, "kind": "ping-req", "seq": seq, "target": target, "u": []}


@pytest.mark.parametrize("target", [nid(7), [nid(2)], nid(3)], ids=["unknown", "not a string", "dead"])
def test_a_ping_req_for_a_target_we_cannot_ping_is_nacked_at_once(target):
    helper = knowing(0, 2, 3, k=1)
    helper.receive(nid(0), sync(entry(3, st="d", by=0)), 0.0)
    effects = helper.receive(nid(0), ping_req(target), 0.1)
    assert effects == [Send(nid(0), GOSSIP, {"v": 2, "kind": "nack", "seq": 9})]


def test_relayed_pings_take_fresh_seqs_and_their_nack_waits_the_probe_timeout():
    """Each relayed ping has its own seq (the acks are told apart by it); the asker
    is nacked only once the direct timeout has passed."""
    helper = knowing(0, 2, 3, k=1)
    [first] = sends(helper.receive(nid(0), ping_req(nid(2), seq=9), 0.1))
    [second] = sends(helper.receive(nid(3), ping_req(nid(2), seq=9), 0.1))
    assert (first.channel, first.message["seq"], second.message["seq"]) == (GOSSIP, 1, 2)
    assert helper.next_deadline() == pytest.approx(0.1 + CFG.probe_timeout_s)
    assert helper.tick(0.1 + CFG.probe_timeout_s - 0.01) == []
    [ack] = sends(helper.receive(nid(2), {"v": 2, "kind": "ack", "seq": 1, "u": []}, 0.15))
    assert (ack.to, ack.message["seq"]) == (nid(0), 9)
    nacks = sends(helper.tick(0.1 + CFG.probe_timeout_s))
    assert nacks == [Send(nid(3), GOSSIP, {"v": 2, "kind": "nack", "seq": 9})]


def test_a_relayed_ping_to_a_suspect_carries_the_suspicion():
    """The target hears it is suspected on the ping we relay, so it can refute."""
    helper = knowing(0, 2, 3, k=1)
    helper.receive(nid(0), sync(entry(2, st="s", by=0)), 0.0)
    drain(helper, nid(2), 0.0, sender=3)  # no longer news: sent for the target only
    [relayed] = sends(helper.receive(nid(0), ping_req(nid(2)), 0.1))
    assert entry(2, st="s", by=0) in relayed.message["u"]


def test_relays_are_bounded_and_the_one_past_the_bound_is_nacked():
    helper = knowing(0, 2, k=1)
    for seq in range(RELAYS_MAX):
        [ping] = sends(helper.receive(nid(0), ping_req(nid(2), seq), 0.1))
        assert ping.message["kind"] == "ping"
    assert sends(helper.receive(nid(0), ping_req(nid(2), RELAYS_MAX), 0.1)) == [
        Send(nid(0), GOSSIP, {"v": 2, "kind": "nack", "seq": RELAYS_MAX})]


# --------------------------------------------------------------------------- exchange pages

def test_digest_answers_rotate_over_the_differing_buckets_without_repeats():
    """A difference larger than a page is moved over several exchanges: each answer
    starts one differing bucket further, and no entry appears twice in one."""
    m = machine(0)
    learn(m, range(1, 400))
    differ = sorted({bucket(n) for n in m.members})
    ask = {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": [0] * BUCKETS}
    for k in range(1, 4):
        [answer] = sends(m.receive(nid(1), ask, 0.1))
        ids = [e["id"] for e in answer.message["u"]]
        assert len(ids) == SYNC_PAGE_MAX == len(set(ids))
        start = differ[k % len(differ)]
        assert ids[:len(in_bucket(m, start))] == in_bucket(m, start)


def in_bucket(m: Membership, index: int) -> list[str]:
    return sorted(n for n in m.members if bucket(n) == index)


# --------------------------------------------------------------------------- telling a member

def test_a_member_speaking_from_an_address_we_hold_outdated_is_told_rate_limited():
    """n0005 speaks for itself at its old address while we hold a newer entry
    elsewhere (its id claimed while it was away): we send our entry to the address
    it gives, so it refutes; at most once per probe period per member."""
    m = knowing(1, 5)
    m.receive(nid(5), sync(entry(5, GEN + 1, host="10.9.9.9")), 0.0)
    old = sync(entry(5, GEN, host="10.1.1.1"))
    told = m.receive(nid(5), old, 0.1)
    assert told == [Send(seed_id("tcp://10.1.1.1:7400"), GOSSIP,
                         sync(entry(5, GEN + 1, host="10.9.9.9")))]
    assert m.receive(nid(5), old, 0.1 + CFG.probe_interval_s - 0.01) == []
    assert sends(m.receive(nid(5), old, 0.1 + CFG.probe_interval_s)) == told
    assert m.members[nid(5)] == member(5, GEN + 1, host="10.9.9.9")


def test_the_told_table_is_bounded_by_clearing_it():
    """Past RELAYS_MAX members told, the rate-limit table starts over (a member
    told a moment ago may be told again: bounded memory wins)."""
    m = machine(0)
    many = range(1, RELAYS_MAX + 2)
    for k in many:
        m.receive(nid(k), sync(entry(k, GEN + 1, host="10.9.9.9")), 0.0)
    for k in many[:RELAYS_MAX]:
        assert sends(m.receive(nid(k), sync(entry(k, host="10.1.1.1")), 0.1))
    assert sends(m.receive(nid(1), sync(entry(1, host="10.1.1.1")), 0.1)) == []
    last = many[-1]
    assert sends(m.receive(nid(last), sync(entry(last, host="10.1.1.1")), 0.1))
    assert sends(m.receive(nid(1), sync(entry(1, host="10.1.1.1")), 0.1))


# --------------------------------------------------------------------------- suspicion timeouts
def test_one_confirmation_of_two_shortens_the_suspicion_part_way():
    """Lifeguard's timeout falls with log(confirmers) / log(expected + 1): one
    confirmation of the two expected takes it from 2 s to 2 - log 2 / log 3 s."""
    m = suspected(by=1)
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 0.2)
    deadline = 0.1 + 2.0 - math.log(2) / math.log(3)
    dies_at(m, 2, deadline)


def test_with_one_other_alive_member_one_confirmation_reaches_the_floor():
    """Three members: one other alive may confirm, so its confirmation is all the
    independent evidence there can be (timeout from 2 s to the 1 s floor)."""
    m = knowing(1, 2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    run(m, 0.1 + 2.0 - 0.01)
    assert state(m, 2) == SUSPECT
    other = knowing(1, 2)
    other.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    other.receive(nid(1), sync(entry(2, st="s", by=0)), 0.2)
    dies_at(other, 2, 0.1 + 1.0)


def test_alone_with_the_suspect_the_suspicion_starts_at_the_floor():
    """Two members: nobody could confirm, so the timeout is the floor at once."""
    m = knowing(1)
    run(m, 1.0, silent={nid(1)})  # the probe at 0.5 fails at 1.0: suspect
    assert m.members[nid(1)].state == SUSPECT
    run(m, 1.0 + 1.0 - 0.01, silent={nid(1)})
    assert state(m, 1) == SUSPECT
    run(m, 1.0 + 1.0 + 0.01, silent={nid(1)})
    assert state(m, 1) == DEAD


def test_the_suspicion_floor_grows_with_log10_of_the_ring():
    """20 members: floor 2 * log10(20) * 0.5 s, started at twice that."""
    m = machine(0)
    learn(m, range(1, 20))
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    deadline = 0.1 + 2 * 2 * math.log10(20) * CFG.probe_interval_s
    dies_at(m, 2, deadline)


def test_a_suspicion_at_a_newer_incarnation_starts_its_own_timer():
    """Suspected at GEN, refuted and suspected again at GEN + 1: the new suspicion
    times out (from when it began), the old one does not count."""
    m = suspected(by=1)
    m.receive(nid(1), sync(entry(2, GEN + 1, st="s", by=1)), 1.0)
    assert m.members[nid(2)].generation == GEN + 1
    dies_at(m, 2, 1.0 + 2.0)


# --------------------------------------------------------------------------- probe timers

def test_next_deadline_follows_the_probe_stages():
    """Unanswered: the indirect stage is due after the direct timeout; acked,
    nothing until the next period.  A lone node's next deadline is its probe."""
    assert machine(0).next_deadline() == CFG.probe_interval_s
    m = knowing(1, 2, 3)
    [ping] = [s for s in sends(m.tick(0.5)) if s.message["kind"] == "ping"]
    assert m.next_deadline() == pytest.approx(0.5 + CFG.probe_timeout_s)
    m.receive(ping.to, ack_of(ping), 0.6)
    assert m.next_deadline() == pytest.approx(1.0)


def test_a_worse_health_stretches_the_direct_timeout():
    m = knowing(1, 2, 3, 4)
    probe_until_indirect(m)
    m.tick(1.0)  # the probe failed without nacks: health 1, the next one is out
    assert m.health == 1
    assert m.next_deadline() == pytest.approx(1.0 + 2 * CFG.probe_timeout_s)


def test_helpers_are_the_other_alive_members_and_are_counted():
    """Neither us, the target, nor a member suspect or dead relays a ping-req."""
    m = knowing(1, 2, 3, 4)
    m.receive(nid(1), sync(entry(3, st="d", by=1), entry(4, st="s", by=1)), 0.0)
    ping, reqs = probe_until_indirect(m)
    assert {r.to for r in reqs} == {nid(1), nid(2)} - {ping.to}
    assert all(r.channel == GOSSIP and entry(0) in r.message["u"] for r in reqs)
    assert m.stats["indirect"] == len(reqs)
    m.tick(1.0)
    m.tick(1.0 + 2 * CFG.probe_timeout_s)
    assert m.stats["indirect"] > len(reqs)


def test_an_ack_of_no_probe_and_no_relay_is_ignored():
    m = knowing(1, 2)
    assert m.receive(nid(1), {"v": 2, "kind": "ack", "seq": 42, "u": []}, 0.1) == []


def test_a_relayed_ack_carries_what_we_hold_about_the_asker():
    """The asker, if we hold it suspect, hears it on the ack we relay to it."""
    helper = knowing(0, 2, 3, k=1)
    helper.receive(nid(2), sync(entry(0, st="s", by=2)), 0.0)
    drain(helper, nid(0), 0.0, sender=3)  # no longer news: sent for the asker only
    [ping] = sends(helper.receive(nid(0), ping_req(nid(2)), 0.1))
    [ack] = sends(helper.receive(nid(2), ack_of(ping), 0.15))
    assert ack.channel == GOSSIP and entry(0, st="s", by=2) in ack.message["u"]


# --------------------------------------------------------------------------- join pages

def join_page(page: int, pages: int) -> dict:
    """A page of a join answer (each carrying n0000, so the joiner is not alone)."""
    return {"v": 2, "kind": "sync", "u": [entry(0)], "page": page, "pages": pages}


def joiner() -> Membership:
    m = Membership(member(500), [addr(0)], rng=random.Random(5))
    m.start(0.0)
    return m


def test_a_join_answer_has_at_most_64_pages():
    m = joiner()
    m.receive(nid(0), join_page(63, 64), 0.1)
    with pytest.raises(MembershipError, match=r"^a join page needs integers 0 <= page < pages <= 64$"):
        m.receive(nid(0), join_page(0, 65), 0.1)


def test_pages_of_different_answers_do_not_add_up_to_a_join():
    m = joiner()
    m.receive(nid(0), join_page(0, 2), 0.1)
    m.receive(nid(1), join_page(1, 2), 0.1)
    assert not m.quorate
    m.receive(nid(0), join_page(1, 2), 0.2)
    assert m.quorate


def test_answers_in_progress_are_bounded_and_the_newest_survives_a_reset():
    """At most RELAYS_MAX answers are tracked; one more starts the table over with
    only itself."""
    m = joiner()
    for k in range(1, RELAYS_MAX + 1):
        m.receive(nid(k), join_page(0, 2), 0.1)
    m.receive(nid(1), join_page(1, 2), 0.1)
    assert m.quorate  # 256 answers in progress: the first one is still tracked
    m = joiner()
    for k in range(1, RELAYS_MAX + 2):
        m.receive(nid(k), join_page(0, 2), 0.1)
    m.receive(nid(1), join_page(1, 2), 0.1)
    assert not m.quorate  # forgotten in the reset
    m.receive(nid(RELAYS_MAX + 1), join_page(1, 2), 0.1)
    assert m.quorate


# --------------------------------------------------------------------------- messages in full

def test_a_ping_carries_queued_news_newest_first_our_entry_and_our_agent_count():
    m = knowing(1, 2, 3)
    m.local_agents = 5
    [ping] = sends(m.tick(0.5))
    assert ping == Send(ping.to, GOSSIP, {"v": 2, "kind": "ping", "seq": 1, "ag": 5,
                                          "u": [entry(3), entry(2), entry(1), entry(0)]})


def test_probes_count_their_seq_up_from_one():
    m = knowing(1, 2, 3)
    seqs = [e.message["seq"] for _, e in run(m, 1.6)
            if isinstance(e, Send) and e.message["kind"] == "ping"]
    assert seqs == [1, 2, 3] and m.stats["probes"] == 3


def test_a_failed_probe_tells_its_target_and_counts():
    """Suspected by us: the target hears it directly at once (one more chance to
    refute), and the failure, the suspicion and the ping-reqs are counted."""
    m = knowing(1, 2, 3, 4)
    ping, reqs = probe_until_indirect(m)
    effects = m.tick(1.0)
    told = Send(ping.to, GOSSIP, {"v": 2, "kind": "sync", "u": [
        entry(int(ping.to[1:]), st="s", by=0)]})
    assert told in effects
    assert (m.stats["probes_failed"], m.stats["suspected"], m.stats["indirect"]) == (1, 1, 3)
    [second] = [s for s in sends(effects) if s.message["kind"] == "ping"]
    m.tick(1.0 + 2 * CFG.probe_timeout_s)  # health 1: the direct timeout doubled
    m.tick(2.0)
    assert (m.stats["probes_failed"], m.stats["suspected"]) == (2, 2)
    assert m.stats["indirect"] == 3 + 2  # the first suspect is no helper
    assert state(m, int(second.to[1:])) == SUSPECT


def test_our_failed_probe_of_a_suspect_confirms_it_in_our_name():
    """Suspected by n0001; our own probe of it fails too: the entry now names us,
    goes out again as news, and the timeout reaches the floor (three members)."""
    m = knowing(1, 2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    [ping] = sends(m.tick(0.5))
    assert ping.to == nid(2) and ping.message["u"][0] == entry(2, st="s", by=1)
    assert [e["id"] for e in ping.message["u"]].count(nid(2)) == 1  # news, not twice
    m.tick(0.7)
    effects = m.tick(1.0)
    assert m.members[nid(2)] == Member(nid(2), GEN, member(2).endpoints, SUSPECT, nid(0))
    [next_ping] = [s for s in sends(effects) if s.message["kind"] == "ping"]
    assert next_ping.message["u"][0] == entry(2, st="s", by=0)
    # News again from the start: 3 messages carry it, the ping was the first.
    assert [nid(2) in acks_u(m, 1.0) for _ in range(3)] == [True, True, False]
    m.receive(nid(1), ack_of(next_ping), 1.0)
    m.tick(1.1)
    assert state(m, 2) == DEAD


def test_our_own_failed_probes_do_not_confirm_our_own_suspicion():
    """Only independent members shorten a suspicion: a second failure of our own
    probe adds nothing (three members: suspect at 1.0, dead at 1.0 + 2 s)."""
    m = knowing(1, 2)
    times = {}
    while (now := m.next_deadline()) <= 2.5:
        for e in sends(m.tick(now)):
            if e.message["kind"] == "ping":
                times.setdefault(e.to, []).append(now)
                if e.to != nid(2):
                    m.receive(e.to, ack_of(e), now)
    assert times[nid(2)] == [0.5, 2.0]  # failed at 1.0 and at 2.5
    assert (state(m, 2), m.members[nid(2)].by) == (SUSPECT, nid(0))
    run(m, 3.0 - 0.01, silent={nid(2)})
    assert state(m, 2) == SUSPECT
    run(m, 3.0, silent={nid(2)})
    assert state(m, 2) == DEAD


def test_an_acked_probe_heals_our_health_by_one():
    m = knowing(1, 2, 3, 4, k=2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    m.receive(nid(1), sync(entry(2, GEN + 1, st="s", by=1)), 0.1)
    assert m.health == 2
    run(m, 1.5 + 0.01)  # the first probe goes out at 0.5 * 3 = 1.5, acked
    run(m, 1.5 + 1.5)   # and ends when the next starts
    assert m.health == 1


def test_each_entry_is_sent_retransmit_mult_times_log10_n():
    """3 * ceil(log10(n + 1)) messages carry each update: 3 with 9 members, 6 with 10."""
    for others, times in ((8, 3), (9, 6)):
        m = machine(0)
        learn(m, range(1, others + 1))
        assert len(m.members) == others + 1
        carried = {nid(k): 0 for k in range(1, others + 1)}
        for _ in range(2 * times):
            for node_id in acks_u(m, 0.1):
                if node_id in carried:
                    carried[node_id] += 1
        assert set(carried.values()) == {times}, carried


def test_a_message_carries_at_most_entries_max_queued_updates_newest_first():
    m = machine(0)
    learn(m, range(1, 41))
    newest = [nid(k) for k in range(40, 40 - ENTRIES_MAX, -1)]
    assert acks_u(m, 0.1) == newest + [nid(0)]
    assert acks_u(m, 0.1) == [nid(k) for k in range(40 - ENTRIES_MAX, 40 - 2 * ENTRIES_MAX, -1)] + [nid(0)]


def test_an_ack_to_a_suspect_carries_its_suspicion_once_spent_as_news():
    """A suspect that pings us hears in our ack that it is suspected, even when
    the entry is no longer queued news; an alive sender gets no entry about itself."""
    m = suspected(by=1)
    drain(m, nid(2), 0.2)
    [ack] = sends(m.receive(nid(2), {"v": 2, "kind": "ping", "seq": 3, "u": []}, 0.2))
    assert ack.message["u"] == [entry(0), entry(2, st="s", by=1)]
    assert [e["id"] for e in ack.message["u"]] == [nid(0), nid(2)]
    assert acks_u(m, 0.2) == [nid(0)]


def test_a_ping_to_a_suspect_carries_its_suspicion_once_spent_as_news():
    m = knowing(1, 2)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    drain(m, nid(2), 0.1)
    [ping] = sends(m.tick(0.5))
    assert ping.to == nid(2) and ping.message["u"] == [entry(0), entry(2, st="s", by=1)]


def test_agent_counts_are_noted_from_valid_values_of_members_only():
    m = knowing(1, 2)

    def rows() -> dict:
        return {r["node_id"]: r["agents"] for r in m.rows()}

    def ping(**more) -> dict:
        return {"v": 2, "kind": "ping", "seq": 1, "u": [], **more}

    m.receive(nid(1), ping(ag=3), 0.1)
    for bad in ({}, {"ag": -1}, {"ag": "4"}):
        m.receive(nid(1), ping(**bad), 0.1)
        assert rows()[nid(1)] == 3
    m.receive(nid(1), ping(ag=0), 0.1)
    assert rows()[nid(1)] == 0
    m.receive(nid(9), ping(ag=7), 0.1)
    assert nid(9) not in rows()


@pytest.mark.parametrize("seq", [0, 2**63 - 1])
def test_a_ping_seq_anywhere_in_range_is_acked_with_it(seq):
    [ack] = sends(knowing(1).receive(nid(1), {"v": 2, "kind": "ping", "seq": seq, "u": []}, 0.1))
    assert ack.message["seq"] == seq


def test_probes_go_to_alive_and_suspect_others_only():
    """Never ourselves; a member that died after the round was drawn is skipped."""
    m = knowing(1, 2, 3)
    [first] = sends(m.tick(0.5))
    m.receive(first.to, ack_of(first), 0.5)
    keep = nid(1) if first.to != nid(1) else nid(2)
    dead = [k for k in (1, 2, 3) if nid(k) != keep]
    m.receive(keep, sync(*(entry(k, st="d", by=int(keep[1:])) for k in dead)), 0.6)
    targets = {e.to for _, e in run(m, 5.0)
               if isinstance(e, Send) and e.message["kind"] == "ping"}
    assert targets == {keep}
    lone = knowing(1)
    targets = {e.to for _, e in run(lone, 5.0)
               if isinstance(e, Send) and e.message["kind"] == "ping"}
    assert targets == {nid(1)}


def test_the_digest_exchange_starts_with_us_and_what_we_hold_about_the_receiver():
    m = knowing(1, 2)
    m.receive(nid(1), sync(entry(2, st="d", by=1)), 0.1)
    exchanges = [e for _, e in run(m, 1.0) if isinstance(e, Send) and "dg" in e.message]
    dg = digest_of_entries(m.members.values())
    assert exchanges == [
        Send(nid(1), GOSSIP, {"v": 2, "kind": "sync", "r": 1, "u": [entry(0)], "dg": dg}),
        Send(nid(2), GOSSIP, {"v": 2, "kind": "sync", "r": 1,
                              "u": [entry(0), entry(2, st="d", by=1)], "dg": dg})]


# --------------------------------------------------------------------------- entries on the wire

@pytest.mark.parametrize("node_id", ["x", "n" * 255])
def test_an_entry_id_may_have_1_to_255_characters(node_id):
    item = {**entry(1), "id": node_id}
    assert Member.from_wire(item).node_id == node_id


@pytest.mark.parametrize("node_id", ["", "n" * 256, 7])
def test_an_entry_id_outside_1_to_255_characters_is_refused(node_id):
    with pytest.raises(MembershipError, match=r"^member 'id' must be a string of 1\.\.255$"):
        Member.from_wire({**entry(1), "id": node_id})


def test_an_entry_that_is_no_map_is_refused_naming_it():
    with pytest.raises(MembershipError, match=r"^a member entry must be a map, got 'n0001'$"):
        Member.from_wire("n0001")


def test_incarnation_zero_is_a_valid_incarnation():
    assert Member.from_wire(entry(1, 0)).generation == 0


def test_an_entry_does_not_beat_an_equal_one():
    for st in (ALIVE, SUSPECT, DEAD, LEFT):
        same = replace_state(member(5), st)
        assert not same.beats(same)


def test_a_bad_seq_is_refused_with_its_message():
    with pytest.raises(MembershipError, match=r"^'seq' must be a non-negative integer$"):
        knowing(1).receive(nid(1), {"v": 2, "kind": "ping", "seq": -1, "u": []}, 0.1)


# --------------------------------------------------------------------------- timers in detail

def test_the_indirect_stage_starts_once_at_the_direct_timeout():
    m = knowing(1, 2, 3, 4)
    m.tick(0.5)
    assert sends(m.tick(0.6)) == []
    assert len(sends(m.tick(0.7))) == 3
    assert sends(m.tick(0.8)) == []


def test_a_pause_is_a_timer_more_than_two_periods_late():
    """Exactly two periods late is still a late timer; a moment more is a pause;
    each pause counts."""
    m = knowing(1)
    m.tick(0.5 + 2 * CFG.probe_interval_s)
    assert m.stats["pauses"] == 0
    m = knowing(1)
    m.tick(0.5 + 2 * CFG.probe_interval_s + 0.001)
    assert m.stats["pauses"] == 1
    m.tick(m.next_deadline() + 10.0)
    assert m.stats["pauses"] == 2


def test_a_pause_moves_the_start_of_a_suspicion_too():
    """The lost time comes back to the whole suspicion: a confirmation after the
    pause shortens it from its (moved) start."""
    m = suspected(by=1)
    m.tick(10.5)  # 10 s late: the suspicion that began at 0.1 begins at 10.1 now
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 10.6)
    deadline = 10.1 + 2.0 - math.log(2) / math.log(3)
    dies_at(m, 2, deadline)


def test_every_due_suspicion_times_out_whatever_the_order_of_ids():
    m = knowing(1, 2, 3, 4)
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 0.1)
    m.receive(nid(3), sync(entry(1, st="s", by=3)), 0.5)
    run(m, 0.1 + 2.0 + 0.01)
    assert (state(m, 1), state(m, 2)) == (SUSPECT, DEAD)


# --------------------------------------------------------------------------- periodic sync

def periodic(m: Membership, now: float) -> list[Send]:
    """The sync messages of ``m``'s tick at ``now`` (its pings acked at once)."""
    out = sends(m.tick(now))
    for ping in [s for s in out if s.message["kind"] == "ping"]:
        m.receive(ping.to, ack_of(ping), now)
    return [s for s in out if s.message["kind"] == "sync"]


def test_the_periodic_exchange_never_goes_to_ourselves():
    m = knowing(1)
    targets = {s.to for _, s in run(m, 20.0) if isinstance(s, Send) and "dg" in s.message}
    assert targets == {nid(1)}


def test_seeds_no_alive_member_answers_for_get_a_join_and_so_does_a_member_until_joined():
    """Our seeds may be down while members talk to us (a restart): until joined, a
    random alive member is asked for the whole list too; seeds keep getting joins
    while no alive member is at their address."""
    j = Membership(member(5), [addr(0), addr(1)], rng=random.Random(5))
    j.start(0.0)
    j.receive(nid(0), sync(entry(0)), 0.1)
    join = {"v": 2, "kind": "sync", "u": [entry(5)], "full": True}
    digest = {"v": 2, "kind": "sync", "r": 1, "u": [entry(5)],
              "dg": digest_of_entries(j.members.values())}
    assert periodic(j, 1.0) == [Send(nid(0), GOSSIP, digest),
                                Send(seed_id(addr(1)), GOSSIP, join), Send(nid(0), GOSSIP, join)]
    j.receive(nid(0), {**sync(), "page": 0, "pages": 1}, 1.1)
    assert periodic(j, 2.0) == [Send(nid(0), GOSSIP, digest),
                                Send(seed_id(addr(1)), GOSSIP, join)]


# --------------------------------------------------------------------------- reaping

def test_a_left_member_is_reaped_exactly_dead_reap_s_after():
    m = knowing(1, 2, dead_reap_s=2.0)
    m.receive(nid(2), sync(entry(2, st="l")), 1.0)
    m.tick(2.0)
    m.tick(2.5)
    assert state(m, 2) == LEFT
    m.tick(3.0)
    assert nid(2) not in m.members


def test_a_reaped_member_comes_back_as_a_stranger():
    """Forgotten entirely: relayed back it counts only once it speaks itself, and
    the agent count it once reported is gone."""
    m = knowing(1, 2, downing=STATIC_QUORUM, quorum_size=3, dead_reap_s=2.0)
    m.receive(nid(2), {"v": 2, "kind": "ping", "seq": 1, "u": [], "ag": 4}, 0.5)
    m.receive(nid(2), sync(entry(2, st="l")), 1.0)
    assert not m.quorate
    run(m, 3.0)
    assert nid(2) not in m.members
    m.receive(nid(1), sync(entry(2, GEN + 1)), 3.1)
    assert not m.quorate and {r["node_id"]: r["agents"] for r in m.rows()}[nid(2)] is None
    m.receive(nid(2), sync(entry(2, GEN + 1)), 3.2)
    assert m.quorate


def test_a_reaped_member_leaves_the_gossip_queue():
    """Its queued entry goes with it: it takes no slot of a message any more."""
    m = knowing(1, dead_reap_s=0.5)
    m.receive(nid(1), sync(entry(1, st="l")), 0.0)
    learn(m, range(2, 21))
    m.tick(1.0)  # a ping takes the 16 newest entries; the sync reaps n0001
    assert nid(1) not in m.members
    assert len(acks_u(m, 1.1, sender=2)) == ENTRIES_MAX


# --------------------------------------------------------------------------- errors, exactly

def entry_with(**fields) -> dict:
    """Entry n0001 with ``fields`` replaced."""
    return {**entry(1), **fields}


EP = entry(1)["ep"]

REFUSED = {
    "not a map": ("ping", r"a membership message must be a map"),
    "v=1": ({"v": 1, "kind": "ping", "seq": 1, "u": []},
            r"membership messages need an integer 'v' >= 2 \(got 1: a node of an older version\?\)"),
    "unknown kind": ({"v": 2, "kind": "members", "u": []},
                     r"unknown membership message kind 'members'"),
    "u too long": (sync(*(entry(k) for k in range(SYNC_PAGE_MAX + 1))),
                   r"'u' must be a list of at most 128 entries"),
    "gen 2**64": (sync(entry_with(gen=2**64)),
                  r"member 'gen' must be an integer in 0\.\.2\*\*64-1 \('n0001'\)"),
    "ep empty": (sync(entry_with(ep={})), r"member 'ep' must map 1\.\.8 transports"),
    "ep a list": (sync(entry_with(ep=list(EP.items()))), r"member 'ep' must map 1\.\.8 transports"),
    "no zmq-pub": (sync(entry_with(ep={"zmq": EP["zmq"]})),
                   r"member 'n0001' lacks a 'zmq' or 'zmq-pub' endpoint"),
    "st a list": (sync(entry_with(st=["a"])), r"member 'st' must be one of a, s, d, l \('n0001'\)"),
    "by too long": (sync(entry_with(st="s", by="b" * 256)), r"member 'by' must be a node id \('n0001'\)"),
    "transport name empty": (sync(entry_with(ep={**EP, "": "x"})),
                             r"transport names are strings of 1\.\.32"),
    "transport name too long": (sync(entry_with(ep={**EP, "t" * 33: "x"})),
                                r"transport names are strings of 1\.\.32"),
    "transport name not a string": (sync(entry_with(ep={**EP, 7: "x"})),
                                    r"transport names are strings of 1\.\.32"),
    "endpoint empty": (sync(entry_with(ep={**EP, "other": ""})), r"endpoints are strings of 1\.\.255"),
    "endpoint too long": (sync(entry_with(ep={**EP, "other": "e" * 256})),
                          r"endpoints are strings of 1\.\.255"),
    "endpoint not a string": (sync(entry_with(ep={**EP, "other": 7})),
                              r"endpoints are strings of 1\.\.255"),
    "port 65536": (sync(entry_with(ep={**EP, "zmq": "tcp://h:65536"})),
                   r"member endpoint must be tcp://HOST:PORT, got 'tcp://h:65536'"),
    "rid -1": (sync({**entry(3), "rid": -1}),
               r"member 'rid' must be an integer in 0\.\.2\*\*64-1 \('n0003'\)"),
    "rid 2**64": (sync({**entry(3), "rid": 2**64}),
                  r"member 'rid' must be an integer in 0\.\.2\*\*64-1 \('n0003'\)"),
    "rid a bool": (sync({**entry(3), "rid": True}),
                   r"member 'rid' must be an integer in 0\.\.2\*\*64-1 \('n0003'\)"),
}


@pytest.mark.parametrize("message, error", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_message_names_what_is_wrong(message, error):
    with pytest.raises(MembershipError, match=f"^{error}$"):
        knowing(1).receive(nid(1), message, 0.1)


TAKEN = {
    "gen 2**64-1": entry_with(gen=2**64 - 1),
    "8 transports": entry_with(ep={**EP, **{f"t{i}": "x" for i in range(6)}}),
    "1-character transport and endpoint": entry_with(ep={**EP, "t": "e"}),
    "32-character transport, 255-character endpoint": entry_with(ep={**EP, "t" * 32: "e" * 255}),
    "port 65535": entry_with(ep={**EP, "zmq": "tcp://h:65535"}),
    "255-character by": entry_with(st="s", by="b" * 255),
}


@pytest.mark.parametrize("item", TAKEN.values(), ids=TAKEN.keys())
def test_an_entry_at_the_limits_is_taken(item):
    assert Member.from_wire(item).node_id == nid(1)


def test_the_replica_id_travels_with_the_entry_and_a_refutation_keeps_it():
    """``rid`` is the process's CRDT replica id: absent means 0 (none), and the
    incarnation a refutation raises leaves it as it was (docs/STATE.md, 'Pruning')."""
    mine = Member.of(nid(2), addr(2), addr(2).replace(":7400", ":7401"), GEN, replica=2**64 - 1)
    assert mine.to_wire() == {**entry(2), "rid": 2**64 - 1}
    assert Member.from_wire(mine.to_wire()) == mine and Member.from_wire(entry(2)).replica == 0
    assert "rid" not in member(2).to_wire()
    accused = Membership(mine, (), SwimConfig(), rng=random.Random(2))
    accused.start(0.0)
    accused.receive(nid(1), sync(entry(1)), 0.0)
    accused.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    assert accused.me.generation == GEN + 1 and accused.me.replica == 2**64 - 1
    assert [r["replica"] for r in accused.rows()] == [0, 2**64 - 1]
    m = knowing(1)
    m.receive(nid(2), sync({**entry(2), "rid": 5}), 0.2)
    assert m.members[nid(2)].replica == 5 and m.rows()[2]["replica"] == 5


def test_advertised_replicas_are_every_entrys_or_none_while_one_has_none():
    dead = dataclasses.replace(Member.of(nid(1), addr(1), addr(1), GEN, replica=7), state=DEAD)
    members = {nid(0): Member.of(nid(0), addr(0), addr(0), GEN, replica=5), nid(1): dead}
    assert advertised_replicas(members) == frozenset((5, 7))
    assert advertised_replicas({**members, nid(2): member(2)}) is None
    assert advertised_replicas({}) == frozenset()


def test_by_is_kept_for_suspect_and_dead_entries_only_and_defaults_to_empty():
    assert Member.from_wire(entry_with(st="s")).by == ""
    assert Member.from_wire(entry_with(st="d", by="x")).by == "x"
    assert Member.from_wire(entry_with(by="x")).by == ""
    assert Member.from_wire(entry_with(st="l", by="x")).by == ""


def test_a_member_first_heard_directly_is_counted_at_once():
    """Relayed, n0002 does not count; the moment it speaks itself (even with
    nothing new to say) the quorum is decided again."""
    m = knowing(1, downing=STATIC_QUORUM, quorum_size=3)
    m.receive(nid(1), sync(entry(2)), 0.1)
    assert not m.quorate
    effects = m.receive(nid(2), {"v": 2, "kind": "ping", "seq": 1, "u": [entry(2)]}, 0.2)
    assert m.quorate and of_type(effects, QuorumChanged) == [QuorumChanged(True, 3, 3)]


def test_an_ack_carries_the_agent_count_too():
    m = knowing(1, 2)
    [ping] = sends(m.tick(0.5))
    m.receive(ping.to, {**ack_of(ping), "ag": 4}, 0.6)
    assert {r["node_id"]: r["agents"] for r in m.rows()}[ping.to] == 4


def test_an_ack_goes_back_on_the_gossip_channel():
    [ack] = sends(knowing(1).receive(nid(1), {"v": 2, "kind": "ping", "seq": 1, "u": []}, 0.1))
    assert ack.channel == GOSSIP


def test_a_message_without_entries_is_fine():
    [ack] = sends(knowing(1).receive(nid(1), {"v": 2, "kind": "ping", "seq": 1}, 0.1))
    assert ack.message["seq"] == 1


# --------------------------------------------------------------------------- construction, start

def test_a_machine_before_start_has_no_deadline_and_ticks_idle():
    m = Membership(member(0), [], rng=random.Random(0))
    assert m.next_deadline() is None and m.tick(1.0) == []


def test_without_an_rng_a_machine_replays_from_its_node_id():
    """The default randomness is seeded from the node id: two runs agree."""
    def one_run() -> list:
        m = Membership(member(0), [])
        m.start(0.0)
        for k in range(1, 6):
            m.receive(nid(k), sync(entry(k)), 0.0)
        return [e for _, e in run(m, 10.0)]
    assert one_run() == one_run()


def test_a_fresh_machine_counts_nothing_and_reports_no_agents():
    m = machine(0)
    assert set(m.stats.values()) == {0}
    m.receive(nid(1), sync(entry(1)), 0.0)
    [ping] = sends(m.tick(0.5))
    assert ping.message["ag"] == 0


def test_start_reports_the_verdict_first_then_the_view_of_us_alone():
    j = Membership(member(5), [addr(0)], rng=random.Random(5))
    effects = j.start(0.0)
    assert effects[:2] == [QuorumChanged(False, 1, 1), MembersChanged({nid(5): member(5)},
                                                                      frozenset({nid(5)}))]
    assert j.quorate is False


def test_a_tick_with_nothing_changed_reports_no_view():
    m = machine(0)
    assert of_type(m.tick(0.5), MembersChanged) == []


def test_our_entry_waits_its_turn_as_news_from_start():
    """Our own entry is queued at start like any news: with more than a message of
    newer news it goes first in the next message, before entries sent once."""
    m = machine(0)
    learn(m, range(1, 18))
    assert acks_u(m, 0.1) == [nid(k) for k in range(17, 1, -1)] + [nid(0)]
    assert acks_u(m, 0.1) == [nid(1), nid(0)] + [nid(k) for k in range(2, 16)]


@pytest.mark.parametrize("config, error", [
    ({"probe_timeout_s": 0.0}, r"need 0 < probe_timeout_s <= probe_interval_s"),
    ({"probe_timeout_s": 0.6}, r"need 0 < probe_timeout_s <= probe_interval_s"),
    ({"downing": "oldest"}, r"downing is keep-majority or static-quorum"),
    ({"downing": STATIC_QUORUM, "quorum_size": 0}, r"static-quorum needs quorum_size >= 1"),
])
def test_a_bad_config_is_refused_naming_the_rule(config, error):
    with pytest.raises(ValueError, match=f"^{error}$"):
        SwimConfig(**config)


def test_config_limits_that_are_allowed():
    assert SwimConfig(probe_timeout_s=0.5).probe_timeout_s == SwimConfig().probe_interval_s
    assert SwimConfig(downing=STATIC_QUORUM, quorum_size=1).quorum_size == 1


# --------------------------------------------------------------------------- merging in detail

def test_an_incarnation_may_lead_our_clock_by_exactly_the_limit():
    m = knowing(1)
    limit = 10**9 + GENERATION_AHEAD_MAX_NS  # at now = 1.0 s, wall offset 0
    m.receive(nid(1), sync(entry(5, limit), entry(6, limit + 1), entry(7, limit + 1)), 1.0)
    assert state(m, 5) == ALIVE and nid(6) not in m.members and m.refused_entries == 2


def test_an_unchanged_entry_is_skipped_unread_and_the_rest_still_merge():
    """Entries equal to what we hold are skipped before validation (the common
    case, kept cheap); whatever follows one is merged as usual."""
    m = knowing(1, 2)
    unchanged = {**entry(2), "by": 7}  # would be refused if it were read
    m.receive(nid(1), sync(unchanged, entry(5)), 0.1)
    assert state(m, 5) == ALIVE


def test_accusations_skipped_from_a_stranger_do_not_stop_the_rest():
    m = knowing(1)
    m.receive(nid(9), sync(entry(1, st="s", by=9), entry(5)), 0.1)
    assert state(m, 1) == ALIVE and state(m, 5) == ALIVE


def test_every_forged_address_change_is_counted():
    m = knowing(1, 5)
    m.receive(nid(1), sync(entry(5, GEN + 1, host="10.9.9.9")), 0.1)
    m.receive(nid(1), sync(entry(5, GEN + 2, host="10.9.9.8")), 0.2)
    assert m.refused_entries == 2 and m.members[nid(5)] == member(5)


def test_a_member_repeating_an_older_entry_of_itself_is_not_told():
    """Same address, older incarnation: nothing to refute, nothing sent."""
    m = knowing(1, 5)
    m.receive(nid(5), sync(entry(5, GEN + 1)), 0.1)
    assert m.receive(nid(5), sync(entry(5, GEN)), 0.2) == []


def test_an_older_comeback_relayed_for_a_dead_member_is_not_told():
    m = knowing(1, 5)
    m.receive(nid(1), sync(entry(5, GEN + 1, st="d", by=1)), 0.1)
    assert sends(m.receive(nid(1), sync(entry(5, GEN, host="10.9.9.9")), 0.2)) == []


def test_alive_news_at_the_suspected_incarnation_does_not_confirm_the_suspicion():
    m = suspected(by=1)
    m.receive(nid(3), sync(entry(2)), 0.2)
    m.receive(nid(4), sync(entry(2)), 0.3)
    run(m, FIRST_DEADLINE - 0.01)
    assert state(m, 2) == SUSPECT


def test_a_refuted_suspicion_no_longer_holds_the_downing_back():
    m = suspected(by=1)
    declare_dead(m, [4], 1, 0.1)
    m.receive(nid(2), sync(entry(2, GEN + 1)), 0.2)
    run(m, 0.2 + m.stable_s() + 0.01)  # stable since the refutation, long before 2.1
    assert nid(4) not in m.ring and m.stats["downed"] == 1


def test_a_dead_member_back_alive_is_not_reaped():
    m = knowing(1, 2, dead_reap_s=2.0)
    m.receive(nid(1), sync(entry(2, st="d", by=1)), 0.1)
    m.receive(nid(2), sync(entry(2, GEN + 1)), 0.5)
    run(m, 5.0)
    assert state(m, 2) == ALIVE


def test_only_deaths_are_counted_as_declared_dead():
    m = knowing(1, 2, 3)
    m.receive(nid(1), sync(entry(2, st="s", by=1)), 0.1)
    assert m.stats["declared_dead"] == 0
    declare_dead(m, [2, 3], 1, 0.2)
    assert m.stats["declared_dead"] == 2


def test_downed_counts_add_up():
    m = knowing(1, 2, 3, 4, 5, 6)
    declare_dead(m, [6], 1, 0.1)
    run(m, 5.0)
    declare_dead(m, [5], 1, 5.1)
    run(m, 10.0)
    assert m.stats["downed"] == 2


def test_a_view_change_is_reported_before_the_messages_and_a_verdict_before_both():
    m = knowing(1, 2, 3, 4)
    ping, _ = probe_until_indirect(m)
    effects = m.tick(1.0)
    assert isinstance(effects[0], MembersChanged) and sends(effects)
    flip = declare_dead(m, [2, 3, 4], 1, 1.1)
    assert [type(e) for e in flip[:2]] == [QuorumChanged, MembersChanged]


def test_a_re_queued_entry_is_sent_once_per_message():
    m = suspected(by=1)
    acks_u(m, 0.15)  # n0002 sent once
    m.receive(nid(3), sync(entry(2, st="s", by=3)), 0.2)  # queued again
    ids = acks_u(m, 0.2)
    assert ids.count(nid(2)) == 1


def test_stable_s_is_one_probe_round_over_the_others_alive_at_least():
    assert knowing(1, stable_after_s=0.1).stable_s() == CFG.probe_interval_s
    assert knowing(1, 2, 3, stable_after_s=0.1).stable_s() == 3 * CFG.probe_interval_s


def test_a_worse_health_stretches_the_probe_period():
    m = knowing(1, 2, 3, 4)
    probe_until_indirect(m)
    m.tick(1.0)
    assert m.health == 1
    assert not [s for s in sends(m.tick(1.5)) if s.message["kind"] == "ping"]
    assert [s for s in sends(m.tick(2.0)) if s.message["kind"] == "ping"]


def test_the_digest_stays_exact_over_many_members_and_changes():
    """Sums wrap modulo 2**32 both ways (members added, changed, forgotten)."""
    m = machine(0, dead_reap_s=1.0)
    learn(m, range(1, 300))
    assert held_digest(m) == digest_of_entries(m.members.values())
    m.receive(nid(1), sync(*(entry(k, st="d", by=1) for k in range(2, 100))), 0.1)
    m.receive(nid(1), sync(*(entry(k, GEN + 1) for k in range(100, 200))), 0.2)
    assert held_digest(m) == digest_of_entries(m.members.values())
    m.receive(nid(1), sync(*(entry(k, GEN + 1, st="l") for k in range(200, 300))), 0.3)
    run(m, 2.0)
    assert nid(250) not in m.members
    assert held_digest(m) == digest_of_entries(m.members.values())


def test_sync_answers_go_back_to_the_asker_on_the_gossip_channel():
    seed = machine(0)
    learn(seed, range(1, 5))
    pages = sends(seed.receive(nid(9), {**sync(entry(9)), "full": True}, 0.1))
    ask = {"v": 2, "kind": "sync", "r": 1, "u": [], "dg": [0] * BUCKETS}
    [step2] = sends(seed.receive(nid(9), ask, 0.1))
    [step3] = sends(seed.receive(nid(9), {**ask, "r": 2}, 0.1))
    assert [(s.to, s.channel) for s in pages + [step2, step3]] == [(nid(9), GOSSIP)] * 3


def test_a_bad_digest_is_refused_with_its_message():
    bad = {"v": 2, "kind": "sync", "r": 3, "u": [], "dg": [0] * BUCKETS}
    with pytest.raises(MembershipError, match=r"^a sync digest is 64 integers of 32 bits, r 1 or 2$"):
        knowing(1).receive(nid(1), bad, 0.1)


def test_after_refuting_we_are_still_alive_on_our_ring_and_counted():
    m = knowing(1, 2, downing=STATIC_QUORUM, quorum_size=3)
    m.receive(nid(1), sync(entry(0, st="s", by=1)), 0.1)
    assert m.me.generation == GEN + 1
    assert nid(0) in m.ring and m.quorate and m.counts()[ALIVE] == 3


# --------------------------------------------------------------------------- seed names

def test_a_seed_is_named_by_its_address_until_its_node_id_is_known():
    """``seed:ADDRESS`` names a peer known only by address; ``seed_address`` reads
    the address back, and finds none in a real node id."""
    assert seed_id("tcp://10.0.0.1:7400") == "seed:tcp://10.0.0.1:7400"
    assert seed_address("seed:tcp://10.0.0.1:7400") == "tcp://10.0.0.1:7400"
    assert seed_address("n0001") is None
    assert seed_address("xseed:tcp://h:1") is None
