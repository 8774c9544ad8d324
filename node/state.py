"""Replicated agent state on a node: the glue between the agent host and
``protocols/replication.py``.

The replication machine decides; this module carries its decisions out against
the host and the node's reply path:

- an agent with ``replicated`` fields runs on the machine's record of it;
- after each turn its fields' deltas go to ``Replication.wrote`` and the reply
  waits, held here, until the message's consistency is met (``WriteDone``);
- ``exactly_once`` messages are deduplicated by id in the agent's replicated
  ``_ids`` window, so a duplicate arriving after a failover is still recognised;
- a miss for an agent whose copies may be elsewhere waits for a gather
  (``Restore``); failover wakes agents at a paced rate (``Activate``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgpack

from core_cy import replica_id
from protocols.crdt import GCounter, ORMap, decode_fields, encode_fields, take_deltas
from protocols.delivery import DELIVER, DUPLICATE, HELD, AppliedIds, CausalOrder, mark_delivered
from protocols.effects import Activate, Forget, Persist, Restore, WriteDone
from protocols.replication import LOCAL, Replication, ReplicationError, merge_generation
from protocols.routing import Refusal
from protocols.wire import ErrorCode

from . import storage as stored
from .agents import AgentError, behaviors

if TYPE_CHECKING:
    from .runtime import Node

IDS_FIELD = "_ids"  # the exactly-once window, a field of the agent's record
VC_FIELD = "_vc"    # causal: messages delivered per sender session, a field too
EXACTLY_ONCE = "exactly_once"
CAUSAL = "causal"
CLOCKS_MAX = 100_000  # agents whose causal clocks are cached here (rebuilt from _vc)
CAUSAL_HOLD_S = 5.0   # a held causal message is answered `timeout` after this (clients wait 5 s)

_now = time.monotonic


class ReplicatedState:
    """One per node; owns the node's ``Replication`` machine."""

    def __init__(self, node: "Node", generation: int):
        cfg = node.config
        self.node = node
        self.replica = replica_id(f"{node.node_id}/{generation}")
        self.machine = Replication(
            node.node_id, self.replica, time.time_ns, n=cfg.replicas,
            write_timeout_s=cfg.write_timeout_s, gather_timeout_s=cfg.handoff_timeout_s,
            failover_rate=cfg.failover_rate, epoch_start=generation,
            observe_lag=node.metrics.replication_lag, persist=bool(cfg.storage_path),
            records_max=cfg.agents_max * cfg.replicas, fold_ttl_ns=int(cfg.fold_ttl_s * 1e9))
        self.storage: stored.Storage | None = None
        self._stored_seq: dict[str, int] = {}  # per agent: the last seq in storage
        host = node.host
        host.replica, host.clock = self.replica, time.time_ns
        host._state_for = self.state_for
        host._adopt = self.adopt
        host._turn_start = self.turn_start
        host._turn_done = self.turn_done
        self.duplicates = 0
        self.causal = CausalOrder(timeout_s=CAUSAL_HOLD_S)
        # Causal: each agent's delivered clock as its messages enter the mailbox,
        # ahead of the replicated _vc (ticked when a message's turn runs).
        self._clocks: dict[str, dict[str, int]] = {}
        self._causal_timer: Any = None

    @property
    def effects(self) -> dict:
        return {Restore: self._on_restore, WriteDone: self._on_write_done,
                Activate: self._on_activate, Persist: lambda e: self._persist(e, None),
                Forget: self._forget}

    # ------------------------------------------------------------------ host hooks

    def state_for(self, agent_id: str, cls: type) -> dict:
        """The fields an agent activated here runs on: its record's."""
        return self.machine.primary(agent_id, cls.behavior_name, _now()).fields

    def adopt(self, agent_id: str, cls: type, fields: Any) -> None:
        """A handoff brought the fields from the previous owner."""
        self.machine.adopt(agent_id, cls.behavior_name, fields, _now())
        self.node._arm("replication", self.machine)

    def turn_start(self, agent_id: str, act: Any, req: Any, reply_to: Any) -> bool:
        """Exactly-once: a message id already applied is answered from the window.
        Causal: the message counts as delivered in the agent's replicated clock."""
        if req.delivery == CAUSAL:
            rec = self.machine.primary(agent_id, act.cls.behavior_name, _now())
            _delivered_clock(rec.fields, self.replica).update(
                req.session, GCounter, lambda count: count.increment())
            return False
        if req.delivery != EXACTLY_ONCE:
            return False
        ids = self.machine.primary(agent_id, act.cls.behavior_name, _now()).fields.get(IDS_FIELD)
        entry = ids.get(req.id) if ids is not None else None
        if entry is None:
            return False
        self.duplicates += 1
        self.node.metrics.limited("duplicate_applied_once")
        reply = entry.reply
        if reply is None:
            self.node._reply_error(reply_to, req.id, ErrorCode.TOO_LARGE,
                                   "this message id was applied already; its reply was "
                                   "too large to keep", req.type)
        else:
            self._answer(reply_to, req, _unpack_outcome(reply))
        return True

    def turn_done(self, agent_id: str, act: Any, req: Any, reply_to: Any, result: Any,
                  error: AgentError | None) -> None:
        """After a turn: ship its deltas, and reply once the consistency is met."""
        outcome = ("err", error.code, error.message) if error is not None else ("ok", result)
        fields = act.agent._fields
        once = req.delivery == EXACTLY_ONCE
        if fields is None and not once:
            self._answer(reply_to, req, outcome)
            return
        now = _now()
        rec = self.machine.primary(agent_id, act.cls.behavior_name, now)
        if once:
            self._remember(rec.fields, req.id, outcome)
        deltas = take_deltas(rec.fields)
        if not deltas:
            self._answer(reply_to, req, outcome)
            return
        consistency = req.consistency or self.node.config.consistency
        if consistency == LOCAL and self.storage is None:  # the common case: no wait
            self.node._run([effect for effect in
                            self.machine.wrote(agent_id, deltas, LOCAL, None, now)
                            if type(effect) is not WriteDone])
            self.node._arm("replication", self.machine)
            self._answer(reply_to, req, outcome)
            return
        held = _HeldReply(reply_to, req, outcome, consistency,
                          2 if self.storage is not None else 1)
        effects = []
        for effect in self.machine.wrote(agent_id, deltas, consistency, held, now):
            if type(effect) is Persist:
                self._persist(effect, held)  # the reply waits for the disk too
            else:
                effects.append(effect)
        self.node._run(effects)
        self.node._arm("replication", self.machine)

    def _remember(self, fields: dict, msg_id: str, outcome: tuple) -> None:
        ids = fields.get(IDS_FIELD)
        if ids is None:
            ids = fields[IDS_FIELD] = AppliedIds().bind(self.replica, time.time_ns)
        ids.add(msg_id, msgpack.packb(list(outcome), use_bin_type=True), time.time_ns())

    def _answer(self, reply_to: Any, req: Any, outcome: tuple) -> None:
        if outcome[0] == "ok":
            vc = None
            if req.delivery == CAUSAL:
                rec = self.machine.records.get(req.subject)
                clock = rec.fields.get(VC_FIELD) if rec is not None else None
                vc = {s: c for s, c in clock.value().items()} if clock is not None else None
            self.node._reply_data(reply_to, req.id, outcome[1], vc)
        else:
            self.node._reply_error(reply_to, req.id, outcome[1], outcome[2], req.type)

    # ------------------------------------------------------------------ causal

    def deliver_causal(self, agent_id: str, act: Any, req: Any, reply_to: Any) -> None:
        """Hand a causal message to its agent once every message it depends on (by
        its ``vc``, from any session) has been; until then it is held (bounded,
        answered ``timeout`` after the hold timeout)."""
        node, now = self.node, _now()
        delivered = self._clock(agent_id, act)
        verdict = self.causal.offer(agent_id, delivered, req.session, req.vc,
                                    (req, reply_to), req.nbytes, now)
        if verdict == DELIVER:
            mark_delivered(delivered, req.session, req.vc)
            node.host.deliver(agent_id, act, req, reply_to)
            self._release_ready(agent_id, act, delivered)
        elif verdict == DUPLICATE:
            node.metrics.limited("causal_duplicate")
            node._reply_error(reply_to, req.id, ErrorCode.BAD_REQUEST,
                              f"message {req.vc.get(req.session)} of session "
                              f"{req.session!r} was delivered to {agent_id!r} already",
                              req.type)
        elif verdict == HELD:
            node.metrics.limited("causal_held")
            self._arm_causal()
        else:  # a Refusal: a hold bound
            node._reply_error(reply_to, req.id, verdict.code, verdict.message, req.type)

    def _release_ready(self, agent_id: str, act: Any, delivered: dict) -> None:
        for verdict, held in self.causal.ready(agent_id, delivered):
            req, reply_to = held.item
            if verdict == DELIVER:
                mark_delivered(delivered, held.sender, held.vc)
                self.node.host.deliver(agent_id, act, req, reply_to)
            else:
                self.node._reply_error(reply_to, req.id, ErrorCode.BAD_REQUEST,
                                       "a causal message delivered already", req.type)

    def _clock(self, agent_id: str, act: Any) -> dict[str, int]:
        clock = self._clocks.get(agent_id)
        if clock is None:
            if len(self._clocks) >= CLOCKS_MAX:
                self._clocks.clear()  # rebuilt from the replicated clocks
            rec = self.machine.primary(agent_id, act.cls.behavior_name, _now())
            stored = rec.fields.get(VC_FIELD)
            clock = self._clocks[agent_id] = dict(stored.value()) if stored is not None else {}
        return clock

    def _arm_causal(self) -> None:
        deadline = self.causal.next_deadline()
        if self._causal_timer is not None:
            self._causal_timer.cancel()
            self._causal_timer = None
        if deadline is not None and not self.node._closed:
            self._causal_timer = self.node._loop.call_at(deadline, self._causal_expired)

    def _causal_expired(self) -> None:
        self._causal_timer = None
        for held in self.causal.tick(_now()):
            req, reply_to = held.item
            self.node._reply_error(
                reply_to, req.id, ErrorCode.TIMEOUT,
                f"causal message held {self.causal.timeout_s} s: a message it depends on "
                "(by its vc) never reached the agent", req.type)
        self._arm_causal()

    def reset(self, agent_id: str) -> bool:
        """``syn.stop``: the agent's replicated state starts again empty on every
        replica (a new generation).  False if this node held none of it."""
        effects = self.machine.reset(agent_id, _now())
        if effects is None:
            return False
        self.forget_clock(agent_id)
        self.node._run(effects)
        self.node._arm("replication", self.machine)
        return True

    def forget_clock(self, agent_id: str) -> None:
        """The agent left this node: its held messages are answered, clock dropped."""
        self._clocks.pop(agent_id, None)
        for held in self.causal.drop_agent(agent_id):
            req, reply_to = held.item
            self.node._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE,
                                   "the agent moved to another node; send again", req.type)

    # ------------------------------------------------------------------ effects

    def _on_write_done(self, effect: WriteDone) -> None:
        held = effect.handle
        if not effect.ok:
            self.node.metrics.limited("write_consistency_timeout")
            held.failed(f"write applied on the owner and {effect.acks} replica(s); "
                        f"consistency {held.consistency} needs {effect.needed}: it may or "
                        "may not last")
        self._part_done(held)

    def _part_done(self, held: "_HeldReply") -> None:
        held.parts -= 1
        if held.parts:
            return
        if held.problem is None:
            self._answer(held.reply_to, held.req, held.outcome)
        else:
            self.node._reply_error(held.reply_to, held.req.id, ErrorCode.TIMEOUT,
                                   held.problem, held.req.type)

    # ------------------------------------------------------------------ storage

    def open_storage(self, loop: Any) -> int:
        """Open ``storage_path`` and read every copy kept there back into records
        (before the node joins: the first ring change re-places them).  Returns how
        many agents came back."""
        cfg = self.node.config
        if not cfg.storage_path:
            return 0
        self._loop = loop
        self.storage = stored.Storage(
            cfg.storage_path, sync=cfg.storage_sync,
            on_snapshot_wanted=lambda agent: loop.call_soon_threadsafe(self._compact, agent))
        count = 0
        for row in self.storage.load():
            fields: dict = {}
            for data in ([row.snapshot] if row.snapshot else []) + list(row.deltas):
                merge_generation(fields, decode_fields(msgpack.unpackb(data, raw=False)))
            self.machine.recovered(row.agent, row.behavior, fields)
            self._stored_seq[row.agent] = row.seq
            count += 1
        return count

    def _persist(self, effect: Persist, held: "_HeldReply | None") -> None:
        store = self.storage
        if store is None:
            return
        agent_id = effect.agent_id
        seq = self._stored_seq[agent_id] = self._stored_seq.get(agent_id, 0) + 1
        data = msgpack.packb(effect.fields, use_bin_type=True)
        done = None if held is None else self._when_stored(held)
        if not store.submit([stored.delta(agent_id, effect.behavior, seq, data)], done):
            self.node.metrics.limited("storage_queue_full")
            if held is not None:
                self._stored(held, stored.StorageError(store.path, "storage queue full"))

    def _when_stored(self, held: "_HeldReply") -> Any:
        loop = self._loop

        def done(error: Exception | None) -> None:  # runs on the storage writer thread
            loop.call_soon_threadsafe(self._stored, held, error)
        return done

    def _stored(self, held: "_HeldReply", error: Exception | None) -> None:
        if error is not None:
            self.node.metrics.limited("storage_write_failed")
            self.node.log.error("storage_write_failed", error=str(error)[:300])
            held.failed(f"write applied in memory but not stored ({error}): it may or "
                        "may not last")
        self._part_done(held)

    def _forget(self, effect: Forget) -> None:
        if self.storage is not None:
            self._stored_seq.pop(effect.agent_id, None)
            self.storage.submit([stored.delete(effect.agent_id)])

    def _compact(self, agent_id: str) -> None:
        """Storage asks for a snapshot to replace an agent's deltas."""
        rec = self.machine.records.get(agent_id)
        if rec is None or self.storage is None:
            return
        data = msgpack.packb(encode_fields(rec.fields), use_bin_type=True)
        self.storage.submit([stored.snapshot(agent_id, rec.behavior,
                                             self._stored_seq.get(agent_id, 0), data)])

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()
            self.storage = None

    def hold_for_gather(self, req: Any, reply_to: Any, route: tuple) -> bool:
        """A miss for an agent whose copies may be on other nodes: hold the request
        until they are gathered (True), or go ahead and activate (False)."""
        machine = self.machine
        if not machine.needs_gather(req.subject):
            return False
        held = machine.gather(req.subject, (req, reply_to, route), req.nbytes, _now())
        if type(held) is Refusal:
            self.node._reply_error(reply_to, req.id, held.code, held.message, req.type)
        else:
            self.node._run(held)
            self.node._arm("replication", machine)
        return True

    def _on_restore(self, effect: Restore) -> None:
        """The copies are in: activate the agent from the record, then route what waited."""
        node = self.node
        if effect.behavior is not None:
            self._wake(effect.agent_id, effect.behavior)
        else:
            self.machine.settled(effect.agent_id)
        for req, reply_to, (payload, hops, origin) in effect.held:
            node._dispatch(req, payload, reply_to, hops, origin, hold=False)

    def _on_activate(self, effect: Activate) -> None:
        """Failover: we own an agent we hold a copy of; wake it (paced)."""
        agent_id, node = effect.agent_id, self.node
        if agent_id in node.host.directory or node.router.ring.owner(agent_id) != node._me:
            return
        if self.machine.needs_gather(agent_id):
            node._run(self.machine.gather(agent_id, None, 0, _now()))
            node._arm("replication", self.machine)
            return
        rec = self.machine.records.get(agent_id)
        if rec is not None:
            self._wake(agent_id, rec.behavior)

    def _wake(self, agent_id: str, behavior: str) -> None:
        node = self.node
        if agent_id in node.host.directory or node.router.ring.owner(agent_id) != node._me:
            return
        cls = behaviors().get(behavior)
        self.machine.primary(agent_id, behavior, _now())
        if cls is None:
            node.log.warning("replica_behavior_unknown", agent_id=agent_id, behavior=behavior)
            return
        try:
            node.host.activate(agent_id, cls, None)
        except AgentError as exc:  # agents_max or the memory budget: woken on demand
            node.log.warning("failover_activation_deferred", agent_id=agent_id,
                             error=exc.message)
        node._arm("replication", self.machine)

    # ------------------------------------------------------------------ inbound

    def received(self, sender: str, message: dict) -> None:
        node, machine = self.node, self.machine
        bad_before = machine.stats["bad_in_batch"]
        try:
            effects = machine.receive(sender, message, _now())
        except ReplicationError as exc:
            self._bad(exc)
            return
        if machine.stats["bad_in_batch"] != bad_before:
            self._bad(machine.last_error)
        node._run(effects)
        node._arm("replication", self.machine)

    def _bad(self, exc: ReplicationError) -> None:
        node = self.node
        node.metrics.errored(ErrorCode.BAD_REQUEST, "syn.replicate")
        node.metrics.limited(f"replicate_{exc.reason}")
        node.log.warning("bad_replicate", error=str(exc)[:500])

    def events(self) -> dict[str, int]:
        return {**self.machine.stats, "duplicates": self.duplicates}


class _HeldReply:
    """A turn's reply waiting for its write's consistency (and, with storage on,
    for the local disk): ``parts`` still to come; ``problem`` once one failed."""

    __slots__ = ("reply_to", "req", "outcome", "consistency", "parts", "problem")

    def __init__(self, reply_to: Any, req: Any, outcome: tuple, consistency: str, parts: int):
        self.reply_to = reply_to
        self.req = req
        self.outcome = outcome
        self.consistency = consistency
        self.parts = parts
        self.problem: str | None = None

    def failed(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem


def _delivered_clock(fields: dict, replica: int) -> ORMap:
    """The agent's replicated delivered clock: session -> messages delivered."""
    clock = fields.get(VC_FIELD)
    if clock is None:
        clock = fields[VC_FIELD] = ORMap().bind(replica, time.time_ns)
    return clock


def _unpack_outcome(data: bytes) -> tuple:
    outcome = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return tuple(outcome)


__all__ = ["ReplicatedState", "IDS_FIELD"]
