"""Gossip broadcast (``protocols/epidemic.py``) in the deterministic simulator.

Bare ``Epidemic`` machines, no membership: each gets the full node list as its
peers.  Each runs inside a ``Host``, the part of the node that carries
``GroupDeliver`` (here: records it, as the node hands it to its local group
members) and gives the ``Send`` effects to ``protocols.sim.Simulator``, which frames
them as peer GOSSIP frames over its seeded lossy network (the path
``tests/test_swim_sim.py`` uses for membership).  A restarted node gets a fresh
machine whose ``seq_start`` is higher, as a new membership generation is.

Every assertion names its seed: ``Simulator(seed, ...)`` as the test builds it
replays the run.  ``pytest -s`` shows what was measured; ``messages_per_node`` is
also what ``scripts/bench_epidemic.py`` prints.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest

from protocols import peer
from protocols.effects import GOSSIP, GroupDeliver, Send
from protocols.epidemic import DIGEST, PUSH, WANT, Epidemic
from protocols.machine import UnhandledEffect
from protocols.sim import NetworkConfig, Simulator

GEN = 1_700_000_000 * 10**9  # a node's first seq_start: its generation, a wall-clock ns
GROUP = "room"
LOSSY = NetworkConfig(drop_rate=0.2, dup_rate=0.05, delay_min_s=0.001, delay_max_s=0.02)
# Messages (pushes, wants and repair pushes) one node sends per broadcast are at most
# C_MESSAGES * log2(N).  Why: a node pushes ceil(ln N + 2) copies (Epidemic.copies),
# at most 0.69 log2 N + 3: 1.15 log2 N at N = 100, 0.99 at 1,000; repair adds a few
# per cent (measured, no loss: 6.9 and 8.8 messages per node, 1.04 and 0.89 log2 N).
# 1.5 leaves room for that and for loss, and fails if the traffic grows faster than
# log N (fanout * N, or rounds that never stop).
C_MESSAGES = 1.5


def nid(k: int) -> str:
    return f"n{k:04d}"


def replay(seed: int, what: str) -> str:
    return f"seed {seed}: {what} (replay: Simulator({seed}, ...) as this test builds it)"


class Host:
    """The node's side of one machine: ``GroupDeliver`` handled locally, ``Send``
    passed to the simulator; any other effect is an error (the contract)."""

    def __init__(self, machine: Epidemic, on_deliver: Callable[[], None] | None = None,
                 measure_bytes: bool = False):
        self.machine = machine
        self.delivered: list[tuple[float, str, bytes]] = []
        self.sent: Counter = Counter()  # message kind -> count
        self.sent_bytes: Counter = Counter()  # kind -> peer frame bytes (measure_bytes)
        self._on_deliver = on_deliver
        self._measure_bytes = measure_bytes

    def start(self, now: float) -> list:
        return self._carry(self.machine.start(now), now)

    def receive(self, sender: str, message: dict, now: float) -> list:
        return self._carry(self.machine.receive(sender, message, now), now)

    def tick(self, now: float) -> list:
        return self._carry(self.machine.tick(now), now)

    def next_deadline(self) -> float | None:
        return self.machine.next_deadline()

    def publish(self, envelope: bytes, now: float) -> list:
        return self._carry(self.machine.publish(GROUP, envelope, now), now)

    def _carry(self, effects: list, now: float) -> list:
        sends = []
        for effect in effects:
            if type(effect) is GroupDeliver:
                self.delivered.append((now, effect.group, effect.envelope))
                if self._on_deliver is not None:
                    self._on_deliver()
            elif type(effect) is Send:
                sends.append(effect)
                self.sent[effect.message["kind"]] += 1
                if self._measure_bytes:
                    frames = peer.encode(GOSSIP, self.machine.node_id, effect.message)
                    self.sent_bytes[effect.message["kind"]] += sum(len(f) for f in frames)
            else:
                raise UnhandledEffect(f"no handler for {effect!r}")
        return sends

    def times(self, envelope: bytes) -> int:
        return sum(1 for _, _, e in self.delivered if e == envelope)


def new_host(k: int, ids: list[str], seed: int, seq_start: int, **kwargs) -> Host:
    machine = Epidemic(nid(k), rng=random.Random(seed * 1_000_003 + seq_start % 1_000_003 + k),
                       seq_start=seq_start)
    machine.set_peers(ids)
    return Host(machine, **kwargs)


def cluster(n: int, seed: int, network: NetworkConfig, roundtrip: bool = True,
            **kwargs) -> Simulator:
    sim = Simulator(seed, network, wire_roundtrip=roundtrip)
    ids = [nid(k) for k in range(n)]
    for k in range(n):
        sim.add(nid(k), new_host(k, ids, seed, GEN + k, **kwargs))
    return sim


def publish_at(sim: Simulator, when: float, node: str, envelope: bytes) -> None:
    sim.at(when, lambda s: s.inject(node, lambda host, now: host.publish(envelope, now)))


def hosts(sim: Simulator) -> dict[str, Host]:
    return {n: sim.machine(n) for n in sim.node_ids}


def check_once(sim: Simulator, envelopes: list[bytes], seed: int,
               skip: frozenset = frozenset()) -> None:
    for node, host in hosts(sim).items():
        if node in skip:
            continue
        for envelope in envelopes:
            times = host.times(envelope)
            assert times == 1, replay(sim.seed, f"{node} delivered {envelope!r} {times} times")


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_broadcasts_reach_every_node_once_under_loss(seed):
    """30 nodes, 20% of messages lost and 5% duplicated: five broadcasts from
    random nodes each reach every node exactly once."""
    sim = cluster(30, seed, LOSSY)
    rng = random.Random(seed)
    envelopes = [f"m{i}".encode() for i in range(5)]
    for i, envelope in enumerate(envelopes):
        publish_at(sim, 1.0 + 0.3 * i, nid(rng.randrange(30)), envelope)
    sim.run_until(20.0)
    check_once(sim, envelopes, seed)
    last = max(t for host in hosts(sim).values() for t, _, _ in host.delivered)
    stats = Counter()
    for host in hosts(sim).values():
        stats.update(host.machine.stats)
    print(f"\nseed {seed}: all reached by t={last:.2f}s; dropped {sim.stats.dropped}; "
          f"duplicates {stats['duplicates']}, repaired {stats['repaired']}")
    assert stats["delivered"] == 30 * len(envelopes)
    assert sim.stats.dropped > 0 and stats["duplicates"] > 0, replay(seed, "no faults happened")


def test_a_run_replays_from_its_seed():
    def run() -> str:
        sim = cluster(10, 7, LOSSY)
        publish_at(sim, 0.5, nid(3), b"x")
        sim.run_until(5.0)
        return sim.digest()
    assert run() == run()


# --------------------------------------------------------------------------- restarts

@pytest.mark.parametrize("seed", [1, 2])
def test_node_down_during_broadcast_gets_it_once_when_back(seed):
    """n0005 crashes as the broadcast starts (before any copy reaches it) and comes
    back 3 s later, a fresh machine: anti-entropy brings it the message, once; every
    other node has it once too."""
    n, victim, envelope = 20, nid(5), b"while you were out"
    sim = cluster(n, seed, LOSSY)
    ids = sim.node_ids
    publish_at(sim, 1.0, nid(0), envelope)
    sim.at(1.0005, lambda s: s.crash(victim))
    old = sim.machine(victim)
    sim.at(4.0, lambda s: s.restart(victim, new_host(5, ids, seed, GEN + 10**9)))
    sim.run_until(12.0)
    assert old.times(envelope) == 0, replay(seed, "the victim got it before it crashed")
    check_once(sim, [envelope], seed)
    back = sim.machine(victim)
    when = back.delivered[0][0]
    print(f"\nseed {seed}: back at 4.0 s, delivered at {when:.2f} s; "
          f"repaired {back.machine.stats['repaired']}")
    assert back.machine.stats["repaired"] == 1, replay(seed, "not delivered by a repair")


def test_restarted_publisher_mints_new_ids():
    """A publisher that crashes and comes back with a higher seq_start (its new
    generation) starts its ids over there: its next broadcast is not taken for a
    duplicate of its previous one, which every node still remembers."""
    seed, n, publisher = 4, 12, nid(1)
    sim = cluster(n, seed, LOSSY)
    ids = sim.node_ids
    publish_at(sim, 1.0, publisher, b"before")
    sim.at(2.0, lambda s: s.crash(publisher))
    sim.at(2.5, lambda s: s.restart(publisher, new_host(1, ids, seed, GEN + 10**9)))
    publish_at(sim, 3.0, publisher, b"after")
    sim.run_until(12.0)
    check_once(sim, [b"before", b"after"], seed, skip=frozenset({publisher}))
    assert sim.machine(publisher).times(b"after") == 1


# --------------------------------------------------------------------------- cost

@dataclass
class Measure:
    n: int
    seconds_to_all: float       # publish until the last node delivered (mean)
    messages_per_node: float    # pushes + wants + repair pushes, per broadcast
    bytes_per_node: float       # peer frame bytes of those, per broadcast
    digests_per_node_s: float   # anti-entropy digests, per node per second (periodic)


def messages_per_node(n: int, seed: int = 1, network: NetworkConfig | None = None,
                      broadcasts: int = 3, envelope_bytes: int = 1024) -> Measure:
    """``broadcasts`` broadcasts, one after the other (each once every node has the
    previous one and its rounds are over): time to reach all, and what each node
    sent for them.  Digests are periodic, not per broadcast: counted apart."""
    reached = [0]

    def count() -> None:
        reached[0] += 1

    sim = cluster(n, seed, network or NetworkConfig(), roundtrip=False, on_deliver=count,
                  measure_bytes=True)
    sim.run_until(2.0)  # timers started, a first round of digests
    before = {node: (Counter(h.sent), Counter(h.sent_bytes)) for node, h in hosts(sim).items()}
    rng, took, started = random.Random(seed), [], sim.now
    for b in range(broadcasts):
        t0 = sim.now
        publish_at(sim, t0, nid(rng.randrange(n)), bytes(envelope_bytes - 2) + b.to_bytes(2, "big"))
        sim.run_until(t0 + 60.0, stop=lambda s: reached[0] == n * (b + 1))
        assert reached[0] == n * (b + 1), replay(seed, f"broadcast {b} did not reach all in 60 s")
        took.append(sim.now - t0)
        sim.run_for(1.0)  # the last rounds and repairs of this one
    elapsed = sim.now - started
    sent, digests, sent_bytes = 0, 0, 0
    for node, host in hosts(sim).items():
        kinds, nbytes = host.sent - before[node][0], host.sent_bytes - before[node][1]
        sent += kinds[PUSH] + kinds[WANT]
        digests += kinds[DIGEST]
        sent_bytes += nbytes[PUSH] + nbytes[WANT]
    return Measure(n, sum(took) / len(took), sent / n / broadcasts,
                   sent_bytes / n / broadcasts, digests / n / elapsed)


def check_log_bound(sizes: list[int], seed: int = 1) -> list[Measure]:
    print(f"\n{'N':>6} {'to all s':>9} {'msgs/node':>10} {'bound':>6} {'bytes/node':>11} "
          f"{'digests/node/s':>15}")
    measured = []
    for n in sizes:
        m = messages_per_node(n, seed)
        bound = C_MESSAGES * math.log2(n)
        print(f"{n:>6} {m.seconds_to_all:>9.3f} {m.messages_per_node:>10.2f} {bound:>6.1f} "
              f"{m.bytes_per_node:>11.0f} {m.digests_per_node_s:>15.2f}")
        assert m.messages_per_node <= bound, replay(seed, f"N={n}: {m.messages_per_node:.2f} "
                                                          f"messages per node > {bound:.1f}")
        measured.append(m)
    return measured


def test_messages_per_node_grow_like_log_n():
    """At 100 and 1,000 nodes: within C_MESSAGES * log2(N), and growing with N, but
    far slower than N (ten times the nodes, about two more messages: ln 10)."""
    small, large = check_log_bound([100, 1000])
    assert small.messages_per_node < large.messages_per_node < 1.5 * small.messages_per_node
