"""The replication machine (protocols/replication.py), driven by hand between 3-5 nodes.

Every message between machines goes through the peer codec (``peer.encode`` then
``peer.decode``), as the node sends it.  Nothing is delivered unless the test says so:
``Cluster.deliver`` hands over the queued ``Send`` effects that pass a filter (a lost
message is one the test drops), and every other effect (``WriteDone``, ``Restore``,
``Activate``) comes back to the test to be checked.  Agents hold a PN-Counter field
``n``; a write of ``amount`` increments it on the owner, as a handler turn would.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_cy import HashRing, replica_id
from protocols import peer
from protocols.crdt import CrdtError, GCounter, ORSet, PNCounter, encode_fields, take_deltas
from protocols.effects import REPLICATE, Activate, Restore, Send, WriteDone
from protocols.replication import (ALL, BATCH_BYTES_MAX, BATCH_MAX, GEN_FIELD, LOCAL, QUORUM,
                                   Replication, ReplicationError, batch, generation,
                                   merge_generation)
from protocols.routing import Refusal
from protocols.wire import ErrorCode

pytestmark = pytest.mark.timeout(60)

BEHAVIOR = "counter"
WRITE_TIMEOUT_S = 2.0
GATHER_TIMEOUT_S = 2.0
RESEND_S = 0.2

SendFilter = Callable[[str, Send], bool]



def anything(sender: str, send: Send) -> bool:
    return True


def between(*nodes: str) -> SendFilter:
    """Only messages whose sender and receiver are both in ``nodes``."""
    return lambda sender, send: sender in nodes and send.to in nodes


def of_kind(*kinds: str) -> SendFilter:
    return lambda sender, send: send.message["k"] in kinds


class Cluster:
    """Replication machines of ``nodes`` on one ring, started together."""

    def __init__(self, nodes: Iterable[str], n: int = 3, **options: Any):
        self.now = 0.0
        self.clock = itertools.count(1).__next__  # unique, increasing write times
        self.options = {"n": n, "write_timeout_s": WRITE_TIMEOUT_S,
                        "gather_timeout_s": GATHER_TIMEOUT_S, "resend_s": RESEND_S, **options}
        self.machines: dict[str, Replication] = {}
        self.outbox: list[tuple[str, Send]] = []
        self.ring = HashRing(tuple(sorted(nodes)))
        for gen, node_id in enumerate(sorted(nodes), 1):
            self.machines[node_id] = Replication(
                node_id, replica_id(f"{node_id}/{gen}"), self.clock,
                epoch_start=gen << 32, **self.options)
        self.change_ring(self.ring.nodes, previous=self.ring)

    # -- effects and messages -------------------------------------------------
    def run(self, node_id: str, effects: list) -> list:
        """Queue the Sends; return every other effect."""
        others = []
        for effect in effects:
            if isinstance(effect, Send):
                assert effect.channel == REPLICATE
                self.outbox.append((node_id, effect))
            else:
                others.append(effect)
        return others

    def deliver(self, keep: SendFilter = anything, at: float | None = None) -> list:
        """Deliver queued messages passing ``keep`` (and the ones they cause) until none
        is left; others stay queued.  Returns the other effects, in order."""
        if at is not None:
            self.now = at
        out: list = []
        while True:
            index = next((i for i, (s, e) in enumerate(self.outbox) if keep(s, e)), None)
            if index is None:
                return out
            sender, send = self.outbox.pop(index)
            receiver = self.machines.get(send.to)
            if receiver is not None:
                out += self.run(send.to, receiver.receive(sender, wire(sender, send), self.now))

    def drop(self, match: SendFilter = anything) -> list[tuple[str, Send]]:
        """Lose the queued messages matching ``match``; returns them."""
        lost = [(s, e) for s, e in self.outbox if match(s, e)]
        self.outbox = [(s, e) for s, e in self.outbox if not match(s, e)]
        return lost

    def tick(self, node_id: str, at: float) -> list:
        self.now = at
        return self.run(node_id, self.machines[node_id].tick(at))

    # -- agents ---------------------------------------------------------------
    def write(self, agent: str, amount: int, consistency: str = QUORUM,
              handle: Any = None) -> list:
        """A turn on the agent's owner that adds ``amount`` to its counter."""
        owner = self.ring.owner(agent)
        machine = self.machines[owner]
        rec = machine.primary(agent, BEHAVIOR, self.now)
        if "n" not in rec.fields:
            rec.fields["n"] = PNCounter().bind(machine.replica, self.clock)
        rec.fields["n"].increment(amount)
        effects = machine.wrote(agent, take_deltas(rec.fields), consistency, handle, self.now)
        return self.run(owner, effects)

    def value(self, node_id: str, agent: str) -> int | None:
        rec = self.machines[node_id].records.get(agent)
        if rec is None:
            return None
        return rec.fields["n"].value() if "n" in rec.fields else 0

    # -- membership -----------------------------------------------------------
    def change_ring(self, nodes: Iterable[str], previous: HashRing | None = None) -> list:
        """Every live machine learns the members and the ring ``nodes`` (the node's
        runtime order: members_changed, then ring_changed)."""
        previous = previous if previous is not None else self.ring
        self.ring = HashRing(tuple(sorted(nodes)))
        out = []
        for node_id, machine in self.machines.items():
            out += self.run(node_id, machine.members_changed(self.ring.nodes, self.now))
            out += self.run(node_id, machine.ring_changed(previous, self.ring, self.now))
        return out

    def add(self, node_id: str, generation: int) -> Replication:
        machine = self.machines[node_id] = Replication(
            node_id, replica_id(f"{node_id}/{generation}"), self.clock,
            epoch_start=generation << 32, **self.options)
        return machine

    def crash(self, node_id: str) -> None:
        """The node is gone with its memory; messages to it are lost."""
        del self.machines[node_id]
        self.drop(lambda sender, send: send.to == node_id)


def wire(sender: str, send: Send) -> dict:
    """What the receiver gets for ``send``: framed and decoded as the node does."""
    event = peer.decode(peer.encode(send.channel, sender, send.message))
    assert isinstance(event, peer.Replicated) and event.sender == sender
    return event.message


def find_agent(wanted: Callable[[str], bool]) -> str:
    """The first agent id ``wanted`` accepts (placement is deterministic)."""
    for i in range(10_000):
        agent = f"{BEHAVIOR}/{i}"
        if wanted(agent):
            return agent
    raise AssertionError("no such agent in 10,000 ids")


def replicas(nodes: str, agent: str, n: int = 3) -> list[str]:
    return HashRing(tuple(nodes)).preference_list(agent, n)


def done(effects: list) -> list[WriteDone]:
    return [e for e in effects if isinstance(e, WriteDone)]


def sends_of(effects_or_outbox: list, kind: str) -> list[Send]:
    return [e for _, e in effects_or_outbox if e.message["k"] == kind]


# ====================================================================== writes

@pytest.mark.parametrize("consistency, needed", [(LOCAL, 0), (QUORUM, 1), (ALL, 2)])
def test_write_done_when_the_needed_acks_came(consistency, needed):
    c = Cluster("abc")
    agent = "counter/w"
    owner, r1, r2 = c.ring.preference_list(agent, 3)
    first = c.write(agent, 1, consistency, "h")
    if needed == 0:
        assert first == [WriteDone("h", True, 0, 0)]
        return
    assert first == []
    got = c.deliver(between(owner, r1))  # r2 hears nothing yet
    if needed == 1:
        assert got == [WriteDone("h", True, 1, 1)]
    else:
        assert got == []
        assert c.deliver() == [WriteDone("h", True, 2, 2)]
    assert c.deliver() == []  # later acks release nothing twice
    assert {c.value(x, agent) for x in (owner, r1, r2)} == {1}


def test_acks_from_a_node_outside_the_replica_set_or_for_an_older_seq_do_not_count():
    c = Cluster("abcd")
    agent = "counter/x"
    owner, r1, _ = c.ring.preference_list(agent, 3)
    stranger = next(x for x in "abcd" if x not in c.ring.preference_list(agent, 3))
    c.write(agent, 1, QUORUM, "h1")
    c.deliver(between(owner, r1))
    c.write(agent, 1, ALL, "h2")
    c.drop()
    epoch = c.machines[owner].records[agent].epoch
    machine = c.machines[owner]
    assert machine.receive(stranger, {"k": "a", "a": agent, "e": epoch, "s": 2}, 0.1) == []
    assert machine.receive(r1, {"k": "a", "a": agent, "e": epoch, "s": 1}, 0.1) == []
    assert machine.receive(r1, {"k": "a", "a": agent, "e": epoch + 1, "s": 2}, 0.1) == []
    assert machine.waits_now == 1


def test_a_write_whose_acks_never_come_times_out_at_its_deadline():
    c = Cluster("abc")
    agent = "counter/t"
    owner = c.ring.owner(agent)
    c.now = 5.0
    assert c.write(agent, 1, QUORUM, "h") == []
    c.drop()  # every delta lost
    machine = c.machines[owner]
    assert machine.next_deadline() <= 5.0 + WRITE_TIMEOUT_S
    assert done(c.tick(owner, 5.0 + WRITE_TIMEOUT_S - 0.01)) == []
    assert done(c.tick(owner, 5.0 + WRITE_TIMEOUT_S)) == [WriteDone("h", False, 0, 1)]
    assert machine.stats["write_timeouts"] == 1 and machine.waits_now == 0
    c.write(agent, 1, LOCAL, "h2")
    assert done(c.deliver()) == []  # the late acks release nothing


def test_waits_past_their_bound_are_refused_at_once():
    c = Cluster("abc", waits_max=2)
    agent = "counter/b"
    assert c.write(agent, 1, QUORUM, 1) == []
    assert c.write(agent, 1, QUORUM, 2) == []
    assert c.write(agent, 1, QUORUM, 3) == [WriteDone(3, False, 0, 1)]


# ====================================================================== stream

def streaming(agent: str) -> tuple[Cluster, list[str]]:
    """Three nodes; the agent's first write (1) delivered everywhere, so its replicas
    follow the owner's stream.  Returns the cluster and the replica list."""
    c = Cluster("abc")
    c.write(agent, 1, LOCAL)
    c.deliver()
    return c, c.ring.preference_list(agent, 3)


def three_writes_to_one_replica() -> tuple[Cluster, str, str, str, list[Send]]:
    """A replica in the owner's stream, then writes 2 and 3 (amounts 10 and 100)
    queued, their deltas to ``r1`` returned undelivered."""
    agent = "counter/s"
    c, (owner, r1, _) = streaming(agent)
    c.write(agent, 10, LOCAL)
    c.write(agent, 100, LOCAL)
    deltas = [e for s, e in c.drop() if e.to == r1]
    assert [d.message["k"] for d in deltas] == ["d", "d"]
    return c, agent, owner, r1, deltas


def receive(c: Cluster, node_id: str, sender: str, send: Send) -> list[Send]:
    return c.machines[node_id].receive(sender, wire(sender, send), c.now)


def test_deltas_apply_in_stream_order_and_a_gap_asks_for_the_full_state():
    c, agent, owner, r1, (second, third) = three_writes_to_one_replica()
    answer = receive(c, r1, owner, third)
    assert [e.message["k"] for e in answer] == ["n"]
    assert c.value(r1, agent) == 1  # write 3 is not applied over the gap
    answer = receive(c, r1, owner, second)
    assert [(e.message["k"], e.message["s"]) for e in answer] == [("a", 2)]
    assert c.value(r1, agent) == 11
    full = c.machines[owner].receive(r1, {"k": "n", "a": agent, "e": third.message["e"]}, 0.1)
    assert [e.message["k"] for e in full] == ["f"]
    receive(c, r1, owner, full[0])
    assert c.value(r1, agent) == 111
    assert c.machines[r1].records[agent].seq == 3


def test_a_duplicate_delta_is_acked_again_and_not_applied_twice():
    c, agent, owner, r1, (second, _) = three_writes_to_one_replica()
    first = receive(c, r1, owner, second)
    again = receive(c, r1, owner, second)
    assert [e.message for e in again] == [e.message for e in first]
    assert c.value(r1, agent) == 11
    # Writes 1 and 2 once each (write 1 is the first delta of a stream that began
    # empty: a replica applies it without a full state first).
    assert c.machines[r1].stats["deltas_applied"] == 2


def test_a_full_state_applied_twice_changes_nothing():
    c, agent, owner, r1, _ = three_writes_to_one_replica()
    rec = c.machines[owner].records[agent]
    full = {"k": "f", "a": agent, "b": BEHAVIOR, "e": rec.epoch, "s": rec.seq,
            "f": encode_fields(rec.fields)}
    for _ in range(2):
        c.machines[r1].receive(owner, full, 0.1)
    assert c.value(r1, agent) == 111


@pytest.mark.parametrize("ttl_ns, replicas_know, kept", [
    (0, "members", False),          # expired: forgotten
    (10**12, "members", True),      # not yet
    (0, "members and 99", True),    # in their view 99 lives again: kept
    (0, None, True),                # the members' replicas unknown to them: kept
])
def test_replicas_take_a_fold_and_forget_its_marker_past_expiry(ttl_ns, replicas_know, kept):
    """The owner's write folds a retired replica's row and the fold reaches its
    replicas; a copy forgets the marker once expired (the cluster's clock counts 1,
    2, ...), as its owner does, unless the folded replica is live in its view."""
    c = Cluster("abc", fold_ttl_ns=ttl_ns)
    agent = "counter/f"
    owner, r1, r2 = c.ring.preference_list(agent, 3)
    members = frozenset(m.replica for m in c.machines.values())
    c.write(agent, 2)
    c.deliver()
    machine = c.machines[owner]
    machine.live_replicas = members
    if replicas_know is not None:
        for node in (r1, r2):
            c.machines[node].live_replicas = members | ({99} if "99" in replicas_know else set())
    machine.records[agent].fields["n"].merge(PNCounter.from_wire([[99], [3], [0], []]))
    c.write(agent, 1)
    c.deliver()
    assert machine.stats["pruned"] == 1
    for node in (owner, r1, r2):
        copy = c.machines[node].records[agent].fields["n"]
        assert copy.value() == 6 and copy.replicas() == [machine.replica]
        assert bool(copy.folds()) == (kept and node != owner or ttl_ns > 0)


def test_a_write_folds_retired_rows_and_still_carries_all_of_its_generation():
    """``wrote`` prunes (the members' replicas known): retired rows fold into the
    owner's and the folds go out with the write.  Was a bug: ``_gen`` is a counter
    too, and a write carrying only its fold's delta (generation 1, below the
    replicas' 2) was dropped by them, yet acked.  A write carries all of ``_gen``."""
    c = Cluster("abc")
    agent = "counter/g"
    owner, r1, r2 = c.ring.preference_list(agent, 3)
    machine = c.machines[owner]
    # Reset twice, by a retired process (99) and a live one (r1): generation 2.
    gen = GCounter.from_wire([sorted([99, c.machines[r1].replica]), [1, 1], []])
    rec = machine.primary(agent, BEHAVIOR, c.now)
    rec.fields.update({GEN_FIELD: gen.copy(), "n": PNCounter().bind(machine.replica)})
    for node in (r1, r2):
        c.machines[node]._copy_in(agent, BEHAVIOR, {GEN_FIELD: gen.copy()})
    machine.live_replicas = frozenset(m.replica for m in c.machines.values())
    rec.fields["n"].increment(3)
    assert done(c.run(owner, machine.wrote(agent, take_deltas(rec.fields), QUORUM, "h",
                                           c.now)) + c.deliver())
    assert machine.stats["pruned"] == 1
    assert set(rec.fields[GEN_FIELD].replicas()) == {machine.replica, c.machines[r1].replica}
    assert [c.value(node, agent) for node in (owner, r1, r2)] == [3, 3, 3]
    assert [generation(c.machines[node].records[agent].fields) for node in (r1, r2)] == [2, 2]
    assert c.machines[r1].records[agent].fields[GEN_FIELD].folds()  # the fold went out
    rec.fields["n"].merge(PNCounter.from_wire([[98], [4], [0], []]))  # another retired row
    rec.fields["n"].increment(1)
    c.run(owner, machine.wrote(agent, take_deltas(rec.fields), QUORUM, "h2", c.now))
    c.deliver()
    assert machine.stats["pruned"] == 2  # counted across writes
    assert [c.value(node, agent) for node in (owner, r1, r2)] == [8, 8, 8]


# ====================================================================== repair

@pytest.mark.parametrize("lost", ["delta", "ack"])
def test_a_replica_behind_is_repaired_by_tick_without_a_new_write(lost):
    agent = "counter/r"
    c, (owner, r1, r2) = streaming(agent)
    c.write(agent, 10, QUORUM, "h")
    if lost == "delta":
        c.drop(lambda sender, send: send.to == r2)
    else:
        c.deliver(lambda sender, send: send.to == r2)
        c.drop(lambda sender, send: sender == r2)
    assert done(c.deliver()) == [WriteDone("h", True, 1, 1)]
    owner_machine = c.machines[owner]
    repaired_at = None
    for step in range(1, 100):
        c.now = step * 0.1
        c.tick(owner, c.now)
        c.deliver()
        if owner_machine.records[agent].acked[r2] == 2:
            repaired_at = c.now
            break
    assert repaired_at is not None, "the owner never learnt that r2 holds write 2"
    assert c.value(r2, agent) == 11
    assert owner_machine.lagging == 0 and owner_machine.next_deadline() is None


def joined(agent: str, before: str = "abc", after: str = "abcd") -> Cluster:
    """Nodes ``before``, two writes (1 and 10) on ``agent`` delivered everywhere, then
    the nodes of ``after`` (one more) on the ring."""
    c = Cluster(before)
    c.write(agent, 1, QUORUM)
    c.write(agent, 10, QUORUM)
    c.deliver()
    (new,) = set(after) - set(before)
    c.add(new, 9)
    c.change_ring(after)
    return c


def test_a_new_replica_gets_the_full_state_resent_with_backoff_until_acked():
    agent = find_agent(lambda a: replicas("abcd", a)[0] == replicas("abc", a)[0]
                       and "d" in replicas("abcd", a))
    c = joined(agent)
    owner = c.ring.owner(agent)
    sent_at = []
    for step in range(1, 40):
        for _, send in c.drop(lambda sender, send: send.to == "d"):
            if send.message["k"] == "f":
                sent_at.append(c.now)
        c.tick(owner, step * 0.1)
    gaps = [round(b - a, 1) for a, b in zip(sent_at, sent_at[1:])]
    assert gaps[:3] == [0.2, 0.4, 0.8], sent_at  # resend_s, doubled each time
    c.tick(owner, 10.0)
    c.deliver()
    assert c.value("d", agent) == 11
    assert c.machines[owner].lagging == 0


def test_a_node_leaving_the_replica_set_pushes_its_copy_and_drops_it_after_the_acks():
    agent = find_agent(lambda a: replicas("abcd", a)[0] == replicas("abc", a)[0]
                       and "d" in replicas("abcd", a))
    (leaver,) = set(replicas("abc", agent)) - set(replicas("abcd", agent))
    c = joined(agent)
    machine = c.machines[leaver]
    c.tick(leaver, 0.0)
    pushes = [e for s, e in c.outbox if s == leaver]
    assert {e.to for e in pushes} == set(replicas("abcd", agent)) - {leaver}
    assert {e.message["k"] for e in pushes} == {"p"}
    c.deliver(lambda sender, send: sender == leaver)  # the pushes arrive...
    assert agent in machine.records  # ...but their acks have not come back yet
    lost = c.drop(lambda sender, send: send.to == leaver and send.message["k"] == "pa")
    assert len(lost) == 3
    c.tick(leaver, 1.0)  # pushed again: the acks were lost
    c.deliver()
    assert agent not in machine.records and machine.lagging == 0
    assert c.value("d", agent) == 11


def test_an_old_owner_that_stays_a_replica_offers_its_copy_to_the_new_owner():
    agent = find_agent(lambda a: replicas("abcd", a)[0] == "d"
                       and replicas("abc", a)[0] in replicas("abcd", a))
    old = replicas("abc", agent)[0]
    c = Cluster("abc")
    c.write(agent, 1, LOCAL)
    c.drop()  # the write is on the old owner alone (acknowledged at local)
    c.add("d", 9)
    c.change_ring("abcd")
    c.run(old, c.machines[old].released(agent, 0.0))  # its handoff to d is lost
    for step in range(1, 20):
        c.tick(old, step * 0.5)
        c.deliver()
    assert c.value("d", agent) == 1


# ====================================================================== failover

def failover(consistency: str = QUORUM) -> tuple[Cluster, str, str, str]:
    """Five nodes; the owner of an agent acknowledges a write heard by only one
    replica (``keeper``), the other one (``new``) becomes owner when the old owner
    dies and must gather the write.  Returns (cluster, agent, new owner, keeper)."""
    c = Cluster("abcde")
    agent = "counter/f"
    old, new, keeper = c.ring.preference_list(agent, 3)
    c.write(agent, 1, QUORUM)
    c.deliver()
    assert done(c.write(agent, 10, consistency, "h")) == []
    c.drop(lambda sender, send: send.to == new)
    assert done(c.deliver()) == [WriteDone("h", True, 1, 1)]
    c.crash(old)
    c.change_ring(set("abcde") - {old})
    assert c.ring.owner(agent) == new
    return c, agent, new, keeper


def test_a_new_owner_gathers_every_quorum_write_before_it_serves():
    c, agent, new, keeper = failover()
    machine = c.machines[new]
    assert c.value(new, agent) == 1
    assert c.tick(new, 0.0) == [Activate(agent)]  # failover: wake it, paced
    assert machine.needs_gather(agent)
    assert c.run(new, machine.gather(agent, "request", 10, 0.0)) == []
    asked = {e.to for s, e in c.outbox if s == new}
    assert keeper in asked and len(asked) >= 2
    assert machine.held_now == 1
    assert c.deliver() == [Restore(agent, BEHAVIOR, ("request",))]
    assert c.value(new, agent) == 11 and machine.held_now == 0
    machine.primary(agent, BEHAVIOR, 0.0)  # the node wakes the agent on its record
    assert not machine.needs_gather(agent)
    c.write(agent, 100, ALL, "h2")
    c.tick(new, 0.1)
    assert done(c.deliver()) == [WriteDone("h2", True, 2, 2)]
    for node_id in c.ring.preference_list(agent, 3):
        assert c.value(node_id, agent) == 111


def test_a_gather_ends_at_its_timeout_when_a_node_never_answers():
    c, agent, new, keeper = failover()
    machine = c.machines[new]
    assert c.tick(new, 1.0) == [Activate(agent)]
    c.run(new, machine.gather(agent, None, 0, 1.0))
    c.deliver(lambda sender, send: keeper not in (sender, send.to))  # keeper is silent
    assert machine.next_deadline() == pytest.approx(1.0 + GATHER_TIMEOUT_S)
    assert c.tick(new, 1.0 + GATHER_TIMEOUT_S - 0.01) == []
    assert c.tick(new, 1.0 + GATHER_TIMEOUT_S) == [Restore(agent, BEHAVIOR, ())]
    assert machine.stats["gather_timeouts"] == 1
    assert c.value(new, agent) == 1  # the keeper's write comes later, by its push


def test_a_gather_ends_when_the_silent_node_leaves_the_members():
    c, agent, new, keeper = failover()
    machine = c.machines[new]
    c.run(new, machine.gather(agent, None, 0, 0.0))
    c.deliver(lambda sender, send: keeper not in (sender, send.to))
    others = set(c.ring.nodes) - {keeper}
    assert machine.members_changed(others, 0.5) == [Restore(agent, BEHAVIOR, ())]


def test_an_agent_nobody_else_ever_owned_needs_no_gather():
    c = Cluster("abc")
    agent = "counter/fresh"
    assert not c.machines[c.ring.owner(agent)].needs_gather(agent)


def test_failover_activations_are_paced_at_failover_rate():
    rate = 5.0
    c = Cluster("abcde", failover_rate=rate)
    agents = [f"{BEHAVIOR}/{i}" for i in range(500)]
    for agent in agents:
        c.write(agent, 1, LOCAL)
    c.deliver()
    owned_by_dead = [a for a in agents if c.ring.owner(a) == "a"]
    c.crash("a")
    c.change_ring("bcde")
    woken: dict[str, list[float]] = {node_id: [] for node_id in c.machines}
    for step in range(0, 401):  # 40 s, ticking every 0.1 s
        for node_id in c.machines:
            woken[node_id] += [step / 10 for e in c.tick(node_id, step / 10)
                               if isinstance(e, Activate)]
    assert sum(len(times) for times in woken.values()) == len(owned_by_dead)
    burst = max(1.0, rate / 10)
    for node_id, times in woken.items():
        assert len(times) > 2 * rate, "too few agents to see the pace"
        for k, t in enumerate(times):  # k + 1 agents woken by time t
            assert k + 1 <= burst + rate * (t - times[0]) + 1e-9, (node_id, k, times[:k + 1])
        # and not much slower (a token may wait for the next 0.1 s tick)
        assert times[-1] - times[0] <= (len(times) - 1) * (1 / rate + 0.1)


# ====================================================================== held requests

def test_requests_held_for_a_gather_are_bounded_in_count_and_bytes():
    c, agent, new, _ = failover_cluster_with(held_max=2, held_bytes_max=100)
    machine = c.machines[new]
    assert c.run(new, machine.gather(agent, "r1", 10, 0.0)) == []
    assert machine.gather(agent, "r2", 10, 0.0) == []
    refused = machine.gather(agent, "r3", 10, 0.0)
    assert isinstance(refused, Refusal) and refused.code == ErrorCode.OVERLOADED
    c.deliver()
    assert machine.held_now == 0
    assert c.run(new, machine.gather("counter/other", "big", 100, 0.0)) is not None
    too_big = machine.gather(agent + "x", "r", 101, 0.0)
    assert isinstance(too_big, Refusal) and too_big.code == ErrorCode.OVERLOADED


def failover_cluster_with(**options: Any) -> tuple[Cluster, str, str, str]:
    c = Cluster("abcde", **options)
    agent = "counter/f"
    old, new, keeper = c.ring.preference_list(agent, 3)
    c.write(agent, 1, QUORUM)
    c.deliver()
    c.crash(old)
    c.change_ring(set("abcde") - {old})
    return c, agent, new, keeper


def test_stop_answers_every_held_write_and_request():
    c = Cluster("abc")
    agent = "counter/s"
    owner = c.ring.owner(agent)
    c.write(agent, 1, ALL, "h")
    assert c.machines[owner].stop() == [WriteDone("h", False, 0, 2)]


# ====================================================================== bad input

def receiver() -> tuple[Cluster, Replication, str, str]:
    """A replica with a record in the owner's stream, and the owner with a wait."""
    agent = "counter/m"
    c, (owner, r1, _) = streaming(agent)
    c.write(agent, 1, ALL, "h")
    return c, c.machines[r1], owner, agent


GOOD_FIELDS = encode_fields({"n": PNCounter().bind(7).increment(2)})


@pytest.mark.parametrize("message, reason", [
    ([1, 2], "bad_message"),
    ({"k": "zz", "a": "x"}, "bad_kind"),
    ({"k": 1, "a": "x"}, "bad_kind"),
    ({"a": "x"}, "bad_kind"),
    ({"k": "d", "a": ""}, "bad_agent"),
    ({"k": "d", "a": b"x"}, "bad_agent"),
    ({"k": "w", "a": "x" * 1025}, "bad_agent"),
    ({"k": "d", "a": "x", "b": BEHAVIOR, "e": -1, "s": 1, "f": GOOD_FIELDS}, "bad_seq"),
    ({"k": "d", "a": "x", "b": BEHAVIOR, "e": 1, "s": 1 << 64, "f": GOOD_FIELDS}, "bad_seq"),
    ({"k": "a", "a": "x", "e": True, "s": 1}, "bad_seq"),
    ({"k": "n", "a": "x", "e": "1"}, "bad_seq"),
    ({"k": [], "a": "x"}, "bad_kind"),
    ({"k": "f", "a": "x", "b": BEHAVIOR, "e": 1.5, "s": 1, "f": GOOD_FIELDS}, "bad_seq"),
    ({"k": "f", "a": "x", "b": "", "e": 1, "s": 1, "f": GOOD_FIELDS}, "bad_behavior"),
    ({"k": "p", "a": "x", "b": None, "f": GOOD_FIELDS}, "bad_behavior"),
    ({"k": "f", "a": "x", "b": BEHAVIOR, "e": 1, "s": 1, "f": {"n": ["pn", "junk"]}},
     "bad_state"),
    ({"k": "p", "a": "x", "b": BEHAVIOR, "f": {"n": ["nosuchtype", []]}}, "bad_state"),
    ({"k": "p", "a": "x", "b": BEHAVIOR, "f": [1]}, "bad_state"),
    ({"k": "f", "a": "x", "b": BEHAVIOR, "e": 1, "s": 1, "f": {"": ["pn", []]}}, "bad_state"),
])
def test_a_malformed_message_raises_replication_error_with_its_reason(message, reason):
    machine = Cluster("abc").machines["a"]
    with pytest.raises(ReplicationError) as info:
        machine.receive("b", message, 0.0)
    assert info.value.reason == reason


@pytest.mark.parametrize("behavior, fields, reason", [
    (BEHAVIOR, {"n": ["pn", 1]}, "bad_state"),
    ("b" * 129, GOOD_FIELDS, "bad_behavior"),
    (7, GOOD_FIELDS, "bad_behavior"),
])
def test_a_bad_have_for_a_running_gather_is_refused(behavior, fields, reason):
    c, agent, new, keeper = failover()
    machine = c.machines[new]
    machine.gather(agent, None, 0, 0.0)
    with pytest.raises(ReplicationError) as info:
        machine.receive(keeper, {"k": "h", "a": agent, "b": behavior, "f": fields}, 0.1)
    assert info.value.reason == reason


def test_a_state_of_another_type_for_a_field_is_refused_and_changes_nothing():
    c, machine, owner, agent = receiver()
    other = encode_fields({"n": ORSet().bind(3)})
    rec = machine.records[agent]
    with pytest.raises(ReplicationError) as info:
        machine.receive(owner, {"k": "f", "a": agent, "b": BEHAVIOR, "e": rec.epoch,
                                "s": rec.seq, "f": other}, 0.1)
    assert info.value.reason == "bad_state"
    assert c.value(machine.node_id, agent) == 1


junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 64), max_value=1 << 65)
    | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                   max_size=4),
    max_leaves=12)
OTHER_TYPE_FIELDS = encode_fields({"n": ORSet().bind(3)})  # "n" is a PN-Counter here


def good_or_junk(*good: Any) -> st.SearchStrategy:
    """Half the time a value the machine takes, half the time anything."""
    return st.sampled_from(good) | junk


MESSAGE = st.fixed_dictionaries({
    "k": st.sampled_from(["d", "f", "a", "n", "p", "pa", "w", "h"]) | junk,
    "a": good_or_junk("counter/m", "counter/other", ""),
    "b": good_or_junk(BEHAVIOR, None, "b" * 129),
    "e": good_or_junk(0, 1, 1 << 64) | st.integers(min_value=0, max_value=5),
    "s": good_or_junk(0, 1, 2, 3, -1) | st.integers(min_value=0, max_value=5),
    "f": good_or_junk(GOOD_FIELDS, OTHER_TYPE_FIELDS, {}, {"n": ["pn", []]}),
}) | junk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "z"]), MESSAGE),
                         min_size=1, max_size=6))
def test_junk_raises_replication_error_and_nothing_else(messages):
    c, machine, owner, agent = receiver()
    targets = [machine, c.machines[owner]]
    for sender, message in messages:
        for target in targets:
            try:
                effects = target.receive(sender, message, 0.5)
            except ReplicationError as exc:
                assert exc.reason in {"bad_message", "bad_kind", "bad_agent", "bad_seq",
                                      "bad_behavior", "bad_state"}
            else:
                assert isinstance(effects, list)
        for target in targets:
            target.tick(3.0)
            target.next_deadline()


# --- batches: many messages to one peer in one REPL frame (node/runtime.py) -------------

def packed(*messages: dict) -> list[bytes]:
    return [msgpack.packb(m, use_bin_type=True) for m in messages]


def test_a_batch_is_handled_as_its_messages_one_by_one():
    c, agent, owner, r1, (second, third) = three_writes_to_one_replica()
    [message] = batch(packed(wire(owner, second), wire(owner, third)))
    answer = c.machines[r1].receive(owner, message, c.now)
    assert [(e.message["k"], e.message["s"]) for e in answer] == [("a", 2), ("a", 3)]
    assert c.value(r1, agent) == 111


def test_a_bad_message_in_a_batch_is_counted_and_the_others_still_count():
    c, agent, owner, r1, (second, third) = three_writes_to_one_replica()
    machine = c.machines[r1]
    blobs = packed(wire(owner, second), {"k": "zz", "a": agent}, {"k": "b", "m": []})
    answer = machine.receive(owner, {"k": "b", "m": [*blobs, b"\xc1", "text"]}, c.now)
    assert [(e.message["k"], e.message["s"]) for e in answer] == [("a", 2)]
    assert machine.stats["bad_in_batch"] == 4
    assert machine.last_error.reason == "bad_batch"
    for bad in ({"k": "b"}, {"k": "b", "m": []}, {"k": "b", "m": [b"x"] * 1025}):
        with pytest.raises(ReplicationError) as info:
            machine.receive(owner, bad, c.now)
        assert info.value.reason == "bad_batch"


def test_batches_are_bounded_in_messages_and_bytes_and_a_big_message_goes_alone():
    small, big = b"s" * 100, b"b" * (BATCH_BYTES_MAX + 1)
    sizes = [len(b["m"]) for b in batch([small] * (BATCH_MAX + 5))]
    assert sizes == [BATCH_MAX, 5]
    batches = batch([small, big, small])
    assert [len(b["m"]) for b in batches] == [1, 1, 1] and batches[1]["m"] == [big]
    assert batch([]) == []


# --- reset (syn.stop): a new generation beats every older copy ----------------------------

def test_a_reset_agent_starts_empty_on_every_replica_and_older_copies_lose():
    c, (owner, r1, r2) = streaming("counter/g")
    c.write("counter/g", 41, LOCAL)
    c.deliver()
    stale = encode_fields(c.machines[r1].records["counter/g"].fields)  # value 42
    assert c.run(owner, c.machines[owner].reset("counter/g", c.now)) == []
    c.tick(owner, c.now + 0.01)  # the full state of the new generation goes out
    c.deliver()
    assert [c.value(n, "counter/g") for n in (owner, r1, r2)] == [0, 0, 0]
    late = {"k": "p", "a": "counter/g", "b": BEHAVIOR, "f": stale}
    c.machines[r1].receive(owner, late, c.now)  # a copy from the old life, late
    assert c.value(r1, "counter/g") == 0
    c.write("counter/g", 5, LOCAL)  # the new life's writes replicate as usual
    c.deliver()
    assert [c.value(n, "counter/g") for n in (owner, r1, r2)] == [5, 5, 5]
    assert c.machines[owner].reset("counter/none", c.now) is None


def test_generation_merge_keeps_the_newest_life():
    def life(gen: int, amount: int) -> dict:
        fields = {"n": PNCounter().bind(1)}
        fields["n"].increment(amount)
        if gen:
            fields["_gen"] = GCounter().bind(1)
            fields["_gen"].increment(gen)
        return fields

    into = life(0, 3)
    merge_generation(into, life(0, 4))  # same life: a join (max per replica)
    assert into["n"].value() == 4
    merge_generation(into, life(1, 2))  # a newer life replaces the older
    assert into["n"].value() == 2 and generation(into) == 1
    merge_generation(into, life(0, 9))  # an older life is ignored
    assert into["n"].value() == 2
    with pytest.raises(CrdtError):
        generation({"_gen": PNCounter()})


def test_copies_pushed_by_peers_are_bounded_in_records():
    machine = Replication("a", 1, lambda: 0, records_max=2)
    for n in range(2):
        machine.receive("b", {"k": "p", "a": f"x{n}", "b": BEHAVIOR, "f": GOOD_FIELDS}, 0.0)
    with pytest.raises(ReplicationError) as info:
        machine.receive("b", {"k": "p", "a": "x2", "b": BEHAVIOR, "f": GOOD_FIELDS}, 0.0)
    assert info.value.reason == "records_full" and "x2" not in machine.records
    assert machine.stats["refused_copies"] == 1
    machine.receive("b", {"k": "p", "a": "x0", "b": BEHAVIOR, "f": GOOD_FIELDS}, 0.0)  # known
