"""Python client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak wire protocol v1 (docs/PROTOCOL.md) over one ZeroMQ DEALER socket
connected to any node; the node routes each request to the agent's owner.

``AsyncClient`` keeps many calls in flight on one socket: requests are queued
and flushed in one batch per loop iteration, and replies are read by draining
the socket until ``zmq.Again`` when its (edge-triggered) FD fires, then matched
to their futures by ``re``.  ``AsyncClient.call`` returns an awaitable future,
not a coroutine, so ``asyncio.gather`` over many calls makes no task per call.

Matching rule (both clients): a reply answers the call whose request id equals
its ``re``, and nothing else; replies may arrive in any order.  Replies to
requests no longer waited for (calls that timed out or were cancelled, or a
one-way message the node answered anyway) are dropped and counted in
``late_replies``; replies with ``re`` nil, with an id this client never sent, or
that are not envelopes are dropped and counted in ``unmatched_replies``.  The node
sets ``re`` whenever it could read the request id and these clients always send a
readable id, so an error with ``re`` nil is never the answer to one of their calls.
(A forged reply that names an id in flight cannot be told apart here: that needs
authenticated transport.)

Guarantees (docs/PROTOCOL.md section 2.4): ``call`` and ``send`` take
``consistency`` ("local" | "quorum" | "all") and ``delivery`` ("at_most_once" |
"at_least_once" | "exactly_once" | "causal").  With at_least_once or exactly_once
the client resends the same request (same id) when no reply came within an attempt
timeout of min(time left, ATTEMPT_TIMEOUT_S = 1 s), or when the node answered
``unavailable`` or ``overloaded``, waiting between attempts per
``protocols.delivery.Backoff``, until the call's ``timeout_s``; the first reply to
any attempt is the answer, later ones count as late.  A ``send`` with either of
them travels as a call whose reply is only its acknowledgment (``send`` returns
None once the node acknowledged it).  exactly_once ids are ``N.SESSION`` so they are
unique among all clients.  With causal, the client stamps each message with its
vector clock for that agent (``session`` is this client's process id, a uuid4 hex)
and merges the ``vc`` of each reply.  Calls without these options take the same
path as before.

Routing strategies (PROTOCOL.md 2.5): ``pipeline`` (a chain of ``(agent, type)``
stages, each reply the next stage's data), ``broadcast`` (one message to many agents,
replies gathered by the node) and ``publish(..., strategy="gossip")``.  A pipeline or
broadcast asks the node for a deadline a little under the client's own timeout
(``routed_timeout_ms``), so the node's answer, with whatever it gathered, arrives
before the client gives up.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import uuid
from collections import deque
from typing import Any

import msgpack
import zmq

from protocols import wire
from protocols.delivery import Backoff

from .curve import ClientKeys, client_keys

__all__ = ["Client", "AsyncClient", "RemoteError", "CallTimeout", "endpoint"]

IN_FLIGHT_MAX = 10_000    # calls one AsyncClient keeps outstanding before call() waits
OUTBOX_MAX = 100_000      # encoded requests waiting for the socket before send() waits
CLOSE_LINGER_MS = 1000    # time unsent messages get to leave after close()
READ_BATCH_MAX = 1024     # replies read per wake-up before yielding to the loop
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost on the hot path
ATTEMPT_TIMEOUT_S = 1.0   # at_least_once / exactly_once: resend after this long without a reply
RESENT = frozenset((wire.DELIVERY_AT_LEAST_ONCE, wire.DELIVERY_EXACTLY_ONCE))
RETRY_CODES = frozenset((wire.ErrorCode.UNAVAILABLE, wire.ErrorCode.OVERLOADED))
ROUTED_MARGIN_S = 0.5         # a pipeline's or broadcast's deadline at the node: this much
ROUTED_MARGIN_FRACTION = 0.1  # (or a tenth of the timeout, if less) before the client's own
PUBLISH_STRATEGIES = (None, wire.ROUTING_MULTICAST, wire.ROUTING_GOSSIP)


class RemoteError(Exception):
    """The node answered with an error envelope."""

    def __init__(self, code: str, message: str, request_id: str | None = None,
                 retry_after_s: float | None = None, stage: int | None = None,
                 agent: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s  # the node's hint (data.retry_after_ms), or None
        self.stage = stage  # a pipeline's failing stage, from 0 (data.stage), or None
        self.agent = agent  # ... and that stage's agent (data.agent), or None


class CallTimeout(TimeoutError):
    """No reply within the call's timeout."""


def endpoint(address: str) -> str:
    """'host:port' or 'tcp://host:port' -> 'tcp://host:port'."""
    return address if "://" in address else f"tcp://{address}"


def _new_socket(context: zmq.Context, address: str,
                curve: ClientKeys | None = None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint(address))
    return sock


def _decode(raw: bytes) -> dict | None:
    """A reply frame -> its envelope map, or None when it is not one.

    Keys inside ``data`` may be any msgpack type a handler returned.
    """
    try:
        envelope = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    return envelope if isinstance(envelope, dict) else None


def _remote_error(envelope: dict) -> RemoteError:
    return _error_from(envelope.get("data"), envelope.get("re"))


def _error_from(err: Any, request_id: Any) -> RemoteError:
    """An error's data (``{"code", "message", ...}``) -> RemoteError; fields of the
    wrong type are left out rather than trusted."""
    if not isinstance(err, dict):
        err = {}
    hint = err.get("retry_after_ms")
    retry_after_s = hint / 1000 if type(hint) in (int, float) and hint >= 0 else None
    stage, agent = err.get("stage"), err.get("agent")
    return RemoteError(err.get("code", wire.ErrorCode.INTERNAL), err.get("message", ""),
                       request_id, retry_after_s,
                       stage if type(stage) is int else None,
                       agent if type(agent) is str else None)


def _result(envelope: dict) -> Any:
    """A decoded reply envelope -> its data, or raise RemoteError."""
    if envelope.get("type") == wire.TYPE_ERROR:
        raise _remote_error(envelope)
    return envelope.get("data")


# Routing strategies: argument checks and envelopes shared by both clients ------------


def routed_timeout_ms(timeout_s: float) -> int:
    """The deadline a pipeline or broadcast asks the node for (``timeout_ms``): the
    client's timeout less min(ROUTED_MARGIN_S, a tenth of it), so the node answers
    (with a broadcast's missing agents marked ``timeout``) before the client stops
    waiting; at most wire.TIMEOUT_MS_MAX."""
    margin_s = min(ROUTED_MARGIN_S, ROUTED_MARGIN_FRACTION * timeout_s)
    return min(wire.TIMEOUT_MS_MAX, max(1, int(1000 * (timeout_s - margin_s))))


def check_agent(agent: Any, what: str) -> str:
    if type(agent) is not str or not 0 < len(agent) <= wire.SUBJECT_LEN_MAX:
        raise ValueError(f"{what} must be an agent id of 1..{wire.SUBJECT_LEN_MAX} "
                         f"characters, got {agent!r}")
    return agent


def check_type(mtype: Any, what: str = "type") -> str:
    if type(mtype) is not str or not 0 < len(mtype) <= wire.TYPE_LEN_MAX \
            or mtype.startswith(wire.SYSTEM_PREFIX):
        raise ValueError(f"{what} must be an agent message type of 1..{wire.TYPE_LEN_MAX} "
                         f"characters not starting with {wire.SYSTEM_PREFIX!r}, got {mtype!r}")
    return mtype


def check_stages(stages: Any) -> list[tuple[str, str]]:
    """A pipeline's stages, checked: 2..STAGES_MAX (agent, type) pairs; else ValueError."""
    if not isinstance(stages, (list, tuple)):
        raise ValueError(f"stages must be a list of (agent, type) pairs, got "
                         f"{type(stages).__name__}")
    if not 2 <= len(stages) <= wire.STAGES_MAX:
        raise ValueError(f"a pipeline has 2..{wire.STAGES_MAX} stages, got {len(stages)}")
    checked = []
    for index, pair in enumerate(stages):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"stage {index} must be an (agent, type) pair, got {pair!r}")
        checked.append((check_agent(pair[0], f"stage {index}'s agent"),
                        check_type(pair[1], f"stage {index}'s type")))
    return checked


def check_targets(agents: Any) -> list[str]:
    """A broadcast's agents, checked: 1..TARGETS_MAX distinct agent ids; else ValueError."""
    if not isinstance(agents, (list, tuple)):  # a lone str would be taken letter by letter
        raise ValueError(f"agents must be a list of agent ids, got {type(agents).__name__}")
    if not 0 < len(agents) <= wire.TARGETS_MAX:
        raise ValueError(f"a broadcast goes to 1..{wire.TARGETS_MAX} agents, got {len(agents)}")
    seen: set[str] = set()
    for agent in agents:
        if check_agent(agent, "each agent") in seen:
            raise ValueError(f"agent {agent!r} is named twice")
        seen.add(agent)
    return list(agents)


def _pipeline_call(stages: Any, wait_s: float) -> tuple[str, str, dict]:
    """(type, subject, envelope options) of a pipeline call the client waits
    ``wait_s`` for: the first stage is its subject and type, the others ``stages``."""
    (agent, mtype), *rest = check_stages(stages)
    return mtype, agent, {"routing": wire.ROUTING_PIPELINE,
                          "stages": [[a, t] for a, t in rest],
                          "timeout_ms": routed_timeout_ms(wait_s)}


def _scatter_options(agents: list[str], mtype: Any, wait_s: float) -> dict:
    """Envelope options of a broadcast (a scatter call, no subject) of checked ``agents``."""
    check_type(mtype)
    return {"routing": wire.ROUTING_SCATTER, "targets": agents,
            "timeout_ms": routed_timeout_ms(wait_s)}


def _publish_options(strategy: str | None, options: dict) -> dict:
    if strategy not in PUBLISH_STRATEGIES:
        raise ValueError(f"strategy must be None, {wire.ROUTING_MULTICAST!r} or "
                         f"{wire.ROUTING_GOSSIP!r}, got {strategy!r}")
    return options if strategy is None else dict(options, routing=strategy)


def _gathered(agents: list[str], data: Any) -> dict[str, Any]:
    """A scatter's answer -> {agent: its reply data, or a RemoteError}, in the order
    the caller named the agents.  An agent the node's map lacks (never, from a
    conforming node) gets an ``internal`` RemoteError rather than a KeyError."""
    entries = data if isinstance(data, dict) else {}
    gathered: dict[str, Any] = {}
    for agent in agents:
        entry = entries.get(agent)
        if isinstance(entry, dict) and "data" in entry:
            gathered[agent] = entry["data"]
        elif isinstance(entry, dict) and isinstance(entry.get("error"), dict):
            gathered[agent] = _error_from(entry["error"], None)
        else:
            gathered[agent] = RemoteError(wire.ErrorCode.INTERNAL, f"the node's answer "
                                          f"has no entry for {agent!r}")
    return gathered


class _Requests:
    """Envelope building shared by both clients.

    Request ids are "1", "2", ... in order, so whether a reply's ``re`` names a
    request this client sent is one comparison; exactly_once requests add
    ".SESSION" (unique among clients, as the node dedups by agent and id).
    """

    def __init__(self) -> None:
        self.source = f"client-{os.getpid()}-{os.urandom(4).hex()}"
        self.session = uuid.uuid4().hex
        self.causal = _CausalClocks(self.session)
        self.rng = random.Random()  # backoff jitter
        self._last_id = 0

    def next_id(self) -> str:
        self._last_id += 1
        return str(self._last_id)

    def sent(self, re: Any) -> bool:
        """True when ``re`` is the id of a request this client has sent."""
        if type(re) is str and "." in re:
            re, _, session = re.partition(".")
            if session != self.session:
                return False
        return (type(re) is str and 0 < len(re) <= 20 and re.isascii() and re.isdigit()
                and re[0] != "0" and int(re) <= self._last_id)

    def guaranteed(self, mtype: str, subject: str | None, data: Any, mode: str,
                   consistency: str | None, delivery: str | None,
                   options: dict) -> tuple[str, bytes]:
        """A request with guarantees: its id and bytes (stamped, when causal)."""
        rid = self.next_id()
        if delivery == wire.DELIVERY_EXACTLY_ONCE:
            rid = f"{rid}.{self.session}"
        options = dict(options, consistency=consistency, delivery=delivery)
        if delivery == wire.DELIVERY_CAUSAL:
            options["session"], options["vc"] = self.causal.stamp(subject)
        return rid, self.encode(rid, mtype, subject, data, mode, options)

    def encode(self, rid: str, mtype: str, subject: str | None, data: Any, mode: str,
               options: dict) -> bytes:
        return wire.encode(wire.request(rid, mtype, subject, data, mode, **options))


class _AgentClock:
    __slots__ = ("session", "sent", "learned")

    def __init__(self, session: str):
        self.session = session  # this client's process id for the agent
        self.sent = 0           # causal messages sent to the agent under ``session``
        self.learned: dict[str, int] = {}  # merged from the agent's replies


class _CausalClocks:
    """This client's vector clock per agent, for causal delivery (PROTOCOL.md 2.4).

    One clock per agent, because an agent's delivered clock counts only the messages
    delivered to it.  Kept for every agent the client sent a causal message to (a
    small dict each).  When a causal message to an agent fails (an error, or no
    reply), later ones under the same process id would wait for it forever, so the
    client takes a new process id for that agent: what the agent confirmed of the
    old one stays in the clock, so the new messages still follow it.
    """

    def __init__(self, session: str):
        self._session = session
        self._agents: dict[str | None, _AgentClock] = {}

    def stamp(self, agent: str | None) -> tuple[str, dict[str, int]]:
        """The process id and ``vc`` of the next causal message to ``agent``."""
        clock = self._agents.get(agent)
        if clock is None:
            clock = self._agents[agent] = _AgentClock(self._session)
        clock.sent += 1
        vc = dict(clock.learned)
        vc[clock.session] = clock.sent
        return clock.session, vc

    def merge(self, agent: str | None, vc: Any) -> None:
        """Merge a reply's ``vc`` (the agent's delivered clock) into the agent's clock;
        entries that are not (str, positive int) are ignored."""
        clock = self._agents.get(agent)
        if clock is None or type(vc) is not dict:
            return
        learned = clock.learned
        for process, count in vc.items():
            if (type(process) is str and 0 < len(process) <= wire.SESSION_LEN_MAX
                    and type(count) is int and 0 < count <= wire.VC_COUNT_MAX
                    and count > learned.get(process, 0)):
                learned[process] = count
        if len(learned) >= wire.VC_ENTRIES_MAX:  # keep room for our own entry
            # Fewer entries only weaken what a message waits for, never reorder.
            kept = sorted(learned.items(), key=lambda item: item[1])[-(wire.VC_ENTRIES_MAX - 1):]
            clock.learned = dict(kept)

    def failed(self, agent: str | None) -> None:
        """A causal message to ``agent`` was not delivered: use a new process id."""
        clock = self._agents.get(agent)
        if clock is not None:
            clock.session = uuid.uuid4().hex
            clock.sent = 0


class _Attempts:
    """When a call with guarantees sends again, waits, or gives up: the retry rule
    shared by both clients, each driving it with its own I/O.

    After each send, ``wait_s`` says how long to wait for a reply; then ``step``
    with the envelope that came (or None) says what next: "send" (send the same
    bytes again), "wait" (back off, still taking a reply), or "done": then
    ``settle`` gives the call's result or raises.  Only at_least_once and
    exactly_once resend; other calls wait until their deadline once.
    """

    def __init__(self, requests: _Requests, mtype: str, subject: str | None,
                 delivery: str | None, timeout_s: float, now: float):
        self.resend = delivery in RESENT
        self.timeout_s = timeout_s
        self.deadline = now + timeout_s
        self.sends = 0
        self._requests = requests
        self._what = (mtype, subject, delivery)
        self._backoff = Backoff(deadline_s=self.deadline, rng=requests.rng)
        self._until = self.deadline
        self._backing_off = False
        self._last_error: RemoteError | None = None

    def sent(self, now: float) -> None:
        self.sends += 1
        self._backing_off = False
        self._until = min(self.deadline, now + ATTEMPT_TIMEOUT_S) if self.resend else self.deadline

    def wait_s(self, now: float) -> float:
        return max(0.0, self._until - now)

    def step(self, envelope: dict | None, now: float) -> str:
        if envelope is None:  # silence
            if now >= self.deadline or not self.resend:
                return "done"
            return "send" if self._backing_off else self._back_off(now)
        if not self.resend or envelope.get("type") != wire.TYPE_ERROR:
            return "done"
        error = _remote_error(envelope)
        if error.code not in RETRY_CODES:
            return "done"
        self._last_error = error
        return self._back_off(now)

    def _back_off(self, now: float) -> str:
        delay = self._backoff.next_delay(now)
        if delay is None:
            return "done"
        self._backing_off = True
        self._until = now + delay
        return "wait"

    def settle(self, envelope: dict | None) -> Any:
        """The call's result: the data of ``envelope``, the answer (merging its
        ``vc`` when causal); or raise its error, or, without an answer, the last
        retryable error the node gave, else CallTimeout."""
        mtype, subject, delivery = self._what
        causal = self._requests.causal if delivery == wire.DELIVERY_CAUSAL else None
        if envelope is not None and envelope.get("type") != wire.TYPE_ERROR:
            if causal is not None:
                causal.merge(subject, envelope.get("vc"))
            return envelope.get("data")
        if causal is not None:  # not delivered: later messages must not wait for it
            causal.failed(subject)
        if envelope is not None:
            raise _remote_error(envelope)
        if self._last_error is not None:
            raise self._last_error
        raise CallTimeout(f"no reply to {mtype} for {subject!r} within {self.timeout_s} s "
                          f"({self.sends} sends)")


class Client:
    """Blocking client.  One call at a time; safe to keep open for many calls.

    ``with Client("127.0.0.1:7400") as c: c.call("counter/alice", "incr", {"n": 5})``

    A call returns only the reply whose ``re`` equals its request id.  Anything
    else read while waiting is dropped: a reply to an earlier call that timed out
    is counted in ``late_replies``; a reply whose ``re`` is nil or not an id this
    client sent (or that is not an envelope) in ``unmatched_replies``.  An error
    with ``re`` nil answers a request whose id the node could not read, which this
    client never sends, so it is never taken as the answer to the call in flight.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, *, context: zmq.Context | None = None,
                 curve_secret: str | None = None, curve_server: str | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.late_replies = 0       # replies to earlier requests (timed out, or one-way)
        self.unmatched_replies = 0  # replies naming no call of this client (re nil, unknown)
        self._ctx = context or zmq.Context.instance()
        self._sock = _new_socket(self._ctx, address,
                                 client_keys(curve_secret, curve_server))
        self._req = _Requests()

    def call(self, agent: str, type: str, data: Any = None, *, timeout_s: float | None = None,
             consistency: str | None = None, delivery: str | None = None,
             **options: Any) -> Any:
        """Send a request and return the reply data; raises RemoteError or CallTimeout.

        ``consistency`` and ``delivery``: see the module docstring (PROTOCOL.md 2.4).
        """
        if consistency is None and delivery is None:
            return self._call(type, agent, data, timeout_s, options)
        return self._guaranteed(type, agent, data, wire.MODE_CALL, timeout_s, consistency,
                                delivery, options)

    def _call(self, mtype: str, subject: str | None, data: Any, timeout_s: float | None,
              options: dict) -> Any:
        rid = self._req.next_id()
        self._send(self._req.encode(rid, mtype, subject, data, wire.MODE_CALL, options))
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        envelope = self._reply_within(rid, timeout_ms)
        if envelope is None:
            raise CallTimeout(f"no reply to {mtype} for {subject!r} within {timeout_ms} ms")
        return _result(envelope)

    def _send(self, payload: bytes) -> None:
        """Hand a request to the connection, waiting at most ``timeout_s`` for one.

        A DEALER has nowhere to put a message while it has no connection (the node
        is down, or a CURVE handshake was refused: a wrong or unlisted key), and a
        plain send would then block for good; this raises CallTimeout instead."""
        try:
            self._sock.send(payload, _NOBLOCK)
            return
        except zmq.Again:
            pass
        if not self._sock.poll(int(1000 * self.timeout_s), zmq.POLLOUT):
            raise CallTimeout(f"no connection to {self.address} within {self.timeout_s} s "
                              "(node down, or its CURVE handshake refused our key)")
        self._sock.send(payload, _NOBLOCK)

    def _reply_within(self, rid: str, timeout_ms: int) -> dict | None:
        """The reply to ``rid`` if it comes within ``timeout_ms``; other replies read
        meanwhile are dropped and counted."""
        deadline = _Deadline(timeout_ms)
        while True:
            remaining = deadline.remaining_ms()
            if remaining <= 0 or not self._sock.poll(remaining, zmq.POLLIN):
                return None
            envelope = _decode(self._sock.recv())
            re = envelope.get("re") if envelope is not None else None
            if type(re) is str and re == rid:
                return envelope
            if self._req.sent(re):
                self.late_replies += 1
            else:
                self.unmatched_replies += 1

    def _guaranteed(self, mtype: str, subject: str, data: Any, mode: str,
                    timeout_s: float | None, consistency: str | None, delivery: str | None,
                    options: dict) -> Any:
        """A call (or an acknowledged send) with guarantees: resent per ``_Attempts``."""
        if delivery in RESENT:
            mode = wire.MODE_CALL
        rid, payload = self._req.guaranteed(mtype, subject, data, mode, consistency,
                                            delivery, options)
        if mode != wire.MODE_CALL:  # a causal send: stamped, sent once, no reply
            self._send(payload)
            return None
        attempts = _Attempts(self._req, mtype, subject, delivery, self.timeout_s
                             if timeout_s is None else timeout_s, time.monotonic())
        action = "send"
        while action != "done":
            if action == "send":
                self._send(payload)
                attempts.sent(time.monotonic())
            # Rounded up: a wait cut to 0 ms just before the deadline would resend in
            # a loop until the deadline passed (25 copies seen in one call).
            wait_ms = math.ceil(1000 * attempts.wait_s(time.monotonic()))
            envelope = self._reply_within(rid, wait_ms)
            action = attempts.step(envelope, time.monotonic())
        return attempts.settle(envelope)

    def send(self, agent: str, type: str, data: Any = None, *, consistency: str | None = None,
             delivery: str | None = None, **options: Any) -> None:
        """One-way message: no reply; errors are counted at the node.

        With ``delivery`` at_least_once or exactly_once it is sent as a call and this
        returns once the node acknowledged it (raising as ``call`` does otherwise).
        """
        if consistency is not None or delivery is not None:
            self._guaranteed(type, agent, data, wire.MODE_SEND, None, consistency, delivery,
                             options)
            return
        rid = self._req.next_id()
        self._send(self._req.encode(rid, type, agent, data, wire.MODE_SEND, options))

    def publish(self, group: str, type: str, data: Any = None, *,
                strategy: str | None = None, **options: Any) -> None:
        """One-way message to every agent that joined ``group``, on every node.

        ``strategy``: None or "multicast" (PUB/SUB, best effort: drops at the
        high-water mark are counted, not repaired) or "gossip" (an epidemic broadcast
        that repairs what was missed; each member handles it at most once).
        """
        options = _publish_options(strategy, options)
        rid = self._req.next_id()
        self._send(self._req.encode(rid, type, group, data, wire.MODE_PUBLISH, options))

    def pipeline(self, stages: list[tuple[str, str]], data: Any = None, *,
                 timeout_s: float | None = None) -> Any:
        """Run ``data`` through ``stages``, a list of 2..16 ``(agent, type)`` pairs:
        each stage's reply data is the next stage's data; returns the last reply's.

        The chain moves from owner to owner in the cluster.  A failing stage raises
        RemoteError with ``stage`` (its index, from 0) and ``agent`` set; the whole
        pipeline not finishing in time raises RemoteError ``timeout`` (the node's
        deadline, ``routed_timeout_ms``) or CallTimeout.  Bad stages: ValueError.
        """
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        mtype, subject, options = _pipeline_call(stages, wait_s)
        return self._call(mtype, subject, data, timeout_s, options)

    def broadcast(self, agents: list[str], type: str, data: Any = None, *,
                  timeout_s: float | None = None) -> dict[str, Any]:
        """Send one message to each of ``agents`` (1..1000 distinct ids) and gather
        the answers: ``{agent: reply data, or a RemoteError}``, in the order given.

        An agent's error is a RemoteError *value* in the map, never raised (as
        ``asyncio.gather(..., return_exceptions=True)``); one that did not answer
        before the deadline has code ``timeout``.  Raises only when the broadcast as
        a whole failed (RemoteError, CallTimeout), or ValueError for bad arguments.
        """
        agents = check_targets(agents)
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        options = _scatter_options(agents, type, wait_s)
        return _gathered(agents, self._call(type, None, data, timeout_s, options))

    def spawn(self, behavior: str, agent: str, init: Any = None, **options: Any) -> dict:
        return self._call(wire.TYPE_SPAWN, agent, {"behavior": behavior, "init": init}, None, options)

    def stop(self, agent: str, **options: Any) -> dict:
        return self._call(wire.TYPE_STOP, agent, None, None, options)

    def join(self, agent: str, group: str) -> dict:
        return self._call(wire.TYPE_JOIN, agent, {"group": group}, None, {})

    def leave(self, agent: str, group: str) -> dict:
        return self._call(wire.TYPE_LEAVE, agent, {"group": group}, None, {})

    def status(self) -> dict:
        return self._call(wire.TYPE_STATUS, None, None, None, {})

    def ping(self, timeout_s: float | None = None) -> dict:
        return self._call(wire.TYPE_PING, None, None, timeout_s, {})

    def members(self, timeout_s: float | None = None) -> dict:
        """The entry node's member view: ``{"node", "quorate", "members": [{"node_id",
        "address", "state", "incarnation", "agents"}]}``."""
        return self._call(wire.TYPE_MEMBERS, None, None, timeout_s, {})

    def close(self) -> None:
        """Close the socket; unsent one-way messages get CLOSE_LINGER_MS to leave."""
        self._sock.close(linger=CLOSE_LINGER_MS)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Deadline:
    def __init__(self, timeout_ms: int):
        self._end = time.monotonic() + timeout_ms / 1000

    def remaining_ms(self) -> int:
        # Rounded up: a wait cut to 0 while a fraction of a millisecond is left
        # would return before the deadline, and a resending call would spin.
        return math.ceil((self._end - time.monotonic()) * 1000)


class _Call(asyncio.Future):
    """The awaitable ``AsyncClient.call`` returns: an asyncio.Future, not a coroutine.

    ``asyncio.gather`` and ``await`` take it as it is, with no task per call.  It
    also speaks the coroutine protocol (send/throw/close, driving itself), so code
    written for a coroutine keeps working: ``asyncio.create_task(c.call(...))``.
    Cancelling it (directly, or through the task or gather awaiting it) frees the
    call's in-flight slot at once; a reply that comes later is dropped and counted.
    """

    __slots__ = ("_client", "_rid")

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        client = getattr(self, "_client", None)
        if client is not None:
            client._forget(self)
        return True

    # The coroutine protocol, for create_task() and friends.
    def send(self, value: Any) -> Any:
        if not self.done():
            self._asyncio_future_blocking = True
            return self  # the driving task waits on this future, then sends again
        raise StopIteration(self.result())  # result() raises the call's error

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # The driving task gives up on the call (cancelled, maybe before its first
        # step): cancel it too, so its slot is freed now.
        self.cancel()
        if val is None:
            val = typ if isinstance(typ, BaseException) else typ()
        raise val

    def close(self) -> None:
        self.cancel()  # abandoned as a coroutine: no one will take the reply


class AsyncClient:
    """asyncio client: the same methods as ``Client``.

    ``call`` returns an awaitable future (see ``_Call``) and sends at once; the
    other methods are coroutines.  Many calls may be in flight at once (up to
    ``in_flight_max``; further calls queue in order and are sent as slots free, and
    their timeout starts when they are sent).  Create and use it inside one running
    event loop.

    Replies are matched strictly by ``re``: a reply completes the call whose request
    id equals its ``re``, whatever order replies arrive in.  A reply whose ``re``
    names a call no longer waited for (it timed out or was cancelled) is dropped and
    counted in ``late_replies``; one whose ``re`` is nil, is not an id this client
    sent, or that is not an envelope at all is dropped and counted in
    ``unmatched_replies``.  The node sets ``re`` whenever it could read the request
    id, and this client always sends a readable id, so an error with ``re`` nil never
    answers one of its calls.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, *,
                 context: zmq.Context | None = None, in_flight_max: int = IN_FLIGHT_MAX,
                 curve_secret: str | None = None, curve_server: str | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.late_replies = 0       # replies to requests no longer waited for
        self.unmatched_replies = 0  # replies naming no call of this client (re nil, unknown)
        self._ctx = context or zmq.Context.instance()
        self._sock = _new_socket(self._ctx, address,
                                 client_keys(curve_secret, curve_server))
        self._req = _Requests()
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, _Call] = {}  # sent calls awaiting their reply, by id
        # (deadline, rid, description) in deadline order: calls with the default
        # timeout are appended in order, so one sweep timer replaces a timer per call.
        self._deadlines: deque[tuple[float, str, tuple]] = deque()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}  # calls with their own timeout
        self._outbox: deque[bytes] = deque()
        self._in_flight_max = in_flight_max
        # Calls made while in_flight_max were in flight: (future, payload, mtype,
        # subject, timeout_s), sent in order as slots free.
        self._waiting: deque[tuple[_Call, bytes, str, str | None, float | None]] = deque()
        self._flush_scheduled = False
        self._closed = False
        # Calls with guarantees: the reply waiter of each by request id.  Their replies
        # miss ``_pending`` and reach ``_drop``, so plain calls pay nothing for them.
        self._guaranteed_waiters: dict[str, asyncio.Future] = {}
        self._guaranteed_slots = asyncio.Semaphore(in_flight_max)
        self._loop.add_reader(self._sock.FD, self._on_readable)

    # Public API ------------------------------------------------------------

    def call(self, agent: str, type: str, data: Any = None, *,
             timeout_s: float | None = None, consistency: str | None = None,
             delivery: str | None = None, **options: Any) -> "asyncio.Future[Any]":
        """``await c.call(...)``: the reply data, or RemoteError / CallTimeout.

        Not a coroutine: the request is queued for sending now, and the returned
        future is what ``gather`` waits on, so no task is made per call.  A call
        with ``consistency`` or ``delivery`` (module docstring) is a task: it may
        send several times.  Those calls have their own ``in_flight_max`` slots.
        """
        if consistency is None and delivery is None:
            return self._call(type, agent, data, timeout_s, options)
        return self._loop.create_task(self._guaranteed(type, agent, data, wire.MODE_CALL,
                                                       timeout_s, consistency, delivery,
                                                       options))

    async def send(self, agent: str, type: str, data: Any = None, *,
                   consistency: str | None = None, delivery: str | None = None,
                   **options: Any) -> None:
        """One-way message: no reply; errors are counted at the node.

        With ``delivery`` at_least_once or exactly_once it is sent as a call and this
        returns once the node acknowledged it (raising as ``call`` does otherwise).
        """
        if consistency is not None or delivery is not None:
            await self._guaranteed(type, agent, data, wire.MODE_SEND, None, consistency,
                                   delivery, options)
            return
        await self._outbox_room()
        self._enqueue(self._req.encode(self._req.next_id(), type, agent, data,
                                       wire.MODE_SEND, options))

    async def publish(self, group: str, type: str, data: Any = None, *,
                      strategy: str | None = None, **options: Any) -> None:
        """As ``Client.publish``."""
        options = _publish_options(strategy, options)
        await self._outbox_room()
        self._enqueue(self._req.encode(self._req.next_id(), type, group, data,
                                       wire.MODE_PUBLISH, options))

    def pipeline(self, stages: list[tuple[str, str]], data: Any = None, *,
                 timeout_s: float | None = None) -> "asyncio.Future[Any]":
        """As ``Client.pipeline``; like ``call``, it returns an awaitable future
        (bad stages raise ValueError here, at once)."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        mtype, subject, options = _pipeline_call(stages, wait_s)
        return self._call(mtype, subject, data, timeout_s, options)

    async def broadcast(self, agents: list[str], type: str, data: Any = None, *,
                        timeout_s: float | None = None) -> dict[str, Any]:
        """As ``Client.broadcast``."""
        agents = check_targets(agents)
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        options = _scatter_options(agents, type, wait_s)
        return _gathered(agents, await self._call(type, None, data, timeout_s, options))

    async def spawn(self, behavior: str, agent: str, init: Any = None, **options: Any) -> dict:
        return await self._call(wire.TYPE_SPAWN, agent, {"behavior": behavior, "init": init},
                                None, options)

    async def stop(self, agent: str, **options: Any) -> dict:
        return await self._call(wire.TYPE_STOP, agent, None, None, options)

    async def join(self, agent: str, group: str) -> dict:
        return await self._call(wire.TYPE_JOIN, agent, {"group": group}, None, {})

    async def leave(self, agent: str, group: str) -> dict:
        return await self._call(wire.TYPE_LEAVE, agent, {"group": group}, None, {})

    async def status(self) -> dict:
        return await self._call(wire.TYPE_STATUS, None, None, None, {})

    async def ping(self, timeout_s: float | None = None) -> dict:
        return await self._call(wire.TYPE_PING, None, None, timeout_s, {})

    async def members(self, timeout_s: float | None = None) -> dict:
        """As ``Client.members``."""
        return await self._call(wire.TYPE_MEMBERS, None, None, timeout_s, {})

    async def close(self) -> None:
        self._shutdown()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._shutdown()

    # Calls -------------------------------------------------------------------

    def _call(self, mtype: str, subject: str | None, data: Any, timeout_s: float | None,
              options: dict) -> _Call:
        """Queue one call and return its future; errors surface when it is awaited."""
        future = _Call(loop=self._loop)
        if self._closed:
            future.set_exception(RuntimeError("client is closed"))
            return future
        rid = self._req.next_id()
        try:
            payload = self._req.encode(rid, mtype, subject, data, wire.MODE_CALL, options)
        except Exception as exc:  # data msgpack cannot carry: the caller's error
            future.set_exception(exc)
            return future
        future._client = self
        future._rid = rid
        if self._waiting or len(self._pending) >= self._in_flight_max:
            self._waiting.append((future, payload, mtype, subject, timeout_s))
        else:
            self._start(future, rid, payload, mtype, subject, timeout_s)
        return future

    async def _guaranteed(self, mtype: str, subject: str, data: Any, mode: str,
                          timeout_s: float | None, consistency: str | None,
                          delivery: str | None, options: dict) -> Any:
        """A call (or an acknowledged send) with guarantees: resent per ``_Attempts``."""
        if delivery in RESENT:
            mode = wire.MODE_CALL
        await self._outbox_room()
        rid, payload = self._req.guaranteed(mtype, subject, data, mode, consistency,
                                            delivery, options)
        if mode != wire.MODE_CALL:  # a causal send: stamped, sent once, no reply
            self._enqueue(payload)
            return None
        async with self._guaranteed_slots:
            loop = self._loop
            attempts = _Attempts(self._req, mtype, subject, delivery, self.timeout_s
                                 if timeout_s is None else timeout_s, loop.time())
            action = "send"
            try:
                while action != "done":
                    if action == "send":
                        self._enqueue(payload)
                        attempts.sent(loop.time())
                    envelope = await self._reply_within(rid, attempts.wait_s(loop.time()))
                    action = attempts.step(envelope, loop.time())
            finally:
                self._guaranteed_waiters.pop(rid, None)
            return attempts.settle(envelope)

    async def _reply_within(self, rid: str, seconds: float) -> dict | None:
        """The reply envelope to ``rid`` if one comes within ``seconds``, else None."""
        if self._closed:
            raise RuntimeError("client closed")
        waiter = self._loop.create_future()
        self._guaranteed_waiters[rid] = waiter
        timer = self._loop.call_later(seconds, _settle, waiter, None)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _start(self, future: _Call, rid: str, payload: bytes, mtype: str,
               subject: str | None, timeout_s: float | None) -> None:
        self._pending[rid] = future
        self._track_deadline(rid, mtype, subject, timeout_s)
        self._enqueue(payload)

    def _admit_waiting(self) -> None:
        """Send queued calls while slots are free; calls cancelled meanwhile are skipped."""
        waiting, pending = self._waiting, self._pending
        while waiting and len(pending) < self._in_flight_max and not self._closed:
            future, payload, mtype, subject, timeout_s = waiting.popleft()
            if not future.done():
                self._start(future, future._rid, payload, mtype, subject, timeout_s)

    def _forget(self, future: _Call) -> None:
        """A call was cancelled: free its slot now rather than when its reply comes."""
        rid = future._rid
        if self._pending.get(rid) is future:
            del self._pending[rid]
            self._cancel_timer(rid)
            if self._waiting:
                self._admit_waiting()

    def _cancel_timer(self, rid: str) -> None:
        timer = self._timers.pop(rid, None) if self._timers else None
        if timer is not None:
            timer.cancel()

    async def _outbox_room(self) -> None:
        if self._closed:
            raise RuntimeError("client is closed")
        while len(self._outbox) >= OUTBOX_MAX:
            await asyncio.sleep(0.001)  # the socket is at its high-water mark

    # Timeouts ----------------------------------------------------------------

    def _track_deadline(self, rid: str, mtype: str, subject: str | None,
                        timeout_s: float | None) -> None:
        what = (mtype, subject)  # formatted only if the call expires
        if timeout_s is not None and timeout_s != self.timeout_s:
            self._timers[rid] = self._loop.call_later(timeout_s, self._expire, rid, what,
                                                      timeout_s)
            return
        self._deadlines.append((self._loop.time() + self.timeout_s, rid, what))
        if self._sweep_timer is None:
            self._sweep_timer = self._loop.call_later(_sweep_period_s(self.timeout_s), self._sweep)

    def _sweep(self) -> None:
        """Drop answered calls from the front of the deadline queue; expire overdue ones."""
        self._sweep_timer = None
        now = self._loop.time()
        deadlines, pending = self._deadlines, self._pending
        while deadlines:
            deadline, rid, what = deadlines[0]
            if rid in pending:
                if deadline > now:
                    break
                self._expire(rid, what, self.timeout_s)
            deadlines.popleft()
        if deadlines and not self._closed:
            self._sweep_timer = self._loop.call_later(_sweep_period_s(self.timeout_s), self._sweep)

    def _expire(self, rid: str, what: tuple, timeout_s: float) -> None:
        self._timers.pop(rid, None)
        future = self._pending.pop(rid, None)
        if future is not None and not future.done():
            mtype, subject = what
            future.set_exception(
                CallTimeout(f"no reply to {mtype} for {subject!r} within {timeout_s} s"))
        if self._waiting:
            self._admit_waiting()

    # Socket ------------------------------------------------------------------

    def _enqueue(self, payload: bytes) -> None:
        self._outbox.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        send = self._sock.send
        outbox = self._outbox
        while outbox:
            try:
                send(outbox[0], _NOBLOCK)
            except zmq.Again:  # the send queue is at its high-water mark: try again soon
                self._flush_scheduled = True
                self._loop.call_later(0.001, self._flush)
                break
            outbox.popleft()
        self._on_readable()  # sending can swallow the FD's read edge

    def _on_readable(self) -> None:
        if self._closed:
            return
        recv = self._sock.recv
        pending = self._pending
        decode = _decode
        error = wire.TYPE_ERROR
        answered = False
        for _ in range(READ_BATCH_MAX):
            try:
                raw = recv(_NOBLOCK)
            except zmq.Again:
                break
            envelope = decode(raw)
            re = envelope.get("re") if envelope is not None else None
            future = pending.pop(re, None) if type(re) is str else None
            if future is None:
                self._drop(re, envelope)
                continue
            if future.done():  # cannot happen (cancel and expiry unlist it); never crash here
                self.late_replies += 1
                continue
            answered = True
            if self._timers:
                self._cancel_timer(re)
            if envelope.get("type") == error:
                future.set_exception(_remote_error(envelope))
            else:
                future.set_result(envelope.get("data"))
        else:
            self._loop.call_soon(self._on_readable)  # more may wait; let others run first
        if answered and self._waiting:
            self._admit_waiting()

    def _drop(self, re: Any, envelope: dict | None) -> None:
        """A reply that answers no plain call in flight: the answer to a call with
        guarantees, or dropped and counted (see the class docstring)."""
        waiter = (self._guaranteed_waiters.get(re)
                  if self._guaranteed_waiters and type(re) is str else None)
        if waiter is not None and not waiter.done():
            waiter.set_result(envelope)
            return
        if self._req.sent(re):
            self.late_replies += 1
        else:
            self.unmatched_replies += 1

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._flush()  # one-way messages queued in this loop turn still go out
        self._closed = True
        self._loop.remove_reader(self._sock.FD)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for future in (*self._pending.values(), *self._guaranteed_waiters.values()):
            if not future.done():
                future.set_exception(RuntimeError("client closed"))
        self._pending.clear()
        for future, *_ in self._waiting:
            if not future.done():
                future.set_exception(RuntimeError("client closed"))
        self._waiting.clear()
        self._sock.close(linger=CLOSE_LINGER_MS)


def _settle(waiter: asyncio.Future, value: Any) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _sweep_period_s(timeout_s: float) -> float:
    return min(0.1, max(0.005, timeout_s / 20))
