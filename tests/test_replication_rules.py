"""The replication machine's rules, one machine at a time, at explicit times.

tests/test_replication.py drives whole clusters; here a single ``Replication`` is
handed messages as its peers would send them and its effects, records, counters and
deadlines are checked exactly: what a ring change re-places, what a restarted member
is sent again, which copies are pushed on and dropped, how batches and local
storage (``persist``) behave.  Every test names the rule it pins.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import msgpack
import pytest

from core_cy import HashRing, replica_id
from protocols.crdt import (CrdtError, PNCounter, decode_fields, encode_fields,
                            take_deltas)
from protocols.effects import (REPLICATE, Activate, Forget, Persist, Restore, Send,
                               WriteDone)
from protocols.replication import (ALL, BATCH_BYTES_MAX, BATCH_MAX, GEN_FIELD, RECORDS_MAX,
                                   GENERATIONS_MAX, LOCAL, QUORUM, RESEND_MAX_S,
                                   RESTART_JUMP, Replication, ReplicationError, batch)
from protocols.routing import Refusal
from protocols.wire import ErrorCode

pytestmark = pytest.mark.timeout(60)

BEHAVIOR = "counter"
OPTIONS = {"n": 3, "write_timeout_s": 2.0, "gather_timeout_s": 2.0, "resend_s": 0.2}


# ---------------------------------------------------------------------- helpers

def machine(nodes: str = "abc", me: str = "a", **options: Any) -> Replication:
    """``me``'s machine on the ring of ``nodes``, every one of them reachable."""
    m = Replication(me, replica_id(me), itertools.count(1).__next__, **{**OPTIONS, **options})
    ring = HashRing(tuple(nodes))
    m.members_changed(nodes, 0.0)
    m.ring_changed(ring, ring, 0.0)
    return m


def agent_where(wanted: Callable[[list[str]], bool], nodes: str = "abc", n: int = 3,
                *more: tuple[str, Callable[[list[str]], bool]], besides: str = "") -> str:
    """The first agent id (but ``besides``) whose replica list on ``nodes``
    ``wanted`` accepts (and on each ring of ``more``, its own predicate)."""
    first = HashRing(tuple(nodes))
    rings = [(HashRing(tuple(nodes_)), ok) for nodes_, ok in more]
    for i in range(10_000):
        agent = f"{BEHAVIOR}/{i}"
        if agent != besides and wanted(first.preference_list(agent, n)) and all(
                ok(ring.preference_list(agent, n)) for ring, ok in rings):
            return agent
    raise AssertionError("no such agent in 10,000 ids")


def counter(amount: int, replica: int = 7) -> dict:
    field = PNCounter().bind(replica)
    field.increment(amount)
    return {"n": field}


def wire_counter(amount: int, replica: int = 7) -> dict:
    return encode_fields(counter(amount, replica))


def value(m: Replication, agent: str) -> int:
    return m.records[agent].fields["n"].value()


def write(m: Replication, agent: str, amount: int, consistency: str = LOCAL,
          handle: Any = "h", now: float = 0.0) -> list:
    """A turn on the owner ``m`` that adds ``amount`` to the agent's counter."""
    rec = m.records[agent]
    if "n" not in rec.fields:
        rec.fields["n"] = PNCounter().bind(m.replica, m.clock)
    rec.fields["n"].increment(amount)
    return m.wrote(agent, take_deltas(rec.fields), consistency, handle, now)


def ack(agent: str, epoch: int, seq: int) -> dict:
    return {"k": "a", "a": agent, "e": epoch, "s": seq}


def full(agent: str, epoch: int, seq: int, fields: dict, behavior: str = BEHAVIOR) -> dict:
    return {"k": "f", "a": agent, "b": behavior, "e": epoch, "s": seq, "f": fields}


def delta(agent: str, epoch: int, seq: int, fields: dict, **extra: Any) -> dict:
    return {"k": "d", "a": agent, "b": BEHAVIOR, "e": epoch, "s": seq, "f": fields, **extra}


def push(agent: str, fields: dict, behavior: str = BEHAVIOR) -> dict:
    return {"k": "p", "a": agent, "b": behavior, "f": fields}


def own(m: Replication, agent: str, amount: int = 1) -> Any:
    """``m`` owns ``agent`` and wrote ``amount`` (at local), acknowledged by every
    replica; returns the record."""
    rec = m.primary(agent, BEHAVIOR, 0.0)
    write(m, agent, amount)
    for r in list(rec.acked):
        m.receive(r, ack(agent, rec.epoch, rec.seq), 0.0)
    assert m.lagging == 0
    return rec


def owned(nodes: str = "abc", **options: Any) -> tuple[Replication, str, Any]:
    """Machine ``a`` owning an agent (its replicas b and c on "abc") with one write
    (1) every replica acknowledged."""
    m = machine(nodes, **options)
    agent = agent_where(lambda reps: reps[0] == "a", nodes)
    return m, agent, own(m, agent)


def sent(effects: list) -> list[tuple[str, str]]:
    """(to, kind) of every Send, in order."""
    return [(e.to, e.message["k"]) for e in effects if isinstance(e, Send)]


# ---------------------------------------------------------------------- errors, sizes

def test_a_replication_error_reads_reason_colon_detail():
    """The error's text is "reason: detail" and keeps both parts (logs read it)."""
    error = ReplicationError("bad_seq", "'e' is an integer")
    assert str(error) == "bad_seq: 'e' is an integer"
    assert (error.reason, error.detail) == ("bad_seq", "'e' is an integer")


def test_quorum_and_all_need_a_majority_and_every_other_replica():
    """needed(): local none, quorum n // 2 acks besides the owner, all n - 1."""
    m = machine("abcde", n=5)
    assert [m.needed("x", c) for c in (LOCAL, QUORUM, ALL)] == [0, 2, 4]
    m3 = machine("abc")
    assert [m3.needed("x", c) for c in (LOCAL, QUORUM, ALL)] == [0, 1, 2]


@pytest.mark.parametrize("option", [{"n": 0}, {"write_timeout_s": 0.0},
                                    {"gather_timeout_s": 0.0}, {"resend_s": 0.0}])
def test_bad_options_are_refused(option):
    """A replica count below 1 or a timeout not above 0, each alone."""
    with pytest.raises(ValueError, match=r"^n >= 1 and positive timeouts$"):
        Replication("a", 1, lambda: 0, **option)


def test_the_smallest_good_options_are_taken():
    """One replica, any positive timeouts and rate (well under 1 s or 1/s)."""
    Replication("a", 1, lambda: 0, n=1, write_timeout_s=0.5, gather_timeout_s=0.5,
                resend_s=0.01, failover_rate=0.5)
    with pytest.raises(ValueError, match=r"^failover_rate > 0$"):
        Replication("a", 1, lambda: 0, failover_rate=0.0)


# ---------------------------------------------------------------------- views

def test_counts_and_is_primary_describe_the_records():
    """counts(): records, owned ones, copies, lagging, gathers, held writes and the
    failover queue; is_primary only for records this node owns."""
    m, agent, rec = owned()
    copy = agent_where(lambda reps: reps[0] == "b")
    m.receive("b", push(copy, wire_counter(1)), 0.0)
    write(m, agent, 1, ALL, "h", 0.0)
    assert m.counts() == {"records": 2, "primary": 1, "replica": 1, "lagging": 1,
                          "gathering": 0, "waiting_writes": 1, "failover_queue": 0}
    assert m.is_primary(agent) and m.is_primary(copy) is False
    assert m.is_primary("nobody") is False


def test_a_new_machine_counts_nothing_and_knows_nobody():
    """Every counter starts at zero, no error is recorded, nobody is reachable."""
    m = Replication("a", 1, lambda: 0)
    assert set(m.stats.values()) == {0} and m.last_error is None
    assert not m.needs_gather("x") and m.next_deadline() is None


def test_the_defaults_the_node_relies_on():
    """n 3, write and gather timeouts 2 s, repairs after 0.2 s, epochs from 1,
    failover at 1000/s, 10,000 held requests, 100,000 held writes."""
    m = Replication("a", 1, itertools.count(1).__next__)
    ring = HashRing(tuple("abcde"))
    m.members_changed("abcde", 0.0)
    m.ring_changed(ring, ring, 0.0)
    agent = agent_where(lambda reps: reps[0] == "a", "abcde", 3)
    rec = m.primary(agent, BEHAVIOR, 0.0)
    assert len(rec.acked) == 2 and rec.epoch == 1
    write(m, agent, 1, ALL, "h", 10.0)
    assert m.next_deadline() == pytest.approx(10.2)
    m.tick(10.2)
    assert [e for e in m.tick(12.0) if isinstance(e, WriteDone)] == [
        WriteDone("h", False, 0, 2)]
    lost = agent_where(lambda reps: reps[0] == "b", "abcde")
    for n in range(10_000):
        m.gather(lost, n, 0, 30.0)
    assert isinstance(m.gather(lost, "over", 0, 30.0), Refusal)
    assert [e for e in m.tick(31.99) if isinstance(e, Restore)] == []
    assert [e for e in m.tick(32.0) if isinstance(e, Restore)][0].held[-1] == 9_999
    for _ in range(100_000):
        m.wrote(agent, {}, ALL, "w", 40.0)
    assert m.wrote(agent, {}, ALL, "over", 40.0) == [WriteDone("over", False, 0, 2)]
    queued_at = Replication("a", 1, lambda: 0)
    queued_at._activate.append("x")
    assert queued_at.next_deadline() == 1 / 1000
    assert queued_at._records_max == RECORDS_MAX == 3_000_000


# ---------------------------------------------------------------------- writes

def test_a_timed_out_write_leaves_no_wait_on_its_record():
    """Past its deadline a held write is answered (not ok) and its record holds no
    wait any more; the counter counts it once."""
    m, agent, rec = owned()
    assert sent(write(m, agent, 1, ALL, "h", 1.0)) == [("b", "d"), ("c", "d")]
    assert [e for e in m.tick(2.999) if isinstance(e, WriteDone)] == []
    effects = m.tick(3.0)
    assert [e for e in effects if isinstance(e, WriteDone)] == [WriteDone("h", False, 0, 2)]
    assert rec.waits is None and m.waits_now == 0
    assert m.stats["write_timeouts"] == 1


def test_a_burst_of_write_timeouts_on_one_agent_is_answered_in_one_tick():
    """200,000 writes of one agent time out together: each is answered once and the
    record is left with none.  (The record's waits were filtered again for every
    wait that expired: quadratic, minutes for this many; the test's timeout is the
    bound, about a second is enough.)"""
    m, agent, rec = owned(waits_max=200_000)
    write(m, agent, 1)  # its replicas have not acked this one
    for n in range(200_000):
        m.wrote(agent, {}, ALL, n, 0.0)
    expired = [e for e in m.tick(2.0) if isinstance(e, WriteDone)]
    assert expired == [WriteDone(n, False, 0, 2) for n in range(200_000)]
    assert rec.waits is None and m.waits_now == 0


def test_waits_answered_early_are_skipped_when_later_ones_expire():
    """A wait released by its acks stays in the deadline queue; expiring it is skipped
    and the waits behind it still time out (the queue is walked on, not stopped)."""
    m, agent, rec = owned()
    write(m, agent, 1, QUORUM, "first", 1.0)
    assert m.receive("b", ack(agent, rec.epoch, rec.seq), 1.0) == [
        WriteDone("first", True, 1, 1)]
    write(m, agent, 1, ALL, "second", 1.5)
    effects = [e for e in m.tick(3.5) if isinstance(e, WriteDone)]
    assert effects == [WriteDone("second", False, 0, 2)]
    assert m.stats["write_timeouts"] == 1


def test_a_timed_out_write_leaves_the_later_waits_of_its_record_in_place():
    """When one of a record's writes times out, its later writes still wait for
    their acks (and count as timeouts of their own)."""
    m, agent, rec = owned()
    write(m, agent, 1, ALL, "early", 0.0)
    write(m, agent, 1, ALL, "late", 1.0)
    assert [e for e in m.tick(2.0) if isinstance(e, WriteDone)] == [
        WriteDone("early", False, 0, 2)]
    m.receive("b", ack(agent, rec.epoch, 3), 2.5)
    assert m.receive("c", ack(agent, rec.epoch, 3), 2.5) == [WriteDone("late", True, 2, 2)]
    write(m, agent, 1, ALL, "again", 3.0)
    m.tick(5.0)
    assert m.stats["write_timeouts"] == 2


def test_stop_fails_held_writes_once_and_answers_gathers():
    """stop(): every held write fails (and does not time out again later) and every
    gather ends with its requests."""
    m, agent, rec = owned()
    write(m, agent, 1, ALL, "h", 0.0)
    lost = agent_where(lambda reps: reps[0] == "b")
    m.receive("b", push(lost, wire_counter(3)), 0.0)
    m.gather(lost, "request", 5, 0.0)
    assert m.stop() == [WriteDone("h", False, 0, 2), Restore(lost, BEHAVIOR, ("request",))]
    assert rec.waits is None and m.waits_now == 0 and m.held_now == 0
    assert [e for e in m.tick(10.0) if isinstance(e, (WriteDone, Restore))] == []


# ---------------------------------------------------------------------- ring changes

def change(m: Replication, before: str, after: str, now: float = 0.0) -> list:
    """``m`` learns the members and ring ``after``, the owners having been ``before``."""
    effects = m.members_changed(after, now)
    return effects + m.ring_changed(HashRing(tuple(before)), HashRing(tuple(after)), now)


def copy_from_owner(m: Replication, agent: str, owner: str, amount: int = 1) -> None:
    """``m`` takes a full state of ``agent`` from its owner (stream epoch 1, seq 1)."""
    m.receive(owner, full(agent, 1, 1, wire_counter(amount)), 0.0)


def test_an_owned_agent_keeps_its_replicas_acks_and_a_new_replica_gets_the_full_state():
    """Owner side of a ring change: replicas that stay keep the seq they acked; a new
    one starts at -1 (knows nothing) and is sent the full state at the next tick."""
    agent = agent_where(lambda reps: reps[0] == "a", "abc", 3,
                        ("abcd", lambda reps: reps[0] == "a" and "d" in reps))
    (kept,) = set(HashRing(tuple("abcd")).preference_list(agent, 3)) - {"a", "d"}
    m = machine("abc")
    rec = own(m, agent)
    assert change(m, "abc", "abcd") == []
    assert rec.acked == {kept: 1, "d": -1}
    assert sent(m.tick(0.0)) == [("d", "f")]


def test_a_ring_change_that_keeps_an_owned_agent_s_replicas_schedules_nothing():
    """Every replica of an owned agent still holds its latest write: nothing to send."""
    agent = agent_where(lambda reps: reps[0] == "a", "abc", 3,
                        ("abcd", lambda reps: "d" not in reps))
    m = machine("abc")
    rec = own(m, agent)
    acked = dict(rec.acked)
    change(m, "abc", "abcd")
    assert rec.acked == acked and m.lagging == 0 and m.next_deadline() is None
    assert m.tick(10.0) == []


def test_a_copy_whose_owner_and_replicas_stay_is_kept_and_not_pushed():
    """A replica that stays one, under the same owner, has nothing to hand on."""
    agent = agent_where(lambda reps: reps[1] == "a", "abc", 3,
                        ("abcd", lambda reps: reps[1] == "a"))
    owner = HashRing(tuple("abc")).owner(agent)
    m = machine("abc")
    copy_from_owner(m, agent, owner)
    assert change(m, "abc", "abcd") == []
    assert m.tick(0.0) == [] and agent in m.records and m.lagging == 0


def test_a_copy_whose_owner_changed_is_offered_to_the_new_owner_only():
    """A replica that stays one, under a new owner, pushes its copy to that owner."""
    agent = agent_where(lambda reps: reps[0] != "a" and "a" in reps, "abc", 3,
                        ("abcd", lambda reps: reps[0] == "d" and "a" in reps))
    m = machine("abc")
    copy_from_owner(m, agent, HashRing(tuple("abc")).owner(agent))
    change(m, "abc", "abcd")
    assert sent(m.tick(0.0)) == [("d", "p")]
    assert m.records[agent].push_to == {"d"}


def test_a_copy_no_longer_replicated_here_goes_to_every_replica_then_is_forgotten():
    """A node out of an agent's replica set pushes its copy to each new replica and
    drops it (Forget, with local storage) once the last one acknowledged it."""
    agent = agent_where(lambda reps: reps[0] != "a" and "a" in reps, "abc", 3,
                        ("abcd", lambda reps: "a" not in reps))
    targets = HashRing(tuple("abcd")).preference_list(agent, 3)
    m = machine("abc", persist=True)
    copy_from_owner(m, agent, HashRing(tuple("abc")).owner(agent))
    change(m, "abc", "abcd")
    assert sent(m.tick(0.0)) == [(t, "p") for t in sorted(targets)]
    assert m.stats["pushes"] == 3
    for t in targets[:-1]:
        assert m.receive(t, {"k": "pa", "a": agent}, 0.1) == []
        assert agent in m.records
    assert m.receive(targets[-1], {"k": "pa", "a": agent}, 0.1) == [Forget(agent)]
    assert agent not in m.records and m.lagging == 0 and m.stats["dropped"] == 1
    assert m.receive(targets[0], {"k": "pa", "a": agent}, 0.2) == []  # late: ignored


def test_pushes_owed_to_a_node_that_left_the_ring_are_forgotten():
    """A copy still to be pushed to a node that is no longer on the ring is pushed to
    the agent's new replicas and to the live nodes it owed, never to the gone one."""
    for i in range(10_000):
        agent = f"{BEHAVIOR}/{i}"
        first = HashRing(tuple("abc")).preference_list(agent, 3)
        second = HashRing(tuple("abcde")).preference_list(agent, 3)
        if first[0] == "a" or "a" not in first or "a" in second:
            continue
        gone = second[-1]
        rest = "".join(x for x in "abcde" if x != gone)
        third = HashRing(tuple(rest)).preference_list(agent, 3)
        if "a" not in third:
            break
    m = machine("abc")
    copy_from_owner(m, agent, first[0])
    change(m, "abc", "abcde")
    assert m.records[agent].push_to == set(second)
    change(m, "abcde", rest)
    assert m.records[agent].push_to == (set(second) | set(third)) - {gone}


def test_the_first_ring_after_a_restart_places_the_copies_read_back_from_disk():
    """Copies recovered from local storage, placed by the first ring (no previous
    owners): one this node owns is woken, one it replicates is kept, one it does not
    replicate is pushed to the agent's replicas."""
    mine = agent_where(lambda reps: reps[0] == "a", "abcd")
    replica = agent_where(lambda reps: reps[1] == "a", "abcd")
    stranger = agent_where(lambda reps: "a" not in reps, "abcd")
    m = Replication("a", 1, itertools.count(1).__next__, **OPTIONS)
    for agent in (mine, replica, stranger):
        m.recovered(agent, BEHAVIOR, counter(2))
    assert [m.records[a].behavior for a in (mine, replica, stranger)] == [BEHAVIOR] * 3
    m.members_changed("abcd", 0.0)
    assert m.ring_changed(HashRing(()), HashRing(tuple("abcd")), 0.0) == []
    effects = m.tick(0.0)
    assert [e for e in effects if isinstance(e, Activate)] == [Activate(mine)]
    stranger_reps = HashRing(tuple("abcd")).preference_list(stranger, 3)
    assert sent(effects) == [(t, "p") for t in sorted(stranger_reps)]
    assert value(m, replica) == 2 and m.records[replica].push_to is None


def test_a_recovered_copy_joins_the_one_already_held():
    """recovered() merges into a record held already (a join), keeping its behavior."""
    m = Replication("a", 1, lambda: 0)
    m.recovered("x", BEHAVIOR, counter(2, replica=1))
    m.recovered("x", "other", counter(5, replica=2))
    assert value(m, "x") == 7 and m.records["x"].behavior == BEHAVIOR


# ---------------------------------------------------------------------- restarted members

def test_a_restarted_replica_is_sent_the_full_state_again():
    """A member whose generation jumped by more than RESTART_JUMP restarted empty: as
    a replica of our agents it is owed their full state (acked seq -1); a smaller
    step (a refutation) changes nothing."""
    m, agent, rec = owned()
    m.members_changed("abc", 1.0, {"b": 100, "c": 100})
    m.members_changed("abc", 1.0, {"b": 100 + RESTART_JUMP, "c": 100})
    assert rec.acked == {"b": 1, "c": 1} and m.lagging == 0
    m.members_changed("abc", 1.0, {"b": 101 + 2 * RESTART_JUMP, "c": 100})
    assert rec.acked == {"b": -1, "c": 1}
    assert sent(m.tick(1.0)) == [("b", "f")]


def test_a_restarted_owner_is_offered_the_copies_of_its_agents():
    """Replica side: a restarted owner gets our copy of each agent it owns (not of
    the agents others own, nor empty records); pushes owed already are kept."""
    theirs = agent_where(lambda reps: reps[0] == "b" and "a" in reps, "abcd")
    stray = agent_where(lambda reps: reps[0] == "b" and "a" not in reps, "abcd")
    others = agent_where(lambda reps: reps[0] == "c" and "a" in reps, "abcd")
    m = machine("abcd")
    for agent in (theirs, stray, others):
        copy_from_owner(m, agent, HashRing(tuple("abcd")).owner(agent))
    m.receive("b", full("empty", 1, 1, {}), 0.0)
    m.tick(0.0)  # the stray copy is pushed on (its acks do not come)
    m.members_changed("abcd", 1.0, {"b": 5})  # first seen: no restart
    assert m.records[theirs].push_to is None
    m.members_changed("abcd", 1.0, {"b": 5 + RESTART_JUMP + 1})
    assert m.records[theirs].push_to == {"b"}
    assert m.records[stray].push_to == set(HashRing(tuple("abcd")).preference_list(stray, 3))
    assert m.records[others].push_to is None and m.records["empty"].push_to is None
    pushed = [e.message["a"] for e in m.tick(1.0) if isinstance(e, Send)]
    assert pushed.count(theirs) == 1


def test_generations_are_remembered_up_to_a_bound():
    """Up to GENERATIONS_MAX remembered members every one is kept; past it the memory
    starts again, and a member seen first after that is not taken for restarted."""
    m, agent, rec = owned()
    m.members_changed("abc", 0.0, {"b": 1})
    m.members_changed("abc", 0.0, {f"x{i}": 1 for i in range(GENERATIONS_MAX - 2)})
    m.members_changed("abc", 0.0, {"c": 1})  # 4095 known + 1: exactly the bound
    m.members_changed("abc", 0.0, {"b": 2 + RESTART_JUMP})
    assert rec.acked == {"b": -1, "c": 1}
    m2, agent2, rec2 = owned()
    m2.members_changed("abc", 0.0, {"b": 1})
    m2.members_changed("abc", 0.0, {f"x{i}": 1 for i in range(GENERATIONS_MAX - 1)})
    m2.members_changed("abc", 0.0, {"c": 1})  # 4096 known + 1 > bound: forgotten
    m2.members_changed("abc", 0.0, {"b": 2 + RESTART_JUMP})
    assert rec2.acked == {"b": 1, "c": 1}


def test_a_restarted_member_that_is_no_replica_of_an_owned_agent_changes_nothing():
    """Only the replicas an owned agent tracks are marked behind."""
    agent = agent_where(lambda reps: reps[0] == "a" and "d" not in reps, "abcd")
    m = machine("abcd")
    rec = own(m, agent)
    m.members_changed("abcd", 0.0, {"d": 1})
    m.members_changed("abcd", 0.0, {"d": 2 + RESTART_JUMP})
    assert "d" not in rec.acked and m.lagging == 0


# ---------------------------------------------------------------------- released

def test_a_released_agent_becomes_a_copy_offered_to_its_new_owner():
    """released(): the record is no longer ours (no acks tracked), its held writes
    fail, and its copy goes to the new owner when this node stays a replica."""
    agent = agent_where(lambda reps: reps[0] == "a", "abc", 3,
                        ("abcd", lambda reps: reps[0] == "d" and "a" in reps))
    m = machine("abc")
    rec = m.primary(agent, BEHAVIOR, 0.0)
    write(m, agent, 1, ALL, "h", 0.0)
    m.tick(0.0)
    change(m, "abc", "abcd", 0.5)
    assert m.released(agent, 0.5) == [WriteDone("h", False, 0, 2)]
    assert rec.primary is False and rec.acked is None and rec.waits is None
    assert rec.push_to == {"d"}
    assert sent(m.tick(0.5)) == [("d", "p")]
    assert m.released(agent, 0.6) == [] and m.released("nobody", 0.6) == []


def test_a_released_agent_not_replicated_here_is_offered_to_every_replica():
    """released(): a node out of the agent's replica set offers its copy to all of them."""
    agent = agent_where(lambda reps: reps[0] == "a", "abc", 3,
                        ("abcdef", lambda reps: "a" not in reps))
    m = machine("abc")
    own(m, agent)
    change(m, "abc", "abcdef")
    m.released(agent, 1.0)
    reps = HashRing(tuple("abcdef")).preference_list(agent, 3)
    assert m.records[agent].push_to == set(reps)
    assert sent(m.tick(1.0)) == [(t, "p") for t in sorted(reps)]


# ---------------------------------------------------------------------- gathers

def new_owner_after_failover(**options: Any) -> tuple[Replication, str]:
    """Machine ``a`` owning, on ring "acd", an agent "b" owned on "abcd" (a was not
    its owner there): it must gather the agent's copies from c and d."""
    agent = agent_where(lambda reps: reps[0] == "b", "abcd", 3,
                        ("acd", lambda reps: reps[0] == "a"))
    m = machine("abcd", **options)
    change(m, "abcd", "acd")
    return m, agent


def test_needs_gather_asks_for_copies_only_when_someone_else_may_have_one():
    """needs_gather(): yes for an agent another node owned on a remembered ring, or
    that we hold a copy of, or (with local storage) any agent; no when nobody else is
    reachable, when we own it already, or once a gather settled it."""
    m, agent = new_owner_after_failover()
    assert m.needs_gather(agent)
    always_mine = agent_where(lambda reps: reps[0] == "a", "abcd", 3,
                              ("acd", lambda reps: reps[0] == "a"))
    assert not m.needs_gather(always_mine)  # never anywhere else
    m.recovered(always_mine, BEHAVIOR, counter(1))
    assert m.needs_gather(always_mine)  # a copy here: others may hold newer ones
    assert machine("acd", persist=True).needs_gather(always_mine)
    m.primary(always_mine, BEHAVIOR, 0.0)
    assert not m.needs_gather(always_mine)
    alone = machine("a")
    assert not alone.needs_gather(agent)
    m.settled(agent)
    assert not m.needs_gather(agent)


def test_settled_agents_are_remembered_up_to_held_max():
    """settled() is a bounded shortcut: at held_max entries it starts again."""
    m, agent = new_owner_after_failover(held_max=2)
    others = ["x1", "x2"]
    m.settled(agent)
    m.settled(others[0])
    assert not m.needs_gather(agent)
    m.settled(others[1])  # the third: the memory starts again
    assert m.needs_gather(agent) and not m.needs_gather(others[1])


def test_a_gather_asks_every_reachable_replica_and_counts():
    """The first hold sends want to each reachable node of the agent's replica sets
    (sorted), counts one gather, and the answers end it with the held requests."""
    m, agent = new_owner_after_failover()
    effects = m.gather(agent, "r1", 10, 0.0)
    assert sent(effects) == [("c", "w"), ("d", "w")]
    assert m.gather(agent, "r2", 5, 0.1) == []
    assert m.stats["gathers"] == 1 and m.held_now == 2
    assert m.counts()["gathering"] == 1
    assert m.receive("c", {"k": "h", "a": agent, "b": None, "f": None}, 0.2) == []
    assert m.receive("b", {"k": "h", "a": agent, "b": None, "f": None}, 0.2) == []  # not asked
    assert m.receive("d", {"k": "h", "a": agent, "b": BEHAVIOR, "f": wire_counter(4)},
                     0.2) == [Restore(agent, BEHAVIOR, ("r1", "r2"))]
    assert value(m, agent) == 4 and m.held_now == 0
    assert m.receive("c", {"k": "h", "a": agent, "b": None, "f": None}, 0.3) == []


def test_a_gather_with_nobody_to_ask_restores_at_once():
    """Nobody reachable may hold a copy: the agent is restored at once, with the
    behavior of the copy held here and the request; no gather is left to time out
    (it restored the agent a second time, and the request was lost)."""
    m = machine("abc")
    m.recovered("x", BEHAVIOR, counter(1))
    m.members_changed("a", 0.0)
    assert m.gather("x", "r", 1, 0.0) == [Restore("x", BEHAVIOR, ("r",))]
    assert m.gather("y", None, 0, 0.0) == [Restore("y", None, ())]
    assert m.counts()["gathering"] == 0 and m.held_now == 0 and m.stats["gathers"] == 0
    assert m.next_deadline() is None and m.tick(10.0) == []


def test_requests_held_for_gathers_are_bounded_by_their_sum_of_bytes():
    """held_bytes_max bounds the bytes of every held request together, freed when a
    gather ends: the one past the bound is refused overloaded."""
    m, agent = new_owner_after_failover(held_bytes_max=100)
    m.gather(agent, "r1", 30, 0.0)
    m.gather(agent, "r2", 30, 0.0)
    refused = m.gather(agent, "r3", 41, 0.0)
    assert isinstance(refused, Refusal) and refused.code == ErrorCode.OVERLOADED
    assert refused.message == "2 requests wait for agent state to be gathered"
    assert m.gather(agent, "r3", 40, 0.0) == []
    m.members_changed("a", 0.0)  # the asked nodes are gone: the gather ends
    assert m.held_now == 0
    other = agent_where(lambda reps: reps[0] == "b", "abcd", 3,
                        ("acd", lambda reps: reps[0] == "a"), besides=agent)
    m.members_changed("acd", 0.0)
    assert isinstance(m.gather(other, "big", 101, 0.0), Refusal)
    assert m.gather(other, "big", 100, 0.0) == []


def test_a_have_with_state_is_kept_in_local_storage():
    """A gathered copy is merged and, with local storage, persisted as it came."""
    m, agent = new_owner_after_failover(persist=True)
    m.gather(agent, None, 0, 0.0)
    fields = wire_counter(3)
    assert m.receive("c", {"k": "h", "a": agent, "b": BEHAVIOR, "f": fields}, 0.1) == [
        Persist(agent, BEHAVIOR, fields)]
    assert m.records[agent].behavior == BEHAVIOR and value(m, agent) == 3


def test_a_have_merges_into_the_copy_already_held():
    """An answer joins the copy this node holds (not a new record)."""
    m, agent = new_owner_after_failover()
    m.recovered(agent, BEHAVIOR, counter(2, replica=1))
    m.gather(agent, None, 0, 0.0)
    m.receive("c", {"k": "h", "a": agent, "b": BEHAVIOR, "f": wire_counter(3, 2)}, 0.1)
    assert value(m, agent) == 5


def test_want_is_answered_with_our_copy_or_with_nothing():
    """A want gets have: our behavior and fields, or None and None."""
    m, agent, rec = owned()
    assert m.receive("b", {"k": "w", "a": "nobody"}, 0.0) == [
        Send("b", REPLICATE, {"k": "h", "a": "nobody", "b": None, "f": None})]
    assert m.receive("b", {"k": "w", "a": agent}, 0.0) == [
        Send("b", REPLICATE, {"k": "h", "a": agent, "b": BEHAVIOR,
                              "f": encode_fields(rec.fields)})]


def test_adopt_joins_the_handed_off_state_into_our_copy_and_owns_it():
    """adopt(): the handoff's fields are merged into the copy held here and the
    record becomes ours (new epoch; replicas owed the full state)."""
    agent = agent_where(lambda reps: reps[0] == "a")
    m = machine("abc")
    m.receive("b", full(agent, 1, 1, wire_counter(2, replica=1)), 0.0)
    rec = m.adopt(agent, "kv", wire_counter(3, replica=2), 1.0)
    assert rec is m.records[agent] and rec.primary and rec.behavior == "kv"
    assert value(m, agent) == 5 and rec.fields["n"].replica == m.replica
    assert sorted(rec.acked.values()) == [-1, -1]
    assert sent(m.tick(1.0)) == [(r, "f") for r in sorted(rec.acked)]
    fresh = agent_where(lambda reps: reps[0] == "a" and reps[1] == "c")
    assert m.adopt(fresh, BEHAVIOR, None, 1.0).fields == {}
    assert m.is_primary(fresh)


# ---------------------------------------------------------------------- replica side

def replica_of(owner: str = "b", nodes: str = "abc", **options: Any) -> tuple[Replication, str]:
    """Machine ``a``, a replica (not the owner) of an agent ``owner`` owns."""
    agent = agent_where(lambda reps: reps[0] == owner and "a" in reps, nodes)
    return machine(nodes, **options), agent


def test_a_full_state_sets_the_stream_a_replica_follows():
    """A full state is acked with its own seq; from the stream followed already a
    lower seq keeps ours, from another epoch or sender its seq is taken as is."""
    m, agent = replica_of()
    assert m.receive("b", full(agent, 1, 5, wire_counter(1)), 0.0) == [
        Send("b", REPLICATE, ack(agent, 1, 5))]
    rec = m.records[agent]
    assert (rec.src, rec.epoch, rec.seq, rec.behavior) == ("b", 1, 5, BEHAVIOR)
    assert m.receive("b", full(agent, 1, 3, wire_counter(1)), 0.0) == [
        Send("b", REPLICATE, ack(agent, 1, 3))]
    assert rec.seq == 5
    m.receive("b", full(agent, 2, 2, wire_counter(1), behavior="kv"), 0.0)
    assert (rec.src, rec.epoch, rec.seq, rec.behavior) == ("b", 2, 2, "kv")
    m.receive("c", full(agent, 2, 1, wire_counter(1)), 0.0)
    assert (rec.src, rec.epoch, rec.seq) == ("c", 2, 1)
    assert m.stats["fulls_applied"] == 4


def test_a_full_state_to_an_owner_is_merged_without_touching_its_stream():
    """The owner merges a full state it is sent but keeps its own epoch and seq."""
    m, agent, rec = owned()
    epoch = rec.epoch
    assert m.receive("b", full(agent, 99, 7, wire_counter(5)), 0.0) == [
        Send("b", REPLICATE, ack(agent, 99, 7))]
    assert (rec.src, rec.epoch, rec.seq) == ("a", epoch, 1) and value(m, agent) == 6


def test_a_full_state_reaching_a_node_outside_the_replica_set_is_passed_on():
    """A stray copy (the sender's ring is behind) is pushed on to the replicas."""
    agent = agent_where(lambda reps: "a" not in reps, "abcd")
    m = machine("abcd", persist=True)
    fields = wire_counter(1)
    assert m.receive("b", full(agent, 1, 1, fields), 0.5) == [
        Send("b", REPLICATE, ack(agent, 1, 1)), Persist(agent, BEHAVIOR, fields)]
    reps = HashRing(tuple("abcd")).preference_list(agent, 3)
    assert m.records[agent].push_to == set(reps)
    assert m.next_deadline() == 0.5
    assert sent(m.tick(0.5)) == [(t, "p") for t in sorted(reps)]


def test_deltas_apply_in_order_from_the_stream_followed():
    """The first delta of a stream that began empty ("z") opens it; the next one
    applies; a repeat is acked with the seq held; a gap, another sender or another
    epoch asks for the full state; the behavior follows the deltas."""
    m, agent = replica_of(persist=True)
    first = wire_counter(1)
    assert m.receive("b", delta(agent, 1, 1, first, z=True), 0.0) == [
        Send("b", REPLICATE, ack(agent, 1, 1)), Persist(agent, BEHAVIOR, first)]
    rec = m.records[agent]
    assert (rec.src, rec.epoch, rec.seq) == ("b", 1, 1)
    second = {**delta(agent, 1, 2, wire_counter(3)), "b": "kv"}
    assert sent(m.receive("b", second, 0.0)) == [("b", "a")]
    assert rec.seq == 2 and rec.behavior == "kv" and value(m, agent) == 3
    need = Send("b", REPLICATE, {"k": "n", "a": agent, "e": 1})
    assert m.receive("b", delta(agent, 1, 1, first, z=True), 0.0) == [
        Send("b", REPLICATE, ack(agent, 1, 2))]  # a late repeat of the opening delta
    assert m.receive("b", delta(agent, 1, 4, first), 0.0) == [need]
    assert m.receive("c", delta(agent, 1, 3, first), 0.0) == [
        Send("c", REPLICATE, {"k": "n", "a": agent, "e": 1})]
    assert m.receive("b", delta(agent, 2, 3, first), 0.0) == [
        Send("b", REPLICATE, {"k": "n", "a": agent, "e": 2})]
    assert m.stats["deltas_applied"] == 2 and rec.seq == 2


def test_an_opening_delta_is_refused_by_the_owner_and_asks_for_state_when_unknown():
    """An owner never follows another stream; a delta without "z" for an agent not
    held asks for the full state; a "z" delta from a new epoch restarts the stream."""
    m, agent, rec = owned()
    assert sent(m.receive("b", delta(agent, 5, 1, wire_counter(1), z=True), 0.0)) == [
        ("b", "n")]
    r, other = replica_of()
    assert sent(r.receive("b", delta(other, 1, 1, wire_counter(1)), 0.0)) == [("b", "n")]
    assert other not in r.records
    r.receive("b", delta(other, 1, 1, wire_counter(1), z=True), 0.0)
    r.receive("b", delta(other, 1, 2, wire_counter(2)), 0.0)
    assert sent(r.receive("b", delta(other, 2, 1, wire_counter(5, 8), z=True), 0.0)) == [
        ("b", "a")]
    assert (r.records[other].epoch, r.records[other].seq) == (2, 1)
    assert value(r, other) == 7


# ---------------------------------------------------------------------- owner side

def test_acks_count_once_per_replica_of_the_current_stream():
    """Acks from outside the replica set, of another epoch, for an agent not owned or
    not held change nothing; a valid one counts and is clamped to our seq."""
    lags: list[float] = []
    m, agent, rec = owned(observe_lag=lags.append)
    write(m, agent, 1, ALL, "h", 1.0)
    acks = m.stats["acks"]
    assert m.receive("d", ack(agent, rec.epoch, 2), 1.1) == []
    assert m.receive("b", ack(agent, rec.epoch + 1, 2), 1.1) == []
    assert m.receive("b", ack("nobody", rec.epoch, 2), 1.1) == []
    copy = agent_where(lambda reps: reps[0] == "b")
    m.receive("b", full(copy, 1, 1, wire_counter(1)), 1.1)
    assert m.receive("b", ack(copy, 1, 1), 1.1) == []
    assert m.stats["acks"] == acks and rec.acked == {"b": 1, "c": 1}
    assert m.receive("b", ack(agent, rec.epoch, 2), 1.5) == []
    assert rec.acked["b"] == 2 and lags == [0.5] and m.stats["acks"] == acks + 1
    assert m.receive("b", ack(agent, rec.epoch, 2), 1.6) == []
    assert lags == [0.5]  # the same seq again: no second lag sample
    assert m.receive("c", ack(agent, rec.epoch, 9), 1.7) == [WriteDone("h", True, 2, 2)]
    assert rec.acked["c"] == 2 and lags == [0.5]  # past our seq: clamped, no sample


def test_an_ack_releases_only_the_writes_it_covers():
    """An ack of seq s counts for the waits of writes up to s, not later ones."""
    m, agent, rec = owned()
    write(m, agent, 1, ALL, "w2", 0.0)
    write(m, agent, 1, ALL, "w3", 0.0)
    assert m.receive("b", ack(agent, rec.epoch, 2), 0.1) == []
    assert m.receive("c", ack(agent, rec.epoch, 2), 0.1) == [WriteDone("w2", True, 2, 2)]
    assert m.waits_now == 1
    assert m.receive("b", ack(agent, rec.epoch, 3), 0.1) == []
    assert m.receive("c", ack(agent, rec.epoch, 3), 0.1) == [WriteDone("w3", True, 2, 2)]


def test_a_need_is_answered_with_the_full_state_and_marks_the_replica_behind():
    """need: the replica gets the full state now and counts as holding nothing;
    needs from strangers or for agents not owned are counted and ignored."""
    m, agent, rec = owned()
    answer = m.receive("b", {"k": "n", "a": agent, "e": 1}, 0.0)
    assert answer == [Send("b", REPLICATE, full(agent, rec.epoch, 1, encode_fields(rec.fields)))]
    assert rec.acked == {"b": -1, "c": 1} and m.stats["fulls_sent"] == 1
    assert m.receive("d", {"k": "n", "a": agent, "e": 1}, 0.0) == []
    assert m.receive("b", {"k": "n", "a": "nobody", "e": 1}, 0.0) == []
    copy = agent_where(lambda reps: reps[0] == "b")
    m.receive("b", full(copy, 1, 1, wire_counter(1)), 0.0)
    assert m.receive("c", {"k": "n", "a": copy, "e": 1}, 0.0) == []
    assert rec.acked == {"b": -1, "c": 1} and m.stats["needs"] == 4


def test_repairs_send_full_states_only_to_replicas_behind():
    """A repair sends the full state to each replica whose acked seq is below ours
    (or -1), not to one that holds it, even at seq 0."""
    agent = agent_where(lambda reps: reps[0] == "a")
    m = machine("abc")
    rec = m.adopt(agent, BEHAVIOR, wire_counter(2), 0.0)
    assert rec.seq == 0
    assert sent(m.tick(0.0)) == [(r, "f") for r in sorted(rec.acked)]
    b, c = sorted(rec.acked)
    m.receive(b, ack(agent, rec.epoch, 0), 0.0)
    assert sent(m.tick(0.2)) == [(c, "f")]
    assert m.stats["fulls_sent"] == 3


def test_replicas_acking_seq_0_are_up_to_date_and_no_delta_lag_is_measured():
    """A full state at seq 0 (state, no write yet) acked by every replica ends the
    repair; no delta left, so no replication lag is observed."""
    lags: list[float] = []
    agent = agent_where(lambda reps: reps[0] == "a")
    m = machine("abc", observe_lag=lags.append)
    rec = m.adopt(agent, BEHAVIOR, wire_counter(2), 0.0)
    m.tick(0.0)
    for r in list(rec.acked):
        m.receive(r, ack(agent, rec.epoch, 0), 5.0)
    assert m.lagging == 0 and lags == [] and m.next_deadline() is None


def test_a_write_does_not_postpone_a_repair_under_way():
    """A replica behind is repaired on its backoff; writes meanwhile do not push the
    next repair later."""
    m, agent, rec = owned()
    write(m, agent, 1, LOCAL, "h", 0.0)
    m.receive("b", ack(agent, rec.epoch, 2), 0.0)
    assert sent(m.tick(0.2)) == [("c", "f")]
    write(m, agent, 1, LOCAL, "h", 0.3)
    assert m.next_deadline() == pytest.approx(0.4)


def test_a_one_node_write_counts_its_seq_and_schedules_nothing():
    """With no replica (one node) and no storage, writes only count their seq."""
    m = machine("a")
    rec = m.primary("x", BEHAVIOR, 0.0)
    assert write(m, "x", 1, ALL, "h1") == [WriteDone("h1", True, 0, 0)]
    write(m, "x", 1, ALL, "h2")
    assert rec.seq == 2 and m.lagging == 0
    s = machine("a", persist=True)
    s.primary("x", BEHAVIOR, 0.0)
    write(s, "x", 1)
    assert s.lagging == 0 and s.next_deadline() is None


def test_a_turn_without_changes_is_done_when_the_replicas_hold_the_last_write():
    """A turn with no delta needs the replicas to hold the seq already written:
    those that do count at once, the others when they ack."""
    m, agent, rec = owned()
    assert m.wrote(agent, {}, QUORUM, "q", 0.0) == [WriteDone("q", True, 2, 1)]
    write(m, agent, 1, LOCAL, "w", 0.0)
    m.receive("b", ack(agent, rec.epoch, 2), 0.0)
    assert m.wrote(agent, {}, ALL, "all", 0.0) == []
    assert m.receive("c", ack(agent, rec.epoch, 2), 0.0) == [WriteDone("all", True, 2, 2)]


def test_repairs_due_at_the_same_time_go_in_the_order_they_were_scheduled():
    """Two copies to pass on, scheduled at one time, are pushed first come first."""
    first = agent_where(lambda reps: "a" not in reps and reps[0] == "d", "abcd")
    second = agent_where(lambda reps: "a" not in reps and reps[0] == "d", "abcd",
                         besides=first)
    for order in ((first, second), (second, first)):
        m = machine("abcd")
        for agent in order:
            m.receive("b", push(agent, wire_counter(1)), 0.0)
        pushed = [e.message["a"] for e in m.tick(0.0) if isinstance(e, Send)]
        assert pushed == [order[0]] * 3 + [order[1]] * 3


def test_a_write_to_replicas_is_checked_again_after_resend_s():
    """A delta sent schedules a check at now + resend_s: nothing goes before it, the
    full state to a replica still behind at it, then with doubling backoff."""
    m, agent, rec = owned()
    write(m, agent, 1, LOCAL, "h", 1.0)
    m.receive("b", ack(agent, rec.epoch, 2), 1.0)
    assert m.next_deadline() == pytest.approx(1.2)
    assert m.tick(1.19) == []
    assert sent(m.tick(1.2)) == [("c", "f")]
    assert m.next_deadline() == pytest.approx(1.4)
    assert sent(m.tick(1.4)) == [("c", "f")]
    assert m.next_deadline() == pytest.approx(1.8)
    rec.backoff = RESEND_MAX_S
    m.tick(1.8)
    assert m.next_deadline() == pytest.approx(1.8 + RESEND_MAX_S)


def test_a_repair_that_finds_nothing_to_send_clears_the_record():
    """A record due for repair whose replicas caught up meanwhile (one behind left
    the replica set) leaves the lagging set; the repairs due after it still go."""
    m, agent, rec = owned()
    write(m, agent, 1, LOCAL, "h", 0.0)  # c's delta is lost
    m.receive("b", ack(agent, rec.epoch, 2), 0.0)
    later = agent_where(lambda reps: reps[0] == "a" and reps[1] == "b", besides=agent)
    m.primary(later, BEHAVIOR, 0.1)
    write(m, later, 1, LOCAL, "h", 0.1)  # both deltas lost
    change(m, "abc", "ab", 0.15)
    assert sent(m.tick(0.5)) == [("b", "f")]
    assert rec.acked == {"b": 2} and agent not in m._dirty


def test_repairs_are_paced_per_tick():
    """At most REPAIRS_PER_TICK records are repaired in one tick; the rest wait."""
    m = machine("abcd")
    strays = []
    for i in range(10_000):
        agent = f"s/{i}"
        if "a" not in m.replicas(agent):
            strays.append(agent)
            m.receive("b", full(agent, 1, 1, {}), 0.0)
            if len(strays) == 513:
                break
    assert len([e for e in m.tick(0.0) if isinstance(e, Send)]) == 512 * 3
    assert len([e for e in m.tick(0.0) if isinstance(e, Send)]) == 3


def test_a_repair_skips_entries_made_stale_and_goes_on():
    """A heap entry of a record no longer behind is skipped, not the end of the tick."""
    m, agent, rec = owned()
    write(m, agent, 1, LOCAL, "h", 0.0)
    other = agent_where(lambda reps: reps[0] == "a", besides=agent)
    m.primary(other, BEHAVIOR, 0.0)
    write(m, other, 1, LOCAL, "h", 0.0)
    for r in ("b", "c"):
        m.receive(r, ack(agent, rec.epoch, 2), 0.0)
    assert agent not in m._dirty
    assert sorted(sent(m.tick(0.2))) == [("b", "f"), ("c", "f")]


# ---------------------------------------------------------------------- pushes

def test_a_push_of_an_agent_we_run_reaches_our_replicas_too():
    """A copy pushed to the owner is merged and every replica is owed the full state
    (what the copy added must reach them)."""
    m, agent, rec = owned()
    assert m.receive("b", push(agent, wire_counter(5)), 0.0) == [
        Send("b", REPLICATE, {"k": "pa", "a": agent})]
    assert value(m, agent) == 6 and rec.acked == {"b": -1, "c": -1}
    assert sent(m.tick(0.0)) == [("b", "f"), ("c", "f")]


def test_a_push_to_the_agent_s_owner_queues_it_for_failover_unless_gathering():
    """A copy pushed to the node that owns the agent (not running it) wakes it,
    paced; not while a gather for it is under way (the gather restores it)."""
    m, agent = new_owner_after_failover(persist=True)
    fields = wire_counter(2)
    assert m.receive("c", push(agent, fields), 0.0) == [
        Send("c", REPLICATE, {"k": "pa", "a": agent}), Persist(agent, BEHAVIOR, fields)]
    assert m.records[agent].behavior == BEHAVIOR
    assert m.counts()["failover_queue"] == 1
    gathering, _ = new_owner_after_failover()
    gathering.gather(agent, None, 0, 0.0)
    gathering.receive("c", push(agent, fields), 0.0)
    assert gathering.counts()["failover_queue"] == 0


def test_a_push_to_a_replica_is_kept_and_one_to_a_stranger_is_passed_on():
    """A replica keeps a pushed copy (nothing to wake, nothing to pass on); a node
    outside the replica set passes it on to the replicas."""
    m, agent = replica_of()
    m.receive("b", push(agent, wire_counter(2)), 0.0)
    assert m.counts()["failover_queue"] == 0 and m.tick(0.0) == []
    stray = agent_where(lambda reps: "a" not in reps, "abcd")
    s = machine("abcd")
    s.receive("b", push(stray, wire_counter(2)), 0.5)
    reps = HashRing(tuple("abcd")).preference_list(stray, 3)
    assert sent(s.tick(0.5)) == [(t, "p") for t in sorted(reps)]


def test_push_acks_clear_what_was_owed_and_a_replica_keeps_its_copy():
    """Each push ack crosses its sender off; the last one ends the repair of a copy
    this node still replicates (kept: no Forget); unknown agents are ignored."""
    agent = agent_where(lambda reps: reps[0] != "a" and "a" in reps, "abc", 3,
                        ("abcd", lambda reps: reps[0] == "d" and "a" in reps))
    m = machine("abc", persist=True)
    copy_from_owner(m, agent, HashRing(tuple("abc")).owner(agent))
    change(m, "abc", "abcd")
    m.records[agent].push_to.add("c")
    m.tick(0.0)
    assert m.receive("c", {"k": "pa", "a": agent}, 0.1) == []
    assert m.records[agent].push_to == {"d"} and m.lagging == 1
    assert m.receive("d", {"k": "pa", "a": agent}, 0.1) == []
    assert m.records[agent].push_to is None and m.lagging == 0
    assert agent in m.records and m.stats["dropped"] == 0
    assert m.receive("d", {"k": "pa", "a": "nobody"}, 0.1) == []


def test_copies_dropped_are_counted_and_forgotten_only_with_storage():
    """Each copy dropped counts once; without local storage nothing is to forget."""
    m = machine("abcd")
    strays = [agent_where(lambda reps: "a" not in reps, "abcd"),
              agent_where(lambda reps: "a" not in reps, "abcd", 3,
                          besides=agent_where(lambda reps: "a" not in reps, "abcd"))]
    for agent in strays:
        m.receive("b", push(agent, wire_counter(1)), 0.0)
        for t in m.replicas(agent):
            assert m.receive(t, {"k": "pa", "a": agent}, 0.0) == []
    assert m.stats["dropped"] == 2 and m.records == {}


# ---------------------------------------------------------------------- batches

def test_a_batch_of_one_and_of_batch_max_messages_are_taken():
    """A batch holds 1..BATCH_MAX messages; each is handled with the batch's time."""
    m, agent = replica_of()
    one = m.receive("b", {"k": "b", "m": [msgpack.packb({"k": "w", "a": agent})]}, 0.0)
    assert sent(one) == [("b", "h")]
    many = m.receive("b", {"k": "b", "m": [msgpack.packb({"k": "w", "a": agent})] * BATCH_MAX},
                     0.0)
    assert len(many) == BATCH_MAX
    with pytest.raises(ReplicationError, match=r"^bad_batch: 'm' is a list of 1\.\.1024 messages$"):
        m.receive("b", {"k": "b", "m": []}, 0.0)
    stray = agent_where(lambda reps: "a" not in reps, "abcd")
    s = machine("abcd")
    s.receive("b", {"k": "b", "m": [msgpack.packb(push(stray, wire_counter(1)))]}, 0.7)
    assert s.next_deadline() == 0.7 and len(sent(s.tick(0.7))) == 3


@pytest.mark.parametrize("inner, detail", [
    ({"k": "b", "a": "x", "m": []}, "a batch inside a batch"),
    ({"k": "w", "a": "x", 1: 2}, "not a msgpack message: int is not allowed for map key "
                                 "when strict_map_key=True"),
    ("text", "a batch carries packed messages (bin)"),
])
def test_a_bad_message_in_a_batch_is_recorded_with_its_detail(inner, detail):
    """The batch's other messages still count; the last error names what was wrong."""
    m, agent = replica_of()
    blob = inner if isinstance(inner, str) else msgpack.packb(inner, strict_types=False)
    effects = m.receive("b", {"k": "b", "m": [blob, msgpack.packb({"k": "w", "a": agent})]},
                        0.0)
    assert sent(effects) == [("b", "h")]
    assert (m.last_error.reason, m.last_error.detail) == ("bad_batch", detail)
    assert m.stats["bad_in_batch"] == 1


def test_batch_fills_each_batch_to_its_byte_bound_exactly():
    """Messages go into a batch while its bytes stay at or under BATCH_BYTES_MAX, then
    a new batch starts (counting from zero again); each batch is {"k": "b", "m": [...]}."""
    half = b"h" * (BATCH_BYTES_MAX // 2)
    third = b"t" * (BATCH_BYTES_MAX // 3 + 1)
    assert batch([half, half, half, half]) == [{"k": "b", "m": [half, half]},
                                               {"k": "b", "m": [half, half]}]
    assert [len(b["m"]) for b in batch([third] * 4)] == [2, 2]
    assert batch([b"x"] * (BATCH_MAX + 1))[0] == {"k": "b", "m": [b"x"] * BATCH_MAX}


# ---------------------------------------------------------------------- reset, storage

def test_reset_moves_an_owned_agent_to_the_next_generation_once():
    """reset(): the record keeps only a generation one higher, a new seq, every
    replica owed the full state, held writes failed, and (with storage) the new
    state persisted; a second reset with nothing written since is a no-op."""
    m, agent, rec = owned(persist=True)
    write(m, agent, 1, ALL, "h", 0.0)
    effects = m.reset(agent, 0.5)
    assert effects == [WriteDone("h", False, 0, 2),
                       Persist(agent, BEHAVIOR, encode_fields(rec.fields))]
    assert set(rec.fields) == {GEN_FIELD} and rec.fields[GEN_FIELD].value() == 1
    assert rec.fields[GEN_FIELD].replica == m.replica
    assert rec.seq == 3 and rec.acked == {"b": -1, "c": -1}
    assert sent(m.tick(0.5)) == [("b", "f"), ("c", "f")]
    assert m.reset(agent, 0.6) is None and rec.fields[GEN_FIELD].value() == 1
    write(m, agent, 1)
    m.reset(agent, 0.7)
    assert rec.fields[GEN_FIELD].value() == 2 and set(rec.fields) == {GEN_FIELD}


def test_reset_of_a_copy_changes_only_its_fields():
    """A copy (not owned) is reset in place: no seq, no repair, no storage write."""
    m, agent = replica_of(persist=True)
    copy_from_owner(m, agent, "b")
    assert m.reset(agent, 0.0) == []
    rec = m.records[agent]
    assert set(rec.fields) == {GEN_FIELD} and rec.seq == 1 and m.lagging == 0


def test_writes_of_an_owner_with_storage_are_persisted_even_without_replicas():
    """With local storage each delta is persisted (as sent), also on a one-node ring
    where nobody is sent it; the generation rides along with a reset agent's deltas."""
    m = machine("a", persist=True)
    rec = m.primary("x", BEHAVIOR, 0.0)
    effects = write(m, "x", 2, QUORUM, "h", 0.0)
    assert [type(e) for e in effects] == [Persist, WriteDone]
    assert effects[0].agent_id == "x" and decode_fields(effects[0].fields)["n"].value() == 2
    assert effects[1] == WriteDone("h", True, 0, 0) and rec.seq == 1
    m.reset("x", 0.0)
    effects = write(m, "x", 3, LOCAL, "h2", 0.0)
    assert set(effects[0].fields) == {"n", GEN_FIELD}


def test_the_first_delta_of_an_empty_stream_says_so_and_later_ones_do_not():
    """"z" marks the first delta of a stream whose state began empty (a replica needs
    nothing before it); later deltas and streams that began with state lack it."""
    m = machine("abc")
    agent = agent_where(lambda reps: reps[0] == "a")
    m.primary(agent, BEHAVIOR, 0.0)
    first = [e.message for e in write(m, agent, 1) if isinstance(e, Send)]
    assert [msg.get("z") for msg in first] == [True, True]
    assert first[0] == {**delta(agent, m.records[agent].epoch, 1, first[0]["f"]), "z": True}
    assert [e.message.get("z") for e in write(m, agent, 1) if isinstance(e, Send)] == [None] * 2
    other = agent_where(lambda reps: reps[0] == "a", besides=agent)
    m.recovered(other, BEHAVIOR, counter(1))
    m.primary(other, BEHAVIOR, 0.0)
    assert [e.message.get("z") for e in write(m, other, 1) if isinstance(e, Send)] == [None] * 2
    assert m.stats["deltas_sent"] == 6


def test_primary_starts_a_new_epoch_once_and_sends_state_only_when_there_is_some():
    """primary(): a new epoch (counting from epoch_start), seq 0, this node as the
    stream's source, replicas owed everything; called again it changes nothing."""
    m = machine("abc", epoch_start=40)
    agent = agent_where(lambda reps: reps[0] == "a")
    rec = m.primary(agent, BEHAVIOR, 0.0)
    assert (rec.epoch, rec.seq, rec.src, rec.primary, rec.fresh) == (41, 0, "a", True, True)
    assert rec.push_to is None  # nothing of ours to hand on
    assert rec.acked == {r: -1 for r in m.replicas(agent)[1:]} and m.lagging == 0
    assert m.primary(agent, "other", 0.0) is rec and rec.epoch == 41 and rec.behavior == BEHAVIOR
    held = agent_where(lambda reps: reps[0] == "a", besides=agent)
    m.recovered(held, "old", counter(1))
    rec2 = m.primary(held, BEHAVIOR, 0.0)
    assert (rec2.epoch, rec2.fresh, rec2.behavior) == (42, False, BEHAVIOR)
    assert rec2.fields["n"].replica == m.replica and m.lagging == 1


# ---------------------------------------------------------------------- pace, deadlines

def queued(rate: float, count: int) -> tuple[Replication, list[str]]:
    """Machine ``a`` with ``count`` copies of agents it now owns queued for failover."""
    m = machine("abcd", failover_rate=rate)
    agents = []
    for i in range(10_000):
        agent = f"q/{i}"
        if m.replicas(agent)[0] == "b" and HashRing(tuple("acd")).owner(agent) == "a":
            m.receive("b", full(agent, 1, 1, wire_counter(1)), 0.0)
            agents.append(agent)
            if len(agents) == count:
                break
    change(m, "abcd", "acd")
    assert m.counts()["failover_queue"] == count
    return m, agents


def activated(effects: list) -> list[str]:
    return [e.agent_id for e in effects if isinstance(e, Activate)]


def test_failover_starts_with_one_token_and_bursts_up_to_a_tenth_of_the_rate():
    """The first pace has one token; tokens come at failover_rate per second up to a
    burst of max(1, rate / 10)."""
    m, agents = queued(20.0, 5)
    assert activated(m.tick(1.0)) == agents[:1]
    assert m.next_deadline() == pytest.approx(1.05)
    assert activated(m.tick(1.05)) == agents[1:2]
    assert activated(m.tick(100.0)) == agents[2:4]  # burst 2
    assert m.stats["activations"] == 4
    slow, agents = queued(5.0, 3)
    assert activated(slow.tick(0.0)) == agents[:1]
    assert activated(slow.tick(100.0)) == agents[1:2]  # burst 1


def test_failover_skips_agents_woken_or_moved_meanwhile_without_spending_tokens():
    """Queued agents now running here, or owned elsewhere, are skipped and the next
    queued one still goes; an emptied queue paces again from one token."""
    m, agents = queued(5.0, 3)
    m.primary(agents[0], BEHAVIOR, 0.0)
    assert activated(m.tick(0.0)) == agents[1:2]
    assert activated(m.tick(0.2)) == agents[2:3]
    assert activated(m.tick(0.4)) == [] and m.counts()["failover_queue"] == 0
    late = agent_where(lambda reps: reps[0] == "a", "acd")
    assert late not in agents
    m.receive("c", push(late, wire_counter(1)), 5.0)  # owned here, not running
    assert activated(m.tick(5.0)) == [late]


def test_next_deadline_of_a_fresh_failover_queue_is_one_token_away_from_zero():
    """Before any pace the queue's deadline counts from time 0."""
    m, _ = queued(4.0, 2)
    assert m.next_deadline() == pytest.approx(0.25)


def test_gather_timeouts_are_counted_each():
    """Every gather that ends at its deadline counts once."""
    m, agent = new_owner_after_failover()
    other = agent_where(lambda reps: reps[0] == "b", "abcd", 3,
                        ("acd", lambda reps: reps[0] == "a"), besides=agent)
    m.gather(agent, None, 0, 0.0)
    m.gather(other, None, 0, 0.0)
    assert m.next_deadline() == 2.0
    assert len(m.tick(2.0)) == 2 and m.stats["gather_timeouts"] == 2
    assert m.stats["gathers"] == 2


def test_a_gather_asks_the_replicas_of_a_ring_this_node_never_ran_on():
    """The ring before a change (the owners agents had) is remembered even when this
    node never learnt it as its own: its replicas are asked too."""
    agent = agent_where(lambda reps: "d" in reps, "abcd", 3,
                        ("abc", lambda reps: reps[0] == "a"))
    m = machine("abc")
    m.members_changed("abcd", 0.0)
    m.ring_changed(HashRing(tuple("abcd")), HashRing(tuple("abc")), 0.0)
    assert "d" in [e.to for e in m.gather(agent, None, 0, 0.0)]


# ---------------------------------------------------------------------- validation

@pytest.mark.parametrize("message, text", [
    ([1], "bad_message: a replication message is a map"),
    ({"k": "zz", "a": "x"}, "bad_kind: unknown kind 'zz'"),
    ({"k": "w", "a": ""}, "bad_agent: 'a' is 1..1024 characters"),
    ({"k": "n", "a": "x", "e": -1}, "bad_seq: 'e' is an integer 0..2**64-1"),
    ({"k": "a", "a": "x", "e": 1, "s": 1 << 64}, "bad_seq: 's' is an integer 0..2**64-1"),
    ({"k": "p", "a": "x", "b": "b" * 129, "f": {}}, "bad_behavior: 'b' is 1..128 characters"),
    ({"k": "p", "a": "x", "b": BEHAVIOR, "f": {"n": ["nosuchtype", []]}},
     "bad_state: field 'n' has an unknown type tag 'nosuchtype'"),
])
def test_a_malformed_message_is_refused_with_a_stable_text(message, text):
    """The error text (reason: detail) of each shape a peer can break."""
    m = machine("abc")
    with pytest.raises(ReplicationError) as info:
        m.receive("b", message, 0.0)
    assert str(info.value) == text


def test_the_largest_ids_behaviors_and_numbers_are_taken():
    """Bounds are inclusive: a 1-character and a 1024-character agent id, a
    128-character behavior, epoch and seq 0 and 2**64 - 1."""
    m = machine("abc")
    for agent in ("x", "x" * 1024):
        assert sent(m.receive("b", {"k": "w", "a": agent}, 0.0)) == [("b", "h")]
    top = (1 << 64) - 1
    for epoch, seq, behavior in ((0, 0, "k"), (top, top, "b" * 128)):
        effects = m.receive("b", full("y", epoch, seq, {}, behavior=behavior), 0.0)
        assert effects == [Send("b", REPLICATE, ack("y", epoch, seq))]


def test_a_state_of_another_generation_type_is_refused_as_bad_state():
    """A "_gen" field that is not a GCounter breaks the protocol."""
    m, agent = replica_of()
    bad = encode_fields({GEN_FIELD: PNCounter().bind(1)})
    with pytest.raises(ReplicationError, match=r"^bad_state: '_gen' is a GCounter, got PNCounter$"):
        m.receive("b", push(agent, bad), 0.0)


def test_copies_past_records_max_are_refused_with_the_limit_in_the_text():
    m = Replication("a", 1, lambda: 0, records_max=1)
    m.receive("b", push("x", {}), 0.0)
    with pytest.raises(ReplicationError,
                       match=r"^records_full: this node holds its limit of 1 agent records$"):
        m.receive("b", full("y", 1, 1, {}), 0.0)
    with pytest.raises(ReplicationError):
        m.receive("b", delta("z", 1, 1, {}, z=True), 0.0)
    assert m.stats["refused_copies"] == 2 and list(m.records) == ["x"]


def test_a_pushed_copy_follows_no_stream_until_a_full_state_comes():
    """A record made for a pushed copy: not ours, no source, epoch and seq 0, no
    replica acks; a delta from the owner is answered with need."""
    m, agent = replica_of()
    m.receive("b", push(agent, wire_counter(1), behavior="k"), 0.0)
    rec = m.records[agent]
    assert (rec.primary, rec.src, rec.epoch, rec.seq, rec.acked) == (False, None, 0, 0, None)
    assert (rec.behavior, rec.fresh, rec.waits) == ("k", False, None)
    assert sent(m.receive("b", delta(agent, 1, 1, wire_counter(2)), 0.0)) == [("b", "n")]


def test_fields_of_an_owned_record_are_stamped_with_our_replica_and_clock():
    """Becoming the owner, or merging a copy with a new field into an owned record,
    binds every field to this node's replica and clock (its writes are ours)."""
    m, agent = replica_of("a")
    m.recovered(agent, BEHAVIOR, counter(1, replica=9))
    rec = m.primary(agent, BEHAVIOR, 0.0)
    assert (rec.fields["n"].replica, rec.fields["n"].clock) == (m.replica, m.clock)
    extra = encode_fields({"m": PNCounter().bind(9)})
    m.receive("b", push(agent, extra), 0.0)
    assert (rec.fields["m"].replica, rec.fields["m"].clock) == (m.replica, m.clock)


def test_a_refused_copy_leaves_no_record_behind():
    """A copy whose merge is refused (here a "_gen" field of the wrong type) must not
    leave an empty record: nothing would ever pass it on or drop it."""
    bad = encode_fields({GEN_FIELD: PNCounter().bind(1)})
    m = machine("abc")
    for message in (full("f", 1, 1, bad), push("p", bad), delta("d", 1, 1, bad, z=True)):
        with pytest.raises(ReplicationError, match=r"^bad_state: '_gen' is a GCounter"):
            m.receive("b", message, 0.0)
    with pytest.raises(ReplicationError, match=r"^bad_state: '_gen' is a GCounter"):
        m.adopt("a1", BEHAVIOR, bad, 0.0)
    with pytest.raises(CrdtError):  # not a state at all: refused before any merge
        m.adopt("a2", BEHAVIOR, {"n": ["nosuchtype", []]}, 0.0)
    assert m.records == {}
    m.receive("b", full("f", 1, 1, {}), 0.0)  # a good copy of the same agent is taken
    with pytest.raises(ReplicationError):
        m.receive("b", full("f", 1, 2, bad), 0.0)
    assert "f" in m.records  # a refused copy never drops a record that was there


def test_a_refused_delta_keeps_the_copy_it_was_meant_for():
    """The record was there before the bad delta: it stays, at the seq it had."""
    bad = encode_fields({GEN_FIELD: PNCounter().bind(1)})
    m = machine("abc")
    m.receive("b", full("d", 1, 1, {}), 0.0)
    with pytest.raises(ReplicationError, match=r"^bad_state: '_gen' is a GCounter"):
        m.receive("b", delta("d", 1, 2, bad), 0.0)
    assert m.records["d"].seq == 1
