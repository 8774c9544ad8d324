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
from protocols.crdt import take_deltas
from protocols.delivery import AppliedIds
from protocols.effects import Activate, Restore, WriteDone
from protocols.replication import Replication, ReplicationError
from protocols.routing import Refusal
from protocols.wire import ErrorCode

from .agents import AgentError, behaviors

if TYPE_CHECKING:
    from .runtime import Node

IDS_FIELD = "_ids"  # the exactly-once window, a field of the agent's record
EXACTLY_ONCE = "exactly_once"

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
            observe_lag=node.metrics.replication_lag)
        host = node.host
        host.replica, host.clock = self.replica, time.time_ns
        host._state_for = self.state_for
        host._adopt = self.adopt
        host._turn_start = self.turn_start
        host._turn_done = self.turn_done
        self.duplicates = 0

    @property
    def effects(self) -> dict:
        return {Restore: self._on_restore, WriteDone: self._on_write_done,
                Activate: self._on_activate}

    # ------------------------------------------------------------------ host hooks

    def state_for(self, agent_id: str, cls: type) -> dict:
        """The fields an agent activated here runs on: its record's."""
        return self.machine.primary(agent_id, cls.behavior_name, _now()).fields

    def adopt(self, agent_id: str, cls: type, fields: Any) -> None:
        """A handoff brought the fields from the previous owner."""
        self.machine.adopt(agent_id, cls.behavior_name, fields, _now())
        self.node._arm("replication", self.machine)

    def turn_start(self, agent_id: str, act: Any, req: Any, reply_to: Any) -> bool:
        """Exactly-once: a message id already applied is answered from the window."""
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
            self.node._reply_error(reply_to, req.id, ErrorCode.BAD_REQUEST,
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
        self.node._run(self.machine.wrote(agent_id, deltas, consistency,
                                          (reply_to, req, outcome, consistency), now))
        self.node._arm("replication", self.machine)

    def _remember(self, fields: dict, msg_id: str, outcome: tuple) -> None:
        ids = fields.get(IDS_FIELD)
        if ids is None:
            ids = fields[IDS_FIELD] = AppliedIds().bind(self.replica, time.time_ns)
        ids.add(msg_id, msgpack.packb(list(outcome), use_bin_type=True), time.time_ns())

    def _answer(self, reply_to: Any, req: Any, outcome: tuple) -> None:
        if outcome[0] == "ok":
            self.node._reply_data(reply_to, req.id, outcome[1])
        else:
            self.node._reply_error(reply_to, req.id, outcome[1], outcome[2], req.type)

    # ------------------------------------------------------------------ effects

    def _on_write_done(self, effect: WriteDone) -> None:
        reply_to, req, outcome, consistency = effect.handle
        if effect.ok:
            self._answer(reply_to, req, outcome)
            return
        self.node.metrics.limited("write_consistency_timeout")
        self.node._reply_error(
            reply_to, req.id, ErrorCode.TIMEOUT,
            f"write applied on the owner and {effect.acks} replica(s); consistency "
            f"{consistency} needs {effect.needed}: it may or may not last", req.type)

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
        node = self.node
        try:
            effects = self.machine.receive(sender, message, _now())
        except ReplicationError as exc:
            node.metrics.errored(ErrorCode.BAD_REQUEST, "syn.replicate")
            node.metrics.limited(f"replicate_{exc.reason}")
            node.log.warning("bad_replicate", error=str(exc)[:500])
            return
        node._run(effects)
        node._arm("replication", self.machine)

    def events(self) -> dict[str, int]:
        return {**self.machine.stats, "duplicates": self.duplicates}


def _unpack_outcome(data: bytes) -> tuple:
    outcome = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return tuple(outcome)


__all__ = ["ReplicatedState", "IDS_FIELD"]
