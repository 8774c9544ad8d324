"""Composite requests: scatter-gather and pipelines, each answered exactly once.

Both run over the ordinary request path.  Each piece is routed like any request
(``Route``, ``ForwardTo`` effects), with a ``reply_to`` whose origin is ``STRATEGY``
and whose caller is a *slot* of this machine.  When a piece's answer comes back
(a reply or error envelope, by whatever path), the node hands it to
``answered(slot, payload, now)``.  PROTOCOL.md 2.5 has the envelopes.

**Scatter** (``routing: "scatter"``, ``targets``): ``scatter(req, reply_to, owners,
hops, now)`` takes each target's owner as the router gave it.  Targets owned here
become one direct request each (``Route``); each other owner gets **one** forward
carrying a scatter of its own targets (``ForwardTo``), whose answer is a map of
its part; a target the router refused is answered with that refusal at once.  A
gather ends once, at the first of: every target answered; its deadline (targets
still missing are answered ``timeout``); ``stop()``.  Its answer maps each target
to ``{"data": ...}`` or ``{"error": {"code", "message"}}``.

**Pipeline** (``routing: "pipeline"``, ``stages``): a chain of ``(agent, type)``.
At the entry node, ``pipeline_entry`` records the whole pipeline under one deadline
and gives the reply_to it travels with.  At each stage's owner, ``stage`` wraps the
caller: the handler's reply becomes the next stage's request (its ``data``; routed
anew, ``Route``), or the final answer (``Relay``), which goes to the entry node once,
straight from the last stage.  An error at stage k ends the pipeline: the caller
gets that error with ``stage`` (k, from 0) and ``agent`` in its data.  The entry
answers ``timeout`` if the deadline passes first; a late answer is dropped.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Mapping

import msgpack

from . import wire
from .effects import Answer, Fail, ForwardTo, Relay, Route
from .wire import ErrorCode

IN_FLIGHT_MAX = 10_000        # gathers and pipelines this node answers for at once
SUB_MARGIN_S = 0.2            # an owner's part of a scatter ends this much earlier,
SUB_MARGIN_FRACTION = 0.1     # (or a tenth of the time left) so its answer makes it


class _Strategy:
    """The origin of a reply_to whose caller is a slot of this machine."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STRATEGY"


STRATEGY = _Strategy()


class Gather:
    __slots__ = ("reply_to", "request_id", "targets", "results", "deadline", "nbytes",
                 "done")

    def __init__(self, reply_to: tuple, request_id: str, targets: tuple, deadline: float):
        self.reply_to = reply_to
        self.request_id = request_id
        self.targets = targets
        self.results: dict[str, dict] = {}
        self.deadline = deadline
        self.nbytes = 0
        self.done = False


class Part:
    """A slot: the answer for ``agents`` of a gather (``nested``: a sub-scatter's map)."""

    __slots__ = ("gather", "agents", "nested")

    def __init__(self, gather: Gather, agents: tuple, nested: bool):
        self.gather, self.agents, self.nested = gather, agents, nested


class Whole:
    """A slot at the entry node: the answer of a whole pipeline."""

    __slots__ = ("reply_to", "request_id", "mtype", "deadline", "done")

    def __init__(self, reply_to: tuple, request_id: str, mtype: str, deadline: float):
        self.reply_to, self.request_id, self.mtype = reply_to, request_id, mtype
        self.deadline = deadline
        self.done = False


class Stage:
    """A slot at a stage's owner: the handler's answer to one stage."""

    __slots__ = ("req", "reply_to", "deadline", "done")

    def __init__(self, req: wire.RoutedRequest, reply_to: tuple, deadline: float | None):
        self.req, self.reply_to, self.deadline = req, reply_to, deadline
        self.done = False


def _error_entry(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _decode(payload: bytes) -> dict | None:
    try:
        env = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    return env if isinstance(env, dict) else None


def _outcome(env: dict | None) -> tuple[bool, Any]:
    """(True, data) for a reply envelope, (False, error data) for anything else."""
    if env is not None and env.get("type") == wire.TYPE_REPLY:
        return True, env.get("data")
    err = env.get("data") if env is not None else None
    if not isinstance(err, dict) or type(err.get("code")) is not str:
        err = {"code": ErrorCode.INTERNAL, "message": "unreadable answer"}
    return False, err


class Strategies:
    """The composite requests this node answers for (see the module docstring)."""

    def __init__(self, node_id: str, *, default_timeout_s: float, reply_bytes_max: int,
                 in_flight_max: int = IN_FLIGHT_MAX):
        self._me = node_id
        self._default_timeout_s = default_timeout_s
        self._reply_bytes_max = reply_bytes_max
        self._in_flight_max = in_flight_max
        self._live = 0
        self._timers: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self.stats = {"scatters": 0, "scatter_targets": 0, "scatter_parts": 0,
                      "pipelines": 0, "stages": 0, "timed_out": 0, "late": 0,
                      "refused": 0}

    # --- scatter -------------------------------------------------------------------

    def scatter(self, req: wire.RoutedRequest, reply_to: tuple | None,
                owners: Mapping[str, Any], hops: int, now: float) -> list:
        """Start a gather for ``req``; ``owners`` maps each target to its owner's node
        id (this node's for a local one) or a routing Refusal."""
        if reply_to is None:
            return []  # a forwarded scatter with nobody to answer: nothing to gather
        if self._live >= self._in_flight_max:
            self.stats["refused"] += 1
            return [Fail(reply_to, req.id, ErrorCode.OVERLOADED,
                         f"{self._in_flight_max} scatters and pipelines in flight on this "
                         f"node", req.type)]
        gather = Gather(reply_to, req.id, req.targets, now + self._timeout_s(req))
        self._arm(gather.deadline, gather)
        self.stats["scatters"] += 1
        self.stats["scatter_targets"] += len(req.targets)
        effects: list = []
        remote: dict[str, list[str]] = {}
        for agent in req.targets:
            owner = owners[agent]
            if type(owner) is not str:  # refused by the router
                gather.results[agent] = _error_entry(owner.code, owner.message)
            elif owner == self._me:
                effects.append(self._one(gather, req, agent, reply_to, hops))
            else:
                remote.setdefault(owner, []).append(agent)
        for owner, agents in remote.items():
            effects.append(self._part(gather, req, owner, tuple(agents), reply_to, hops, now))
        return effects + self._maybe_done(gather)

    def _one(self, gather: Gather, req: wire.RoutedRequest, agent: str, reply_to: tuple,
             hops: int) -> Route:
        env = wire.request(req.id, req.type, agent, req.data,
                           traceparent=req.raw.get("traceparent"), ttl=req.ttl)
        encoded = wire.encode(env)
        one = wire.Request(req.id, req.type, agent, wire.MODE_CALL, req.data, req.ttl, env,
                           len(encoded))  # its bytes count against the node's budgets
        slot = (Part(gather, (agent,), False), STRATEGY, None, reply_to[3], reply_to[4])
        return Route(one, encoded, slot, hops)

    def _part(self, gather: Gather, req: wire.RoutedRequest, owner: str, agents: tuple,
              reply_to: tuple, hops: int, now: float) -> ForwardTo:
        left_s = max(gather.deadline - now, 0.001)
        sub_ms = max(1, int(1000 * (left_s - min(SUB_MARGIN_S, SUB_MARGIN_FRACTION * left_s))))
        env = wire.request(req.id, req.type, None, req.data, routing=wire.ROUTING_SCATTER,
                           targets=list(agents), timeout_ms=sub_ms, ttl=req.ttl,
                           traceparent=req.raw.get("traceparent"))
        part = wire.RoutedRequest(req.id, req.type, None, wire.MODE_CALL, req.data, req.ttl,
                                  env, routing=wire.ROUTING_SCATTER, targets=agents,
                                  timeout_ms=sub_ms)
        self.stats["scatter_parts"] += 1
        encoded = wire.encode(env)
        part.nbytes = len(encoded)
        slot = (Part(gather, agents, True), STRATEGY, None, reply_to[3], reply_to[4])
        return ForwardTo(owner, part, encoded, slot, hops)

    def _part_answered(self, part: Part, payload: bytes) -> list:
        gather = part.gather
        if gather.done:
            self.stats["late"] += 1
            return []
        ok, data = _outcome(_decode(payload))
        gather.nbytes += len(payload)
        over = gather.nbytes > self._reply_bytes_max
        for agent in part.agents:
            if agent in gather.results:
                continue  # answered already (a part is answered once; never overwrite)
            if over:
                entry = _error_entry(ErrorCode.TOO_LARGE, f"the gathered answers exceed "
                                     f"{self._reply_bytes_max} bytes")
            elif not ok:
                entry = {"error": data}
            elif not part.nested:
                entry = {"data": data}
            else:
                entry = self._nested_entry(data, agent)
            gather.results[agent] = entry
        return self._maybe_done(gather)

    @staticmethod
    def _nested_entry(data: Any, agent: str) -> dict:
        """One agent's entry out of an owner's answer to its part of the scatter."""
        entry = data.get(agent) if isinstance(data, dict) else None
        if isinstance(entry, dict) and ("data" in entry or isinstance(entry.get("error"), dict)):
            return entry
        return _error_entry(ErrorCode.INTERNAL, f"the owner's answer lacks {agent!r}")

    def _maybe_done(self, gather: Gather) -> list:
        if gather.done or len(gather.results) < len(gather.targets):
            return []
        return self._finish(gather)

    def _finish(self, gather: Gather) -> list:
        gather.done = True
        self._live -= 1
        results = gather.results
        return [Answer(gather.reply_to, gather.request_id,
                       {agent: results[agent] for agent in gather.targets})]

    # --- pipeline ------------------------------------------------------------------

    def pipeline_entry(self, req: wire.RoutedRequest, reply_to: tuple, now: float) -> tuple | Fail:
        """The reply_to a pipeline from this node's own client travels with: its
        answer (or the deadline) comes back here once, whichever stage gives it."""
        if self._live >= self._in_flight_max:
            self.stats["refused"] += 1
            return Fail(reply_to, req.id, ErrorCode.OVERLOADED,
                        f"{self._in_flight_max} scatters and pipelines in flight on this "
                        f"node", req.type)
        whole = Whole(reply_to, req.id, req.type, now + self._timeout_s(req))
        self._arm(whole.deadline, whole)
        self.stats["pipelines"] += 1
        return (whole, STRATEGY, None, reply_to[3], reply_to[4])

    def stage(self, req: wire.RoutedRequest, reply_to: tuple | None, now: float) -> tuple | None:
        """The reply_to of one stage run here: its answer moves the pipeline on."""
        if reply_to is None or type(reply_to[0]) is Stage:
            return reply_to  # nobody to answer, or wrapped already (held, then run)
        self.stats["stages"] += 1
        # From now: ``timeout_ms`` is what was left when this stage's request was made
        # (by the caller, or by the stage before it, on this node or another).
        deadline = now + req.timeout_ms / 1000 if req.timeout_ms else None
        return (Stage(req, reply_to, deadline), STRATEGY, None, reply_to[3], reply_to[4])

    def _stage_answered(self, stage: Stage, payload: bytes, now: float) -> list:
        if stage.done:
            return []
        stage.done = True
        req = stage.req
        env = _decode(payload)
        ok, data = _outcome(env)
        if not ok:
            return [Relay(stage.reply_to, self._stage_error(req, data["code"],
                                                            data.get("message", "")))]
        if not req.stages:
            return [Relay(stage.reply_to, payload)]  # the last stage: the answer
        left_ms = None
        if stage.deadline is not None:
            left_ms = int(1000 * (stage.deadline - now))
            if left_ms <= 0:
                return [Relay(stage.reply_to, self._stage_error(
                    req, ErrorCode.TIMEOUT, "the pipeline's deadline passed"))]
        (agent, mtype), rest = req.stages[0], req.stages[1:]
        nxt = wire.request(req.id, mtype, agent, data, routing=wire.ROUTING_PIPELINE,
                           stages=[list(pair) for pair in rest], stage=req.stage + 1,
                           timeout_ms=left_ms, ttl=req.ttl,
                           traceparent=req.raw.get("traceparent"))
        try:
            encoded = wire.encode(nxt)
        except (TypeError, ValueError, OverflowError) as exc:
            return [Relay(stage.reply_to, self._stage_error(req, ErrorCode.INTERNAL, str(exc)))]
        if len(encoded) > self._reply_bytes_max:
            return [Relay(stage.reply_to, self._stage_error(
                req, ErrorCode.TOO_LARGE, f"its reply makes a request of {len(encoded)} "
                f"bytes, over {self._reply_bytes_max}"))]
        routed = wire.RoutedRequest(req.id, mtype, agent, wire.MODE_CALL, data, req.ttl, nxt,
                                    routing=wire.ROUTING_PIPELINE, stages=rest,
                                    stage=req.stage + 1, timeout_ms=left_ms)
        routed.nbytes = len(encoded)
        return [Route(routed, encoded, stage.reply_to, 0)]

    def _stage_error(self, req: wire.RoutedRequest, code: str, message: str) -> bytes:
        env = {"v": wire.VERSION, "id": req.id, "re": req.id, "type": wire.TYPE_ERROR,
               "source": self._me,
               "data": {"code": code, "message": f"stage {req.stage} ({req.subject} "
                                                 f"{req.type}): {message}",
                        "stage": req.stage, "agent": req.subject}}
        traceparent = req.raw.get("traceparent")
        if type(traceparent) is str:
            env["traceparent"] = traceparent
        return wire.encode(env)

    def _whole_answered(self, whole: Whole, payload: bytes) -> list:
        if whole.done:
            self.stats["late"] += 1
            return []
        whole.done = True
        self._live -= 1
        return [Relay(whole.reply_to, payload)]

    # --- answers, time -------------------------------------------------------------

    def answered(self, slot: Any, payload: bytes, now: float) -> list:
        """A piece's answer (an encoded reply or error envelope) reached its slot."""
        kind = type(slot)
        if kind is Part:
            return self._part_answered(slot, payload)
        if kind is Stage:
            return self._stage_answered(slot, payload, now)
        return self._whole_answered(slot, payload)

    @staticmethod
    def deadline_of(slot: Any) -> float | None:
        """When the scatter or pipeline a piece belongs to must be answered (None:
        a stage of a pipeline that gave no deadline)."""
        return slot.gather.deadline if type(slot) is Part else slot.deadline

    @property
    def in_flight(self) -> int:
        return self._live

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].done:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def tick(self, now: float) -> list:
        effects: list = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, item = heapq.heappop(timers)
            if not item.done:
                self.stats["timed_out"] += 1
                effects += self._expire(item)
        return effects

    def receive(self, sender: str, message: Any, now: float) -> list:
        raise TypeError("strategies take no peer messages (answers come through answered)")

    def stop(self) -> list:
        """The node is shutting down: everything in flight is answered now."""
        effects = []
        for _, _, item in self._timers:
            if not item.done:
                effects += self._expire(item, ErrorCode.UNAVAILABLE, "node is shutting down")
        self._timers.clear()
        return effects

    def _expire(self, item: Any, code: str = ErrorCode.TIMEOUT, why: str = "") -> list:
        if type(item) is Whole:
            item.done = True
            self._live -= 1
            return [Fail(item.reply_to, item.request_id, code,
                         why or "the pipeline did not finish before its deadline", item.mtype)]
        for agent in item.targets:
            if agent not in item.results:
                item.results[agent] = _error_entry(code, why or "no answer before the "
                                                   "scatter's deadline")
        return self._finish(item)

    def _timeout_s(self, req: wire.RoutedRequest) -> float:
        return req.timeout_ms / 1000 if req.timeout_ms else self._default_timeout_s

    def _arm(self, deadline: float, item: Any) -> None:
        self._live += 1
        timers = self._timers
        if len(timers) > 2 * self._live + 1024:
            # Answered gathers and pipelines leave their timer behind until its
            # deadline (up to 10 minutes): drop them, so the heap stays bounded by
            # what is in flight, not by the request rate.
            timers[:] = [t for t in timers if not t[2].done]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, next(self._seq), item))
