"""Membership (SWIM + Lifeguard): unit tests that drive single machines by hand.

Messages are built as the machine builds them (``{"v": 2, "kind": ...}``, entries
``{"id", "gen", "ep"[, "st", "by"]}``).  Timings come from ``SwimConfig()``'s
defaults: probe every 0.5 s, direct timeout 0.2 s, sync every 1 s.  The simulations
(many machines, a faulty network) are in ``tests/test_swim_sim.py``.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest

from protocols.effects import GOSSIP, MembersChanged, QuorumChanged, Refuted, Send, seed_id
from protocols.membership import (ALIVE, BUCKETS, DEAD, GENERATION_AHEAD_MAX_NS, LEFT,
                                  MEMBERS_MAX, STATIC_QUORUM,
                                  SUSPECT, SYNC_PAGE_MAX, Member, Membership,
                                  MembershipError, SwimConfig)

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
    run(m, FLOOR_DEADLINE - 0.01)
    assert state(m, 2) == SUSPECT
    run(m, FLOOR_DEADLINE + 0.01)
    assert state(m, 2) == DEAD


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
    run(m, FIRST_DEADLINE + late - 0.01)
    assert state(m, 2) == SUSPECT
    run(m, FIRST_DEADLINE + late + 0.01)
    assert state(m, 2) == DEAD


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
                       "endpoints": {"zmq": addr(0), "zmq-pub": addr(0).replace(":7400", ":7401")}}
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
