"""Replicated agent state between real node processes (127.0.0.1, port 0): no
acknowledged write is lost when a node is ``kill -9``ed or leaves, a write at
``all`` answers ``timeout`` while a replica is frozen, and the frozen replica
catches up after it thaws (docs/STATE.md, Replication and Failover).

The client side is raw: envelopes from ``protocols.wire.request`` pipelined over one
ZeroMQ DEALER socket per node (``Pipeline``), so that hundreds of writes are in
flight at once and every reply is matched to its request by ``re``.  A write counts
as *acknowledged* when its ``syn.reply`` came back; one answered with an error, or
never, may or may not have applied.  After the fault, every counter must hold at
least its acknowledged increments and at most the increments sent.

Measured figures (failover seconds, writes sent / acknowledged / lost) are printed:
run with ``-s`` to see them.  Bounds are liveness bounds, generous for a loaded
2-core machine; nothing asserts on speed.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack
import pytest
import zmq

import core_cy
from protocols import wire
from support import Cluster, NodeProcess, metric_samples, wait_until
from test_node_membership import clusters  # noqa: F401  (a fixture: the nodes are killed after)

pytestmark = pytest.mark.timeout(120)

RETRYABLE = frozenset(("timeout", "unavailable", "overloaded"))  # PROTOCOL.md 2.4
WINDOW = 256            # requests in flight at once, over all of a pipeline's sockets
ATTEMPT_S = 1.0         # a resending pipeline sends again after this without a reply
RETRY_BACKOFF_S = 0.1   # ... and this long after a retryable error
SETTLE_BOUND_S = 40.0   # every request answered (a forward to a dead owner waits for
                        # its downing; a causal hold lasts 5 s; a loaded machine is slow)
FAILOVER_BOUND_S = 30.0  # kill -9 -> each of the victim's agents answered with its state
                         # (the target with default timings is under 5 s)


# --- a pipelined raw client ---------------------------------------------------------------

@dataclass
class Message:
    """One request and what became of it.  ``reply`` is the first ``syn.reply``."""

    id: str
    agent: str
    frame: bytes                    # encoded once; a resend is the same bytes, same id
    attempts: int = 0
    first_sent_at: float = 0.0
    due: float = 0.0                # when a resending pipeline sends it again
    reply: dict | None = None
    answered_at: float = 0.0
    arrival: int = 0                # the pipeline's count of replies when this one came
    error: str | None = None        # the last error code
    replies: int = 0                # every answer that came, late ones included

    @property
    def acked(self) -> bool:
        return self.reply is not None

    @property
    def value(self) -> Any:
        return self.reply["data"]["value"]


class Pipeline:
    """Requests over one DEALER socket per node address, many in flight at once.

    Each attempt goes through the next socket in turn.  Without ``resend`` a request
    is sent once and ends with its first answer (at-most-once).  With ``resend`` a
    request unanswered after ``attempt_s``, or answered with a retryable error, is
    sent again with the same id until it gets a reply: the client side of
    ``at_least_once`` and ``exactly_once`` (PROTOCOL.md 2.4).
    """

    def __init__(self, addresses: Iterable[str], resend: bool = False,
                 attempt_s: float = ATTEMPT_S, window: int = WINDOW):
        self._ctx = zmq.Context()
        self._sockets = []
        self._poller = zmq.Poller()
        for address in addresses:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{address}")
            self._sockets.append(sock)
            self._poller.register(sock, zmq.POLLIN)
        self._turn = itertools.cycle(self._sockets)
        self._prefix = uuid.uuid4().hex   # exactly-once ids are unique among all senders
        self._numbers = itertools.count()
        self.resend = resend
        self.attempt_s = attempt_s
        self.window = window
        self.messages: list[Message] = []
        self.in_flight: dict[str, Message] = {}
        self._by_id: dict[str, Message] = {}
        self.errors: Counter = Counter()
        self._arrivals = itertools.count(1)

    def close(self) -> None:
        self._ctx.destroy(linger=0)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # sending ------------------------------------------------------------------------

    def submit(self, agent: str, mtype: str, data: Any = None, *,
               request_id: str | None = None, **extensions: Any) -> Message:
        """Send one request now (``extensions``: consistency, delivery, session, vc)."""
        rid = request_id or f"{self._prefix}.{next(self._numbers)}"
        message = Message(rid, agent, wire.encode(wire.request(rid, mtype, agent, data,
                                                               **extensions)))
        self.messages.append(message)
        self.in_flight[rid] = message
        self._by_id[rid] = message
        self._send(message, time.monotonic())
        return message

    def _send(self, message: Message, now: float) -> None:
        if not message.attempts:
            message.first_sent_at = now
        message.attempts += 1
        message.due = now + self.attempt_s
        next(self._turn).send(message.frame)

    @property
    def has_room(self) -> bool:
        return len(self.in_flight) < self.window

    # receiving ----------------------------------------------------------------------

    def pump(self, wait_s: float = 0.01) -> None:
        """Resend what is due (when resending), then read every reply that is in."""
        now = time.monotonic()
        if self.resend:
            for message in [m for m in self.in_flight.values() if m.due <= now]:
                self._send(message, now)
        for sock, _ in self._poller.poll(wait_s * 1000):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._answered(msgpack.unpackb(frame, raw=False, strict_map_key=False))

    def _answered(self, envelope: dict) -> None:
        message = self._by_id.get(envelope.get("re"))
        if message is None:
            return
        message.replies += 1
        if message.id not in self.in_flight:   # a late answer to a request that ended
            return
        if envelope["type"] == wire.TYPE_REPLY:
            message.reply, message.answered_at = envelope, time.monotonic()
            message.arrival = next(self._arrivals)
            del self.in_flight[message.id]
            return
        code = envelope["data"]["code"]
        message.error = code
        self.errors[code] += 1
        if self.resend and code in RETRYABLE:
            message.due = time.monotonic() + RETRY_BACKOFF_S
        else:
            del self.in_flight[message.id]

    def settle(self, bound_s: float = SETTLE_BOUND_S) -> None:
        """Until every request has ended (with resends: got a reply)."""
        deadline = time.monotonic() + bound_s
        while self.in_flight:
            if time.monotonic() > deadline:
                stuck = list(self.in_flight.values())[:5]
                raise AssertionError(f"{len(self.in_flight)} requests unanswered after "
                                     f"{bound_s} s, e.g. {[(m.agent, m.error) for m in stuck]}")
            self.pump(0.05)

    # the load -----------------------------------------------------------------------

    def drive(self, agents: list[str], mtype: str, data: Any = None, *,
              until: Callable[[], bool] | None = None, seconds: float = 0.0,
              bound_s: float = FAILOVER_BOUND_S, **extensions: Any) -> None:
        """Send ``mtype`` to ``agents`` round robin, keeping the window full, for
        ``seconds`` and then until ``until()`` holds (at most ``bound_s``)."""
        started = time.monotonic()
        order = itertools.cycle(agents)
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds and (until is None or until()):
                return
            if elapsed > bound_s:
                raise AssertionError(f"not within {bound_s} s: {until}")
            while self.has_room:
                self.submit(next(order), mtype, data, **extensions)
            self.pump(0.005)

    # what happened ------------------------------------------------------------------

    def count(self, which: Callable[[Message], bool] = lambda m: True) -> Counter:
        """Messages per agent that ``which`` picks."""
        return Counter(m.agent for m in self.messages if which(m))


def addresses(nodes: Iterable[NodeProcess]) -> list[str]:
    return [node.address for node in nodes]


def read_agents(addresses: list[str], agents: Iterable[str], data: Any = None,
                bound_s: float = SETTLE_BOUND_S) -> dict[str, Message]:
    """Each agent's ``get``, resent until it answers (an agent whose owner died
    answers once it failed over): agent -> its answered message (value, source)."""
    with Pipeline(addresses, resend=True) as reader:
        for agent in agents:
            reader.submit(agent, "get", data)
        reader.settle(bound_s)
        return {m.agent: m for m in reader.messages}


def counter_values(nodes: Iterable[NodeProcess], agents: Iterable[str]) -> dict[str, int]:
    return {a: m.value for a, m in read_agents(addresses(nodes), agents).items()}


def owners(nodes: Iterable[NodeProcess], agents: Iterable[str], data: Any = None
           ) -> dict[str, str]:
    """Agent -> the node that answered for it: its owner (activated by the ``get``)."""
    return {a: m.reply["source"] for a, m in read_agents(addresses(nodes), agents,
                                                         data).items()}


@dataclass
class Loss:
    """Counters against what was sent and acknowledged to them."""

    sent: int = 0
    acked: int = 0
    lost: dict[str, tuple[int, int]] = field(default_factory=dict)    # agent: (value, acked)
    excess: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent: (value, sent)

    def line(self) -> str:
        return (f"sent {self.sent}, acknowledged {self.acked}, counters below their "
                f"acknowledged count {len(self.lost)} (increments lost "
                f"{sum(a - v for v, a in self.lost.values())}), counters above the "
                f"increments sent {len(self.excess)}")


def check_counters(values: dict[str, int], sent: Counter, acked: Counter) -> Loss:
    loss = Loss(sum(sent.values()), sum(acked.values()))
    for agent, value in values.items():
        if value < acked[agent]:
            loss.lost[agent] = (value, acked[agent])
        if value > sent[agent]:
            loss.excess[agent] = (value, sent[agent])
    return loss


# --- the cluster ----------------------------------------------------------------------

def preference_lists(cluster: Cluster, agents: Iterable[str], n: int = 3) -> dict[str, list]:
    """Agent -> its replicas (owner first) on the ring of the cluster's nodes, as the
    nodes compute it."""
    with cluster.nodes[0].client() as c:
        vnodes = c.status()["members"][0]["ring"]["vnodes"]
    ring = core_cy.HashRing(tuple(sorted(n.name for n in cluster.nodes)), vnodes=vnodes)
    return {agent: list(ring.preference_list(agent, n)) for agent in agents}


def gauge(node: NodeProcess, name: str) -> float | None:
    return metric_samples(node).get((f"synthesis_{name}", ()))


# --- 1. kill -9 under load: nothing acknowledged lost -----------------------------------

def failover_under_load(cluster: Cluster, consistency: str, agents: list[str]) -> None:
    """Increments at ``consistency`` through all nodes but the last; the last one is
    killed mid-load.  Checks the victim's agents come back with their state, and
    that afterwards no counter lost an acknowledged increment."""
    *survivors, victim = cluster.nodes
    with Pipeline(addresses(survivors)) as load:
        orphans = [a for a, owner in owners(survivors, agents).items()
                   if owner == victim.name]
        assert orphans, "the victim owns none of the counters"
        load.drive(agents, "incr", seconds=3.0, consistency=consistency)
        victim.kill()
        killed_at = time.monotonic()
        acked_at_kill = load.count(lambda m: m.acked and m.answered_at <= killed_at)

        def after_kill(m: Message) -> bool:
            return m.acked and m.first_sent_at > killed_at

        def orphans_answered() -> bool:
            return set(orphans) <= set(load.count(after_kill))

        load.drive(agents, "incr", seconds=3.0, until=orphans_answered,
                   consistency=consistency)
        first = {}
        for m in sorted(filter(after_kill, load.messages), key=lambda m: m.answered_at):
            first.setdefault(m.agent, m)
        failover_s = max(first[a].answered_at - killed_at for a in orphans)
        load.settle()
        stale = {a: (first[a].value, acked_at_kill[a]) for a in orphans
                 if first[a].value < acked_at_kill[a]}
        values = counter_values(survivors, agents)
        loss = check_counters(values, load.count(), load.count(lambda m: m.acked))
        print(f"\n{consistency}, {len(cluster.nodes)} nodes, {len(agents)} counters "
              f"({len(orphans)} owned by the victim): failover {failover_s:.2f} s from "
              f"kill -9 to the last of them answering; {loss.line()}; errors "
              f"{dict(load.errors)}")
    assert not stale, f"answered after the failover without their state: {stale}"
    assert not loss.lost, f"acknowledged increments lost: {loss.lost}"
    assert not loss.excess, f"more increments than were sent: {loss.excess}"


@pytest.mark.parametrize("consistency,size", [("quorum", 4), ("all", 3)])
def test_kill_9_loses_no_acknowledged_write(clusters, consistency, size):
    """Default timings, so the printed failover time is the one users get."""
    cluster = clusters(size)
    failover_under_load(cluster, consistency, [f"counter/k{i}" for i in range(240)])


# --- 2. a frozen replica: `all` times out, `quorum` goes on, then it catches up -----------

WRITE_TIMEOUT_S = 1.0
# Slow failure detection: a replica frozen for a few seconds stays a member (frozen,
# not dead), so the writes wait for it rather than for a new replica set.
FREEZE_TOLERANT = ("--probe-interval-s", "1.0", "--suspicion-mult", "6",
                   "--suspicion-max-mult", "6")


def call_once(address: str, agent: str, mtype: str, bound_s: float = 10.0,
              **extensions: Any) -> tuple[Message, float]:
    """One request through one node, sent once: its message and the seconds it took."""
    with Pipeline([address]) as pipe:
        message = pipe.submit(agent, mtype, **extensions)
        pipe.settle(bound_s)
        return message, time.monotonic() - message.first_sent_at


def test_all_times_out_on_a_frozen_replica_which_catches_up_after(clusters):
    cluster = clusters(5, metrics=True,
                       args=("--write-timeout-s", str(WRITE_TIMEOUT_S), *FREEZE_TOLERANT))
    by_name = {n.name: n for n in cluster.nodes}
    agent, replicas = next(iter(preference_lists(cluster, ["counter/frozen"]).items()))
    owner, second, frozen = (by_name[name] for name in replicas)
    outsider = next(n for n in cluster.nodes if n.name not in replicas)
    first, _ = call_once(owner.address, agent, "incr", consistency="all")
    assert first.acked and first.value == 1

    frozen.signal(signal.SIGSTOP)
    try:
        at_all, waited_s = call_once(owner.address, agent, "incr", consistency="all")
        at_quorum, _ = call_once(owner.address, agent, "incr", consistency="quorum")
    finally:
        frozen.signal(signal.SIGCONT)
    print(f"\n`all` with {frozen.name} frozen answered {at_all.error} after "
          f"{waited_s:.2f} s (write_timeout_s {WRITE_TIMEOUT_S})")
    assert at_all.error == "timeout" and not at_all.acked
    assert waited_s >= WRITE_TIMEOUT_S * 0.9
    assert at_quorum.acked and at_quorum.value == 3   # the timed-out write applied too

    wait_until(lambda: gauge(owner, "replication_lagging") == 0, timeout_s=20,
               what=f"{owner.name} has no replica behind")
    # Only the thawed replica keeps a copy now: reading the agent through the
    # survivors shows what it caught up to.
    owner.kill()
    second.kill()
    value = counter_values([outsider], [agent])[agent]
    assert value == 3, f"{frozen.name} caught up to {value} of the 3 increments"


# --- 3. graceful leave at `local`: nothing lost -----------------------------------------

def test_sigterm_loses_nothing_at_local(clusters):
    """One copy of each agent (``--replicas 1``): a leaving node must hand every agent
    it holds over before it exits, or writes acknowledged at ``local`` are gone."""
    cluster = clusters(3, args=("--replicas", "1"))
    *survivors, leaver = cluster.nodes
    agents = [f"counter/t{i}" for i in range(240)]
    with Pipeline(addresses(survivors)) as load:
        assert leaver.name in owners(survivors, agents).values()
        load.drive(agents, "incr", seconds=2.0, consistency="local")
        leaver.signal(signal.SIGTERM)
        load.drive(agents, "incr", until=lambda: leaver.proc.poll() is not None,
                   consistency="local")
        load.drive(agents, "incr", seconds=1.0, consistency="local")
        load.settle()
        values = counter_values(survivors, agents)
        loss = check_counters(values, load.count(), load.count(lambda m: m.acked))
        print(f"\nSIGTERM of {leaver.name} at local with one copy: exit "
              f"{leaver.proc.returncode}; {loss.line()}; errors {dict(load.errors)}")
    assert leaver.proc.returncode == 0
    assert not loss.lost, f"acknowledged increments lost: {loss.lost}"
    assert not loss.excess, f"more increments than were sent: {loss.excess}"
