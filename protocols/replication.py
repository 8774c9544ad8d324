"""Replication: every agent's CRDT state lives on N nodes, so one can die.

A pure machine (``protocols/machine.py``), one per node.  Agents whose behavior
declares CRDT fields (``protocols/crdt``) keep their state in a *record* here; an
active agent's fields are the record's objects, so a handler's writes land in the
record directly and nothing is copied per turn.

**Placement.**  An agent's replicas are ``ring.preference_list(agent, n)``: its
owner first, then the next ``n - 1`` distinct nodes clockwise.

**Owner side.**  After each turn that changed the state the node calls ``wrote``
with the fields' pending deltas; each replica gets a ``delta`` carrying the
owner's stream ``(epoch, seq)``.  ``consistency`` decides when the reply may go:
``local`` at once, ``quorum`` once a majority of the replicas (the owner counts as
one) hold the write, ``all`` once every replica does; a deadline answers
``timeout`` instead (``WriteDone(ok=False)``: the write may or may not last).
The owner tracks each replica's highest acknowledged ``seq``: a replica behind
(a lost delta or ack, a new replica after a ring change) gets the full state,
resent with backoff until acked.  That version-vector bookkeeping is the
anti-entropy: nothing is repaired by luck.

**Replica side.**  A delta is applied only in its stream order (``seq`` follows
the last one applied from that owner epoch): deltas of OR-Sets and maps need
causal delivery.  Anything else answers ``need`` and the owner sends the full
state, which merges in any order (a CRDT join).  Duplicates are acked again.

**Failover.**  When the ring changes, every node looks at its records: one it
owns now but did not own before is queued for ``Activate`` (paced at
``failover_rate`` agents per second); one it holds but no longer replicates is
pushed to the agent's new replicas and dropped once they all acknowledged it;
one whose owner changed is offered to the new owner, which merges it.  Before
an agent it did not own becomes active here, its new owner *gathers*: it asks
every reachable node of the agent's replica sets under the last ``RINGS_KEPT``
rings for their copy, holds the agent's requests, and merges what comes back
(``Restore``).  A write acknowledged at ``quorum`` is on a majority of its
replicas, so while a majority lives one of them answers the gather.

Messages on the ``replicate`` channel (msgpack maps, docs/PROTOCOL.md 9.7)::

    {"k": "d", "a": agent, "b": behavior, "e": epoch, "s": seq, "f": fields}  delta
    {"k": "f", "a": agent, "b": behavior, "e": epoch, "s": seq, "f": fields}  full state
    {"k": "a", "a": agent, "e": epoch, "s": seq}                              ack
    {"k": "n", "a": agent, "e": epoch}                                        need full
    {"k": "p", "a": agent, "b": behavior, "f": fields}                        push (a copy)
    {"k": "pa", "a": agent}                                                   push ack
    {"k": "w", "a": agent}                                                    want (gather)
    {"k": "h", "a": agent, "b": behavior | None, "f": fields | None}          have

``fields`` is ``protocols.crdt.encode_fields`` output.  A message that breaks these
shapes raises ``ReplicationError(reason)`` (the node counts it).
"""

from __future__ import annotations

import heapq
import reprlib
from collections import deque
from typing import Any, Callable, Iterable

import msgpack

from core_cy import HashRing

from .crdt import (CrdtError, GCounter, bind_fields, decode_fields, encode_fields,
                   expire_fold_markers, merge_fields, prune_fields, take_deltas)
from .effects import REPLICATE, Activate, Forget, Persist, Restore, Send, WriteDone
from .routing import Refusal
from .wire import ErrorCode

AGENT_ID_CHARS_MAX = 1024
BEHAVIOR_CHARS_MAX = 128
U64_MAX = (1 << 64) - 1
RINGS_KEPT = 4            # rings whose replica sets a gather asks (the current one too)
REPAIRS_PER_TICK = 512    # full states (re)sent per tick: a ring change is paced
RESEND_MAX_S = 5.0        # backoff ceiling of a repair to one replica
#: A generation is a start time in ns and a refutation adds 1 to it, so a jump of
#: more than this is a restart (a process takes far longer than 1 ms to start).
RESTART_JUMP = 1_000_000
GENERATIONS_MAX = 4096    # members whose last generation is remembered
GEN_FIELD = "_gen"        # how many times the agent was reset (syn.stop): a GCounter
LOCAL, QUORUM, ALL = "local", "quorum", "all"
CONSISTENCIES = frozenset((LOCAL, QUORUM, ALL))
KINDS = frozenset(("d", "f", "a", "n", "p", "pa", "w", "h", "b"))
BATCH_MAX = 1024          # messages in one batch
BATCH_BYTES_MAX = 1 << 20  # packed bytes of a batch's messages (one larger goes alone)
RECORDS_MAX = 3_000_000   # agent records by default (the node passes agents_max x replicas)
FOLD_TTL_NS = 7 * 86_400 * 10**9  # how long fold markers are kept by default (a week)


class ReplicationError(ValueError):
    """A replication message that breaks the protocol; ``reason`` is a short stable
    string for a metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Record:
    """One agent's state on this node (owner or replica)."""

    __slots__ = ("behavior", "fields", "primary", "src", "epoch", "seq", "acked",
                 "repair_at", "backoff", "push_to", "waits", "sent_at", "fresh")

    def __init__(self, behavior: str):
        self.behavior = behavior
        self.fields: dict = {}
        self.primary = False   # this node owns the agent: its writes stream from here
        self.src: str | None = None  # replica side: the owner whose stream we follow
        self.epoch = 0
        self.seq = 0
        self.acked: dict[str, int] | None = None  # owner side: replica -> seq it holds
        self.repair_at = 0.0
        self.backoff = 0.0
        self.push_to: set[str] | None = None  # copies still to hand to these nodes
        self.waits: list[_Wait] | None = None
        self.sent_at = 0.0     # when the delta numbered ``seq`` left (lag metric)
        self.fresh = False     # owner side: this epoch began with an empty state


class _Wait:
    """A reply held until ``needed`` replicas acknowledged ``seq``."""

    __slots__ = ("handle", "agent", "epoch", "seq", "needed", "acks", "deadline", "done")

    def __init__(self, handle: Any, agent: str, epoch: int, seq: int, needed: int,
                 deadline: float):
        self.handle = handle
        self.agent = agent
        self.epoch = epoch
        self.seq = seq
        self.needed = needed
        self.acks: set[str] = set()
        self.deadline = deadline
        self.done = False


class _Gather:
    """Requests held while the copies of an agent come in (new owner side)."""

    __slots__ = ("asked", "answered", "items", "nbytes", "deadline")

    def __init__(self, asked: set[str], deadline: float):
        self.asked = asked
        self.answered: set[str] = set()
        self.items: list = []
        self.nbytes = 0
        self.deadline = deadline


class Replication:
    """The replication machine of one node (see the module docstring)."""

    def __init__(self, node_id: str, replica: int, clock: Callable[[], int], *,
                 n: int = 3, write_timeout_s: float = 2.0, gather_timeout_s: float = 2.0,
                 resend_s: float = 0.2, failover_rate: float = 1000.0,
                 held_max: int = 10_000, held_bytes_max: int = 64 << 20,
                 waits_max: int = 100_000, epoch_start: int = 0,
                 observe_lag: Callable[[float], None] | None = None, persist: bool = False,
                 records_max: int = RECORDS_MAX, fold_ttl_ns: int = FOLD_TTL_NS):
        if n < 1 or not write_timeout_s > 0 or not gather_timeout_s > 0 or not resend_s > 0:
            raise ValueError("n >= 1 and positive timeouts")
        if not failover_rate > 0:
            raise ValueError("failover_rate > 0")
        self.node_id = node_id
        self.replica = replica
        self.clock = clock
        # The replica ids the members advertise, set by the node from its view (None:
        # not known, or a member advertises none): what pruning may not retire.
        self.live_replicas: frozenset[int] | None = None
        self._fold_ttl_ns = fold_ttl_ns
        self.n = n
        self._write_timeout_s = write_timeout_s
        self._gather_timeout_s = gather_timeout_s
        self._resend_s = resend_s
        self._rate = failover_rate
        self._held_max = held_max
        self._held_bytes_max = held_bytes_max
        self._waits_max = waits_max
        self._epoch = epoch_start
        self._observe_lag = observe_lag or (lambda seconds: None)
        self.persist = persist  # emit Persist/Forget for local storage (storage_path)
        self._records_max = records_max
        self.records: dict[str, Record] = {}
        self._rings: list[HashRing] = [HashRing((node_id,))]
        self._reachable: set[str] = set()
        self._generations: dict[str, int] = {}  # member -> generation last seen
        self._dirty: set[str] = set()            # records with replicas or pushes behind
        self._due: list[tuple[float, int, str]] = []  # (repair_at, serial, agent): a heap
        self._serial = 0
        self._waits: deque[_Wait] = deque()      # in deadline order (one timeout for all)
        self._gathers: dict[str, _Gather] = {}
        self._settled: set[str] = set()         # gathered, and nobody had a copy
        self._activate: deque[str] = deque()     # failover: agents to wake, paced
        self._tokens = 0.0
        self._paced_at: float | None = None
        self._held = 0
        self._held_bytes = 0
        self.stats = {"deltas_sent": 0, "deltas_applied": 0, "fulls_sent": 0,
                      "fulls_applied": 0, "acks": 0, "needs": 0, "pushes": 0,
                      "gathers": 0, "gather_timeouts": 0, "write_timeouts": 0,
                      "activations": 0, "dropped": 0, "bad_in_batch": 0,
                      "refused_copies": 0, "pruned": 0}
        self.last_error: ReplicationError | None = None  # of a batch's skipped message

    # ------------------------------------------------------------------ placement

    @property
    def ring(self) -> HashRing:
        return self._rings[-1]

    def replicas(self, agent_id: str) -> list[str]:
        """The agent's replica set on the current ring, its owner first."""
        return self.ring.preference_list(agent_id, self.n)

    def _others(self, agent_id: str) -> list[str]:
        return [r for r in self.replicas(agent_id) if r != self.node_id]

    def needed(self, agent_id: str, consistency: str) -> int:
        """Replica acks (besides the owner's own copy) a write at ``consistency`` needs."""
        size = len(self.replicas(agent_id))
        if consistency == LOCAL:
            return 0
        return size // 2 if consistency == QUORUM else size - 1

    # ------------------------------------------------------------------ membership

    def members_changed(self, reachable: Iterable[str], now: float,
                        generations: dict[str, int] | None = None) -> list:
        """Alive members changed: gathers stop waiting for members gone.  A member
        whose ``generations`` entry jumped restarted (with no copies, unless it keeps
        them on disk; its node id, and so the ring, unchanged): every replica state
        it held is resent, and it is offered the copies of the agents it owns."""
        self._reachable = set(reachable) - {self.node_id}
        if generations is not None:
            known = self._generations
            for node_id, generation in generations.items():
                if generation - known.get(node_id, generation) > RESTART_JUMP:
                    self._replica_renewed(node_id, now)
            # Members that went away are remembered too: one that comes back after
            # a crash comes back with a higher generation, and must get its copies.
            if len(known) + len(generations) > GENERATIONS_MAX:
                known.clear()
            known.update(generations)
        effects: list = []
        for agent_id in list(self._gathers):
            gather = self._gathers[agent_id]
            gather.asked &= self._reachable
            if gather.asked <= gather.answered:
                effects.append(self._finish_gather(agent_id))
        return effects

    def _replica_renewed(self, node_id: str, now: float) -> None:
        """``node_id`` may have restarted empty: as a replica it gets our full states
        again; as an owner, our copies (it merges them and wakes the agents)."""
        for agent_id, rec in self.records.items():
            if rec.primary and rec.acked and node_id in rec.acked:
                rec.acked[node_id] = -1
                self._repair_soon(agent_id, rec, now)
            elif not rec.primary and rec.fields and self.replicas(agent_id)[:1] == [node_id]:
                rec.push_to = (rec.push_to or set()) | {node_id}
                self._repair_soon(agent_id, rec, now)

    def ring_changed(self, previous: HashRing, ring: HashRing, now: float) -> list:
        """The ring moved on from ``previous`` (the owners agents had before) to
        ``ring``: re-place every record (see the module docstring)."""
        rings = self._rings
        if set(rings[-1].nodes) != set(previous.nodes):
            rings.append(previous)
        rings.append(ring)
        del rings[:-RINGS_KEPT]
        self._settled.clear()
        effects: list = []
        me = self.node_id
        for agent_id, rec in list(self.records.items()):
            before = previous.preference_list(agent_id, self.n) if len(previous) else []
            now_list = ring.preference_list(agent_id, self.n)
            owner = now_list[0] if now_list else me
            if owner == me:
                self._owned_after_change(agent_id, rec, now)
            else:
                self._held_after_change(agent_id, rec, before, now_list, now, effects)
        return effects

    def _owned_after_change(self, agent_id: str, rec: Record, now: float) -> None:
        if rec.primary:
            others = self._others(agent_id)
            old = rec.acked or {}
            rec.acked = {r: old.get(r, -1) for r in others}
            if any(seq < rec.seq for seq in rec.acked.values()):
                self._repair_soon(agent_id, rec, now)
        elif agent_id not in self._gathers:
            self._activate.append(agent_id)  # failover: wake it, paced

    def _held_after_change(self, agent_id: str, rec: Record, before: list, after: list,
                           now: float, effects: list) -> None:
        """Someone else owns it now: make sure they have what we hold."""
        me = self.node_id
        if rec.primary:
            # Still active here until the node hands it off; ``released`` re-places it.
            return
        targets = set(after) - {me} if me not in after else set()
        if before and before[0] != after[0]:
            targets.add(after[0])  # the new owner merges every copy it is offered
        targets.update(t for t in rec.push_to or () if t in self.ring)  # not to the dead
        rec.push_to = targets or None
        if targets:
            self._repair_soon(agent_id, rec, now)
        elif me not in after:
            effects.extend(self._drop(agent_id))

    def released(self, agent_id: str, now: float) -> list:
        """The node handed the agent to its new owner: our record is a copy now."""
        rec = self.records.get(agent_id)
        if rec is None or not rec.primary:
            return []
        rec.primary = False
        rec.acked = None
        after = self.replicas(agent_id)
        # The handoff may never arrive: the new owner is offered our copy as well.
        rec.push_to = set(after) if self.node_id not in after else {after[0]}
        self._repair_soon(agent_id, rec, now)
        return self._fail_waits(rec)

    # ------------------------------------------------------------------ owner side

    def is_primary(self, agent_id: str) -> bool:
        rec = self.records.get(agent_id)
        return rec is not None and rec.primary

    def needs_gather(self, agent_id: str) -> bool:
        """Must the copies of ``agent_id`` be gathered before it is activated here?
        Not when we own it already, nor when nobody else is reachable, nor (without
        local storage) when it had no other owner on any ring we remember: it was
        never anywhere else.  With storage, copies from before a restart of the
        whole cluster may be on any node's disk, whatever our rings say."""
        rec = self.records.get(agent_id)
        if (rec is not None and rec.primary) or agent_id in self._settled:
            return False
        if not self._gather_set(agent_id):
            return False
        me = self.node_id
        return (rec is not None or self.persist
                or any(r.owner(agent_id) != me for r in self._rings if len(r)))

    def _gather_set(self, agent_id: str) -> set[str]:
        asked: set[str] = set()
        for ring in self._rings:
            if len(ring):
                asked.update(ring.preference_list(agent_id, self.n))
        return asked & self._reachable

    def gather(self, agent_id: str, item: Any, nbytes: int, now: float) -> list | Refusal:
        """Hold ``item`` (a request, or None for a paced failover activation) until
        the copies of ``agent_id`` are in; the first hold asks for them."""
        gather = self._gathers.get(agent_id)
        effects: list = []
        if gather is None:
            asked = self._gather_set(agent_id)
            if not asked:  # nobody to ask: restored now, the request with it (no gather
                # is left to time out and restore the agent a second time)
                return [Restore(agent_id, self._behavior_of(agent_id),
                                () if item is None else (item,))]
            gather = self._gathers[agent_id] = _Gather(asked, now + self._gather_timeout_s)
            self.stats["gathers"] += 1
            effects = [Send(to, REPLICATE, {"k": "w", "a": agent_id}) for to in sorted(asked)]
        if item is not None:
            if self._held >= self._held_max or self._held_bytes + nbytes > self._held_bytes_max:
                return Refusal(ErrorCode.OVERLOADED,
                               f"{self._held} requests wait for agent state to be gathered")
            gather.items.append(item)
            gather.nbytes += nbytes
            self._held += 1
            self._held_bytes += nbytes
        return effects

    def _behavior_of(self, agent_id: str) -> str | None:
        rec = self.records.get(agent_id)
        return rec.behavior if rec is not None else None

    def _finish_gather(self, agent_id: str) -> Restore:
        gather = self._gathers.pop(agent_id)
        self._held -= len(gather.items)
        self._held_bytes -= gather.nbytes
        return Restore(agent_id, self._behavior_of(agent_id), tuple(gather.items))

    def settled(self, agent_id: str) -> None:
        """A gather found no copy anywhere: activate fresh, without asking again
        (until the ring changes).  Bounded: it is only a shortcut."""
        if len(self._settled) >= self._held_max:
            self._settled.clear()
        self._settled.add(agent_id)

    def primary(self, agent_id: str, behavior: str, now: float) -> Record:
        """The record an agent activated here runs on; it becomes this node's to
        write: a new epoch, and every replica is sent the full state."""
        rec = self.records.get(agent_id)
        if rec is None:
            rec = self.records[agent_id] = Record(behavior)
        if not rec.primary:
            rec.primary = True
            rec.behavior = behavior
            self._epoch += 1
            rec.epoch, rec.seq, rec.src = self._epoch, 0, self.node_id
            rec.push_to = None
            rec.fresh = not rec.fields
            bind_fields(rec.fields, self.replica, self.clock)
            others = self._others(agent_id)
            rec.acked = {r: -1 for r in others}
            if others and rec.fields:
                self._repair_soon(agent_id, rec, now)
        return rec

    def adopt(self, agent_id: str, behavior: str, fields: Any, now: float) -> Record:
        """A handoff brought the agent's state from its previous owner: merge it into
        our record (a join with whatever copy we held) and own it."""
        rec = self.records.get(agent_id)
        created = rec is None
        if created:
            rec = self.records[agent_id] = Record(behavior)
        if fields:
            self._merge_copy(agent_id, rec, lambda: decode_fields(fields), created)
        return self.primary(agent_id, behavior, now)

    def wrote(self, agent_id: str, deltas: dict, consistency: str, handle: Any,
              now: float) -> list:
        """The owner applied a turn's ``deltas`` ({field: delta CRDT}): stream them
        to the replicas; ``WriteDone(handle)`` once ``consistency`` is met."""
        rec = self.records[agent_id]
        needed = 0 if consistency == LOCAL else self.needed(agent_id, consistency)
        effects: list = []
        if deltas and self.live_replicas is not None:
            deltas = self._prune(rec, deltas)
        if deltas and GEN_FIELD in rec.fields:  # which life it belongs to: all of it
            deltas = {**deltas, GEN_FIELD: rec.fields[GEN_FIELD]}  # (a fold's delta is not)
        if deltas and not rec.acked and not self.persist:
            rec.seq += 1  # nobody to send it to (one node, or replicas = 1)
        elif deltas:
            rec.seq += 1
            rec.sent_at = now
            message = {"k": "d", "a": agent_id, "b": rec.behavior, "e": rec.epoch,
                       "s": rec.seq, "f": encode_fields(deltas)}
            if rec.seq == 1 and rec.fresh:
                message["z"] = True  # the stream began empty: this delta is all of it
            for to in rec.acked or ():
                effects.append(Send(to, REPLICATE, message))
                self.stats["deltas_sent"] += 1
            if rec.acked and agent_id not in self._dirty:
                # Checked again after resend_s: a lost delta or ack is repaired.
                self._schedule(agent_id, rec, now + self._resend_s)
            effects.extend(self._kept(agent_id, rec, message["f"]))
        have = sum(1 for seq in (rec.acked or {}).values() if seq >= rec.seq)
        if needed <= have:
            effects.append(WriteDone(handle, True, have, needed))
        elif len(self._waits) >= self._waits_max:
            effects.append(WriteDone(handle, False, have, needed))
        else:
            wait = _Wait(handle, agent_id, rec.epoch, rec.seq, needed, now + self._write_timeout_s)
            wait.acks.update(r for r, seq in rec.acked.items() if seq >= rec.seq)
            self._waits.append(wait)
            if rec.waits is None:
                rec.waits = []
            rec.waits.append(wait)
        return effects

    def stop(self) -> list:
        """The node is going: every held reply and request is answered."""
        effects: list = []
        for rec in self.records.values():
            effects.extend(self._fail_waits(rec))
        for agent_id in list(self._gathers):
            effects.append(self._finish_gather(agent_id))
        return effects

    def _fail_waits(self, rec: Record) -> list:
        effects = []
        for wait in rec.waits or ():
            if not wait.done:
                wait.done = True
                effects.append(WriteDone(wait.handle, False, len(wait.acks), wait.needed))
        rec.waits = None
        return effects

    # ------------------------------------------------------------------ messages

    def receive(self, sender: str, message: Any, now: float) -> list:
        if type(message) is dict and message.get("k") == "b":
            return self._on_batch(sender, message, now)
        kind, agent_id = _check(message)
        handler = _HANDLERS[kind]
        return handler(self, sender, agent_id, message, now)

    def _on_batch(self, sender: str, message: dict, now: float) -> list:
        """Many messages to one peer in one (``batch``): each is handled as if it came
        alone; a bad one is counted and skipped, the others still count."""
        packed = message.get("m")
        if type(packed) is not list or not 0 < len(packed) <= BATCH_MAX:
            raise ReplicationError("bad_batch", f"'m' is a list of 1..{BATCH_MAX} messages")
        effects: list = []
        for blob in packed:
            try:
                inner = _unpack_inner(blob)
                kind, agent_id = _check(inner)
                if kind == "b":
                    raise ReplicationError("bad_batch", "a batch inside a batch")
                effects.extend(_HANDLERS[kind](self, sender, agent_id, inner, now))
            except ReplicationError as exc:
                self.stats["bad_in_batch"] += 1
                self.last_error = exc
        return effects

    def _on_delta(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        epoch, seq, behavior = _u64(m, "e"), _u64(m, "s"), _behavior(m)
        rec = self.records.get(agent_id)
        created = False
        if seq == 1 and m.get("z") is True and (rec is None or not rec.primary) and (
                rec is None or rec.src != sender or rec.epoch != epoch):
            # The first delta of a stream that began empty needs no full state first
            # (a new agent's first write reaches its replicas in one message).
            if rec is None:
                rec, created = self._new_copy(agent_id, behavior), True
            rec.src, rec.epoch, rec.seq = sender, epoch, 0
        if rec is None or rec.primary or rec.src != sender or rec.epoch != epoch:
            return [self._need(sender, agent_id, epoch)]
        if seq <= rec.seq:
            return [self._ack(sender, agent_id, epoch, rec.seq)]  # a duplicate
        if seq != rec.seq + 1:
            return [self._need(sender, agent_id, epoch)]
        self._merge_copy(agent_id, rec, lambda: _fields(m), created)
        rec.seq, rec.behavior = seq, behavior
        self.stats["deltas_applied"] += 1
        return [self._ack(sender, agent_id, epoch, seq), *self._kept(agent_id, rec, m["f"])]

    def _on_full(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        epoch, seq, behavior = _u64(m, "e"), _u64(m, "s"), _behavior(m)
        rec = self._copy_in(agent_id, behavior, _fields(m))
        self.stats["fulls_applied"] += 1
        if not rec.primary:
            same = rec.src == sender and rec.epoch == epoch
            rec.src, rec.epoch, rec.behavior = sender, epoch, behavior
            rec.seq = max(rec.seq, seq) if same else seq
            self._pass_on_if_stray(agent_id, rec, now)
        return [self._ack(sender, agent_id, epoch, seq), *self._kept(agent_id, rec, m["f"])]

    def _pass_on_if_stray(self, agent_id: str, rec: Record, now: float) -> None:
        """A copy came to a node outside the agent's replica set (the sender's ring is
        behind ours, or the message is a late duplicate): hand it on, then drop it."""
        replicas = self.replicas(agent_id)
        if self.node_id not in replicas:
            rec.push_to = (rec.push_to or set()) | set(replicas)
            self._repair_soon(agent_id, rec, now)

    def _on_ack(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        epoch, seq = _u64(m, "e"), _u64(m, "s")
        rec = self.records.get(agent_id)
        if rec is None or not rec.primary or rec.epoch != epoch or rec.acked is None:
            return []
        if sender not in rec.acked:
            return []
        self.stats["acks"] += 1
        if seq == rec.seq and rec.acked[sender] < seq and rec.sent_at:
            self._observe_lag(now - rec.sent_at)
        if seq > rec.acked[sender]:
            rec.acked[sender] = min(seq, rec.seq)
        if rec.acked[sender] >= rec.seq and not rec.push_to and not self._behind(rec):
            self._dirty.discard(agent_id)
            rec.backoff = 0.0
        return self._settle(rec, sender, seq)

    def _settle(self, rec: Record, sender: str, seq: int) -> list:
        effects = []
        waits = rec.waits
        if not waits:
            return effects
        for wait in waits:
            if wait.done or wait.seq > seq or wait.epoch != rec.epoch:
                continue
            wait.acks.add(sender)
            if len(wait.acks) >= wait.needed:
                wait.done = True
                effects.append(WriteDone(wait.handle, True, len(wait.acks), wait.needed))
        rec.waits = [w for w in waits if not w.done] or None
        return effects

    def _on_need(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        _u64(m, "e")
        rec = self.records.get(agent_id)
        self.stats["needs"] += 1
        if rec is None or not rec.primary or rec.acked is None or sender not in rec.acked:
            return []
        rec.acked[sender] = -1
        return [self._full(sender, agent_id, rec)]

    def _on_push(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        rec = self._copy_in(agent_id, _behavior(m), _fields(m))
        if rec.primary:
            # A copy of an agent we run: what it adds must reach our replicas too.
            rec.acked = {r: -1 for r in rec.acked or ()}
            self._repair_soon(agent_id, rec, now)
        elif self.replicas(agent_id)[:1] == [self.node_id] and agent_id not in self._gathers:
            self._activate.append(agent_id)
        else:
            self._pass_on_if_stray(agent_id, rec, now)
        return [Send(sender, REPLICATE, {"k": "pa", "a": agent_id}),
                *self._kept(agent_id, rec, m["f"])]

    def _on_push_ack(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        rec = self.records.get(agent_id)
        if rec is None or not rec.push_to:
            return []
        rec.push_to.discard(sender)
        if not rec.push_to:
            rec.push_to = None
            if self.node_id not in self.replicas(agent_id) and not rec.primary:
                return self._drop(agent_id)
            if not self._behind(rec):
                self._dirty.discard(agent_id)
        return []

    def _on_want(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        rec = self.records.get(agent_id)
        if rec is None:
            return [Send(sender, REPLICATE, {"k": "h", "a": agent_id, "b": None, "f": None})]
        return [Send(sender, REPLICATE, {"k": "h", "a": agent_id, "b": rec.behavior,
                                          "f": encode_fields(rec.fields)})]

    def _on_have(self, sender: str, agent_id: str, m: dict, now: float) -> list:
        gather = self._gathers.get(agent_id)
        if gather is None or sender not in gather.asked:
            return []
        if m.get("b") is not None:
            rec = self._copy_in(agent_id, _behavior(m), _fields(m))
            kept = self._kept(agent_id, rec, m["f"])
        else:
            kept = []
        gather.answered.add(sender)
        if gather.asked <= gather.answered:
            return [*kept, self._finish_gather(agent_id)]
        return kept

    def _new_copy(self, agent_id: str, behavior: str) -> Record:
        """A record for a copy a peer sent us, within ``records_max``: peers are not
        authenticated yet, and each record costs memory whatever its bytes."""
        if len(self.records) >= self._records_max:
            self.stats["refused_copies"] += 1
            raise ReplicationError("records_full",
                                   f"this node holds its limit of {self._records_max} "
                                   "agent records")
        rec = self.records[agent_id] = Record(behavior)
        return rec

    def _prune(self, rec: Record, deltas: dict) -> dict:
        """A write folds retired replicas' counter rows into ours (docs/STATE.md,
        'Pruning'); the folds go out with the write's own deltas."""
        removed = prune_fields(rec.fields, self.live_replicas, self.replica, self.clock(),
                               self._fold_ttl_ns)
        if not removed:
            return deltas
        self.stats["pruned"] += removed
        deltas = dict(deltas)
        merge_fields(deltas, take_deltas(rec.fields))
        return deltas

    def _copy_in(self, agent_id: str, behavior: str, fields: dict) -> Record:
        """Join a copy a peer sent into our record of the agent (made if new)."""
        rec = self.records.get(agent_id)
        created = rec is None
        if created:
            rec = self._new_copy(agent_id, behavior)
        self._merge_copy(agent_id, rec, lambda: fields, created)
        return rec

    def _merge_copy(self, agent_id: str, rec: Record, fields: Callable[[], dict],
                    created: bool) -> None:
        """``_merge`` the copy ``fields()`` reads; a refused copy leaves no record it
        created behind (an empty record would stay until ``records_max``)."""
        try:
            self._merge(rec, fields())
        except (ReplicationError, CrdtError):
            if created:
                del self.records[agent_id]
            raise

    def _merge(self, rec: Record, fields: dict) -> None:
        """Join a copy into a record; fields new to an owned record are stamped with
        our replica (its next writes are ours).  Generations first: a copy from
        before the agent was reset is ignored, one from after it replaces ours."""
        try:
            merge_generation(rec.fields, fields)
        except CrdtError as exc:  # a field of another type under the same name
            raise ReplicationError("bad_state", str(exc)[:300]) from None
        if self.live_replicas is not None:  # copies forget markers as owners do
            expire_fold_markers(rec.fields, self.clock, self.live_replicas)
        if rec.primary:
            bind_fields(rec.fields, self.replica, self.clock)

    def _ack(self, to: str, agent_id: str, epoch: int, seq: int) -> Send:
        return Send(to, REPLICATE, {"k": "a", "a": agent_id, "e": epoch, "s": seq})

    def _need(self, to: str, agent_id: str, epoch: int) -> Send:
        return Send(to, REPLICATE, {"k": "n", "a": agent_id, "e": epoch})

    def _full(self, to: str, agent_id: str, rec: Record) -> Send:
        self.stats["fulls_sent"] += 1
        return Send(to, REPLICATE, {"k": "f", "a": agent_id, "b": rec.behavior,
                                    "e": rec.epoch, "s": rec.seq,
                                    "f": encode_fields(rec.fields)})

    # ------------------------------------------------------------------ time

    def _repair_soon(self, agent_id: str, rec: Record, now: float) -> None:
        """Repair at once, unless a repair is scheduled already: that one sends to
        every target as it is then, and keeps its backoff (two nodes whose rings
        disagree would otherwise bounce pushes and full states without pause)."""
        if agent_id not in self._dirty:
            self._schedule(agent_id, rec, now)

    def _schedule(self, agent_id: str, rec: Record, at: float) -> None:
        """Look at ``rec``'s replicas and pushes again at ``at``.  The heap keeps
        stale entries (acked meanwhile, rescheduled): they are skipped when due."""
        rec.repair_at = at
        self._dirty.add(agent_id)
        self._serial += 1
        heapq.heappush(self._due, (at, self._serial, agent_id))

    def _stale(self, entry: tuple) -> bool:
        at, _, agent_id = entry
        rec = self.records.get(agent_id)
        return rec is None or agent_id not in self._dirty or rec.repair_at != at

    @staticmethod
    def _behind(rec: Record) -> bool:
        return bool(rec.acked) and any(seq < rec.seq or seq < 0 for seq in rec.acked.values())

    def _drop(self, agent_id: str) -> list:
        self.records.pop(agent_id, None)
        self._dirty.discard(agent_id)
        self.stats["dropped"] += 1
        return [Forget(agent_id)] if self.persist else []

    def _kept(self, agent_id: str, rec: Record, fields: Any) -> list:
        """What local storage must keep of a change to ``rec``."""
        return [Persist(agent_id, rec.behavior, fields)] if self.persist else []

    def recovered(self, agent_id: str, behavior: str, fields: dict) -> None:
        """A copy read back from local storage at start: held, owned by nobody yet
        (the first ring change re-places it like any other copy)."""
        rec = self.records.get(agent_id)
        if rec is None:
            rec = self.records[agent_id] = Record(behavior)
        merge_generation(rec.fields, fields)

    def reset(self, agent_id: str, now: float) -> list | None:
        """The agent was stopped: its state starts again empty everywhere.  The
        record keeps only a generation one higher, which makes every older copy
        (replicas, late deltas, stored ones) lose against it.  None if there was no
        state to reset."""
        rec = self.records.get(agent_id)
        if rec is None or set(rec.fields) <= {GEN_FIELD}:
            return None  # nothing to reset (never written, or reset already)
        gen = rec.fields.get(GEN_FIELD) or GCounter().bind(self.replica, self.clock)
        gen.bind(self.replica, self.clock)
        gen.increment(1)
        gen.take_delta()
        rec.fields.clear()
        rec.fields[GEN_FIELD] = gen
        effects = self._fail_waits(rec)
        if rec.primary:
            rec.seq += 1
            rec.acked = {r: -1 for r in rec.acked or ()}
            if rec.acked:
                self._repair_soon(agent_id, rec, now)
            effects.extend(self._kept(agent_id, rec, encode_fields(rec.fields)))
        return effects

    def tick(self, now: float) -> list:
        effects: list = []
        self._expire_waits(now, effects)
        self._expire_gathers(now, effects)
        self._repair(now, effects)
        self._pace(now, effects)
        return effects

    def _expire_waits(self, now: float, effects: list) -> None:
        waits = self._waits
        touched: dict[str, Record] = {}
        while waits and (waits[0].done or waits[0].deadline <= now):
            wait = waits.popleft()
            if wait.done:
                continue
            wait.done = True
            self.stats["write_timeouts"] += 1
            effects.append(WriteDone(wait.handle, False, len(wait.acks), wait.needed))
            rec = self.records.get(wait.agent)
            if rec is not None and rec.waits:
                touched[wait.agent] = rec
        # Each record's waits are filtered once per tick, not once per wait that
        # expired: a burst of timeouts on one busy agent stays linear.
        for rec in touched.values():
            rec.waits = [w for w in rec.waits if not w.done] or None

    def _expire_gathers(self, now: float, effects: list) -> None:
        for agent_id in [a for a, g in self._gathers.items() if g.deadline <= now]:
            self.stats["gather_timeouts"] += 1
            effects.append(self._finish_gather(agent_id))

    def _repair(self, now: float, effects: list) -> None:
        """Full states to replicas behind, copies to nodes still to take them."""
        budget, due = REPAIRS_PER_TICK, self._due
        while due and due[0][0] <= now and budget > 0:
            entry = heapq.heappop(due)
            if self._stale(entry):
                continue
            agent_id = entry[2]
            rec = self.records[agent_id]
            budget -= 1
            sent = self._repair_one(agent_id, rec)
            if not sent:
                self._dirty.discard(agent_id)
                continue
            effects.extend(sent)
            rec.backoff = min(RESEND_MAX_S, rec.backoff * 2 or self._resend_s)
            self._schedule(agent_id, rec, now + rec.backoff)

    def _repair_one(self, agent_id: str, rec: Record) -> list:
        sends = []
        if rec.primary and rec.acked:
            sends = [self._full(r, agent_id, rec) for r, seq in rec.acked.items()
                     if seq < rec.seq or seq < 0]
        if rec.push_to:
            wire_fields = encode_fields(rec.fields)
            for to in sorted(rec.push_to):
                self.stats["pushes"] += 1
                sends.append(Send(to, REPLICATE, {"k": "p", "a": agent_id, "b": rec.behavior,
                                                  "f": wire_fields}))
        return sends

    def _pace(self, now: float, effects: list) -> None:
        """Failover activations, at most ``failover_rate`` per second."""
        if not self._activate:
            self._paced_at = None
            return
        if self._paced_at is None:
            self._paced_at, self._tokens = now, 1.0
        burst = max(1.0, self._rate / 10)
        self._tokens = min(burst, self._tokens + (now - self._paced_at) * self._rate)
        self._paced_at = now
        while self._activate and self._tokens >= 1.0:
            agent_id = self._activate.popleft()
            rec = self.records.get(agent_id)
            if rec is None or rec.primary or self.replicas(agent_id)[:1] != [self.node_id]:
                continue
            self._tokens -= 1.0
            self.stats["activations"] += 1
            effects.append(Activate(agent_id))

    def next_deadline(self) -> float | None:
        times = []
        if self._waits:
            times.append(self._waits[0].deadline)
        if self._gathers:
            times.append(min(g.deadline for g in self._gathers.values()))
        due = self._due
        while due and self._stale(due[0]):
            heapq.heappop(due)
        if due:
            times.append(due[0][0])
        if self._activate:
            times.append((self._paced_at or 0.0) + 1.0 / self._rate)
        return min(times) if times else None

    # ------------------------------------------------------------------ views

    @property
    def held_now(self) -> int:
        return self._held

    @property
    def waits_now(self) -> int:
        return sum(1 for w in self._waits if not w.done)

    @property
    def lagging(self) -> int:
        """Records with a replica or a copy still behind."""
        return len(self._dirty)

    def counts(self) -> dict[str, int]:
        primary = sum(1 for r in self.records.values() if r.primary)
        return {"records": len(self.records), "primary": primary,
                "replica": len(self.records) - primary, "lagging": len(self._dirty),
                "gathering": len(self._gathers), "waiting_writes": self.waits_now,
                "failover_queue": len(self._activate)}


# ---------------------------------------------------------------------- validation

def _check(message: Any) -> tuple[str, str]:
    if type(message) is not dict:
        raise ReplicationError("bad_message", "a replication message is a map")
    kind = message.get("k")
    if type(kind) is not str or kind not in KINDS:
        raise ReplicationError("bad_kind", f"unknown kind {reprlib.repr(kind)}")
    agent_id = message.get("a")
    if type(agent_id) is not str or not 0 < len(agent_id) <= AGENT_ID_CHARS_MAX:
        raise ReplicationError("bad_agent", f"'a' is 1..{AGENT_ID_CHARS_MAX} characters")
    return kind, agent_id


def generation(fields: dict) -> int:
    """How many times the agent whose state ``fields`` is was reset."""
    gen = fields.get(GEN_FIELD)
    if gen is None:
        return 0
    if type(gen) is not GCounter:
        raise CrdtError(f"{GEN_FIELD!r} is a GCounter, got {type(gen).__name__}")
    return gen.value()


def merge_generation(into: dict, fields: dict) -> None:
    """``merge_fields``, generations first: an older life is ignored, a newer one
    replaces what ``into`` holds (in place: a running agent sees it)."""
    theirs, ours = generation(fields), generation(into)
    if theirs < ours:
        return
    if theirs > ours:
        into.clear()
    merge_fields(into, fields)


def batch(packed: list[bytes]) -> list[dict]:
    """Batches (``{"k": "b", "m": [...]}``) of already packed messages, each batch at
    most BATCH_MAX messages and BATCH_BYTES_MAX bytes; a message larger than that
    travels in a batch of its own."""
    out: list[dict] = []
    current: list[bytes] = []
    size = 0
    for blob in packed:
        if current and (len(current) >= BATCH_MAX or size + len(blob) > BATCH_BYTES_MAX):
            out.append({"k": "b", "m": current})
            current, size = [], 0
        current.append(blob)
        size += len(blob)
    if current:
        out.append({"k": "b", "m": current})
    return out


def _unpack_inner(blob: Any) -> Any:
    if type(blob) is not bytes:
        raise ReplicationError("bad_batch", "a batch carries packed messages (bin)")
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=len(blob),
                               max_str_len=len(blob), max_array_len=len(blob),
                               max_map_len=len(blob), max_ext_len=len(blob))
    except Exception as exc:  # msgpack raises several unrelated types
        raise ReplicationError("bad_batch", f"not a msgpack message: {exc}"[:200]) from None


def _u64(m: dict, key: str) -> int:
    value = m.get(key)
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise ReplicationError("bad_seq", f"{key!r} is an integer 0..2**64-1")
    return value


def _behavior(m: dict) -> str:
    value = m.get("b")
    if type(value) is not str or not 0 < len(value) <= BEHAVIOR_CHARS_MAX:
        raise ReplicationError("bad_behavior", f"'b' is 1..{BEHAVIOR_CHARS_MAX} characters")
    return value


def _fields(m: dict) -> dict:
    try:
        return decode_fields(m.get("f"))
    except CrdtError as exc:
        raise ReplicationError("bad_state", str(exc)[:300]) from None


_HANDLERS = {
    "d": Replication._on_delta, "f": Replication._on_full, "a": Replication._on_ack,
    "n": Replication._on_need, "p": Replication._on_push, "pa": Replication._on_push_ack,
    "w": Replication._on_want, "h": Replication._on_have,
}
