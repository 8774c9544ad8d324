"""The node's event loop: sockets, timers, protocol machines and their effects.

One ROUTER socket takes requests from clients and peer traffic from other
nodes.  The loop wakes when the socket's FD is readable and drains it in
batches with NOBLOCK until ``zmq.Again`` (the FD is edge-triggered: a partial
read would leave messages sitting unread), then re-checks ``zmq.EVENTS``.
Requests are decoded once; forwarding passes the original bytes on.

Routing: ``registry.owner(subject)`` names the owning node.  A local owner hands
the request to the agent host; a remote one gets it one hop away over the
peer transport, and its reply comes back the same way to the client's route.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import resource
import signal
import time
from typing import Any

import msgpack
import zmq

import core_cy
from protocols import wire
from protocols.effects import MembersChanged, Refuted, Send, SetTimer
from protocols.membership import Member, Membership, MembershipError
from protocols.wire import ErrorCode, Request, WireError

from . import logs, systemd
from .agents import AgentError, AgentHost, Supervision, load_behavior_modules
from .config import NodeConfig
from .metrics import MetricsServer, NodeMetrics, stamp, unstamp
from .registry import Registry
from .guard import ConnectionGuard
from .parked import ParkedReplies
from .transports.zeromq import (OP_FWD, OP_GOSSIP, OP_RPL, OP_STATQ, OP_STATR, PEER_MAGIC,
                                SOCKETS_MAX, ZmqTransport)

BATCH_MAX = 512            # messages read per socket per wake-up, for fairness
RETRY_INTERVAL_S = 0.02    # how often queued peer sends are retried
STATUS_WAITS_MAX = 256     # concurrent cluster-status collections
SHUTDOWN_LINGER_MS = 500   # time given to last replies on close
FORWARD_QUIET_S = 1.0      # shutdown stops waiting for forwarded replies after this silence

_NO_REPLY = None
# Plain ints: pyzmq's flag enums cost an enum construction per '|' on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_SRCFD = int(zmq.SRCFD)
GUARD_TICK_S = 0.01             # how often the connection guard checks a few connections
GUARD_PER_TICK = 32             # connections checked per tick (about 3 us each)
GUARD_SCAN_S = 0.5              # how often it checks all, and the node-wide budget
GUARD_RSS_JUMP_BYTES = 16 << 20  # resident growth that checks all at once
GUARD_ALERT_TICK_S = 0.002      # the tick for GUARD_ALERT_S after a connection was cut
GUARD_ALERT_S = 2.0
IDLE_SWEEP_LOOKS = 10_000       # agents the idle sweep looks at per step
IDLE_SWEEP_STEP_S = 0.1
LARGE_REQUEST_BYTES = 64 << 10  # refused while the node is over its memory budget


def _new_context() -> zmq.Context:
    """A ZeroMQ context with room for every socket the limits allow, on purpose.

    libzmq's default of 1023 sockets sat below the peer-link limit, so made-up
    members exhausted it.  The process's file limit is raised to match: each
    socket holds a couple of descriptors, and each accepted connection one.
    """
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, SOCKETS_MAX + 16)
    _raise_file_limit(4 * (SOCKETS_MAX + 16) + 4096)
    return ctx


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # the limits stay as they were; sockets beyond them are refused, not fatal


class Node:
    """A synthesis node.  ``await Node(config).serve()`` runs it until stopped."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.node_id = config.resolved_node_id
        self.log = logs.get_logger()
        self.metrics = NodeMetrics(self.node_id)
        self.registry = Registry(self.node_id)
        self.members: dict[str, Member] = {}
        self.host = AgentHost(
            mailbox_len_max=config.mailbox_len_max,
            agents_max=config.agents_max,
            handler_timeout_s=config.handler_timeout_s,
            supervision=Supervision(config.supervision, config.restart_limit,
                                    config.restart_window_s, config.restart_backoff_s,
                                    config.restart_backoff_max_s),
            executor_workers=config.executor_workers,
            metrics=self.metrics, log=self.log,
            reply=self._reply_data, fail=self._reply_error,
            mailbox_total_max=config.mailbox_total_max,
            mailbox_bytes_max=config.mailbox_bytes_max,
        )
        self._ctx = _new_context()
        self._router: zmq.Socket | None = None
        self._transport: ZmqTransport | None = None
        self._membership: Membership | None = None
        self._metrics_server: MetricsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._closed = False  # sockets closed: late callbacks must not touch them
        self._pump_scheduled = False
        self._in_pump = False
        self._gossip_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guard_scanned_at = 0.0
        self._guard_alert_until = 0.0
        self._status_waits: dict[bytes, dict] = {}
        self._tokens = itertools.count(1)
        self._started_at = time.monotonic()
        self._max_bytes = config.max_message_bytes
        self._max_hops = config.max_hops
        self._endpoint = config.router_endpoint
        self._forwards_waiting = 0  # calls forwarded to owners whose reply has not come back
        self._member_addresses: set[str] = set()  # ROUTER endpoints of the other members
        self._parked = ParkedReplies(self.metrics)
        self._replies_routed = 0    # replies from owners passed back to our clients

    # ------------------------------------------------------------------ start/stop

    async def serve(self) -> None:
        """Run until ``request_stop`` (or SIGTERM/SIGINT), then shut down gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        load_behavior_modules(self.config.behaviors)
        self._open_sockets()
        self._start_metrics()
        self._install_signal_handlers()
        self._start_membership()
        self._start_idle_sweeps()
        systemd.ready()
        self._start_watchdog()
        self.log.info("node_serving", address=self.config.router_endpoint,
                      pub=self.config.pub_endpoint, seeds=list(self.config.seeds))
        try:
            await self._stop_event.wait()
        finally:
            await self._shutdown()

    def request_stop(self) -> None:
        if self._stop_event is not None and not self._stopping:
            self._stopping = True
            self._stop_event.set()

    def _open_sockets(self) -> None:
        cfg = self.config
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises, not a silent drop
        router.setsockopt(zmq.SNDHWM, cfg.peer_hwm)
        router.setsockopt(zmq.RCVHWM, cfg.peer_hwm)
        # A hard guard far above the protocol limit: larger frames cost the
        # sender its connection instead of our memory.  Between the two limits
        # the sender gets a too_large reply.
        router.setsockopt(zmq.MAXMSGSIZE, 4 * cfg.max_message_bytes + 65536)
        router.setsockopt(zmq.LINGER, SHUTDOWN_LINGER_MS)
        router.bind(cfg.router_bind)
        self._router = router
        self._guard = ConnectionGuard(
            router, metrics=self.metrics, log=self.log, connections_max=cfg.connections_max,
            conn_inbound_bytes_max=cfg.conn_inbound_bytes_max,
            inbound_bytes_max=cfg.inbound_bytes_max, reply_bytes_max=cfg.client_reply_bytes_max)
        self._guard_tick()
        self._transport = ZmqTransport(context=self._ctx, node_id=self.node_id,
                                       pub_bind=cfg.pub_bind, peer_hwm=cfg.peer_hwm,
                                       pub_hwm=cfg.pub_hwm, metrics=self.metrics)
        self._transport.start()
        self._loop.add_reader(router.FD, self._pump)
        self._loop.add_reader(self._transport.sub.FD, self._pump)
        self._schedule_pump()  # the FDs are edge-triggered: look once after registering

    def _start_metrics(self) -> None:
        self.metrics.set_gauges(self._gauges)
        address = self.config.metrics_address
        if address is None:
            return
        self._metrics_server = MetricsServer(address[0], address[1], self.metrics, self._health)
        self._metrics_server.start()

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass

    def _start_watchdog(self) -> None:
        period_s = systemd.watchdog_interval_s()
        if period_s is None:
            return

        def ping() -> None:
            if not self._stopping:
                systemd.watchdog()
                self._loop.call_later(period_s, ping)
        ping()

    async def _shutdown(self) -> None:
        self.log.info("node_stopping", pending=self.host.pending())
        systemd.stopping()
        deadline = self._loop.time() + self.config.shutdown_timeout_s
        refused = await self.host.drain(self.config.shutdown_timeout_s)
        await self._await_forwarded_replies(deadline)
        self._transport.retry(math.inf)  # sends still queued: now or never (callers told)
        self._pump()  # answer what arrived meanwhile, flush replies
        for timer in (self._gossip_timer, self._retry_timer, self._guard_timer):
            if timer is not None:
                timer.cancel()
        for wait in list(self._status_waits.values()):
            self._finish_status(wait)
        self._loop.remove_reader(self._router.FD)
        self._loop.remove_reader(self._transport.sub.FD)
        self._closed = True
        self._transport.stop(linger_ms=SHUTDOWN_LINGER_MS)
        self._guard.close()
        self._router.close(linger=SHUTDOWN_LINGER_MS)
        self._ctx.term()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self.log.info("node_stopped", refused=refused)

    async def _await_forwarded_replies(self, deadline: float) -> None:
        """Route replies to calls we forwarded, until none is due or none arrives.

        The count can only over-estimate (an owner that died holds replies that
        never come), so stop waiting once replies stop arriving for a second.
        """
        quiet_since = self._loop.time()
        seen = self._replies_routed
        while self._forwards_waiting > 0 and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
            if self._replies_routed != seen:
                seen, quiet_since = self._replies_routed, self._loop.time()
            elif self._loop.time() - quiet_since > FORWARD_QUIET_S:
                break

    # ------------------------------------------------------------------ membership

    def _start_membership(self) -> None:
        cfg = self.config
        me = Member(self.node_id, cfg.router_endpoint, cfg.pub_endpoint, time.time_ns())
        wall_offset_ns = time.time_ns() - int(self._loop.time() * 1e9)
        self._membership = Membership(
            me, cfg.seeds, cfg.gossip_interval_s, wall_offset_ns=wall_offset_ns,
            generation_ahead_max_ns=int(cfg.generation_ahead_max_s * 1e9))
        self._run_effects(self._membership.start(self._loop.time()))

    def _run_effects(self, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                body = msgpack.packb(effect.message, use_bin_type=True)
                stranger = (effect.address not in self._member_addresses
                            and effect.address not in self.config.seeds)
                if self._peer_send(effect.address, [PEER_MAGIC, OP_GOSSIP, body],
                                   stranger=stranger):
                    self.metrics.sent("gossip")
            elif isinstance(effect, SetTimer):
                if self._gossip_timer is not None:
                    self._gossip_timer.cancel()
                self._gossip_timer = self._loop.call_at(effect.at, self._membership_tick)
            elif isinstance(effect, MembersChanged):
                self._on_members(effect.members)
            elif isinstance(effect, Refuted):
                self._on_refuted(effect)
            else:  # a machine asked for something nobody carries out: a bug
                raise TypeError(f"no handler for effect {effect!r}")

    def _on_refuted(self, effect: Refuted) -> None:
        self.metrics.refuted()
        self.log.error("node_id_claimed_elsewhere", claimed_address=effect.claimed_address,
                       claimed_generation=effect.claimed_generation,
                       new_generation=effect.generation,
                       hint="another process uses this node id, or gossip was forged; "
                            "enable CURVE authentication on untrusted networks")

    def _membership_tick(self) -> None:
        self._gossip_timer = None
        if not self._stopping:
            self._run_effects(self._membership.tick(self._loop.time()))

    def _on_members(self, members: dict[str, Member]) -> None:
        self.members = members
        self.registry.set_members(members)
        others = [m for m in members.values() if m.node_id != self.node_id]
        self._member_addresses = {m.address for m in others}
        # Close links to addresses no member uses any more (a restarted node's old one).
        self._transport.retain({m.address for m in others} | set(self.config.seeds),
                               {m.pub_address for m in others})
        for member in others:
            self._transport.connect(member.address)  # None (counted) when out of links
            self._transport.subscribe(member.pub_address)
        self._parked.flush(self._member_addresses, self._send_parked)
        self.log.info("members_changed", members=sorted(members))

    def _on_gossip(self, body: bytes) -> None:
        try:
            message = msgpack.unpackb(body, raw=False)
            refused_before = self._membership.refused_entries
            effects = self._membership.receive(message, self._loop.time())
        except (MembershipError, ValueError, msgpack.UnpackException) as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.gossip")
            self.log.warning("bad_gossip", error=str(exc))
            return
        refused = self._membership.refused_entries - refused_before
        if refused:
            self.metrics.gossip_refused(refused)
            self.log.warning("gossip_entries_refused", count=refused,
                             reason="generation too far ahead, or an address change "
                                    "not sent by the member itself")
        self._run_effects(effects)

    # ------------------------------------------------------------------ the pump

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Drain the ROUTER and SUB sockets in batches; reschedule if more waits."""
        self._pump_scheduled = False
        if self._closed:
            return
        self._in_pump = True
        try:
            self._drain(self._router, self._on_router, self._guard.read)
            self._drain(self._transport.sub, self._on_multicast)
        finally:
            self._in_pump = False
        if (self._router.getsockopt(_EVENTS) & _POLLIN
                or self._transport.sub.getsockopt(_EVENTS) & _POLLIN):
            self._schedule_pump()

    def _drain(self, sock: zmq.Socket, handle, account=None) -> None:
        # Frames (copy=False) tell whether more parts follow without a getsockopt
        # call, which costs more than the rest of reading a frame (measured).
        recv = sock.recv
        for _ in range(BATCH_MAX):
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            first = frame
            frames = [frame.bytes]
            while frame.more:  # the rest of a multipart message is already here
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            if account is not None:  # which connection it came from, for its byte budget
                account(first.get(_SRCFD), frames)
            try:
                handle(frames)
            except Exception as exc:  # a bug must not take the node down
                self.metrics.errored(ErrorCode.INTERNAL)
                self.log.exception("dispatch_failed", error=repr(exc))
                if sock is self._router:
                    self._answer_internal(frames, exc)

    def _answer_internal(self, frames: list[bytes], exc: Exception) -> None:
        """Best effort: a client whose request met a bug still gets an answer."""
        if len(frames) == 2 or (len(frames) == 3 and frames[1] == b""):
            # A bounded peek, not a decode: the frame may be what met the bug.
            known = wire.refusal(frames[-1][:self._max_bytes], ErrorCode.INTERNAL, "")
            if known.one_way:  # the send-mode rule holds for node bugs too
                return
            self._send_route(tuple(frames[:-1]), wire.error(
                known.request_id, ErrorCode.INTERNAL, f"node error: {type(exc).__name__}",
                self.node_id, known.traceparent))

    # ------------------------------------------------------------------ inbound

    def _on_router(self, frames: list[bytes]) -> None:
        n = len(frames)
        if n == 2:
            self._on_client(frames[1], (frames[0],))
        elif n >= 3 and frames[1] == PEER_MAGIC:
            self._on_peer(frames)
        elif n == 3 and frames[1] == b"":
            self._on_client(frames[2], (frames[0], b""))  # REQ framing
        else:
            # No frame is looked into; the error is one frame, after the empty
            # delimiter when the message began with one, so a REQ socket gets it.
            route = (frames[0], b"") if n >= 3 and frames[1] == b"" else (frames[0],)
            self._send_route(route, wire.error(
                None, ErrorCode.BAD_REQUEST,
                f"expected one envelope frame, got {n - 1} frames", self.node_id))
            self.metrics.errored(ErrorCode.BAD_REQUEST)

    def _on_client(self, payload: bytes, route: tuple) -> None:
        self._accept(payload, None, route, 0)

    def _on_peer(self, frames: list[bytes]) -> None:
        op = frames[2]
        if op == OP_FWD and len(frames) >= 6:  # route frames are absent for one-way sends
            self._on_forwarded(frames)
        elif op == OP_RPL and len(frames) >= 5:
            route, forwarded = unstamp(frames[4:])
            if forwarded is None or not route:
                # Every call we forward carries our stamp (a per-process random key):
                # a reply without it answers nothing we sent.  Forged: never routed.
                self.metrics.limited("forged_reply")
                return
            self._forwards_waiting = max(0, self._forwards_waiting - 1)
            self._replies_routed += 1
            self._send_route(route, frames[3])
            self.metrics.sent("reply")
            self.metrics.replied_forwarded(forwarded)
        elif op == OP_GOSSIP and len(frames) == 4:
            self._on_gossip(frames[3])
        elif op == OP_STATQ and len(frames) == 5:
            self._answer_status_query(frames[3].decode(errors="replace"), frames[4])
        elif op == OP_STATR and len(frames) == 5:
            self._collect_status(frames[3], frames[4])
        else:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.peer")
            self.log.warning("bad_peer_frame", op=op[:16].decode(errors="replace"), frames=len(frames))

    def _on_forwarded(self, frames: list[bytes]) -> None:
        origin = frames[3].decode(errors="replace")  # the entry node's ROUTER endpoint
        hops = frames[4][0] if frames[4] else 0
        self._accept(frames[5], origin, tuple(frames[6:]), hops)

    def _accept(self, payload: bytes, origin: str | None, route: tuple, hops: int) -> None:
        """Validate a request from a client (origin None) or forwarded by a peer."""
        arrived = time.perf_counter()  # for synthesis_request_seconds
        try:
            req = wire.parse_request(payload, self._max_bytes)
        except WireError as exc:
            self.metrics.errored(exc.code)
            if exc.one_way:  # readably send/publish: never answered, only counted
                return
            if self._send_reply((origin, route, None, arrived),
                                wire.error(exc.request_id, exc.code, exc.message, self.node_id,
                                           exc.traceparent)):
                self.metrics.sent("error")
            return
        self.metrics.received(req.type)
        reply_to = (_NO_REPLY if req.mode != wire.MODE_CALL
                    else (origin, route, req.raw.get("traceparent"), arrived))
        if self._stopping:
            self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE, "node is shutting down",
                              req.type)
            return
        self._dispatch(req, payload, reply_to, hops)

    def _on_multicast(self, frames: list[bytes]) -> None:
        accepted = self._transport.accept_multicast(frames)
        if accepted is None:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.multicast")
            return
        group, payload = accepted
        try:
            req = wire.parse_request(payload, self._max_bytes)
        except WireError as exc:
            self.metrics.errored(exc.code, "syn.multicast")
            return
        self.metrics.received(req.type)
        self._deliver_to_group(group, req)

    # ------------------------------------------------------------------ routing

    def _dispatch(self, req: Request, payload: bytes, reply_to: Any, hops: int) -> None:
        mtype = req.type
        if mtype in wire.NODE_TYPES:
            self._node_request(req, reply_to)
        elif req.mode == wire.MODE_PUBLISH:
            self._publish(req, payload)
        else:
            owner = self.registry.owner(req.subject)
            if owner == self.node_id:
                self._handle_local(req, reply_to)
            else:
                self._forward(owner, req, payload, reply_to, hops)

    def _forward(self, owner: str, req: Request, payload: bytes, reply_to: Any, hops: int) -> None:
        ttl = self._max_hops if req.ttl is None else req.ttl
        if hops >= ttl:
            self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE,
                              f"owner {owner!r} is beyond the hop limit ({ttl})", req.type)
            return
        member = self.members.get(owner)
        if member is None:  # the ring and the member table are updated together
            self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE,
                              f"owner {owner!r} is not a known member", req.type)
            return
        origin, route = reply_to[:2] if reply_to is not None else (None, ())
        if origin is None:
            origin = self._endpoint
        frames = [PEER_MAGIC, OP_FWD, origin.encode(), bytes((hops + 1,)), payload, *route]
        if reply_to is not None and reply_to[0] is None:  # our client's call: time it
            frames.append(stamp(reply_to[3]))

        # Replies come back through us only for our own clients' calls; count
        # those so shutdown can wait for them.  Before sending: give_up may run
        # inside the send.
        ours = reply_to is not None and reply_to[0] is None

        def give_up(code: str, reason: str) -> None:  # called once, on any failure
            if ours:
                self._forwards_waiting -= 1
            self._reply_error(reply_to, req.id, code, reason, req.type)

        if ours:
            self._forwards_waiting += 1

        if self._peer_send(member.address, frames, give_up):
            self.metrics.forwarded(req.type)
            self.metrics.sent("forward")

    def _handle_local(self, req: Request, reply_to: Any) -> None:
        agent_id = req.subject
        if self.host.memory_tight and req.nbytes > LARGE_REQUEST_BYTES:
            self.metrics.limited("memory_budget")
            self._reply_error(reply_to, req.id, ErrorCode.OVERLOADED,
                              f"node is over its memory budget: requests above "
                              f"{LARGE_REQUEST_BYTES} bytes are refused for now", req.type)
            return
        try:
            if wire.is_system_type(req.type):
                self._system_request(req, reply_to)
                return
            act = self.host.resolve(agent_id)
        except AgentError as exc:
            self._reply_error(reply_to, req.id, exc.code, exc.message, req.type)
            return
        except Exception as exc:
            self.log.error("activation_failed", agent_id=agent_id, error=repr(exc))
            self._reply_error(reply_to, req.id, ErrorCode.INTERNAL,
                              f"activating {agent_id!r} failed: {exc!r}", req.type)
            return
        if act is None:
            self._reply_error(reply_to, req.id, ErrorCode.UNKNOWN_AGENT,
                              f"no agent {agent_id!r} and no behavior named "
                              f"{agent_id.partition('/')[0]!r}", req.type)
            return
        self.host.deliver(agent_id, act, req, reply_to)

    def _system_request(self, req: Request, reply_to: Any) -> None:
        agent_id, mtype, data = req.subject, req.type, req.data
        if mtype == wire.TYPE_SPAWN:
            self.host.spawn(agent_id, data["behavior"], data.get("init"))
            result = {"agent": agent_id, "node": self.node_id}
        elif mtype == wire.TYPE_STOP:
            if not self.host.stop(agent_id):
                raise AgentError(ErrorCode.UNKNOWN_AGENT, f"no agent {agent_id!r} on this node")
            result = {"agent": agent_id, "stopped": True}
        elif mtype == wire.TYPE_JOIN:
            if self.host.resolve(agent_id) is None:
                raise AgentError(ErrorCode.UNKNOWN_AGENT, f"no agent {agent_id!r}")
            self.host.join(agent_id, data["group"])
            result = {"agent": agent_id, "group": data["group"], "joined": True}
        else:  # TYPE_LEAVE
            left = self.host.leave(agent_id, data["group"])
            result = {"agent": agent_id, "group": data["group"], "joined": False, "left": left}
        self.metrics.handled(mtype)
        self._reply_data(reply_to, req.id, result)

    # ------------------------------------------------------------------ multicast

    def _publish(self, req: Request, payload: bytes) -> None:
        group = req.subject
        self._transport.broadcast(group.encode(), [payload])
        self.metrics.sent("publish")
        self._deliver_to_group(group, req)

    def _deliver_to_group(self, group: str, req: Request) -> None:
        members = self.host.groups.get(group)
        if not members:
            return
        for agent_id in list(members):
            act = self.host.directory.get(agent_id)
            if act is not None:
                self.host.deliver(agent_id, act, req, _NO_REPLY)

    # ------------------------------------------------------------------ node requests

    def _node_request(self, req: Request, reply_to: Any) -> None:
        if req.type == wire.TYPE_PING:
            self._reply_data(reply_to, req.id, {"node": self.node_id})
            return
        self._start_status(req, reply_to)

    def local_status(self) -> dict:
        snap = self.metrics.snapshot()
        return {
            "node": self.node_id,
            "address": self.config.router_endpoint,
            "agents": len(self.host.directory),
            "agents_by_state": self.host.counts_by_state(),
            "received": snap.get("received", 0),
            "handled": snap.get("handled", 0),
            "errors": snap.get("errors", 0),
            "forwarded": snap.get("forwarded", 0),
            "members": len(self.members),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "kernels": core_cy.IMPLEMENTATION,
            # What a client needs to place agents itself (PROTOCOL.md section 8).
            "ring": {"vnodes": self.registry._ring.vnodes,
                     "points_per_vnode": core_cy.POINTS_PER_VNODE,
                     "weight": self.registry._ring.weight(self.node_id)},
            "reachable": True,
        }

    def _start_status(self, req: Request, reply_to: Any) -> None:
        if reply_to is None:
            return
        if len(self._status_waits) >= STATUS_WAITS_MAX:
            self._reply_error(reply_to, req.id, ErrorCode.OVERLOADED,
                              "too many status requests in flight", req.type)
            return
        token = str(next(self._tokens)).encode()
        others = {m.node_id: m for m in self.members.values() if m.node_id != self.node_id}
        wait = {"token": token, "reply_to": reply_to, "id": req.id,
                "results": {self.node_id: self.local_status()}, "expected": set(others)}
        self._status_waits[token] = wait
        if not others:
            self._finish_status(wait)
            return
        # The deadline first: whatever happens to the queries, the slot is freed.
        wait["timer"] = self._loop.call_later(self.config.status_timeout_s,
                                              self._finish_status, wait)
        for member in others.values():
            self._peer_send(member.address, [PEER_MAGIC, OP_STATQ, self.node_id.encode(), token])

    def _answer_status_query(self, origin: str, token: bytes) -> None:
        member = self.members.get(origin)
        if member is None or len(token) > 32:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.status")
            return
        body = msgpack.packb(self.local_status(), use_bin_type=True)
        self._peer_send(member.address, [PEER_MAGIC, OP_STATR, token, body])

    def _collect_status(self, token: bytes, body: bytes) -> None:
        wait = self._status_waits.get(token)
        if wait is None:
            return  # answered after the deadline
        try:
            status = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException):
            status = None
        node = status.get("node") if isinstance(status, dict) else None
        if type(node) is not str or node not in wait["expected"]:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.status")
            return
        wait["results"][node] = status
        wait["expected"].discard(node)
        if not wait["expected"]:
            self._finish_status(wait)

    def _finish_status(self, wait: dict) -> None:
        if self._status_waits.pop(wait["token"], None) is None:
            return
        timer = wait.get("timer")
        if timer is not None:
            timer.cancel()
        rows = []
        for node_id in sorted(self.members):
            row = wait["results"].get(node_id)
            if row is None:
                member = self.members[node_id]
                row = {"node": node_id, "address": member.address, "reachable": False}
            rows.append(row)
        self._reply_data(wait["reply_to"], wait["id"], {"node": self.node_id, "members": rows})

    # ------------------------------------------------------------------ replies

    def _reply_data(self, reply_to: Any, request_id: str, data: Any) -> None:
        if reply_to is None:
            return
        try:
            payload = wire.reply(request_id, data, self.node_id, reply_to[2])
        except (TypeError, ValueError, OverflowError) as exc:
            self._reply_error(reply_to, request_id, ErrorCode.INTERNAL,
                              f"reply is not msgpack-serialisable: {exc}", "")
            return
        if self._send_reply(reply_to, payload):
            self.metrics.sent("reply")

    def _reply_error(self, reply_to: Any, request_id: str | None, code: str, message: str,
                     mtype: str) -> None:
        self.metrics.errored(code, mtype)
        if reply_to is None:
            return
        if self._send_reply(reply_to, wire.error(request_id, code, message, self.node_id,
                                                 reply_to[2])):
            self.metrics.sent("error")

    def _send_reply(self, reply_to: tuple, payload: bytes) -> bool:
        """Send (or queue, for a remote origin) one reply; False if it was dropped.

        reply_to is (origin endpoint or None for a local client, route frames, traceparent,
        perf_counter at arrival).
        """
        origin, route, _, arrived = reply_to
        if not route:
            return False  # a forwarded one-way message: nobody to answer
        if origin is None:
            sent = self._send_route(route, payload)
            self.metrics.replied_local(arrived)
            return sent
        if origin == self._endpoint:  # a forward that came back to us: its reply is here
            self._forwards_waiting = max(0, self._forwards_waiting - 1)
            route, forwarded = unstamp(route)
            sent = self._send_route(route, payload)
            self.metrics.replied_forwarded(forwarded)
            return sent
        frames = [PEER_MAGIC, OP_RPL, payload, *route]
        if origin not in self._member_addresses:
            # Replies travel only over links to members: a FWD naming a made-up
            # origin must not make us dial it.  An origin that joined a moment ago
            # gets its reply once gossip names it (bounded wait, then dropped).
            return self._parked.park(origin, frames, self._loop.time())
        return self._peer_send(origin, frames)

    def _send_parked(self, origin: str, frames: list) -> None:
        self._peer_send(origin, frames)

    def _send_route(self, route: tuple, payload: bytes) -> bool:
        """Send a payload to a client through the ROUTER; False if it was dropped."""
        if self._closed:
            self.metrics.client_send_failed()
            return False
        send = self._router.send
        sent = True
        try:
            for frame in route:
                send(frame, _SNDMORE_NOBLOCK)
            send(payload, _NOBLOCK)
        except zmq.ZMQError:  # client gone (EHOSTUNREACH) or its queue is full
            self.metrics.client_send_failed()
            sent = False
        else:  # counted against the client's reply budget until its peer acknowledges
            self._guard.wrote(route[0], len(payload) + 9 + 2 * (len(route) - 1))
        if not self._in_pump:
            # A send outside the pump can consume the FD's edge: look again.
            self._schedule_pump()
        return sent

    # ------------------------------------------------------------------ timers, gauges

    def _peer_send(self, address: str, frames: list, give_up=None, stranger: bool = False) -> bool:
        """Send to a peer now, or queue until its link is up (bounded in size and time)."""
        if self._closed:
            self.metrics.peer_send_failed()
            return False
        ok = self._transport.send(address, frames, give_up, self._loop.time(), stranger)
        self._ensure_retry()
        return ok

    def _ensure_retry(self) -> None:
        if self._retry_timer is None and (self._transport.has_queued or self._parked):
            self._retry_timer = self._loop.call_later(RETRY_INTERVAL_S, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._closed:
            return
        try:
            now = self._loop.time()
            self._transport.retry(now)
            self._parked.expire(now)
        except Exception as exc:  # a timer callback must never die: re-armed below
            self.metrics.errored(ErrorCode.INTERNAL)
            self.log.exception("retry_failed", error=repr(exc))
        self._ensure_retry()

    def _guard_tick(self) -> None:
        """Apply the connection budgets: a few connections every tick, all of them
        every GUARD_SCAN_S (and whenever memory jumps)."""
        self._guard_timer = None
        if self._closed:
            return
        now = self._loop.time()
        try:
            if now - self._guard_scanned_at >= GUARD_SCAN_S:
                self._guard_scanned_at = now
                cut = self._guard.scan()
            else:
                cut = self._guard.tick(GUARD_PER_TICK, GUARD_RSS_JUMP_BYTES)
        except Exception as exc:  # a timer callback must never die: re-armed below
            self.metrics.errored(ErrorCode.INTERNAL)
            self.log.exception("guard_failed", error=repr(exc))
            cut = 0
        self._check_memory()
        if cut:  # under attack: look much more often for a while (a few us a look)
            self._guard_alert_until = now + GUARD_ALERT_S
        tick_s = GUARD_ALERT_TICK_S if now < self._guard_alert_until else GUARD_TICK_S
        self._guard_timer = self._loop.call_later(tick_s, self._guard_tick)

    def _check_memory(self) -> None:
        budget = self.config.memory_bytes_max
        tight = bool(budget) and self._guard.rss > budget
        if tight != self.host.memory_tight:
            self.host.memory_tight = tight
            self.log.warning("memory_budget", over=tight, rss=self._guard.rss, budget=budget)

    def _start_idle_sweeps(self) -> None:
        """Passivate agents idle for agent_idle_s (to twice that): a sweep starts every
        agent_idle_s and looks at a bounded number of agents per step."""
        idle_s = self.config.agent_idle_s
        if idle_s <= 0:
            return

        def start() -> None:
            if not self._closed:
                self.host.start_sweep()
                self._loop.call_later(idle_s, start)

        def step() -> None:
            if not self._closed:
                self.host.sweep_idle(IDLE_SWEEP_LOOKS)
                self._loop.call_later(IDLE_SWEEP_STEP_S, step)

        self._loop.call_later(idle_s, start)
        step()

    def _gauges(self) -> dict[str, float]:
        transport = self._transport.health() if self._transport else {}
        return {
            "agents_active": len(self.host.directory),
            "mailbox_depth": self.host.mailbox_depth(),
            "mailbox_bytes": self.host.mailbox_bytes(),
            "peers_connected": transport.get("peers", 0),
            "peer_queue_depth": transport.get("queued", 0),
            "members": len(self.members),
        }

    def _health(self) -> tuple[bool, dict]:
        ok = not self._stopping and self._router is not None
        return ok, {"status": "serving" if ok else "stopping", "node": self.node_id,
                    "members": len(self.members), "agents": len(self.host.directory)}
