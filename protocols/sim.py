"""A deterministic simulator: many nodes' machines in one process, on virtual time.

The simulator plays the node runtime for pure machines (``protocols/machine.py``):
it feeds them virtual time and peer messages and carries their effects out through
one ``Effects`` table per node, so an effect nobody handles raises, as in the node.

Two levels, one engine (``Simulator``):

- **Bare machines** (``Simulator.add(node_id, machine, address=...)``): any object
  with ``receive(sender, message, now)``, ``tick(now)``, ``next_deadline()`` and
  optionally ``start(now)``; it gets the ``gossip`` channel.  This is what
  ``tests/test_membership.py`` runs Membership machines with.  Handled effects:
  ``Send``, ``MembersChanged``, ``Refuted``.
- **Whole nodes** (``NodeSim``): each node is a ``SimNode`` (Membership + Router +
  Handoff + Replication + StatusCollector + Strategies + a small agent host with
  sync counter handlers, wired together like the node's runtime and
  ``node/state.py`` wire them); simulated clients send request envelopes (direct
  calls, pipelines, scatter-gathers) to random live entry nodes; ``Answer``/``Fail``
  effects go back to those clients.
  Invariants are checked after every step (see ``NodeSim``); a failure raises
  ``InvariantViolation`` with the seed and the one command that replays it::

      python -m protocols.sim --seed 123 --nodes 20 --duration-s 60 ...

The network is seeded and faulty on request (``NetworkConfig``): loss,
duplication, delay (and so reordering); partitions (``partition``/``heal``); nodes
crash and restart (a fresh machine, state lost) or pause and resume (a SIGSTOP:
events wait, then arrive in order).  Messages travel as peer frames
(``protocols/peer.py``): a ``Send`` is framed with ``peer.encode`` as the runtime
frames it and decoded on arrival, so machines never share objects and the codec
runs too (``wire_roundtrip=False`` hands gossip objects over as they are, for
speed).  Timers follow the contract: after every step the simulator asks the
machine's ``next_deadline()`` and calls ``tick`` then.

Everything random comes from one ``random.Random(seed)``; nothing iterates a set
of strings (whose order changes with PYTHONHASHSEED): the same seed gives the same
run, to the byte (``Simulator.digest()`` hashes the event trace).  Pure: no
sockets, no asyncio, no clocks, no module-level random.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import msgpack

from core_cy import replica_id

from . import peer, wire
from .crdt import PNCounter, bind_fields, decode_fields, encode_fields, merge_fields, take_deltas
from .effects import (GOSSIP, STATUS_ANSWER, Activate, Answer, Fail, ForwardTo, Install,
                      MembersChanged, QuorumChanged, Refuted, Relay, Restore, Route, Send,
                      Surrender, Unresponsive, WriteDone, seed_address)
from .handoff import Handoff, HandoffError, previous_ring
from .machine import Effects
from .membership import (ALIVE, LEFT, SUSPECT, Member, Membership, MembershipError,
                         SwimConfig, advertised_replicas)
from .replication import ALL, CONSISTENCIES, QUORUM, Replication, ReplicationError
from .routing import Refusal, Router
from .status import StatusCollector, StatusError
from .strategies import STRATEGY, Strategies
from .wire import ErrorCode, WireError

_START, _TICK, _MESSAGE, _CALL, _ACTION = range(5)
_KIND_NAMES = ("start", "tick", "message", "call", "action")

MESSAGE_BYTES_MAX = 1 << 20  # envelopes a simulated node accepts


@dataclass(frozen=True, slots=True)
class SendFrames:
    """Send already-encoded peer frames (FWD, RPL) to node ``to``.

    The node's runtime sends these straight to its transport on the hot path; the
    simulated node returns them as an effect, which the simulator's table carries.
    """

    to: str
    frames: list


class SimulationError(Exception):
    """The simulation itself was misused, or a machine broke the contract."""


@dataclass
class NetworkConfig:
    """Faults of the simulated network.  Probabilities are per message."""

    drop_rate: float = 0.0        # a sent message is lost
    dup_rate: float = 0.0         # a sent message arrives twice (independent delays)
    delay_min_s: float = 0.001    # one-way latency, uniform in [min, max]:
    delay_max_s: float = 0.010    #   different delays reorder messages

    def __post_init__(self) -> None:
        if not (0.0 <= self.drop_rate <= 1.0 and 0.0 <= self.dup_rate <= 1.0):
            raise ValueError("drop_rate and dup_rate are probabilities in [0, 1]")
        if not 0.0 <= self.delay_min_s <= self.delay_max_s:
            raise ValueError("need 0 <= delay_min_s <= delay_max_s")


@dataclass
class SimStats:
    steps: int = 0         # events run
    sent: int = 0          # Send effects carried out
    delivered: int = 0     # messages handed to a machine
    dropped: int = 0       # lost to drop_rate
    duplicated: int = 0    # extra copies made
    partitioned: int = 0   # lost to a partition
    undeliverable: int = 0  # no such node, or it was down when the message arrived
    deferred: int = 0      # events held while their node was paused
    ticks: int = 0         # tick() calls
    errors: int = 0        # exceptions raised by a machine's receive() (strict=False)


@dataclass
class _Slot:
    node_id: str
    address: str
    machine: Any
    effects: Effects | None = None
    up: bool = True
    paused: bool = False
    incarnation: int = 0
    timer_at: float | None = None
    backlog: list = field(default_factory=list)  # events held while paused


class Simulator:
    """Runs machines against a virtual clock and a seeded faulty network."""

    def __init__(self, seed: int, network: NetworkConfig | None = None, *,
                 wire_roundtrip: bool = True, strict: bool = True,
                 answers: Callable[[str, Any], None] | None = None):
        """``answers(node_id, effect)``, when given, receives every ``Answer`` and
        ``Fail`` (whole-node mode); without it those effects are unhandled."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = network or NetworkConfig()
        self.now = 0.0
        self.stats = SimStats()
        self.changes: list[tuple[float, str, MembersChanged]] = []
        self.record_changes = True  # False at scale: each change holds a copy of the view
        self.effects_log: list[tuple[float, str, Any]] = []
        self.errors: list[tuple[float, str, Exception]] = []
        self._strict = strict
        self._roundtrip = wire_roundtrip
        self._answers = answers
        self._slots: dict[str, _Slot] = {}
        self._by_address: dict[str, str] = {}
        self._queue: list[tuple] = []
        self._seq = 0
        self._group_of: dict[str, int] | None = None  # node id -> partition group
        self._observers: list[Callable[["Simulator", str, list], None]] = []
        self._trace = hashlib.sha256()

    # -- topology ---------------------------------------------------------
    def add(self, node_id: str, machine: Any, address: str | None = None,
            start_at: float | None = None) -> None:
        """Add a machine as node ``node_id``, reachable by ``seed_id(address)`` too;
        ``start(now)`` runs at ``start_at`` (default: now) when it has one."""
        if node_id in self._slots:
            raise ValueError(f"node {node_id!r} already in the simulation")
        address = address or node_id
        if address in self._by_address:
            raise ValueError(f"address {address!r} already in the simulation")
        slot = self._slots[node_id] = _Slot(node_id, address, machine)
        slot.effects = self._effects_table(node_id)
        self._by_address[address] = node_id
        self._boot(slot, start_at)

    def _boot(self, slot: _Slot, start_at: float | None) -> None:
        if hasattr(slot.machine, "start"):
            at = self.now if start_at is None else max(start_at, self.now)
            self._push(at, _START, slot.node_id, slot.incarnation)
        else:
            self._rearm(slot)

    def machine(self, node_id: str) -> Any:
        return self._slots[node_id].machine

    def address_of(self, node_id: str) -> str:
        return self._slots[node_id].address

    @property
    def node_ids(self) -> list[str]:
        return list(self._slots)

    def up_ids(self) -> list[str]:
        """Nodes not crashed (paused ones included: they are alive, only stopped)."""
        return [n for n, s in self._slots.items() if s.up]

    def is_up(self, node_id: str) -> bool:
        return self._slots[node_id].up

    def is_paused(self, node_id: str) -> bool:
        return self._slots[node_id].paused

    def crash(self, node_id: str) -> None:
        """Stop a node dead: it loses its state, gets no messages and no timers
        until ``restart``.  Messages in flight to it are lost when they arrive."""
        slot = self._slots[node_id]
        slot.up, slot.paused, slot.timer_at = False, False, None
        slot.backlog.clear()
        slot.incarnation += 1
        self._note("crash", node_id)

    def restart(self, node_id: str, machine: Any, start_at: float | None = None) -> None:
        """Put a fresh machine (e.g. a higher generation) at a crashed node's place."""
        slot = self._slots[node_id]
        if slot.up:
            raise SimulationError(f"{node_id} is up: crash it before restarting it")
        slot.machine, slot.up = machine, True
        self._note("restart", node_id)
        self._boot(slot, start_at)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the node keeps its state; its events wait until ``resume``."""
        slot = self._slots[node_id]
        if slot.up:
            slot.paused = True
            self._note("pause", node_id)

    def resume(self, node_id: str) -> None:
        """SIGCONT: every held event runs now, in the order it arrived."""
        slot = self._slots[node_id]
        if not (slot.up and slot.paused):
            return
        slot.paused = False
        self._note("resume", node_id)
        held, slot.backlog = slot.backlog, []
        for kind, payload in held:
            if kind != _TICK:  # timers are re-armed below, once
                self._push(self.now, kind, node_id, payload)
        slot.timer_at = None
        self._rearm(slot)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: messages flow only inside a group.  Nodes left out of
        every group form one more group together."""
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for node_id in group:
                if node_id in group_of:
                    raise ValueError(f"{node_id!r} is in two partition groups")
                group_of[node_id] = index
        self._group_of = group_of
        self._note("partition", repr([sorted(g) for g in groups]))

    def heal(self) -> None:
        self._group_of = None
        self._note("heal", "")

    def connected(self, a: str, b: str) -> bool:
        if self._group_of is None:
            return True
        return self._group_of.get(a, -1) == self._group_of.get(b, -1)

    def observe(self, callback: Callable[["Simulator", str, list], None]) -> None:
        """``callback(sim, node_id, effects)`` after every step that ran a machine:
        the place to check invariants."""
        self._observers.append(callback)

    # -- scripting ------------------------------------------------------------
    def at(self, when: float, action: Callable[["Simulator"], None]) -> None:
        """Run ``action(sim)`` at virtual time ``when`` (faults, client load)."""
        self._push(max(when, self.now), _ACTION, "", action)

    def inject(self, node_id: str, call: Callable[[Any, float], list],
               lost: Callable[[], None] | None = None) -> None:
        """Run ``call(machine, now) -> effects`` on the node as its next event (a
        client request arriving); ``lost()`` runs instead if the node is down."""
        self._push(self.now, _CALL, node_id, (call, lost))

    def run_effects(self, node_id: str, effects: list) -> None:
        """Carry out ``effects`` as if node ``node_id`` had returned them (the
        runtime's effect table), then run the observers."""
        self._slots[node_id].effects.run(effects)
        for callback in self._observers:
            callback(self, node_id, effects)

    def digest(self) -> str:
        """A hash of every event run so far: equal digests, equal runs."""
        return self._trace.hexdigest()

    # -- running ------------------------------------------------------------
    def pending(self) -> int:
        return len(self._queue)

    def next_event_at(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def step(self) -> bool:
        """Run the next event (advancing virtual time to it).  False when idle."""
        if not self._queue:
            return False
        at, seq, kind, node_id, payload = heapq.heappop(self._queue)
        self.now = max(self.now, at)
        self.stats.steps += 1
        if kind == _ACTION:
            self._trace.update(f"{at!r} a {seq}\n".encode())
            payload(self)
            return True
        slot = self._slots.get(node_id)
        effects = self._run_event(slot, kind, node_id, payload)
        if effects is None:
            return True
        self._trace.update(f"{self.now!r} {_KIND_NAMES[kind]} {node_id} {len(effects)}\n".encode())
        slot.effects.run(effects)
        self._rearm(slot)
        for callback in self._observers:
            callback(self, node_id, effects)
        return True

    def _run_event(self, slot: _Slot | None, kind: int, node_id: str, payload: Any) -> list | None:
        """The machine's effects for one event, or None when the event is void."""
        now = self.now
        if kind == _TICK:
            if slot is None or not slot.up or payload != (slot.incarnation, slot.timer_at):
                return None  # superseded by a later next_deadline, or a crash
            if slot.paused:
                self._hold(slot, kind, payload)
                return None
            slot.timer_at = None
            self.stats.ticks += 1
            effects = slot.machine.tick(now)
            deadline = slot.machine.next_deadline()
            if deadline is not None and deadline <= now and not effects:
                raise SimulationError(f"{node_id}: tick({now!r}) did nothing but "
                                      f"next_deadline() is still {deadline!r}")
            return effects
        if kind == _START:
            if slot is None or not slot.up or payload != slot.incarnation:
                return None
            if slot.paused:
                self._hold(slot, kind, payload)
                return None
            return slot.machine.start(now)
        if kind == _CALL:
            call, lost = payload
            if slot is None or not slot.up:
                if lost is not None:
                    lost()
                return None
            if slot.paused:
                self._hold(slot, kind, payload)
                return None
            return call(slot.machine, now)
        return self._deliver(slot, node_id, payload)

    def _deliver(self, slot: _Slot | None, node_id: str, payload: tuple) -> list | None:
        sender, frames, message = payload
        if slot is None or not slot.up:
            self.stats.undeliverable += 1
            return None
        if not self.connected(sender, node_id):
            self.stats.partitioned += 1
            return None
        if slot.paused:
            self._hold(slot, _MESSAGE, payload)
            return None
        self.stats.delivered += 1
        machine = slot.machine
        try:
            if hasattr(machine, "receive_frames"):  # a whole node: it decodes, as the runtime
                return machine.receive_frames(frames, self.now)
            if frames is not None:  # a bare machine: the sender comes from the frame
                event = peer.decode(frames)
                if type(event) is not peer.Gossiped:
                    raise SimulationError(f"{node_id} is a bare machine: it takes gossip, "
                                          f"not {type(event).__name__}")
                sender, message = event.sender, event.message
            return machine.receive(sender, message, self.now)
        except SimulationError:
            raise
        except Exception as exc:  # a remote protocol error: the runtime logs it
            self.stats.errors += 1
            self.errors.append((self.now, node_id, exc))
            if self._strict:
                raise
            return []

    def _hold(self, slot: _Slot, kind: int, payload: Any) -> None:
        self.stats.deferred += 1
        slot.backlog.append((kind, payload))

    def run_until(self, t: float, stop: Callable[["Simulator"], bool] | None = None,
                  max_steps: int | None = None) -> bool:
        """Run every event due at or before ``t``; the clock ends at ``t``.

        ``stop(sim)`` is checked after each step; returns True when it ended the
        run early.  ``max_steps`` bounds the work (ValueError when exceeded).
        """
        steps = 0
        queue = self._queue
        while queue and queue[0][0] <= t:
            if max_steps is not None and steps >= max_steps:
                raise ValueError(f"more than {max_steps} steps before t={t} (seed {self.seed})")
            self.step()
            steps += 1
            if stop is not None and stop(self):
                return True
        self.now = max(self.now, t)
        return False

    def run_for(self, duration_s: float, **kwargs: Any) -> bool:
        return self.run_until(self.now + duration_s, **kwargs)

    # -- effects ------------------------------------------------------------
    def _effects_table(self, node_id: str) -> Effects:
        """The one table through which this node's effects are carried out."""
        def send(effect: Send) -> None:
            self._send(node_id, effect)

        def members_changed(effect: MembersChanged) -> None:
            if self.record_changes:
                self.changes.append((self.now, node_id, effect))

        def log(effect: Any) -> None:
            self.effects_log.append((self.now, node_id, effect))

        handlers: dict[type, Callable[[Any], None]] = {
            Send: send, MembersChanged: members_changed, Refuted: log, QuorumChanged: log}
        if self._answers is not None:  # whole nodes: clients, and frames of their own
            answers = self._answers

            def answer(effect: Any) -> None:
                answers(node_id, effect)

            def send_frames(effect: SendFrames) -> None:
                self._transmit(node_id, effect.to, effect.frames, None)
            handlers[Answer] = handlers[Fail] = answer
            handlers[SendFrames] = send_frames
        return Effects(handlers)

    def _rearm(self, slot: _Slot) -> None:
        """Schedule the machine's tick at its ``next_deadline()`` (the contract)."""
        if not slot.up or slot.paused:
            return
        deadline = slot.machine.next_deadline()
        if deadline == slot.timer_at:
            return
        slot.timer_at = deadline
        if deadline is not None:
            self._push(max(deadline, self.now), _TICK, slot.node_id,
                       (slot.incarnation, deadline))

    def _push(self, at: float, kind: int, node_id: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, node_id, payload))

    def _note(self, what: str, detail: str) -> None:
        self._trace.update(f"{self.now!r} {what} {detail}\n".encode())

    def _send(self, sender: str, effect: Send) -> None:
        """A Send effect, framed by the peer codec as the node frames it (or, without
        the wire round trip, handed over as the object itself)."""
        if self._roundtrip:
            self._transmit(sender, effect.to, peer.encode(effect.channel, sender, effect.message),
                           None)
        elif effect.channel != GOSSIP:
            raise SimulationError(f"without the wire round trip only {GOSSIP!r} is carried, "
                                  f"not {effect.channel!r}")
        else:
            self._transmit(sender, effect.to, None, effect.message)

    def _transmit(self, sender: str, to: str, frames: list | None, message: Any) -> None:
        """Through the faulty network.  Frames are bytes: copies share nothing."""
        self.stats.sent += 1
        address = seed_address(to)
        if address is not None:  # a seed: whoever is at that address gets it
            to = self._by_address.get(address, to)
        rng, net = self.rng, self.net
        if net.drop_rate and rng.random() < net.drop_rate:
            self.stats.dropped += 1
            return
        copies = 1
        if net.dup_rate and rng.random() < net.dup_rate:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            delay = rng.uniform(net.delay_min_s, net.delay_max_s)
            self._push(self.now + delay, _MESSAGE, to, (sender, frames, message))


# ============================================================== whole nodes

class CounterHost:
    """A pure agent host with synchronous handlers: counter agents.

    ``counter/<anything>`` is activated on its first message (the node's virtual
    activation); ``incr`` adds ``data`` (an int) and returns the new value, ``get``
    returns the value.  A counter is a PN-Counter field ``n`` in the agent's fields,
    which come from ``state_for(agent_id)`` as the node's ``AgentHost`` gets them: the
    replication machine's record when the node replicates, else the host's own dict.
    ``take_out`` and ``install``/``merge_moved`` move an agent's fields between
    nodes (the handoff), through ``adopt(agent_id, wire_fields)``.  ``version`` grows
    with every activation or removal, so an observer can tell cheaply whether the
    active set changed.
    """

    PREFIX = "counter/"
    BEHAVIOR = "counter"
    FIELD = "n"

    def __init__(self, replica: int, clock: Callable[[], int],
                 state_for: Callable[[str], dict] | None = None,
                 adopt: Callable[[str, Any], None] | None = None) -> None:
        self.active: dict[str, dict] = {}  # agent id -> its fields (the directory)
        self.version = 0
        self.handled = 0
        self.replica = replica
        self.clock = clock
        self._kept: dict[str, dict] = {}  # without replication: the fields live here
        self._state_for = state_for or (lambda agent_id: self._kept.setdefault(agent_id, {}))
        self._adopt = adopt or self._adopt_kept

    def value(self, agent_id: str) -> int | None:
        """The counter's value here, or None if the agent is not active here."""
        fields = self.active.get(agent_id)
        if fields is None:
            return None
        counter = fields.get(self.FIELD)
        return counter.value() if counter is not None else 0

    def handle(self, agent_id: str, mtype: str, data: Any) -> tuple[bool, Any, str]:
        """(ok, value, error message): value is the result, or an ErrorCode."""
        if not agent_id.startswith(self.PREFIX):
            return False, ErrorCode.UNKNOWN_AGENT, f"no agent {agent_id!r}"
        if mtype not in ("incr", "get"):
            return False, ErrorCode.UNKNOWN_TYPE, f"counters take incr and get, not {mtype!r}"
        if mtype == "incr" and type(data) is not int:
            return False, ErrorCode.BAD_REQUEST, "incr takes an integer"
        fields = self.active.get(agent_id)
        if fields is None:
            fields = self.activate(agent_id)
        self.handled += 1
        if mtype == "incr" and data:
            counter = fields.get(self.FIELD)
            if counter is None:
                counter = fields[self.FIELD] = PNCounter().bind(self.replica, self.clock)
            if data > 0:
                counter.increment(data)
            else:
                counter.decrement(-data)
        return True, self.value(agent_id), ""

    @classmethod
    def resolves(cls, agent_id: str) -> bool:
        """True if a message to ``agent_id`` activates an agent (the node's host
        resolving a behavior by the id's prefix)."""
        return agent_id.startswith(cls.PREFIX)

    def activate(self, agent_id: str) -> dict:
        fields = self.active[agent_id] = self._state_for(agent_id)
        self.version += 1
        return fields

    def take_out(self, agent_id: str) -> bytes | None:
        """The agent's fields (packed wire form, as the node's host snapshots them),
        gone from here; None if it is not here."""
        fields = self.active.pop(agent_id, None)
        if fields is None:
            return None
        self._kept.pop(agent_id, None)
        self.version += 1
        return msgpack.packb(encode_fields(fields), use_bin_type=True)

    def install(self, agent_id: str, state: bytes | None) -> None:
        """Activate a moved agent with its fields (the node's ``AgentHost.install``)."""
        if agent_id in self.active:
            return
        if state:
            self._adopt(agent_id, msgpack.unpackb(state, raw=False))
        self.activate(agent_id)

    def merge_moved(self, agent_id: str, state: bytes | None) -> bool:
        """A moved state for an agent already active here: join its fields in."""
        if agent_id not in self.active or not state:
            return False
        self._adopt(agent_id, msgpack.unpackb(state, raw=False))
        return True

    def _adopt_kept(self, agent_id: str, wire_fields: Any) -> None:
        fields = self._kept.setdefault(agent_id, {})
        merge_fields(fields, decode_fields(wire_fields))
        bind_fields(fields, self.replica, self.clock)


class _HeldReply:
    """A turn's reply waiting for its write's consistency (``WriteDone``)."""

    __slots__ = ("req", "reply_to", "value")

    def __init__(self, req: wire.Request, reply_to: tuple, value: Any):
        self.req, self.reply_to, self.value = req, reply_to, value


class SimNode:
    """One whole node: Membership + Router + Handoff + Replication + StatusCollector +
    Strategies + CounterHost, wired as the node's runtime (and ``node/state.py``)
    wires them, behind the machine contract.

    Replication (``replicas`` > 1) as ``node/state.py`` drives it: an agent's fields
    are its record's (``Replication.primary``); after each turn the deltas
    go to ``wrote`` with the request's consistency (default ``consistency``) and
    the reply waits for ``WriteDone`` (``timeout`` when it fails); a miss waits for
    a gather (``Restore``); ``Activate`` wakes failed-over agents; ring changes call
    ``ring_changed(previous_ring(...), ring)``, member changes ``members_changed``;
    an agent handed off is ``released``, one arriving is adopted, or merged into
    the live one on a handoff conflict.  REPLICATE messages are peer frames too.

    Peer traffic is peer frames (``protocols/peer.py``), requests and replies are
    wire envelopes (``protocols/wire.py``): the same codecs as the node.  The
    machines' effects run through the node's own ``Effects`` table, as in
    ``node/runtime.py``: ``MembersChanged`` rebuilds the router's ring from the
    membership's ring, tells the handoff machine, and hands every agent another node
    owns now to that node with its value (``_move_out``); ``QuorumChanged`` gates
    the router; ``Surrender``/``Install`` move agents; ``Answer``/``Fail`` are
    replies to a ``reply_to`` (``_reply``); ``Send`` and ``Refuted`` go out.

    Routing follows the runtime (``_dispatch``, ``_dispatch_routed``, ``_owner_of``,
    ``_forward``, ``_send_reply``, ``_on_reply``, ``_handle_local`` with its handoff
    hold and its pipeline stage wrap).  A ``reply_to`` is the runtime's
    ``(caller, origin, token, traceparent, arrived)``: origin None for this node's
    client (caller: the client's handle), a node id for a call forwarded here, or
    ``STRATEGY`` for a piece of a scatter or pipeline (caller: the slot of
    ``protocols/strategies.py`` its answer goes to); None for a one-way message.
    Scatter-gather and pipelines run ``Strategies`` as the runtime does: its
    ``Route``/``ForwardTo``/``Relay`` effects, its timer and its ``stop``.
    ``syn.status`` runs a StatusCollector collection.  Frames and answers that break
    a protocol are counted in ``remote_errors`` by reason, never raised.
    """

    def __init__(self, me: Member, seeds: Iterable[str], *, key: bytes,
                 rng: random.Random, swim: SwimConfig | None = None, max_hops: int = 2,
                 forward_timeout_s: float = 2.0, status_timeout_s: float = 1.0,
                 handoff_timeout_s: float = 1.0, handoff_window_s: float = 5.0,
                 wall_offset_ns: int = 0, handoff: bool = True, replicas: int = 3,
                 consistency: str = QUORUM, write_timeout_s: float = 2.0,
                 failover_rate: float = 1000.0, fold_ttl_s: float = 600.0):
        if consistency not in CONSISTENCIES:
            raise ValueError(f"consistency is one of {sorted(CONSISTENCIES)}")
        self.node_id = me.node_id
        self._now = 0.0
        self._wall_offset_ns = wall_offset_ns
        self.membership = Membership(me, seeds, swim, rng=rng, wall_offset_ns=wall_offset_ns)
        self.router = Router(me.node_id, key, max_hops=max_hops,
                             forward_timeout_s=forward_timeout_s)
        self.handoff = Handoff(me.node_id, timeout_s=handoff_timeout_s,
                               window_s=handoff_window_s, seq_start=me.generation)
        self.status = StatusCollector(me.node_id, status_timeout_s)
        # As the runtime: a scatter or pipeline without timeout_ms has a forward's.
        self.strategies = Strategies(me.node_id, default_timeout_s=forward_timeout_s,
                                     reply_bytes_max=MESSAGE_BYTES_MAX)
        # Replicated state, as node/state.py: the replica id and the epochs come from
        # the node's generation; replicas 0 or 1 turn replication off.
        self.replica = me.replica or replica_id(f"{me.node_id}/{me.generation}")
        self.consistency = consistency
        self.replication: Replication | None = None
        if replicas > 1:
            self.replication = Replication(
                me.node_id, self.replica, self.clock, n=replicas,
                write_timeout_s=write_timeout_s, gather_timeout_s=handoff_timeout_s,
                failover_rate=failover_rate, epoch_start=me.generation,
                fold_ttl_ns=int(fold_ttl_s * 1e9))
            self.host = CounterHost(self.replica, self.clock, self._state_for, self._adopt)
        else:
            self.host = CounterHost(self.replica, self.clock)
        self.view: frozenset[str] = frozenset((me.node_id,))  # the ring: who owns agents
        self.left = False
        self.hands_off = handoff  # False: agents stay where they are (a test's bug)
        self.late_replies = 0
        self.unresponsive: dict[str, int] = {}   # owner -> forwards it let time out
        self.remote_errors: dict[str, int] = {}
        self._addresses: dict[str, str] = {me.node_id: me.address}
        self._moved_to: dict[str, str] = {}  # agent handed away -> where (runtime: same)
        self._serving = not tuple(seeds)     # owned agents under the ring we hold
        self._stopping = False
        self.handoff_conflicts = 0           # moved states merged into an active agent
        self._out: list = []
        out = self._out.append
        self._effects = Effects({Send: out, Refuted: out,
                                 Answer: self._do_answer, Fail: self._do_fail,
                                 Relay: self._do_relay, Route: self._do_route,
                                 ForwardTo: self._do_forward_to,
                                 MembersChanged: self._on_members,
                                 QuorumChanged: self._on_quorum,
                                 Surrender: self._on_surrender, Install: self._on_install,
                                 Unresponsive: self._on_unresponsive,
                                 WriteDone: self._on_write_done, Restore: self._on_restore,
                                 Activate: self._on_activate})

    def clock(self) -> int:
        """The node's wall clock in ns (CRDT stamps): virtual time."""
        return int(self._now * 1e9) + self._wall_offset_ns + 1

    # -- the machine contract ----------------------------------------------------
    def start(self, now: float) -> list:
        self._now = now
        return self._run(self.membership.start(now))

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.membership.next_deadline(), self.router.next_deadline(),
                                 self.status.next_deadline(), self.handoff.next_deadline(),
                                 self.strategies.next_deadline(),
                                 self.replication and self.replication.next_deadline())
                     if d is not None]
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> list:
        self._now = now
        self._effects.run(self.membership.tick(now))
        self._effects.run(self.router.tick(now))
        self._effects.run(self.handoff.tick(now))
        self._effects.run(self.strategies.tick(now))
        self._tick_replication(now)
        return self._run(self.status.tick(now))

    REPLICATION_TICKS_MAX = 8  # ticks at one instant (the runtime's timer firing again)

    def _tick_replication(self, now: float) -> None:
        """Carrying a tick's effects out can make work due at once (an agent woken by
        Activate repairs its replicas): the runtime's timer fires again right away."""
        machine = self.replication
        for _ in range(self.REPLICATION_TICKS_MAX if machine is not None else 0):
            deadline = machine.next_deadline()
            if deadline is None or deadline > now:
                return
            self._effects.run(machine.tick(now))

    def receive_frames(self, frames: list, now: float) -> list:
        """Peer frames from the network (the runtime's ``peer``)."""
        self._now = now
        try:
            event = peer.decode(frames)
        except peer.PeerProtocolError as exc:
            return self._remote_error(f"peer_{exc.reason}")
        kind = type(event)
        if kind is peer.Forwarded:
            self._accept(event.envelope, None, event.origin, event.token, event.hops, now)
        elif kind is peer.Replied:
            self._on_reply(event.token, event.envelope)
        elif kind is peer.Gossiped:
            try:
                self._effects.run(self.membership.receive(event.sender, event.message, now))
            except MembershipError:
                return self._remote_error("bad_gossip")
        elif kind is peer.HandedOff:
            try:
                self._effects.run(self.handoff.receive(event.sender, event.message, now))
            except HandoffError:
                return self._remote_error("bad_handoff")
        elif kind is peer.Replicated:
            if self.replication is None:
                return self._remote_error("replicate_off")
            try:
                self._effects.run(self.replication.receive(event.sender, event.message, now))
            except ReplicationError as exc:
                return self._remote_error(f"replicate_{exc.reason}")
        elif kind is peer.StatusQueried:
            if event.sender not in self.view:
                return self._remote_error("status_query_from_stranger")
            self._out.append(Send(event.sender, STATUS_ANSWER,
                                  {"token": event.token, "status": self.local_status()}))
        else:
            try:
                self._effects.run(self.status.receive(event.sender, event.message, now))
            except StatusError:
                return self._remote_error("bad_status_answer")
        return self._take()

    def stop(self, now: float) -> list:
        """The end of a graceful stop: every forward, scatter, pipeline, held write,
        held request and status collection in flight is answered."""
        self._now = now
        self._stopping = True
        self._effects.run(self.router.stop())
        self._effects.run(self.strategies.stop())
        for req, _, reply_to, _ in self.handoff.stop():
            self._refuse_stopping(req, reply_to)
        if self.replication is not None:
            self._effects.run(self.replication.stop())
        return self._run(self.status.stop())

    def _refuse_stopping(self, req: wire.Request, reply_to: tuple) -> None:
        self._reply(reply_to, req.id, False, ErrorCode.UNAVAILABLE, "node is shutting down",
                    req.type)

    @property
    def handing_off(self) -> bool:
        """State still on its way to other nodes (the runtime's ``_handing_off``)."""
        return bool(self.handoff.kept_now or (self.replication and self.replication.lagging))

    def leave(self, now: float) -> list:
        """A graceful leave: the members hear it and the agents go to their owners."""
        self._now = now
        self.left = True
        return self._run(self.membership.leave(now))

    # -- client calls --------------------------------------------------------------
    def call(self, handle: Any, envelope: bytes, now: float) -> list:
        """A client's request envelope entering here (the runtime's ``client``)."""
        self._now = now
        self._accept(envelope, handle, None, None, 0, now)
        return self._take()

    def local_status(self) -> dict:
        return {"node": self.node_id, "address": self._addresses[self.node_id],
                "members": len(self.view), "agents": len(self.host.active),
                "forwards_in_flight": self.router.in_flight, "reachable": True}

    # -- routing -----------------------------------------------------------------
    def _accept(self, envelope: bytes, handle: Any, origin: str | None, token: bytes | None,
                hops: int, now: float) -> None:
        """A request from this node's client (origin None) or forwarded by a peer."""
        try:
            req = wire.parse_request(envelope, MESSAGE_BYTES_MAX)
        except WireError as exc:
            if not exc.one_way:  # readably send/publish: never answered
                self._reply((handle, origin, token, exc.traceparent, now),
                            exc.request_id or "", False, exc.code, exc.message, "")
            return
        # A forwarded call without a token has nobody to answer: one-way, like a send.
        reply_to = (None if req.mode != wire.MODE_CALL or (origin is not None and token is None)
                    else (handle, origin, token, req.raw.get("traceparent"), now))
        self._dispatch(req, envelope, reply_to, hops, now)

    def _dispatch(self, req: wire.Request, envelope: bytes, reply_to: tuple | None, hops: int,
                  now: float, hold: bool = True) -> None:
        if req.type == wire.TYPE_STATUS:
            self._node_request(req, reply_to, now)
        elif req.routing is not None:
            self._dispatch_routed(req, envelope, reply_to, hops, now, hold)
        else:
            self._route_direct(req, envelope, reply_to, hops, now, hold)

    def _route_direct(self, req: wire.Request, envelope: bytes, reply_to: tuple | None,
                      hops: int, now: float, hold: bool) -> None:
        """One agent, through its owner: handled here, forwarded, or refused."""
        target = self._owner_of(req.subject, req.ttl, hops)
        if target == self.node_id:
            self._handle_local(req, envelope, reply_to, hops, now, hold)
        elif type(target) is Refusal:
            self._refuse_request(req, reply_to, target.code, target.message, now)
        else:
            self._forward(target, req, envelope, reply_to, hops, now)

    def _refuse_request(self, req: wire.Request, reply_to: tuple | None, code: str,
                        message: str, now: float) -> None:
        """As the runtime: an error before any handler ran; a pipeline stage's names
        its stage and agent."""
        if req.routing == wire.ROUTING_PIPELINE and reply_to is not None:
            reply_to = self.strategies.stage(req, reply_to, now)
        self._reply(reply_to, req.id, False, code, message, req.type)

    def _dispatch_routed(self, req: wire.RoutedRequest, envelope: bytes, reply_to: tuple | None,
                         hops: int, now: float, hold: bool) -> None:
        """Scatter and pipeline (protocols/strategies.py)."""
        if req.routing == wire.ROUTING_SCATTER:
            owners = {agent: self._owner_of(agent, req.ttl, hops) for agent in req.targets}
            self._effects.run(self.strategies.scatter(req, reply_to, owners, hops, now))
            return
        if reply_to is not None and reply_to[1] is None:  # our own client's pipeline
            entry = self.strategies.pipeline_entry(req, reply_to, now)
            if type(entry) is Fail:
                self._do_fail(entry)
                return
            reply_to = entry
        self._route_direct(req, envelope, reply_to, hops, now, hold)

    def _owner_of(self, agent_id: str, ttl: int | None, hops: int) -> str | Refusal:
        target = self.router.route(agent_id, ttl, hops)
        if target == self.node_id and self._moved_to:
            target = self._after_move(agent_id, ttl, hops)
        return target

    def _after_move(self, agent_id: str, ttl: int | None, hops: int) -> str | Refusal:
        """We own it by our ring, but handed it to a node whose ring is ahead of
        ours: the request follows the agent (as a forward, within the hop limit)."""
        moved = self._moved_to.get(agent_id)
        if moved is None or agent_id in self.host.active:
            return self.node_id
        return self.router.follow(agent_id, moved, ttl, hops)

    def _do_route(self, effect: Route) -> None:
        self._dispatch(effect.request, effect.payload, effect.reply_to, effect.hops, self._now)

    def _do_forward_to(self, effect: ForwardTo) -> None:
        self._forward(effect.owner, effect.request, effect.payload, effect.reply_to,
                      effect.hops, self._now)

    def _do_relay(self, effect: Relay) -> None:
        self._send_reply(effect.reply_to, effect.payload)

    def _strategy_answer(self, slot: Any, payload: bytes) -> None:
        """A piece of a scatter or pipeline was answered (protocols/strategies.py)."""
        self._effects.run(self.strategies.answered(slot, payload, self._now))

    def _node_request(self, req: wire.Request, reply_to: tuple | None, now: float) -> None:
        """``syn.status``: a StatusCollector collection over the ring."""
        if reply_to is not None:
            members = {n: self._addresses.get(n, "") for n in sorted(self.view | {self.node_id})}
            self._effects.run(self.status.start(reply_to, req.id, self.local_status(),
                                                members, now))

    def _handle_local(self, req: wire.Request, envelope: bytes, reply_to: tuple | None,
                      hops: int, now: float, hold: bool = True) -> None:
        """As the runtime: on a miss the request waits for the agent's state, from its
        previous owner (``hold``) or gathered from its replicas; a pipeline's stage
        has its answer move the pipeline on."""
        if req.subject not in self.host.active:
            item = (req, envelope, reply_to, hops)
            if hold and self.handoff.expecting(req.subject, now) is not None:
                self._held_or_refused(self.handoff.hold(req.subject, item, req.nbytes, now),
                                      req, reply_to)
                return
            machine = self.replication
            if machine is not None and machine.needs_gather(req.subject):
                self._held_or_refused(machine.gather(req.subject, item, req.nbytes, now),
                                      req, reply_to)
                return
            if not self.host.resolves(req.subject):  # the runtime: no behavior by that name
                self._refuse_request(req, reply_to, ErrorCode.UNKNOWN_AGENT,
                                     f"no agent {req.subject!r}", now)
                return
        if req.routing == wire.ROUTING_PIPELINE:  # its answer moves the pipeline on
            reply_to = self.strategies.stage(req, reply_to, now)
        ok, value, message = self.host.handle(req.subject, req.type, req.data)
        if ok and self.replication is not None:
            self._turn_done(req, reply_to, value)
        else:
            self._reply(reply_to, req.id, ok, value, message, req.type)

    def _held_or_refused(self, held: list | Refusal, req: wire.Request,
                         reply_to: tuple | None) -> None:
        if type(held) is Refusal:
            self._reply(reply_to, req.id, False, held.code, held.message, req.type)
        else:
            self._effects.run(held)

    def _turn_done(self, req: wire.Request, reply_to: tuple | None, value: Any) -> None:
        """After a turn (node/state.py ``turn_done``): ship its deltas; the reply waits
        until the request's consistency is met (``WriteDone``)."""
        machine = self.replication
        agent_id = req.subject
        deltas = take_deltas(machine.primary(agent_id, CounterHost.BEHAVIOR, self._now).fields)
        if not deltas:
            self._reply(reply_to, req.id, True, value, "", req.type)
            return
        held = _HeldReply(req, reply_to, value)
        self._effects.run(machine.wrote(agent_id, deltas, req.consistency or self.consistency,
                                        held, self._now))

    def _forward(self, owner: str, req: wire.Request, envelope: bytes, reply_to: tuple | None,
                 hops: int, now: float) -> None:
        """One hop on.  Our own client's call, and a piece of a scatter or pipeline, is
        recorded in the router (answered exactly once, whatever happens); a call
        forwarded to us keeps its origin and token, so the owner replies to the entry
        node directly."""
        if reply_to is None:  # one-way: nothing to answer
            frames = peer.forward(self.node_id, self.node_id, hops + 1, b"", envelope)
        elif reply_to[1] is None or reply_to[1] is STRATEGY:  # answered through us
            token = self.router.forward_started(reply_to, req.id, req.type, owner, now,
                                                reply_to[4], req.nbytes,
                                                self._piece_timeout(reply_to, now))
            if type(token) is Refusal:
                self._reply(reply_to, req.id, False, token.code, token.message, req.type)
                return
            frames = peer.forward(self.node_id, self.node_id, hops + 1, token, envelope)
        else:
            frames = peer.forward(self.node_id, reply_to[1], hops + 1, reply_to[2], envelope)
        self._out.append(SendFrames(owner, frames))

    @staticmethod
    def _piece_timeout(reply_to: tuple, now: float) -> float | None:
        """As the runtime: a piece of a scatter or pipeline may take until its whole
        request's deadline."""
        if reply_to[1] is not STRATEGY:
            return None
        deadline = Strategies.deadline_of(reply_to[0])
        return None if deadline is None else deadline - now

    # -- replies (the runtime's _reply_data/_reply_error, _send_reply, _on_reply) --------
    def _do_answer(self, effect: Answer) -> None:
        self._reply(effect.handle, effect.request_id, True, effect.data, "", "")

    def _do_fail(self, effect: Fail) -> None:
        self._reply(effect.handle, effect.request_id, False, effect.code, effect.message,
                    effect.mtype)

    def _reply(self, reply_to: tuple | None, request_id: str, ok: bool, value: Any,
               message: str, mtype: str) -> None:
        """The one place results leave: ``value`` is the result, or the ErrorCode.
        This node's client gets an ``Answer`` or ``Fail`` effect (the simulated
        client reads effects, not envelopes); anyone else an envelope."""
        if reply_to is None:
            return  # a one-way message
        if reply_to[1] is None:  # our client, directly
            handle = reply_to[0]
            self._out.append(Answer(handle, request_id, value) if ok else
                             Fail(handle, request_id, value, message, mtype))
            return
        traceparent = reply_to[3]
        self._send_reply(reply_to, wire.reply(request_id, value, self.node_id, traceparent)
                         if ok else wire.error(request_id, value, message, self.node_id,
                                               traceparent))

    def _send_reply(self, reply_to: tuple, payload: bytes) -> None:
        """Send one reply envelope to its caller."""
        caller, origin, token, _, _ = reply_to
        if origin is None:  # our own client
            self._to_client(caller, payload, "")
        elif origin is STRATEGY:  # a piece of a scatter or pipeline, answered
            self._strategy_answer(caller, payload)
        elif token is None:
            return  # a forwarded one-way message: nobody to answer
        elif origin == self.node_id:  # our own forward came back round to us
            self._on_reply(token, payload)
        else:
            self._out.append(SendFrames(origin, peer.reply(self.node_id, token, payload)))

    def _on_reply(self, token: bytes, envelope: bytes) -> None:
        pending = self.router.reply_arrived(token)
        if pending is None:
            self.late_replies += 1  # a duplicate, or after its timeout: answered already
            return
        if pending.handle[1] is STRATEGY:  # a piece of a scatter or pipeline
            self._strategy_answer(pending.handle[0], envelope)
            return
        self._to_client(pending.handle[0], envelope, pending.mtype)

    def _to_client(self, handle: Any, envelope: bytes, mtype: str) -> None:
        """The runtime passes the envelope to its client untouched; the simulated
        client reads it as an ``Answer`` or ``Fail`` effect."""
        reply = wire.decode_map(envelope, MESSAGE_BYTES_MAX)
        request_id = reply.get("re") or ""
        if reply.get("type") == wire.TYPE_ERROR:
            error = reply["data"]
            self._out.append(Fail(handle, request_id, error["code"], error["message"], mtype))
        else:
            self._out.append(Answer(handle, request_id, reply.get("data")))

    # -- effects -------------------------------------------------------------------
    def _on_members(self, effect: MembersChanged) -> None:
        members = effect.members
        self._addresses = {n: m.address for n, m in members.items()}
        reachable = sorted(n for n, m in members.items()
                           if m.state in (ALIVE, SUSPECT, LEFT))
        self._effects.run(self.handoff.members_changed(reachable))
        machine = self.replication
        if machine is not None:  # a member whose generation changed gets its copies again
            live = {n: m.generation for n, m in members.items() if m.state in (ALIVE, SUSPECT)}
            self._effects.run(machine.members_changed(live, self._now, live))
            machine.live_replicas = advertised_replicas(members)
        gone = set(self._moved_to.values()) - set(reachable)
        if gone:
            self._moved_to = {a: n for a, n in self._moved_to.items() if n not in gone}
        ring = effect.ring_ids
        if ring != frozenset(self.router.ring.nodes):
            previous = previous_ring(self.router.ring, ring, self.node_id, self._serving)
            self._effects.run(self.router.members_changed(sorted(ring), reachable))
            self._effects.run(self.handoff.ring_changed(previous.owner, self._now,
                                                        self.router.ring.owner))
            if machine is not None:
                self._effects.run(machine.ring_changed(previous, self.router.ring, self._now))
            self._move_out(sorted(self.host.active))
        self.view = ring
        self._serving = self.router.quorate
        self._out.append(effect)

    def _move_out(self, agent_ids: list) -> None:
        """As the runtime: agents another node owns now go there with their value
        (counter handlers are synchronous: never busy)."""
        owner_of, me = self.router.ring.owner, self.node_id
        if not self.hands_off:
            return
        for agent_id in agent_ids:
            owner = owner_of(agent_id)
            if owner != me:
                self._hand_to(agent_id, owner)

    def _hand_to(self, agent_id: str, owner: str) -> None:
        state = self.host.take_out(agent_id)
        if state is None:
            self._effects.run(self.handoff.none(agent_id, owner))
            return
        self._moved_to[agent_id] = owner
        self._effects.run(self.handoff.send_state(agent_id, owner, CounterHost.BEHAVIOR, state,
                                                  (), self._now))
        if self.replication is not None:
            self._effects.run(self.replication.released(agent_id, self._now))

    def _on_quorum(self, effect: QuorumChanged) -> None:
        self.router.set_quorate(effect.quorate, effect.reachable, effect.reference)
        self._out.append(effect)

    def _on_surrender(self, effect: Surrender) -> None:
        self._hand_to(effect.agent_id, effect.to)

    def _on_install(self, effect: Install) -> None:
        self._moved_to.pop(effect.agent_id, None)
        if effect.behavior is not None:
            if effect.agent_id in self.host.active:  # activated before its state came
                self.handoff_conflicts += 1
                self.host.merge_moved(effect.agent_id, effect.state)
            else:
                self.host.install(effect.agent_id, effect.state)
        for req, envelope, reply_to, hops in effect.held:  # routed again: owners move
            self._dispatch(req, envelope, reply_to, hops, self._now, hold=False)
        owner = self.router.ring.owner(effect.agent_id)
        if effect.agent_id in self.host.active and owner != self.node_id:
            self._hand_to(effect.agent_id, owner)  # given back, or moved on: pass it on

    # -- replicated state (node/state.py) -------------------------------------------
    def _state_for(self, agent_id: str) -> dict:
        """The fields an agent activated here runs on: its record's."""
        return self.replication.primary(agent_id, CounterHost.BEHAVIOR, self._now).fields

    def _adopt(self, agent_id: str, wire_fields: Any) -> None:
        """A handoff brought the fields from the previous owner."""
        self.replication.adopt(agent_id, CounterHost.BEHAVIOR, wire_fields, self._now)

    def _on_write_done(self, effect: WriteDone) -> None:
        held = effect.handle
        req = held.req
        if effect.ok:
            self._reply(held.reply_to, req.id, True, held.value, "", req.type)
        else:
            self._reply(held.reply_to, req.id, False, ErrorCode.TIMEOUT,
                        f"write applied on the owner and {effect.acks} replica(s); "
                        f"it needed {effect.needed}: it may or may not last", req.type)

    def _on_restore(self, effect: Restore) -> None:
        """The copies are in: activate the agent from its record, then route what waited."""
        if effect.behavior is not None:
            self._wake(effect.agent_id, effect.behavior)
        else:
            self.replication.settled(effect.agent_id)
        for req, envelope, reply_to, hops in effect.held:
            if self._stopping:
                self._refuse_stopping(req, reply_to)
            else:
                self._dispatch(req, envelope, reply_to, hops, self._now, hold=False)

    def _on_activate(self, effect: Activate) -> None:
        """Failover: we own an agent we hold a copy of; wake it (paced)."""
        agent_id, machine = effect.agent_id, self.replication
        if agent_id in self.host.active or self.router.ring.owner(agent_id) != self.node_id:
            return
        if machine.needs_gather(agent_id):
            self._effects.run(machine.gather(agent_id, None, 0, self._now))
            return
        rec = machine.records.get(agent_id)
        if rec is not None:
            self._wake(agent_id, rec.behavior)

    def _wake(self, agent_id: str, behavior: str) -> None:
        if agent_id in self.host.active or self.router.ring.owner(agent_id) != self.node_id:
            return
        if behavior != CounterHost.BEHAVIOR:
            self.remote_errors["replica_behavior_unknown"] = \
                self.remote_errors.get("replica_behavior_unknown", 0) + 1
            return
        self.host.activate(agent_id)

    def _remote_error(self, reason: str) -> list:
        self.remote_errors[reason] = self.remote_errors.get(reason, 0) + 1
        return self._take()

    def _on_unresponsive(self, effect: Unresponsive) -> None:
        # The simulated network keeps no per-peer queue to drop: count it only.
        self.unresponsive[effect.node_id] = self.unresponsive.get(effect.node_id, 0) + 1

    def _run(self, effects: list) -> list:
        self._effects.run(effects)
        return self._take()

    def _take(self) -> list:
        out = self._out[:]
        self._out.clear()
        return out


class InvariantViolation(AssertionError):
    """An invariant broke; the message carries the seed and the replay command."""


@dataclass
class Scenario:
    """Everything a whole-node run depends on: the same scenario, the same run."""

    seed: int
    nodes: int = 5
    duration_s: float = 20.0      # clients call until then; then heal, resume, drain
    calls_per_s: float = 50.0
    counters: int = 20
    drop_rate: float = 0.0
    dup_rate: float = 0.0
    delay_min_s: float = 0.001
    delay_max_s: float = 0.010
    partitions: int = 0           # partition-then-heal episodes
    crashes: int = 0              # crash-then-restart episodes
    pauses: int = 0               # pause-then-resume episodes
    stops: int = 0                # graceful leave (handoff), stop, restart episodes
    warmup_s: float = 3.0         # clients start then
    probe_interval_s: float = 0.5
    sync_interval_s: float = 1.0
    downing: str = "keep-majority"
    quorum_size: int = 0
    max_hops: int = 2
    forward_timeout_s: float = 2.0
    handoff: bool = True          # agents move with their state when owners change
    replicas: int = 3             # copies of each agent's state; 0 or 1: no replication
    consistency: str = QUORUM     # of the clients' incrs: local, quorum or all
    fast_restarts: bool = False   # replicated: a crashed node may restart before it is downed
    exact: bool = False           # check counter values (needs a fault-free run)
    steps_max: int = 0            # 0: no bound
    pipelines_per_s: float = 0.0  # client pipelines (routing "pipeline"), besides calls_per_s
    scatters_per_s: float = 0.0   # client scatter-gathers (routing "scatter")
    stages: int = 3               # stages of each pipeline
    targets: int = 24             # agents of each scatter
    routed_timeout_ms: int = 0    # their timeout_ms; 0: none (the node's default)

    def network(self) -> NetworkConfig:
        return NetworkConfig(self.drop_rate, self.dup_rate, self.delay_min_s, self.delay_max_s)

    def command(self) -> str:
        """The one command that replays this run."""
        default = Scenario(seed=self.seed)
        args = [f"--seed {self.seed}"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            else:
                args.append(f"{flag} {value!r}")
        return "python -m protocols.sim " + " ".join(args)


STRONG = frozenset((QUORUM, ALL))  # consistencies whose acknowledged writes outlive a crash


class _Call:
    __slots__ = ("entry", "mtype", "subject", "n", "issued_at", "answer", "lost",
                 "acked_before", "consistency", "routing", "targets", "deadline",
                 "answered_at")

    def __init__(self, entry: str, mtype: str, subject: str, n: int, issued_at: float,
                 consistency: str | None = None, routing: str | None = None,
                 targets: tuple = (), deadline: float | None = None):
        self.entry, self.mtype, self.subject, self.n = entry, mtype, subject, n
        self.issued_at = issued_at
        self.consistency = consistency  # what the request named (None: the node's default)
        self.routing = routing          # None (direct), "pipeline" or "scatter"
        self.targets = targets          # a scatter's agents, in order
        self.deadline = deadline        # a pipeline's or scatter's: answered by then
        self.answer: Any = None      # ("data", value) or ("error", code, message)
        self.answered_at: float | None = None
        self.lost = False            # its entry node crashed before answering
        self.acked_before = 0        # exact mode: acknowledged incr sum when issued


@dataclass
class Result:
    scenario: Scenario
    calls: int
    answered: int
    errors: dict
    lost_with_entry: int
    late_replies: int
    sim_time_s: float
    stats: SimStats
    digest: str
    counters_checked: bool  # (d) held for the whole run
    remote_errors: dict     # frames and answers nodes refused, by reason
    losses_skipped: int = 0  # crashes/stops that found no moment with replicas whole

    def summary(self) -> str:
        return (f"seed={self.scenario.seed} nodes={self.scenario.nodes} "
                f"sim_time_s={self.sim_time_s:.1f} steps={self.stats.steps} "
                f"calls={self.calls} answered={self.answered} errors={self.errors} "
                f"lost_with_entry={self.lost_with_entry} late_replies={self.late_replies} "
                f"sent={self.stats.sent} dropped={self.stats.dropped} "
                f"duplicated={self.stats.duplicated} partitioned={self.stats.partitioned} "
                f"undeliverable={self.stats.undeliverable} deferred={self.stats.deferred} "
                f"counters_checked={self.counters_checked} "
                f"losses_skipped={self.losses_skipped} "
                f"remote_errors={self.remote_errors} digest={self.digest[:16]}")


def node_id(k: int) -> str:
    return f"n{k:03d}"


def node_address(k: int) -> str:
    return f"tcp://10.0.{k // 256}.{k % 256}:7400"


class NodeSim:
    """Whole nodes under simulated clients, invariants checked after every step:

    (a) every call is answered exactly once, by the node it entered (an answer to
        an unknown or already answered call is a violation; after the end phase,
        with the network healed and time past every deadline, no call is left
        unanswered, except those whose entry node crashed: their client saw the
        connection die);
    (b) no agent is active on two live nodes whose member views are equal;
    (c) answers are data of the right shape, or an error code of ErrorCode;
    (d) counter values: in a run where no state can be lost or applied twice
        (no duplication, crash, partition or pause; graceful leaves hand state
        off, so they may happen; every view full when clients start),
        ``get`` sees every incr acknowledged before it was sent and none not yet
        sent; with ``exact`` (a fault-free run) every call also succeeds and a
        final get per counter returns the sum of acknowledged incrs;
    (e) with replication on (``replicas`` > 1), in every scenario, crashes
        included: after heal, every node up, views equal and replication quiet
        (within SETTLE_MAX_S), every replica of a counter holds the same value, and
        it is at least the sum of incrs acknowledged at quorum or all and (without
        duplication: a duplicated forward applies an incr twice) at most the sum
        sent.  What makes it hold with crashes: a crash or graceful stop waits
        until the replicas are whole again (``replicas_whole``), so no agent loses
        two copies at once (one that finds no such moment before the clients stop
        is skipped and counted); a crashed or stopped node restarts only once the
        others took it off the ring, unless ``fast_restarts``.

    (f) a pipeline or scatter (``issue_pipeline``, ``issue_scatter``; random ones
        with ``pipelines_per_s``, ``scatters_per_s``) is answered by its deadline
        (its timeout_ms, else the forward timeout) unless its entry was paused; its
        answer has the strategy's shape (an int; a map of every target in order to
        its data or its error), and without faults holds no error;
    (g) with replication on, after (e): one more incr per counter makes its
        owner fold the rows of retired replicas (generations no member
        advertises, docs/STATE.md 'Pruning'): its owner then holds none, and (e)
        holds again, so no fold lost or double-counted a write.

    A machine raising is a violation too (with the seed and the replay command).
    """

    node_class = SimNode  # tests put a subclass with a planted bug here

    def __init__(self, scenario: Scenario):
        self.scenario = s = scenario
        if s.exact and (s.drop_rate or s.dup_rate or s.partitions or s.crashes or s.pauses
                        or s.stops):
            raise ValueError("exact counter values need a fault-free run")
        self.sim = Simulator(s.seed, s.network(), answers=self._on_answer)
        self.calls: dict[int, _Call] = {}
        self.unanswered = 0
        self.violations: list[str] = []
        self._holders: dict[str, list[str]] = {}   # agent -> live nodes holding it
        self._held: dict[str, set] = {}             # node -> agents it holds (as seen)
        self._host_version: dict[str, int] = {}
        self._multi: dict[str, None] = {}           # agents held by two or more nodes
        # (d) applies when no state can be lost and nothing is applied twice: no
        # duplication, and no member declared dead (a crash, or a partition or a
        # pause that outlasts the suspicion: its agents start fresh elsewhere until
        # replication exists).  A graceful leave hands state off, so stops keep it.
        self.bounded = s.exact or not (s.dup_rate or s.crashes or s.partitions or s.pauses)
        self._acked: dict[str, int] = {}            # (d): acknowledged incr sum
        self._issued: dict[str, int] = {}           # (d): incr sum sent
        # (e): with replication on, incrs acknowledged at quorum or all must last
        # through anything (crashes included); the final value is checked after heal.
        self.replicated = s.replicas > 1
        self._acked_strong: dict[str, int] = {}
        self.losses_skipped = 0                     # crashes/stops that found no window
        self.losses: list[tuple[float, str, bool]] = []  # (when, node, graceful) per crash/stop
        self._generation_ns = 1
        self._calling = True
        self.sim.observe(self._after_step)
        for k in range(s.nodes):
            self.sim.add(node_id(k), self.new_node(k), address=node_address(k),
                         start_at=self.sim.rng.uniform(0.0, 1.0))
        self._script()

    # -- building ------------------------------------------------------------------
    def new_node(self, k: int) -> SimNode:
        """Node k, fresh (at the start and at every restart)."""
        s, rng = self.scenario, self.sim.rng
        # Generations as the node makes them: its wall clock in ns at start (here the
        # virtual clock), so a restart always comes back higher.
        generation = max(self._generation_ns, int(self.sim.now * 1e9)) + 1
        self._generation_ns = generation
        me = Member.of(node_id(k), node_address(k), node_address(k).replace(":7400", ":7401"),
                       generation, replica=replica_id(f"{node_id(k)}/{generation}"))
        seeds = [node_address(j) for j in (0, 1) if j < s.nodes]
        swim = SwimConfig(probe_interval_s=s.probe_interval_s,
                          probe_timeout_s=min(0.2, s.probe_interval_s),
                          sync_interval_s=s.sync_interval_s, downing=s.downing,
                          quorum_size=s.quorum_size)
        return self.node_class(me, seeds, key=rng.getrandbits(64).to_bytes(8, "big"),
                               rng=random.Random(rng.getrandbits(64)), swim=swim,
                               max_hops=s.max_hops, forward_timeout_s=s.forward_timeout_s,
                               handoff=s.handoff, replicas=s.replicas,
                               consistency=s.consistency)

    def _script(self) -> None:
        """The fault schedule and the client load, drawn from the seed."""
        s, sim, rng = self.scenario, self.sim, self.sim.rng
        span = max(s.duration_s - s.warmup_s, 1.0)
        for _ in range(s.partitions):
            start = s.warmup_s + rng.uniform(0.1, 0.6) * span
            sim.at(start, self._partition)
            sim.at(start + rng.uniform(0.05, 0.3) * span, lambda sim: sim.heal())
        for _ in range(s.crashes):
            start = s.warmup_s + rng.uniform(0.1, 0.6) * span
            sim.at(start, self._one_loss_at_a_time(self._crash_one(rng.uniform(0.02, 0.2) * span)))
        for _ in range(s.stops):
            start = s.warmup_s + rng.uniform(0.1, 0.6) * span
            sim.at(start, self._one_loss_at_a_time(self._leave_one(rng.uniform(0.02, 0.2) * span)))
        for _ in range(s.pauses):
            start = s.warmup_s + rng.uniform(0.1, 0.7) * span
            sim.at(start, self._pause_one(start + rng.uniform(0.01, 0.1) * span))
        if self.bounded:
            sim.at(s.warmup_s, self._check_converged)
        for rate, issue_one in ((s.calls_per_s, self._one_call),
                                (s.pipelines_per_s, self._one_pipeline),
                                (s.scatters_per_s, self._one_scatter)):
            if rate > 0:
                sim.at(s.warmup_s, self._client(rate, issue_one))

    def _check_converged(self, sim: Simulator) -> None:
        """Exact values need owners that no longer move: every view full by then."""
        full = frozenset(sim.node_ids)
        behind = [n for n in sim.node_ids if sim.machine(n).view != full]
        if behind and not self.scenario.exact:
            self.bounded = False  # owners may still move: values are not comparable
        elif behind:
            self._violate(f"(d) precondition: {behind} have not seen every member by "
                          f"warmup_s={self.scenario.warmup_s}")
            self.fail()

    def _partition(self, sim: Simulator) -> None:
        """Cut the nodes that are up in two (a side of only crashed nodes would cut
        nothing); crashed ones go with the first side."""
        ids = sim.up_ids()
        sim.rng.shuffle(ids)
        cut = sim.rng.randint(1, len(ids) - 1) if len(ids) > 1 else 1
        down = [n for n in sim.node_ids if not sim.is_up(n)]
        sim.partition(sorted(ids[:cut] + down), sorted(ids[cut:]))

    WHOLE_POLL_S = 0.5  # a crash or stop waiting for the last one's repair looks this often

    def _one_loss_at_a_time(self, action: Callable[[Simulator], None]) -> Callable[[Simulator], None]:
        """With replication on, a crash or a stop waits until the cluster has repaired
        the last one (``replicas_whole``), so no agent loses two copies at once; one
        that cannot run before the clients stop is dropped."""
        def when_whole(sim: Simulator) -> None:
            if not self.replicated or self.replicas_whole():
                action(sim)
            elif self._calling and sim.now + self.WHOLE_POLL_S < self.scenario.duration_s:
                sim.at(sim.now + self.WHOLE_POLL_S, when_whole)
            else:
                self.losses_skipped += 1
        return when_whole

    def replicas_whole(self) -> bool:
        """Every node is up and sees every other, and every agent with state runs on
        its owner with each replica holding a copy (none waiting for its first full
        state, no copy still to hand over, no failover or gather under way): losing
        one node now loses one copy of anything at most."""
        sim = self.sim
        full = frozenset(sim.node_ids)
        nodes = [sim.machine(n) for n in sim.node_ids]
        if not all(sim.is_up(n) for n in sim.node_ids) or any(n.view != full for n in nodes):
            return False
        for node in nodes:
            counts = node.replication.counts()
            if counts["gathering"] or counts["failover_queue"]:
                return False
            for agent_id, rec in node.replication.records.items():
                if rec.push_to or (rec.primary and rec.acked and min(rec.acked.values()) < 0):
                    return False
                owner = sim.machine(node.router.ring.owner(agent_id)).replication
                if rec.fields and not owner.is_primary(agent_id):
                    return False
        return True

    def _crash_one(self, down_s: float) -> Callable[[Simulator], None]:
        def crash(sim: Simulator) -> None:
            ids = sim.up_ids()
            if len(ids) > 1:
                self._crash(ids[sim.rng.randrange(len(ids))], False, sim.now + down_s)
        return crash

    def _leave_one(self, down_s: float) -> Callable[[Simulator], None]:
        """A graceful leave: the node announces it and hands its agents off, then
        stops a moment later (time for the handoff) and restarts ``down_s`` after
        the leave began."""
        def leave(sim: Simulator) -> None:
            restart_at = sim.now + down_s
            ids = [n for n in sim.up_ids() if not sim.is_paused(n)
                   and not sim.machine(n).left]
            if len(ids) <= 1:
                return
            victim = ids[sim.rng.randrange(len(ids))]
            sim.run_effects(victim, sim.machine(victim).leave(sim.now))

            deadline = sim.now + self.LEAVE_WAIT_MAX_S
            quiet_until = [sim.now + self.LEAVE_QUIET_S]

            def stop(sim: Simulator) -> None:
                machine = sim.machine(victim)
                if not (sim.is_up(victim) and machine.left):
                    return
                if sim.is_paused(victim):  # a stopped process cannot shut down: later
                    sim.at(sim.now + 0.1, stop)
                    return
                if (machine.handing_off or sim.now < quiet_until[0]) and sim.now < deadline:
                    if machine.handing_off:  # as the runtime: quiet for a while
                        quiet_until[0] = sim.now + self.LEAVE_QUIET_S
                    sim.at(sim.now + 0.1, stop)
                    return
                sim.run_effects(victim, machine.stop(sim.now))
                self._crash(victim, True, max(restart_at, sim.now + 0.1))
            sim.at(sim.now + 0.1, stop)
        return leave

    LEAVE_WAIT_MAX_S = 10.0  # a leaving node waits this long for its handoffs at most
    LEAVE_QUIET_S = 0.5      # ... and until none has been in flight for this long

    def crash(self, victim: str, restart_at: float) -> None:
        """Crash node ``victim`` now (a scripted fault); it restarts, fresh, at
        ``restart_at`` (later, with replication on, as ``_restart`` says)."""
        self._crash(victim, False, restart_at)

    def _crash(self, victim: str, graceful: bool, restart_at: float) -> None:
        """The node is gone (state lost); calls that entered it are lost with it,
        except that a graceful stop must have answered every one."""
        sim = self.sim
        self.losses.append((sim.now, victim, graceful))
        self._forget_node(victim)
        sim.crash(victim)
        for call_id, call in self.calls.items():
            if call.entry == victim and call.answer is None and not call.lost:
                if graceful and call.issued_at < sim.now:
                    self._violate(f"(a) call {call_id} entered {victim}, which stopped "
                                  "gracefully without answering it")
                call.lost = True
                self.unanswered -= 1
        if self.violations:
            self.fail()
        sim.at(restart_at, self._restart(victim, restart_at + self.DOWNED_WAIT_MAX_S))

    DOWNED_WAIT_MAX_S = 60.0  # a crashed node waits at most this long to be downed

    def _restart(self, victim: str, latest: float) -> Callable[[Simulator], None]:
        """Restart the node, fresh.  With replication on (and not ``fast_restarts``)
        a stopped or crashed node comes back only once every other live node has
        taken it off the ring: its copies are gone, and only a ring change re-places
        them (a node back before that keeps a copy short: see ``fast_restarts``)."""
        def restart(sim: Simulator) -> None:
            waits = self.replicated and not self.scenario.fast_restarts and sim.now < latest
            if waits and any(victim in sim.machine(n).view for n in sim.up_ids()):
                sim.at(sim.now + self.WHOLE_POLL_S, restart)
                return
            sim.restart(victim, self.new_node(int(victim[1:])))
        return restart

    def _pause_one(self, resume_at: float) -> Callable[[Simulator], None]:
        def pause(sim: Simulator) -> None:
            ids = [n for n in sim.up_ids() if not sim.is_paused(n)]
            if ids:
                victim = ids[sim.rng.randrange(len(ids))]
                sim.pause(victim)
                sim.at(resume_at, lambda sim: sim.resume(victim))
        return pause

    # -- clients ---------------------------------------------------------------------
    def _client(self, rate_per_s: float, issue_one: Callable[[str, random.Random], None]
                ) -> Callable[[Simulator], None]:
        """A client load: ``issue_one(entry, rng)`` at a random live entry node, at
        ``rate_per_s`` on average (Poisson), until the clients stop."""
        def next_one(sim: Simulator) -> None:
            if not self._calling:
                return
            ids = sim.up_ids()
            if ids:
                issue_one(ids[sim.rng.randrange(len(ids))], sim.rng)
            sim.at(sim.now + sim.rng.expovariate(rate_per_s), next_one)
        return next_one

    def _one_call(self, entry: str, rng: random.Random) -> None:
        subject = f"counter/{rng.randrange(self.scenario.counters)}"
        kind = rng.random()
        if kind < 0.6:
            self.issue(entry, "incr", subject, rng.randint(1, 5))
        elif kind < 0.98:
            self.issue(entry, "get", subject, None)
        else:
            self.issue(entry, wire.TYPE_STATUS, None, None)

    # Composite calls touch counters of their own (``counter/s...`` for scatters, a
    # pipeline's incr stages fresh ``counter/p<call>.<stage>`` ones): the direct
    # calls' counter checks, (d) and (e), see none of their writes, and an incr
    # stage's data (the previous stage's answer) never compounds.
    def _one_pipeline(self, entry: str, rng: random.Random) -> None:
        s, call_id = self.scenario, len(self.calls) + 1
        stages = [(f"counter/p{call_id}.{i}", "incr") if rng.random() < 0.6
                  else (self.scatter_counter(rng.randrange(2 * s.targets)), "get")
                  for i in range(s.stages)]
        self.issue_pipeline(entry, stages, rng.randint(1, 5), s.routed_timeout_ms or None)

    def _one_scatter(self, entry: str, rng: random.Random) -> None:
        s = self.scenario
        targets = [self.scatter_counter(i) for i in rng.sample(range(2 * s.targets), s.targets)]
        mtype, data = ("incr", rng.randint(1, 5)) if rng.random() < 0.5 else ("get", None)
        self.issue_scatter(entry, mtype, targets, data, s.routed_timeout_ms or None)

    @staticmethod
    def scatter_counter(i: int) -> str:
        return f"{CounterHost.PREFIX}s{i}"

    def issue(self, entry: str, mtype: str, subject: str | None, data: Any,
              ttl: int | None = None, consistency: str | None = None) -> int:
        """A client sends a call to node ``entry``; returns the call id.  An incr
        names ``consistency`` (default: the scenario's)."""
        if mtype == "incr":
            consistency = consistency or self.scenario.consistency
        call = _Call(entry, mtype, subject, data if mtype == "incr" else 0, self.sim.now,
                     consistency)
        if self.bounded:
            call.acked_before = self._acked.get(subject, 0)
        if mtype == "incr" and type(data) is int:
            self._issued[subject] = self._issued.get(subject, 0) + data
        return self._send(call, lambda rid: wire.request(rid, mtype, subject, data, ttl=ttl,
                                                         consistency=consistency))

    def issue_pipeline(self, entry: str, stages: list[tuple[str, str]], data: Any,
                       timeout_ms: int | None = None) -> int:
        """A client sends a pipeline of ``(agent, type)`` stages to node ``entry``;
        returns the call id.  Its answer is due by ``timeout_ms`` (default: the
        node's, a forward's timeout)."""
        (agent, mtype), rest = stages[0], [list(stage) for stage in stages[1:]]
        call = _Call(entry, mtype, agent, 0, self.sim.now, routing=wire.ROUTING_PIPELINE,
                     deadline=self._deadline(timeout_ms))
        return self._send(call, lambda rid: wire.request(
            rid, mtype, agent, data, routing=wire.ROUTING_PIPELINE, stages=rest,
            timeout_ms=timeout_ms))

    def issue_scatter(self, entry: str, mtype: str, targets: list[str], data: Any,
                      timeout_ms: int | None = None) -> int:
        """A client sends ``mtype`` to every agent of ``targets`` (routing
        "scatter") through node ``entry``; returns the call id."""
        call = _Call(entry, mtype, None, 0, self.sim.now, routing=wire.ROUTING_SCATTER,
                     targets=tuple(targets), deadline=self._deadline(timeout_ms))
        return self._send(call, lambda rid: wire.request(
            rid, mtype, None, data, routing=wire.ROUTING_SCATTER, targets=list(targets),
            timeout_ms=timeout_ms))

    def _deadline(self, timeout_ms: int | None) -> float:
        timeout_s = timeout_ms / 1000 if timeout_ms else self.scenario.forward_timeout_s
        return self.sim.now + timeout_s

    def _send(self, call: _Call, envelope_for: Callable[[str], dict]) -> int:
        call_id = len(self.calls) + 1
        self.calls[call_id] = call
        self.unanswered += 1

        def lost() -> None:  # the entry crashed as the call arrived
            if call.answer is None and not call.lost:
                call.lost = True
                self.unanswered -= 1
        envelope = wire.encode(envelope_for(f"r{call_id}"))
        self.sim.inject(call.entry, lambda node, now: node.call(call_id, envelope, now), lost)
        return call_id

    # -- invariants --------------------------------------------------------------------
    def _violate(self, what: str) -> None:
        self.violations.append(f"t={self.sim.now!r} step={self.sim.stats.steps}: {what}")

    def _on_answer(self, node: str, effect: Any) -> None:
        """(a), (c), (d) for one Answer or Fail, as it is carried out."""
        call = self.calls.get(effect.handle) if isinstance(effect.handle, int) else None
        if call is None or effect.request_id != f"r{effect.handle}":
            self._violate(f"(a) {node} answered an unknown call: {effect!r:.200}")
            return
        if call.answer is not None or call.lost:
            self._violate(f"(a) {node} answered call {effect.handle} again "
                          f"(first: {call.answer!r}{', entry crashed' if call.lost else ''}): "
                          f"{effect!r:.200}")
            return
        if node != call.entry:
            self._violate(f"(a) call {effect.handle} entered {call.entry} but {node} answered")
        self.unanswered -= 1
        call.answered_at = self.sim.now
        if call.deadline is not None:
            self._check_deadline(effect.handle, call)
        if isinstance(effect, Fail):
            call.answer = ("error", effect.code, effect.message)
            if effect.code not in ErrorCode.ALL:
                self._violate(f"(c) error code {effect.code!r} is not an ErrorCode: {effect!r:.200}")
            elif self.scenario.exact:
                self._violate(f"(d) call {effect.handle} failed in a fault-free run: {effect!r:.200}")
            return
        call.answer = ("data", effect.data)
        if call.routing == wire.ROUTING_SCATTER:
            self._check_gathered(effect.handle, call, effect.data)
        elif call.routing == wire.ROUTING_PIPELINE:
            if type(effect.data) is not int:
                self._violate(f"(c) pipeline call {effect.handle} answered "
                              f"{effect.data!r:.80}, not an int")
        elif call.mtype == wire.TYPE_STATUS:
            self._check_status(node, effect.handle, effect.data)
        elif type(effect.data) is not int:
            self._violate(f"(c) {call.mtype} answered {effect.data!r:.80}, not an int")
        else:
            if call.mtype == "incr" and call.consistency in STRONG:
                self._acked_strong[call.subject] = self._acked_strong.get(call.subject, 0) + call.n
            if self.bounded:
                self._check_counter(effect.handle, call, effect.data)

    DEADLINE_SLACK_S = 1e-6  # the entry answers at its own timer: float rounding only

    def _check_deadline(self, call_id: int, call: _Call) -> None:
        """(f) A pipeline or scatter is answered by its deadline, by the entry node's
        own timer (a paused entry answers when it runs again: not checked then)."""
        late = self.sim.now - call.deadline
        if late > self.DEADLINE_SLACK_S and not self.scenario.pauses:
            self._violate(f"(f) {call.routing} call {call_id} answered {late:.3f} s after "
                          f"its deadline")

    def _check_gathered(self, call_id: int, call: _Call, data: Any) -> None:
        """(c) A scatter's answer maps each target, in order, to ``{"data": int}`` or
        ``{"error": {"code", "message"}}``; (d) without faults, never an error."""
        if not isinstance(data, dict) or tuple(data) != call.targets:
            self._violate(f"(c) scatter call {call_id} answered {data!r:.200}, not a map "
                          f"of its {len(call.targets)} targets in order")
            return
        for agent, entry in data.items():
            error = entry.get("error") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and list(entry) == ["data"] and type(entry["data"]) is int:
                continue
            if (isinstance(error, dict) and list(entry) == ["error"]
                    and error.get("code") in ErrorCode.ALL
                    and type(error.get("message")) is str):
                if self.scenario.exact:
                    self._violate(f"(d) scatter call {call_id}: {agent} failed in a "
                                  f"fault-free run: {entry!r:.200}")
                continue
            self._violate(f"(c) scatter call {call_id}: {agent} answered {entry!r:.200}")

    def _check_status(self, node: str, call_id: int, data: Any) -> None:
        rows = data.get("members") if isinstance(data, dict) else None
        if (not isinstance(rows, list) or data.get("node") != node
                or not all(isinstance(r, dict) and type(r.get("node")) is str for r in rows)
                or node not in [r["node"] for r in rows]):
            self._violate(f"(c) status call {call_id} answered {data!r:.200}")

    def _check_counter(self, call_id: int, call: _Call, value: int) -> None:
        subject = call.subject
        if call.mtype == "incr":
            self._acked[subject] = self._acked.get(subject, 0) + call.n
        else:
            low, high = call.acked_before, self._issued.get(subject, 0)
            if not low <= value <= high:
                self._violate(f"(d) get {subject} (call {call_id}) returned {value}; "
                              f"acknowledged incrs before it sum to {low}, all sent to {high}")

    def _after_step(self, sim: Simulator, node: str, effects: list) -> None:
        self._update_holders(sim, node)
        for agent in self._multi:
            holders = self._holders[agent]
            views = [sim.machine(h).view for h in holders]
            for i in range(len(views)):
                if views[i] in views[i + 1:]:
                    j = views.index(views[i], i + 1)
                    self._violate(f"(b) {agent} is active on {holders[i]} and {holders[j]}, "
                                  f"whose views are equal ({len(views[i])} members)")
        if self.violations:
            self.fail()

    def _update_holders(self, sim: Simulator, node: str) -> None:
        machine = sim.machine(node)
        host = machine.host
        if self._host_version.get(node) == host.version:
            return
        self._host_version[node] = host.version
        now = host.active.keys()
        before = self._held.get(node, set())
        for agent in sorted(before - now):
            self._drop_holder(agent, node)
        for agent in sorted(now - before):
            holders = self._holders.setdefault(agent, [])
            holders.append(node)
            if len(holders) == 2:
                self._multi[agent] = None
        self._held[node] = set(now)

    def _drop_holder(self, agent: str, node: str) -> None:
        holders = self._holders[agent]
        holders.remove(node)
        if len(holders) < 2:
            self._multi.pop(agent, None)

    def _forget_node(self, node: str) -> None:
        """A crashed node holds nothing any more."""
        for agent in sorted(self._held.pop(node, set())):
            self._drop_holder(agent, node)
        self._host_version.pop(node, None)

    def fail(self) -> None:
        s = self.scenario
        shown = "\n  ".join(self.violations[:5])
        raise InvariantViolation(
            f"seed={s.seed}: {len(self.violations)} invariant violation(s):\n  {shown}\n"
            f"replay: {s.command()}")

    # -- running -----------------------------------------------------------------------
    def run(self) -> Result:
        """Clients call until ``duration_s``; then the network heals, paused nodes
        resume, crashed ones restart, and time runs past every deadline; then (a)'s
        end check (and (d)'s final gets)."""
        try:
            self._run()
        except InvariantViolation:
            raise
        except Exception as exc:  # a machine raised: a bug too, and it replays
            self._violate(f"{type(exc).__name__}: {exc}")
            try:
                self.fail()
            except InvariantViolation as violation:
                raise violation from exc
        return self.result()

    def _run(self) -> None:
        s, sim = self.scenario, self.sim
        sim.run_until(s.duration_s, max_steps=s.steps_max or None)
        self._calling = False
        self._settle()
        if self.replicated:
            self._settle_replicas()
            self._check_replicas()
            self._check_pruned()
        if s.exact:
            self._final_gets()
        unanswered = [i for i, c in self.calls.items() if c.answer is None and not c.lost]
        if unanswered:
            self._violate(f"(a) {len(unanswered)} call(s) never answered, e.g. "
                          f"{unanswered[:5]} ({self.calls[unanswered[0]].mtype} "
                          f"{self.calls[unanswered[0]].subject} entered "
                          f"{self.calls[unanswered[0]].entry})")
            self.fail()

    def _settle(self) -> None:
        s, sim = self.scenario, self.sim
        sim.heal()
        for n in sim.node_ids:
            sim.resume(n)
        # Past the last forward's (or pipeline's, scatter's) deadline, plus the
        # slowest message, plus a margin.
        sim.run_for(max(s.forward_timeout_s, s.routed_timeout_ms / 1000)
                    + 2 * s.delay_max_s + 1.0, max_steps=s.steps_max or None)

    SETTLE_MAX_S = 120.0  # after heal: time for views to agree and replication to go quiet
    SETTLE_STEP_S = 1.0

    def _settle_replicas(self) -> None:
        """Run until every node is up, all views are full and equal, and no
        replication machine has work left (repairs, pushes, held writes, gathers,
        failovers); a cluster that does not get there in SETTLE_MAX_S is a violation."""
        sim, s = self.sim, self.scenario
        until = sim.now + self.SETTLE_MAX_S
        while not self._quiet():
            if sim.now >= until:
                lagging = {n: sim.machine(n).replication.counts() for n in sim.up_ids()
                           if sim.machine(n).replication.next_deadline() is not None}
                views = {n: len(sim.machine(n).view) for n in sim.up_ids()}
                self._violate(f"(e) not settled {self.SETTLE_MAX_S} s after heal: views "
                              f"{views}, replication still busy on {lagging}")
                self.fail()
            sim.run_for(self.SETTLE_STEP_S, max_steps=s.steps_max or None)

    def _quiet(self) -> bool:
        sim = self.sim
        full = frozenset(sim.node_ids)
        return all(sim.is_up(n) and sim.machine(n).view == full
                   and sim.machine(n).replication.next_deadline() is None
                   for n in sim.node_ids)

    def _check_replicas(self) -> None:
        """(e) After heal, every replica of an agent holds the same value, and the
        value counts every incr acknowledged at quorum or all and (without
        duplication, which may apply a forwarded incr twice) none not sent."""
        sim, s = self.sim, self.scenario
        ring = sim.machine(sim.node_ids[0]).router.ring
        for subject in sorted(self._issued):
            replicas = ring.preference_list(subject, s.replicas)
            values = [_counter_value(sim.machine(r).replication.records.get(subject))
                      for r in replicas]
            if len(set(values)) > 1:
                self._violate(f"(e) replicas of {subject} differ: "
                              f"{dict(zip(replicas, values))}")
            acked, issued = self._acked_strong.get(subject, 0), self._issued[subject]
            value = values[0]
            if value < acked or (value > issued and not s.dup_rate):
                self._violate(f"(e) {subject} is {value} on its owner {replicas[0]} after "
                              f"heal; incrs acknowledged at quorum/all sum to {acked}, "
                              f"all sent to {issued}")
        if self.violations:
            self.fail()

    def _check_pruned(self) -> None:
        """(g) Pruning: settled, one more incr per counter makes its owner fold every
        retired replica's row; then (e) holds again, and no counter's owner
        holds a row of a replica no member advertises."""
        sim = self.sim
        ids = sim.up_ids()
        calls = {subject: self.issue(ids[sim.rng.randrange(len(ids))], "incr", subject, 1)
                 for subject in sorted(self._issued)}
        sim.run_for(self.scenario.forward_timeout_s + 1.0)
        self._settle_replicas()
        self._check_replicas()
        ring = sim.machine(sim.node_ids[0]).router.ring
        live = {sim.machine(n).replica for n in sim.up_ids()}  # every node is up now
        for subject, call_id in calls.items():
            if (self.calls[call_id].answer or ("",))[0] != "data":
                continue  # not written (a timeout): nothing folded, nothing to check
            node = sim.machine(ring.owner(subject))
            counter = node.replication.records[subject].fields[CounterHost.FIELD]
            stray = [r for r in counter.replicas() if r not in live]
            if stray:
                self._violate(f"(g) {subject}: its owner {node.node_id} still holds rows "
                              f"of retired replicas {stray} after a write")
        if self.violations:
            self.fail()

    def _final_gets(self) -> None:
        sim = self.sim
        finals = {}
        for subject in sorted(self._issued):
            ids = sim.up_ids()
            finals[subject] = self.issue(ids[sim.rng.randrange(len(ids))], "get", subject, None)
        sim.run_for(self.scenario.forward_timeout_s + 1.0)
        for subject, call_id in finals.items():
            answer = self.calls[call_id].answer
            if answer != ("data", self._acked.get(subject, 0)):
                self._violate(f"(d) final get {subject} answered {answer!r}; acknowledged "
                              f"incrs sum to {self._acked.get(subject, 0)}")
        if self.violations:
            self.fail()

    def result(self) -> Result:
        errors: dict[str, int] = {}
        for call in self.calls.values():
            if call.answer is not None and call.answer[0] == "error":
                errors[call.answer[1]] = errors.get(call.answer[1], 0) + 1
        late = sum(self.sim.machine(n).late_replies for n in self.sim.node_ids)
        remote: dict[str, int] = {}
        for n in self.sim.node_ids:
            for reason, count in self.sim.machine(n).remote_errors.items():
                remote[reason] = remote.get(reason, 0) + count
        return Result(self.scenario, len(self.calls),
                      sum(1 for c in self.calls.values() if c.answer is not None),
                      dict(sorted(errors.items())),
                      sum(1 for c in self.calls.values() if c.lost), late,
                      self.sim.now, self.sim.stats, self.sim.digest(), self.bounded,
                      dict(sorted(remote.items())), self.losses_skipped)


def _counter_value(record: Any) -> int:
    """The counter value in a replication record (0 without one)."""
    counter = record.fields.get(CounterHost.FIELD) if record is not None else None
    return counter.value() if counter is not None else 0


def run_scenario(scenario: Scenario) -> Result:
    """Run one whole-node simulation; raises InvariantViolation on a broken invariant."""
    return NodeSim(scenario).run()


# ============================================================== command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protocols.sim",
        description="Run (or replay) a whole-node simulation from its seed.")
    default = Scenario(seed=0)
    for f in fields(Scenario):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(default, f.name)
        if f.name == "seed":
            parser.add_argument(flag, type=int, required=True)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    scenario = Scenario(**args)
    try:
        result = run_scenario(scenario)
    except InvariantViolation as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
