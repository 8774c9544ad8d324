"""The node: runs the protocol machines, carries out their effects, owns the timers.

Everything that decides lives in pure machines (``protocols/``): membership, routing
(local / forward / refuse, and every forward in flight answered exactly once),
cluster status and the shutdown sequence.  This module feeds them real time and
real messages, and performs what they ask through one table of effect handlers
(``protocols.machine.Effects``): an effect nobody handles is an error.

Traffic comes and goes through transports built from the registry
(``node/transports``): inbound as ``client(handle, payload)`` or peer frames, replies
to opaque handles the transport minted, peers named by node id.  Requests are
decoded once; a forward passes the client's bytes on untouched.

A call's caller is a ``reply_to`` tuple ``(handle, origin, token, traceparent,
arrived)``: a local client's transport handle, or, for a call forwarded to us, the
entry node's id and the forward's token (the reply goes back to that node, which
finds the client by the token).  One-way requests have ``reply_to`` None.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
from collections import OrderedDict
from typing import Any

import core_cy
import msgpack
from protocols import peer, wire
from protocols.admission import CLIENT_INFLIGHT, CLIENT_RATE, Admission, Refused
from protocols import epidemic
from protocols.effects import (REPLICATE, Answer, Fail, ForwardTo, GroupDeliver, Install,
                               MembersChanged,
                               QuorumChanged, Refuted, Relay, Route, Send, Surrender,
                               Unresponsive, GOSSIP)
from protocols.handoff import Handoff, HandoffError, previous_ring
from protocols.machine import Effects
from protocols.membership import (ALIVE, LEFT, SUSPECT, ZMQ, ZMQ_PUB, Member, Membership,
                                  MembershipError, SwimConfig, advertised_replicas)
from protocols.replication import batch
from protocols.routing import Refusal, Router
from protocols.shutdown import Phase, Shutdown
from protocols.status import StatusCollector, StatusError
from protocols.strategies import STRATEGY, Strategies
from protocols.wire import ErrorCode, Request, WireError

from . import logs, ready, systemd, transports
from .agents import BUSY, AgentError, AgentHost, Supervision, load_behavior_modules
from .config import NodeConfig
from .curve import CurveError, NodeCurve
from .guard import rss_bytes, trim_malloc
from .metrics import MetricsServer, NodeMetrics
from .parked import ParkedReplies
from .state import CAUSAL, ReplicatedState
from .transports import faults
from .transports.select import Policy, TransportSet

RETRY_INTERVAL_S = 0.02    # how often queued peer sends are retried
SHUTDOWN_LINGER_MS = 500   # time given to last replies on close
MEMORY_CHECK_S = 0.05      # how often resident memory is compared with its budget
MEMORY_TRIM_EVERY = 20     # checks over budget between two malloc_trim calls (1 s)
IDLE_SWEEP_LOOKS = 10_000  # agents the idle sweep looks at per step
IDLE_SWEEP_STEP_S = 0.1
LARGE_REQUEST_BYTES = 64 << 10  # refused while the node is over its memory budget
MOVE_RETRY_S = 0.05        # agents busy when their ownership moved are tried again after
LEAVE_POLL_S = 0.02        # a graceful leave waits for handoffs to be acknowledged
LEAVE_QUIET_S = 0.5        # ... and then for none to be in flight for this long
JOIN_HELD_MAX = 10_000     # requests a joining node holds until it has joined ...
JOIN_HELD_BYTES_MAX = 64 << 20  # ... and their envelope bytes
MOVED_MAX = 100_000        # agents handed away whose requests still follow them
STALL_BEAT_S = 0.1         # the stall guard's heartbeat

_now = time.monotonic  # the loop's clock (asyncio's default), without a method lookup
_pack = msgpack.Packer(use_bin_type=True).pack


class Node:
    """A synthesis node.  ``await Node(config).serve()`` runs it until stopped."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.node_id = config.resolved_node_id
        self.log = logs.get_logger()
        self.metrics = NodeMetrics(self.node_id)
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
        self.router = self._new_router()
        self.strategies = self._new_strategies()
        self.status = StatusCollector(self.node_id, config.status_timeout_s,
                                      key=os.urandom(8))
        self.shutdown = Shutdown(config.shutdown_timeout_s)
        self.membership: Membership | None = None
        self.epidemic: epidemic.Epidemic | None = None  # gossip broadcast, made at start
        self.curve = self._load_curve()
        self._transport_set: TransportSet | None = None  # with bridges configured
        self._peer_endpoints: dict[str, dict[str, str]] = {}  # the last view's, for SIGHUP
        self.transport = self._build_transport()
        if config.faults_file:  # testing only (docs/OPERATIONS.md, "Fault injection")
            self.transport = faults.wrap(self.transport, config.faults_file, self.log,
                                         self.metrics)
        self.handoff: Handoff | None = None
        self._moving: set[str] = set()   # agents to hand on once their turn ends
        # Agent handed away -> (to whom, until when its requests follow it): only
        # while rings may still disagree (handoff_window_s), and bounded in count.
        self._moved_to: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._move_timer: asyncio.TimerHandle | None = None
        self._refusing = False           # past the leave: new requests are refused
        self._serving = not config.seeds  # owned agents under the ring we hold
        # A node with seeds holds agent requests until it has joined (milliseconds:
        # members that heard of it already may forward to it before its view is in).
        self._joining = bool(config.seeds)
        self._join_held: list[tuple] = []
        self._join_held_bytes = 0
        self._join_timer: asyncio.TimerHandle | None = None
        # The node's generation: its replica id and replication epochs derive from it.
        self._generation = time.time_ns()
        self.state = ReplicatedState(self, self._generation)
        self._effects = Effects({
            **self.state.effects,
            Send: self._do_send, MembersChanged: self._on_members, Refuted: self._on_refuted,
            Answer: self._do_answer, Fail: self._do_fail, Phase: self._on_phase,
            Unresponsive: self._on_unresponsive, QuorumChanged: self._on_quorum,
            Surrender: self._on_surrender, Install: self._on_install,
            Relay: self._do_relay, Route: self._do_route, ForwardTo: self._do_forward_to,
            GroupDeliver: self._on_group_deliver,
        })
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._forwards_settled: asyncio.Event | None = None
        self._stopping = False
        self._closed = False  # sockets closed: late callbacks must not touch them
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._retry_timer: asyncio.TimerHandle | None = None
        self._parked = ParkedReplies(self.metrics)
        # Limits per client (protocols/admission.py): a local client's handle is
        # (transport handle, principal) from intake to reply, so the reply settles it.
        self._admission = Admission(config.client_rate, config.client_burst,
                                    config.client_inflight_max, config.clients_tracked_max)
        self._started_at = _now()
        self._max_bytes = config.max_message_bytes
        self._me = self.node_id
        self._repl_out: dict[str, list[bytes]] = {}  # replication messages, batched
        self._repl_flush_soon = False
        # Stall guard: a node that did not run for longer than peers take to suspect
        # it does not serve its agents until membership had a round to catch up.
        self._awake_at = _now()
        self._cpu_at = time.process_time()
        self._recovering_until = 0.0
        self._stall_s = 2 * config.probe_interval_s
        self._stall_recover_s = 2 * config.probe_interval_s + config.probe_timeout_s

    # ------------------------------------------------------------------ start/stop

    async def serve(self) -> None:
        """Run until ``request_stop`` (or SIGTERM/SIGINT), then shut down gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._forwards_settled = asyncio.Event()
        load_behavior_modules(self.config.behaviors)
        self.transport.start(self._loop, self)
        self._use_bound_addresses()
        self._start_metrics()
        self._install_signal_handlers()
        self._say_if_open()
        self._open_storage()
        self._start_membership()
        self._start_memory_checks()
        self._start_idle_sweeps()
        systemd.ready()
        self._start_watchdog()
        self._start_stall_guard()
        info = ready.serving_info(self.node_id, self.config.router_endpoint,
                                  self.config.pub_endpoint, self._metrics_bound(), os.getpid())
        self.log.info("node_serving", address=info["address"], pub=info["pub"],
                      metrics=info["metrics"], seeds=list(self.config.seeds))
        ready.announce(self.config.ready_file, info)
        try:
            await self._stop_event.wait()
        finally:
            await self._shut_down()

    def _build_transport(self) -> transports.Transport:
        """ZeroMQ, and beside it the bridges the config names: then a TransportSet
        chooses per peer, falls back and keeps circuit breakers."""
        cfg = self.config
        native = transports.create(
            # An empty node id: the transport derives it once bound, as the config does.
            "zmq", node_id=cfg.node_id, router_bind=cfg.router_bind,
            router_endpoint=cfg.router_endpoint, pub_bind=cfg.pub_bind,
            pub_endpoint=cfg.pub_endpoint, max_message_bytes=cfg.max_message_bytes,
            peer_hwm=cfg.peer_hwm, pub_hwm=cfg.pub_hwm, metrics=self.metrics,
            log=self.log, linger_ms=SHUTDOWN_LINGER_MS, curve=self.curve,
            limits={"connections_max": cfg.connections_max,
                    "conn_inbound_bytes_max": cfg.conn_inbound_bytes_max,
                    "inbound_bytes_max": cfg.inbound_bytes_max,
                    "client_reply_bytes_max": cfg.client_reply_bytes_max})
        transports.load_modules(cfg.transport_modules)
        binds = [("http2", cfg.http2, cfg.http2_advertise), ("quic", cfg.quic, cfg.quic_advertise)]
        binds += [(*item.split("=", 1), "") for item in cfg.transport_binds]
        bridges = [transports.create(
            name, node_id=cfg.node_id, bind=bind, advertise=advertise, tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key, tls_ca=cfg.tls_ca, max_message_bytes=cfg.max_message_bytes,
            metrics=self.metrics, log=self.log) for name, bind, advertise in binds if bind]
        if not bridges:
            return native
        self._transport_set = TransportSet(
            [native, *bridges], Policy(cfg.transport_order, cfg.transport_policy),
            labels=",".join(cfg.labels), breaker_failures=cfg.breaker_failures,
            breaker_open_s=cfg.breaker_open_s, metrics=self.metrics)
        self.metrics.set_transports(lambda: {
            "stats": self._transport_set.stats,
            "breakers": self._transport_set.breaker_states()})
        return self._transport_set

    def _load_curve(self) -> NodeCurve | None:
        """The node's CURVE keys and allowed peers and clients, when CURVE is on."""
        cfg = self.config
        if not cfg.curve_enabled:
            return None
        try:
            return NodeCurve(cfg.curve_secret, cfg.curve_peers, cfg.curve_clients, self.log)
        except CurveError as exc:
            self.log.error("curve_keys_unusable", error=str(exc))
            raise SystemExit(2) from None

    def _say_if_open(self) -> None:
        """Loudly, at start: a node other machines can reach that anyone may talk to."""
        if self.config.exposed_without_curve:
            self.log.error("node_open", listen=self.config.listen,
                           hint="curve = off: anyone who can reach these ports can send "
                                "peer traffic (forged gossip, forwards, replies) and call "
                                "any agent; see docs/OPERATIONS.md, 'Securing a cluster'")

    def reload_keys(self) -> None:
        """SIGHUP: read the CURVE key directories again (the old keys stay on error)."""
        if self.curve is None:
            self.log.info("keys_reload_skipped", reason="curve is off")
            return
        try:
            self.curve.reload()
        except CurveError as exc:
            self.metrics.limited("curve_reload_failed")
            self.log.error("keys_reload_failed", error=str(exc), kept="the keys loaded before")
            return
        ring = self.curve.keyring
        self.log.info("keys_reloaded", peers=len(ring.peers), clients=len(ring.clients))
        if self.membership is not None:
            self.membership.set_member_keys(ring.member_keys())
        # Keys members advertise are checked against the new certificates now.
        self.transport.set_peers(self._peer_endpoints, self.config.seeds)

    def _open_storage(self) -> None:
        """Local durability (storage_path): copies kept there come back first."""
        if not self.config.storage_path:
            return
        started = _now()
        try:
            count = self.state.open_storage(self._loop)
        except Exception as exc:  # a file that is not ours, a lock held, a bad disk
            self.log.error("storage_open_failed", path=self.config.storage_path, error=str(exc))
            raise SystemExit(2) from None
        self.log.info("storage_recovered", path=self.config.storage_path, agents=count,
                      seconds=round(_now() - started, 3), sync=self.config.storage_sync)

    def request_stop(self) -> None:
        if self._stop_event is not None and not self._stopping:
            self._stopping = True
            self._stop_event.set()

    def _new_strategies(self) -> Strategies:
        cfg = self.config
        return Strategies(self.node_id, reply_bytes_max=cfg.max_message_bytes,
                          default_timeout_s=cfg.handler_timeout_s + cfg.forward_margin_s)

    def _new_router(self) -> Router:
        cfg = self.config
        return Router(self.node_id, os.urandom(8), max_hops=cfg.max_hops,
                      forward_timeout_s=cfg.handler_timeout_s + cfg.forward_margin_s)

    def _use_bound_addresses(self) -> None:
        """A port 0 in listen, pub or advertise is known only now, bound: the config
        takes the advertised endpoints with the real ports, and a node id derived from
        advertise takes the bound port.  The machines made with the provisional id
        have not run yet, so they are made again."""
        endpoints = self.transport.endpoints()
        self.config = self.config.bound(endpoints[ZMQ], endpoints[ZMQ_PUB])
        node_id = self.config.resolved_node_id
        if node_id != self.node_id:
            self.node_id = self._me = self.metrics.node_id = node_id
            self.router = self._new_router()
            self.strategies = self._new_strategies()
            self.status = StatusCollector(node_id, self.config.status_timeout_s,
                                          key=os.urandom(8))
            logs.set_node_id(node_id)

    def _metrics_bound(self) -> tuple[str, int] | None:
        """(host, port) the metrics server listens on (port 0 resolved), or None."""
        if self._metrics_server is None:
            return None
        return self.config.metrics_address[0], self._metrics_server.port

    def _start_metrics(self) -> None:
        self.metrics.set_gauges(self._gauges)
        address = self.config.metrics_address
        self._metrics_server = None
        if address is not None:
            self._metrics_server = MetricsServer(address[0], address[1], self.metrics,
                                                 self._health)
            self._metrics_server.start()

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        try:
            self._loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        except (NotImplementedError, RuntimeError):
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

    def _start_stall_guard(self) -> None:
        """Notice when this process did not run for a while (SIGSTOP, a VM pause, a
        swap storm): peers may have declared it dead and given its agents to other
        owners meanwhile.  Until membership has had time to find out, its own
        agents refuse requests (``unavailable``: clients resend) instead of applying
        the backlog a second time beside the interim owner."""
        period_s = STALL_BEAT_S

        def beat() -> None:
            now = _now()
            stopped_s = self._stopped_for(now)
            if stopped_s > self._stall_s:
                self._recovering_until = now + self._stall_recover_s
                self.metrics.limited("node_stalled")
                self.log.error("node_stalled", stalled_s=round(stopped_s, 3),
                               hint="refusing agent requests while membership catches up")
            self._awake_at, self._cpu_at = now, time.process_time()
            if not self._closed:
                self._loop.call_later(period_s, beat)
        self._awake_at, self._cpu_at = _now(), time.process_time()
        beat()

    def _stopped_for(self, now: float) -> float:
        """How long this process did not run since the last beat: the time that
        passed minus the CPU time it used (a loop busy with work is not stopped; one
        starved of CPU by others is, as far as its peers can tell)."""
        gap = now - self._awake_at
        if gap <= self._stall_s:
            return gap
        return gap - (time.process_time() - self._cpu_at)

    def _stalled(self) -> bool:
        now = _now()
        return now < self._recovering_until or self._stopped_for(now) > self._stall_s

    async def _shut_down(self) -> None:
        """The sequence is ``protocols/shutdown.py``'s; the waits here are on events."""
        self.log.info("node_stopping", pending=self.host.pending())
        systemd.stopping()
        now = _now()
        self._run(self.shutdown.begin(now))
        await self._leave_cluster()
        self._refusing = True
        refused = await self.host.drain(self.shutdown.deadline - _now())
        self._run(self.shutdown.agents_idle(_now()))
        if self.router.in_flight:
            try:
                await asyncio.wait_for(self._forwards_settled.wait(),
                                       max(0.0, self.shutdown.deadline - _now()))
            except asyncio.TimeoutError:
                pass
        self._run(self.shutdown.forwards_settled(_now()) or self.shutdown.tick(math.inf))
        self._run(self.router.stop())   # whatever is left is answered 'unavailable'
        self._run(self.strategies.stop())
        self._release_join_held(False)
        self._run(self.state.machine.stop())
        if self.handoff is not None:
            for req, reply_to, _ in self.handoff.stop():
                self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE,
                                  "node is shutting down", req.type)
        self._run(self.status.stop())   # collections answer with what they have
        self.transport.retry(math.inf)  # sends still queued: now or never (callers told)
        for _, timer in self._timers.values():
            timer.cancel()
        for timer in (self._retry_timer, self._move_timer):
            if timer is not None:
                timer.cancel()
        self._closed = True
        self.state.close()  # what is queued for the disk is committed first
        self.transport.stop(linger_ms=SHUTDOWN_LINGER_MS)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._run(self.shutdown.closed())
        self.log.info("node_stopped", refused=refused)

    def _on_phase(self, phase: Phase) -> None:
        self.log.info("shutdown_phase", phase=phase.name)

    # ------------------------------------------------------------------ machines

    def _run(self, effects: list) -> None:
        if effects:
            self._effects.run(effects)

    def _arm(self, name: str, machine: Any) -> None:
        """Keep one timer per machine, at its next deadline."""
        deadline = machine.next_deadline()
        armed = self._timers.get(name)
        if armed is not None:
            if armed[0] == deadline:
                return
            armed[1].cancel()
            del self._timers[name]
        if deadline is not None and not self._closed:
            handle = self._loop.call_at(deadline, self._tick, name, machine)
            self._timers[name] = (deadline, handle)

    def _tick(self, name: str, machine: Any) -> None:
        self._timers.pop(name, None)
        if self._closed:
            return
        try:
            self._run(machine.tick(_now()))
        except Exception as exc:  # a timer callback must never die: re-armed below
            self.metrics.errored(ErrorCode.INTERNAL)
            self.log.exception("tick_failed", machine=name, error=repr(exc))
        self._arm(name, machine)

    def _do_send(self, effect: Send) -> None:
        if effect.channel == REPLICATE:
            self._replicate_later(effect)
            return
        frames = peer.encode(effect.channel, self._me, effect.message)
        if effect.channel == GOSSIP:
            self.metrics.gossip_sent(sum(map(len, frames)))
        # Control traffic (membership, status) goes over ZeroMQ first, not a bridge:
        # probes must measure the peer, not a bridge's queue behind bulk forwards
        # (h2load over HTTP/2 delayed acks until a healthy peer was declared dead).
        if self.transport.send(effect.to, frames, None, _now(), prefer=ZMQ):
            self.metrics.sent(effect.channel)
        self._ensure_retry()

    def _replicate_later(self, effect: Send) -> None:
        """Replication messages to a peer are batched per loop iteration: under load
        one REPL frame carries many deltas and acks instead of one each."""
        outbox = self._repl_out.get(effect.to)
        if outbox is None:
            outbox = self._repl_out[effect.to] = []
        outbox.append(_pack(effect.message))
        if not self._repl_flush_soon:
            self._repl_flush_soon = True
            self._loop.call_soon(self._flush_replication)

    def _flush_replication(self) -> None:
        self._repl_flush_soon = False
        outboxes, self._repl_out = self._repl_out, {}
        now = _now()
        for to, packed in outboxes.items():
            for message in batch(packed):
                frames = peer.replicate(self._me, message)
                if self.transport.send(to, frames, None, now):
                    self.metrics.sent(REPLICATE)
        self._ensure_retry()

    def _on_unresponsive(self, effect: Unresponsive) -> None:
        """Calls to this owner timed out: what the transport still holds for it (a
        frozen process reads nothing) is dropped rather than left to pile up."""
        self.transport.drop_queued(effect.node_id)
        self.metrics.limited("unresponsive_owner")

    def _do_answer(self, effect: Answer) -> None:
        self._reply_data(effect.handle, effect.request_id, effect.data)

    def _do_fail(self, effect: Fail) -> None:
        self._reply_error(effect.handle, effect.request_id, effect.code, effect.message,
                          effect.mtype)
        self._check_forwards_settled()

    # ------------------------------------------------------------------ membership

    def _start_membership(self) -> None:
        cfg = self.config
        endpoints = self.transport.endpoints()
        me = Member(self.node_id, self._generation, tuple(sorted(endpoints.items())),
                    replica=self.state.replica)
        wall_offset_ns = time.time_ns() - int(_now() * 1e9)
        self.handoff = Handoff(self.node_id, timeout_s=cfg.handoff_timeout_s,
                               window_s=cfg.handoff_window_s, seq_start=me.generation)
        self.membership = Membership(
            me, cfg.seeds, swim_config(cfg), wall_offset_ns=wall_offset_ns,
            generation_ahead_max_ns=int(cfg.generation_ahead_max_s * 1e9))
        if self.curve is not None:
            self.membership.set_member_keys(self.curve.keyring.member_keys())
        # Gossip broadcast ids start at our generation: a restart never reuses one.
        self.epidemic = epidemic.Epidemic(self.node_id, seq_start=me.generation,
                                          rng=random.Random(os.urandom(8)))
        self.metrics.set_events(self._events)
        self._run(self.membership.start(_now()))
        self._arm("membership", self.membership)
        self._run(self.epidemic.start(_now()))
        self._arm("epidemic", self.epidemic)

    def _on_members(self, effect: MembersChanged) -> None:
        """The view changed: peers to reach, the ring, and agents that move.

        Peers are every member but us, dead ones too (they are sent a sync page now
        and then, which is how a healed partition merges) and left ones (they may
        still be handing agents off).  The ring holds what membership says owns."""
        members = effect.members
        self.members = {n: m for n, m in members.items() if m.state != LEFT}
        others = {n: dict(m.endpoints) for n, m in members.items() if n != self.node_id}
        self._peer_endpoints = others
        self.transport.set_peers(others, self.config.seeds)
        self.epidemic.set_peers(n for n, m in members.items()
                                if n != self.node_id and m.state in (ALIVE, SUSPECT))
        self._parked.flush(set(others), self._send_parked)
        reachable = [n for n, m in members.items() if m.state in (ALIVE, SUSPECT, LEFT)]
        self._run(self.handoff.members_changed(reachable))
        live = {n: m.generation for n, m in members.items() if m.state in (ALIVE, SUSPECT)}
        self._run(self.state.machine.members_changed(live, _now(), live))
        self.state.machine.live_replicas = advertised_replicas(members)
        gone = {n for n, _ in self._moved_to.values()} - set(reachable)
        if gone:
            self._moved_to = OrderedDict((a, v) for a, v in self._moved_to.items()
                                         if v[0] not in gone)
        ring = effect.ring_ids
        if ring != frozenset(self.router.ring.nodes):
            previous = previous_ring(self.router.ring, ring, self._me, self._serving)
            self._run(self.router.members_changed(ring, reachable))
            self._run(self.handoff.ring_changed(previous.owner, _now(),
                                                self.router.ring.owner))
            self._run(self.state.machine.ring_changed(previous, self.router.ring, _now()))
            self._move_out(list(self.host.directory))
            self.log.info("ring_changed", ring=sorted(ring))
        self._serving = self.router.quorate
        self._arm("router", self.router)
        self._arm("handoff", self.handoff)
        self._arm("replication", self.state.machine)
        self.log.info("members_changed", **self.membership.counts())

    def _hold_until_joined(self, req: Request, payload: bytes, reply_to: Any, hops: int,
                           origin: str | None) -> None:
        if (len(self._join_held) >= JOIN_HELD_MAX
                or self._join_held_bytes + req.nbytes > JOIN_HELD_BYTES_MAX):
            self.metrics.limited("joining")
            self._reply_error(reply_to, req.id, ErrorCode.OVERLOADED,
                              "node is joining the cluster", req.type)
            return
        self._join_held.append((req, payload, reply_to, hops, origin))
        self._join_held_bytes += req.nbytes
        if self._join_timer is None:
            self._join_timer = self._loop.call_later(self.config.handoff_timeout_s,
                                                     self._release_join_held, False)

    def _release_join_held(self, joined: bool) -> None:
        """Joined: route what waited.  Not joined in time (or stopping): answer it."""
        if self._join_timer is not None:
            self._join_timer.cancel()
            self._join_timer = None
        held, self._join_held, self._join_held_bytes = self._join_held, [], 0
        for req, payload, reply_to, hops, origin in held:
            if joined:
                self._dispatch(req, payload, reply_to, hops, origin)
            else:
                self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE,
                                  "node has not joined the cluster yet (no seed answered)",
                                  req.type)

    def _on_quorum(self, effect: QuorumChanged) -> None:
        self.router.set_quorate(effect.quorate, effect.reachable, effect.reference)
        if effect.quorate and self._joining:
            self._joining = False
            self._release_join_held(True)
        log = self.log.info if effect.quorate else self.log.error
        log("quorum_changed", quorate=effect.quorate, reachable=effect.reachable,
            reference=effect.reference, strategy=self.config.downing,
            hint=None if effect.quorate else "this side of a split serves no agents "
                                            "until enough members are reachable again")

    # ------------------------------------------------------------------ handoff

    def _move_out(self, agent_ids: list[str]) -> None:
        """Hand every agent in ``agent_ids`` that another node owns now to its owner;
        one busy in a turn is tried again once the turn is over (MOVE_RETRY_S)."""
        route, me = self.router.ring.owner, self._me
        for agent_id in agent_ids:
            owner = route(agent_id)
            if owner == me:
                self._moving.discard(agent_id)
                continue
            taken = self.host.take_out(agent_id)
            if taken is BUSY:
                self._moving.add(agent_id)
                continue
            self._moving.discard(agent_id)
            if taken is not None:
                self._hand_to(agent_id, owner, taken)
        if self._moving and self._move_timer is None and not self._closed:
            self._move_timer = self._loop.call_later(MOVE_RETRY_S, self._move_again)
        self._arm("handoff", self.handoff)

    def _hand_to(self, agent_id: str, owner: str, taken: tuple) -> None:
        now, moved = _now(), self._moved_to
        self.metrics.agent_moved_out()
        moved.pop(agent_id, None)
        moved[agent_id] = (owner, now + self.config.handoff_window_s)
        while moved and (len(moved) > MOVED_MAX or next(iter(moved.values()))[1] <= now):
            moved.popitem(last=False)  # the oldest first: all share one window
        self._run(self.handoff.send_state(agent_id, owner, *taken, now))
        self._run(self.state.machine.released(agent_id, now))
        self.state.forget_clock(agent_id)
        self._arm("replication", self.state.machine)

    def _after_move(self, agent_id: str, ttl: int | None, hops: int) -> Any:
        """We own it by our ring but handed it to a node whose ring is ahead of
        ours: the request follows the agent (a forward, within the hop limit)."""
        moved = self._moved_to.get(agent_id)
        if moved is None or agent_id in self.host.directory or moved[1] <= _now():
            return self._me
        return self.router.follow(agent_id, moved[0], ttl, hops)

    def _move_again(self) -> None:
        self._move_timer = None
        if not self._closed:
            self._move_out(sorted(self._moving))

    def _on_surrender(self, effect: Surrender) -> None:
        """A node that owns the agent now asks for it."""
        taken = self.host.take_out(effect.agent_id)
        if taken is None:
            self._run(self.handoff.none(effect.agent_id, effect.to))
        elif taken is not BUSY:  # busy: the want is sent again
            self._hand_to(effect.agent_id, effect.to, taken)

    def _on_install(self, effect: Install) -> None:
        """An agent's state arrived (or will not): install it, then run what waited."""
        agent_id = effect.agent_id
        self._moved_to.pop(agent_id, None)
        if effect.behavior is not None:
            if agent_id in self.host.directory:
                self.metrics.limited("handoff_conflict")
                merged = self.host.merge_moved(agent_id, effect.state)
                self.log.warning("handoff_conflict", agent_id=agent_id, merged=merged,
                                 hint="the agent was activated here before its state "
                                      "arrived; its replicated fields are merged in, "
                                      "other state is dropped")
            else:
                try:
                    self.host.install(agent_id, effect.behavior, effect.state, effect.groups)
                except AgentError as exc:
                    self.log.error("handoff_install_failed", agent_id=agent_id,
                                   error=exc.message)
        for req, reply_to, (payload, hops, origin) in effect.held:
            self._dispatch(req, payload, reply_to, hops, origin, hold=False)  # owners move
        if agent_id in self.host.directory and self.router.ring.owner(agent_id) != self._me:
            self._move_out([agent_id])  # given back, or moved on meanwhile: pass it on

    def _hold_for_handoff(self, req: Request, reply_to: Any, route: tuple) -> bool:
        """A miss for an agent whose state may be on its way here: hold the request
        and ask the previous owner (True), or activate fresh (False)."""
        now = _now()
        if self.handoff.expecting(req.subject, now) is None:
            return False
        held = self.handoff.hold(req.subject, (req, reply_to, route), req.nbytes, now)
        if type(held) is Refusal:
            self._reply_error(reply_to, req.id, held.code, held.message, req.type)
        else:
            self._run(held)
            self._arm("handoff", self.handoff)
        return True

    def _on_handoff(self, event: peer.HandedOff) -> None:
        try:
            effects = self.handoff.receive(event.sender, event.message, _now())
        except HandoffError as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.handoff")
            self.metrics.limited(f"handoff_{exc.reason}")
            self.log.warning("bad_handoff", error=str(exc))
            return
        self._run(effects)
        self._arm("handoff", self.handoff)

    async def _leave_cluster(self) -> None:
        """A graceful leave: every member hears it, the ring moves on without us, and
        our agents go to their new owners with their state (bounded by the
        shutdown deadline).  Requests that arrive meanwhile are forwarded."""
        if self.membership is None:
            return
        self._run(self.membership.leave(_now()))
        self._arm("membership", self.membership)
        quiet_until = _now() + LEAVE_QUIET_S
        while _now() < self.shutdown.deadline and (
                self._handing_off() or _now() < quiet_until):
            if self._handing_off():
                # Quiet for a while before going: a node whose ring is behind may
                # still pass a state back to us, and we must hand it on.
                quiet_until = _now() + LEAVE_QUIET_S
            await asyncio.sleep(LEAVE_POLL_S)
        if self._handing_off():
            self.log.warning("leave_handoff_incomplete", unacknowledged=self.handoff.kept_now,
                             busy=len(self._moving), replicas_behind=self.state.machine.lagging)

    def _handing_off(self) -> bool:
        """State still on its way to other nodes: agents, or replicated copies."""
        return bool(self.handoff.kept_now or self._moving or self.state.machine.lagging)

    def _events(self) -> dict[str, dict[str, int]]:
        h = self.handoff
        return {"membership": dict(self.membership.stats),
                "handoff": {"sent": h.sent, "acked": h.acked, "resent": h.resent,
                            "returned": h.returned, "installed": h.installed,
                            "duplicates": h.duplicates, "timed_out": h.timed_out,
                            "owner_lost": h.owner_lost, "refused": h.refused,
                            "rerouted": h.rerouted},
                "replication": self.state.events(),
                "routing": dict(self.strategies.stats),
                "gossip": dict(self.epidemic.stats) if self.epidemic else {}}

    def _on_refuted(self, effect: Refuted) -> None:
        self.metrics.refuted()
        self.log.error("node_id_claimed_elsewhere", claimed_address=effect.claimed_address,
                       claimed_generation=effect.claimed_generation,
                       new_generation=effect.generation,
                       hint="another process uses this node id, or gossip was forged; "
                            "enable CURVE authentication on untrusted networks")

    def _on_gossip(self, event: peer.Gossiped) -> None:
        if event.message.get("kind") in epidemic.KINDS:  # a gossip broadcast, not SWIM
            self._on_broadcast(event)
            return
        membership = self.membership
        refused_before = membership.refused_entries
        try:
            effects = membership.receive(event.sender, event.message, _now())
        except MembershipError as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.gossip")
            self.log.warning("bad_gossip", error=str(exc))
            return
        refused = membership.refused_entries - refused_before
        if refused:
            self.metrics.gossip_refused(refused)
            self.log.warning("gossip_entries_refused", count=refused,
                             reason="incarnation too far ahead, an address change not "
                                    "sent by the member itself, or the member limit")
        self._run(effects)
        self._arm("membership", membership)

    def _on_broadcast(self, event: peer.Gossiped) -> None:
        try:
            effects = self.epidemic.receive(event.sender, event.message, _now())
        except epidemic.EpidemicError as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.gossip")
            self.log.warning("bad_gossip", error=str(exc))
            return
        self._run(effects)
        self._arm("epidemic", self.epidemic)

    def _on_group_deliver(self, effect: GroupDeliver) -> None:
        """A gossip broadcast reached this node (once): to the group's agents here."""
        try:
            req = wire.parse_request(effect.envelope, self._max_bytes)
        except WireError as exc:
            self.metrics.errored(exc.code, "syn.gossip")
            return
        self._deliver_to_group(effect.group, req)

    # ------------------------------------------------------------------ inbound (transport)

    def client(self, handle: Any, payload: bytes, principal: bytes = b"") -> None:
        """A request from a client of one of our transports (``principal``: who sent
        it, see ``Inbound.client``), admitted within that client's limits first.  An
        admitted request is settled (``Admission.done``) exactly once: by its reply
        in ``_send_reply``/``_on_reply``, or here when no reply is owed (one-way)."""
        admission = self._admission
        refused = admission.admit(principal, _now())
        if refused is not None:
            self._refuse_client(handle, payload, refused)
            return
        try:
            owed = self._accept(payload, (handle, principal), None, None, 0)
        except BaseException:  # a bug (the transport answers 'internal'): settle it here
            admission.done(principal)
            raise
        if not owed:
            admission.done(principal)

    def _refuse_client(self, handle: Any, payload: bytes, refused: Refused) -> None:
        """A client past its limits: 'overloaded' with a retry hint, or, for a
        one-way request, nothing (the send-mode rule); counted either way."""
        reason, retry_after_s = refused
        self.metrics.limited(reason)
        self.metrics.errored(ErrorCode.OVERLOADED)
        known = wire.refusal(payload[:self._max_bytes], ErrorCode.OVERLOADED, "")
        if known.one_way:
            return
        cfg = self.config
        if reason == CLIENT_RATE:
            message = (f"client is over its rate of {cfg.client_rate:g} requests/s "
                       f"(burst {self._admission.burst:g})")
        elif reason == CLIENT_INFLIGHT:
            message = (f"client has {cfg.client_inflight_max} requests in flight, its "
                       f"limit; send more as they are answered")
        else:
            message = (f"node tracks its limit of {cfg.clients_tracked_max} clients, "
                       f"all with requests in flight")
        if self.transport.reply(handle, wire.error(
                known.request_id, ErrorCode.OVERLOADED, message, self.node_id,
                known.traceparent, retry_after_ms=math.ceil(retry_after_s * 1000))):
            self.metrics.sent("error")

    def peer(self, frames: list[bytes]) -> None:
        try:
            event = peer.decode(frames)
        except peer.PeerProtocolError as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.peer")
            self.metrics.limited(f"peer_{exc.reason}")
            self.log.warning("bad_peer_frame", reason=exc.reason, error=str(exc),
                             frames=len(frames))
            return
        kind = type(event)
        if kind is peer.Forwarded:
            token = event.token or None
            self._accept(event.envelope, None, event.origin, token, event.hops)
        elif kind is peer.Replied:
            self._on_reply(event)
        elif kind is peer.Gossiped:
            self._on_gossip(event)
        elif kind is peer.HandedOff:
            self._on_handoff(event)
        elif kind is peer.Replicated:
            self.state.received(event.sender, event.message)
        elif kind is peer.StatusQueried:
            self._answer_status_query(event)
        else:
            self._on_status_answer(event)

    def multicast(self, group: str, payload: bytes) -> None:
        try:
            req = wire.parse_request(payload, self._max_bytes)
        except WireError as exc:
            self.metrics.errored(exc.code, "syn.multicast")
            return
        self.metrics.received(req.type)
        self._deliver_to_group(group, req)

    def malformed(self, handle: Any, nframes: int) -> None:
        self.metrics.errored(ErrorCode.BAD_REQUEST)
        self.transport.reply(handle, wire.error(
            None, ErrorCode.BAD_REQUEST, f"expected one envelope frame, got {nframes} frames",
            self.node_id))

    def failed(self, handle: Any, payload: bytes | None, exc: Exception) -> None:
        """A bug met a message: count and log it, and answer the client if it was one."""
        self.metrics.errored(ErrorCode.INTERNAL)
        self.log.error("dispatch_failed", error=repr(exc), exc_info=exc)
        if handle is None or payload is None:
            return
        # A bounded peek, not a decode: the frame may be what met the bug.
        known = wire.refusal(payload[:self._max_bytes], ErrorCode.INTERNAL, "")
        if known.one_way:  # the send-mode rule holds for node bugs too
            return
        self.transport.reply(handle, wire.error(
            known.request_id, ErrorCode.INTERNAL, f"node error: {type(exc).__name__}",
            self.node_id, known.traceparent))

    def _accept(self, payload: bytes, handle: Any, origin: str | None, token: bytes | None,
                hops: int) -> bool:
        """Validate a request from a client (origin None) or forwarded by a peer.
        True when a reply is owed to the caller (sent already, or to come)."""
        arrived = _now()  # for synthesis_request_seconds
        try:
            req = wire.parse_request(payload, self._max_bytes)
        except WireError as exc:
            self.metrics.errored(exc.code)
            if exc.one_way:  # readably send/publish: never answered, only counted
                return False
            if self._send_reply((handle, origin, token, exc.traceparent, arrived),
                                wire.error(exc.request_id, exc.code, exc.message, self.node_id,
                                           exc.traceparent)):
                self.metrics.sent("error")
            return True
        self.metrics.received(req.type)
        # A forwarded call without a token has nobody to answer: one-way, like a send.
        reply_to = (None if req.mode != wire.MODE_CALL or (origin is not None and token is None)
                    else (handle, origin, token, req.raw.get("traceparent"), arrived))
        if self._refusing:
            self._reply_error(reply_to, req.id, ErrorCode.UNAVAILABLE, "node is shutting down",
                              req.type)
        else:
            self._dispatch(req, payload, reply_to, hops, origin)
        return reply_to is not None

    # ------------------------------------------------------------------ routing

    def _dispatch(self, req: Request, payload: bytes, reply_to: Any, hops: int,
                  origin: str | None, hold: bool = True) -> None:
        if req.type in wire.NODE_TYPES:
            self._node_request(req, reply_to)
        elif req.mode == wire.MODE_PUBLISH:
            self._publish(req, payload)
        elif self.host.memory_tight and req.nbytes > LARGE_REQUEST_BYTES:
            # Over the memory budget, large requests are refused whether they would be
            # handled here or forwarded (a frozen owner's forwards pile up here too).
            self.metrics.limited("memory_budget")
            self._reply_error(reply_to, req.id, ErrorCode.OVERLOADED,
                              f"node is over its memory budget: requests above "
                              f"{LARGE_REQUEST_BYTES} bytes are refused for now", req.type)
        elif self._joining:
            self._hold_until_joined(req, payload, reply_to, hops, origin)
        elif req.routing is not None:
            self._dispatch_routed(req, payload, reply_to, hops, origin, hold)
        else:
            self._route_direct(req, payload, reply_to, hops, origin, hold)

    def _route_direct(self, req: Request, payload: bytes, reply_to: Any, hops: int,
                      origin: str | None, hold: bool) -> None:
        """One agent, through its owner: handled here, forwarded, or refused."""
        target = self._owner_of(req.subject, req.ttl, hops)
        if target == self._me:
            self._handle_local(req, reply_to, (payload, hops, origin), hold)
        elif type(target) is Refusal:
            self._refuse_request(req, reply_to, target.code, target.message)
        else:
            self._forward(target, req, payload, reply_to, hops, origin)

    def _refuse_request(self, req: Request, reply_to: Any, code: str, message: str) -> None:
        """Answer an error before any handler ran.  A pipeline stage's error names
        its stage and agent, like its handler's would (the stage is wrapped only
        here and at delivery: requests held for a handoff come back through)."""
        if req.routing == wire.ROUTING_PIPELINE and reply_to is not None:
            reply_to = self.strategies.stage(req, reply_to, _now())
        self._reply_error(reply_to, req.id, code, message, req.type)

    def _dispatch_routed(self, req: Request, payload: bytes, reply_to: Any, hops: int,
                         origin: str | None, hold: bool) -> None:
        """Scatter and pipeline (protocols/strategies.py); a gossip publish went to
        ``_publish`` already."""
        now = _now()
        if req.routing == wire.ROUTING_SCATTER:
            owners = {agent: self._owner_of(agent, req.ttl, hops) for agent in req.targets}
            self._run(self.strategies.scatter(req, reply_to, owners, hops, now))
            self._arm("strategies", self.strategies)
            return
        if reply_to is not None and reply_to[1] is None:  # our own client's pipeline
            entry = self.strategies.pipeline_entry(req, reply_to, now)
            if type(entry) is Fail:
                self._do_fail(entry)
                return
            reply_to = entry
            self._arm("strategies", self.strategies)
        self._route_direct(req, payload, reply_to, hops, origin, hold)

    def _piece_timeout(self, reply_to: tuple, now: float) -> float | None:
        """How long a forwarded piece of a scatter or pipeline may take: until its
        whole request's deadline (the router's forward timeout is the floor)."""
        if reply_to[1] is not STRATEGY:
            return None
        deadline = Strategies.deadline_of(reply_to[0])
        return None if deadline is None else deadline - now

    def _owner_of(self, agent: str, ttl: int | None, hops: int) -> str | Refusal:
        target = self.router.route(agent, ttl, hops)
        if target == self._me and self._moved_to:
            target = self._after_move(agent, ttl, hops)
        return target

    def _do_route(self, effect: Route) -> None:
        self._dispatch(effect.request, effect.payload, effect.reply_to, effect.hops, None)

    def _do_forward_to(self, effect: ForwardTo) -> None:
        self._forward(effect.owner, effect.request, effect.payload, effect.reply_to,
                      effect.hops, None)

    def _do_relay(self, effect: Relay) -> None:
        if self._send_reply(effect.reply_to, effect.payload):
            self.metrics.sent("reply")

    def _strategy_answer(self, slot: Any, payload: bytes) -> None:
        """A piece of a scatter or pipeline was answered (protocols/strategies.py)."""
        self._run(self.strategies.answered(slot, payload, _now()))
        self._arm("strategies", self.strategies)

    def _forward(self, owner: str, req: Request, payload: bytes, reply_to: Any, hops: int,
                 origin: str | None) -> None:
        """One hop on.  Our own client's call is recorded in the router (answered
        exactly once, whatever happens); a call forwarded to us keeps its origin and
        token, so the owner replies to the entry node directly."""
        if reply_to is None:  # one-way: nothing to answer
            frames = peer.forward(self._me, origin or self._me, hops + 1, b"", payload)
            give_up = None
        elif reply_to[1] is None or reply_to[1] is STRATEGY:  # answered through us
            now = _now()
            token = self.router.forward_started(reply_to, req.id, req.type, owner, now,
                                                reply_to[4], req.nbytes,
                                                self._piece_timeout(reply_to, now))
            if type(token) is Refusal:
                self._reply_error(reply_to, req.id, token.code, token.message, req.type)
                return
            frames = peer.forward(self._me, self._me, hops + 1, token, payload)

            def give_up(code: str, reason: str, token: bytes = token) -> None:
                self._run(self.router.send_failed(token, code, reason))
                self._check_forwards_settled()
            self._arm("router", self.router)
        else:
            frames = peer.forward(self._me, reply_to[1], hops + 1, reply_to[2], payload)

            def give_up(code: str, reason: str) -> None:
                self._reply_error(reply_to, req.id, code, reason, req.type)
        prefer = req.raw.get("transport") if self._transport_set is not None else None
        if self.transport.send(owner, frames, give_up, _now(), prefer=prefer):
            self.metrics.forwarded(req.type)
            self.metrics.sent("forward")
        self._ensure_retry()

    def _on_reply(self, event: peer.Replied) -> None:
        pending = self.router.reply_arrived(event.token)
        if pending is None:
            # Not a forward of ours in flight: answered already (timed out, owner
            # left), or a token we never issued (forged).  Never routed to a client.
            self.metrics.limited("late_reply" if self.router.owns_token(event.token)
                                 else "forged_reply")
            return
        if pending.handle[1] is STRATEGY:  # a piece of a scatter or pipeline
            self._strategy_answer(pending.handle[0], event.envelope)
            self._check_forwards_settled()
            return
        handle, principal = pending.handle[0]  # our own client's (see ``client``)
        self.transport.reply(handle, event.envelope)
        self._admission.done(principal)
        self.metrics.sent("reply")
        self.metrics.replied_forwarded(pending.arrived, pending.forwarded_at)
        self._check_forwards_settled()

    def _check_forwards_settled(self) -> None:
        if self._stopping and not self.router.in_flight:
            self._forwards_settled.set()

    def _handle_local(self, req: Request, reply_to: Any, route: tuple, hold: bool) -> None:
        """Run a request for an agent this node owns.  On a miss the request may wait
        for the agent's state to arrive (from its previous owner if ``hold``, or
        gathered from its replicas) and is then routed again with ``route``
        (payload, hops, origin)."""
        agent_id = req.subject
        if self._stalled():
            self._refuse_request(req, reply_to, ErrorCode.UNAVAILABLE,
                                 "node was stalled and may have been declared dead; "
                                 "send again")
            return
        try:
            if wire.is_system_type(req.type):
                self._system_request(req, reply_to)
                return
            act = self.host.directory.get(agent_id)
            if act is None:
                if hold and self._hold_for_handoff(req, reply_to, route):
                    return
                if self.state.hold_for_gather(req, reply_to, route):
                    return
                act = self.host.resolve(agent_id)
        except AgentError as exc:
            self._refuse_request(req, reply_to, exc.code, exc.message)
            return
        except Exception as exc:
            self.log.error("activation_failed", agent_id=agent_id, error=repr(exc))
            self._refuse_request(req, reply_to, ErrorCode.INTERNAL,
                                 f"activating {agent_id!r} failed: {exc!r}")
            return
        if act is None:
            self._refuse_request(req, reply_to, ErrorCode.UNKNOWN_AGENT,
                                 f"no agent {agent_id!r} and no behavior named "
                                 f"{agent_id.partition('/')[0]!r}")
            return
        if req.delivery == CAUSAL:
            self.state.deliver_causal(agent_id, act, req, reply_to)
            return
        if req.routing == wire.ROUTING_PIPELINE:  # its answer moves the pipeline on
            reply_to = self.strategies.stage(req, reply_to, _now())
        self.host.deliver(agent_id, act, req, reply_to)

    def _system_request(self, req: Request, reply_to: Any) -> None:
        agent_id, mtype, data = req.subject, req.type, req.data
        if mtype == wire.TYPE_SPAWN:
            self.host.spawn(agent_id, data["behavior"], data.get("init"))
            result = {"agent": agent_id, "node": self.node_id}
        elif mtype == wire.TYPE_STOP:
            stopped = self.host.stop(agent_id)
            if not self.state.reset(agent_id) and not stopped:
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
        if req.routing == wire.ROUTING_GOSSIP:
            self._gossip(req, payload)
            return
        group = req.subject
        self.transport.broadcast(group.encode(), [payload])
        self.metrics.sent("publish")
        self._deliver_to_group(group, req)

    def _gossip(self, req: Request, payload: bytes) -> None:
        """Start an epidemic broadcast (protocols/epidemic.py); delivered here too.
        One-way: a refusal is counted, never answered (the send-mode rule)."""
        if len(payload) > epidemic.ENVELOPE_BYTES_MAX:
            self.metrics.errored(ErrorCode.TOO_LARGE, req.type)
            return
        try:
            effects = self.epidemic.publish(req.subject, payload, _now())
        except epidemic.EpidemicFull:
            self.metrics.limited("gossip_window_full")
            self.metrics.errored(ErrorCode.OVERLOADED, req.type)
            return
        self.metrics.sent("publish")
        self._run(effects)
        self._arm("epidemic", self.epidemic)

    def _deliver_to_group(self, group: str, req: Request) -> None:
        members = self.host.groups.get(group)
        if not members:
            return
        for agent_id in list(members):
            act = self.host.directory.get(agent_id)
            if act is not None:
                self.host.deliver(agent_id, act, req, None)

    # ------------------------------------------------------------------ status

    def _node_request(self, req: Request, reply_to: Any) -> None:
        if req.type == wire.TYPE_PING:
            self._reply_data(reply_to, req.id, {"node": self.node_id})
        elif req.type == wire.TYPE_MEMBERS:
            self.membership.local_agents = len(self.host.directory)
            self._reply_data(reply_to, req.id, {"node": self.node_id,
                                                "quorate": self.router.quorate,
                                                "members": self.membership.rows()})
        elif reply_to is not None:
            ring = set(self.router.ring.nodes) | {self._me}  # the ring, as PROTOCOL.md 8
            members = {n: m.address for n, m in self.members.items() if n in ring}
            self._run(self.status.start(reply_to, req.id, self.local_status(), members, _now()))
            self._arm("status", self.status)

    def local_status(self) -> dict:
        snap = self.metrics.snapshot()
        ring = self.router.ring
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
            "uptime_s": round(_now() - self._started_at, 3),
            "kernels": core_cy.IMPLEMENTATION,
            # What a client needs to place agents itself (PROTOCOL.md section 8).
            "ring": {"vnodes": ring.vnodes, "points_per_vnode": core_cy.POINTS_PER_VNODE,
                     "weight": ring.weight(self.node_id)},
            "replication": self.state.machine.counts(),
            "transports": self._transports_status(),
            "reachable": True,
        }

    def _transports_status(self) -> dict:
        """What synthesis-ctl status shows of the transports: which run here, and
        every circuit breaker that is not closed."""
        if self._transport_set is None:
            return {"running": ["zmq"], "breakers": []}
        return {"running": sorted(self._transport_set.stats),
                "breakers": self._transport_set.breakers()}

    def _answer_status_query(self, event: peer.StatusQueried) -> None:
        if event.sender not in self.members:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.status")
            return
        self.transport.send(event.sender,
                            peer.status_answer(self._me, event.token, self.local_status()),
                            None, _now())
        self._ensure_retry()

    def _on_status_answer(self, event: peer.StatusAnswered) -> None:
        try:
            effects = self.status.receive(event.sender, event.message, _now())
        except StatusError as exc:
            self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.status")
            self.log.warning("bad_status_answer", error=str(exc))
            return
        self._run(effects)
        self._arm("status", self.status)

    # ------------------------------------------------------------------ replies

    def _reply_data(self, reply_to: Any, request_id: str, data: Any,
                    vc: dict[str, int] | None = None) -> None:
        """Where every result comes back, from agents and machines alike (replies
        that wait for replicas are held in node/state.py first)."""
        if reply_to is None:
            return
        try:
            payload = wire.reply(request_id, data, self.node_id, reply_to[3], vc)
        except (TypeError, ValueError, OverflowError) as exc:
            self._reply_error(reply_to, request_id, ErrorCode.INTERNAL,
                              f"reply is not msgpack-serialisable: {exc}", "")
            return
        if len(payload) > self._max_bytes:
            # The same limit as requests, both ways: a larger reply would cost the
            # link between two nodes (the entry node's guard drops such frames).
            self._reply_error(reply_to, request_id, ErrorCode.TOO_LARGE,
                              f"reply of {len(payload)} bytes exceeds {self._max_bytes}", "")
            return
        if self._send_reply(reply_to, payload):
            self.metrics.sent("reply")

    def _reply_error(self, reply_to: Any, request_id: str | None, code: str, message: str,
                     mtype: str) -> None:
        self.metrics.errored(code, mtype)
        if reply_to is None:
            return
        if self._send_reply(reply_to, wire.error(request_id, code, message, self.node_id,
                                                 reply_to[3])):
            self.metrics.sent("error")

    def _send_reply(self, reply_to: tuple, payload: bytes) -> bool:
        """Send one reply to its caller; False if it was dropped."""
        caller, origin, token, _, arrived = reply_to
        if origin is None:  # our own client: (transport handle, principal)
            sent = self.transport.reply(caller[0], payload)
            self._admission.done(caller[1])
            self.metrics.replied_local(arrived)
            return sent
        if origin is STRATEGY:  # a piece of a scatter or pipeline, answered
            self._strategy_answer(caller, payload)
            return True
        if token is None:
            return False  # a forwarded one-way message: nobody to answer
        if origin == self._me:  # our own forward came back round to us
            self._on_reply(peer.Replied(self._me, token, payload))
            return True
        frames = peer.reply(self._me, token, payload)
        if origin not in self.members:
            # Replies travel only to members: a FWD naming a made-up origin must not
            # make us dial anyone.  An origin that joined a moment ago gets its reply
            # once gossip names it (bounded wait, then dropped and counted).
            parked = self._parked.park(origin, frames, _now())
            self._ensure_retry()
            return parked
        sent = self.transport.send(origin, frames, None, _now())
        self._ensure_retry()
        return sent

    def _send_parked(self, origin: str, frames: list) -> None:
        self.transport.send(origin, frames, None, _now())

    # ------------------------------------------------------------------ timers, gauges

    def _ensure_retry(self) -> None:
        if self._retry_timer is None and (self.transport.has_queued or self._parked):
            self._retry_timer = self._loop.call_later(RETRY_INTERVAL_S, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._closed:
            return
        try:
            now = _now()
            self.transport.retry(now)
            self._parked.expire(now)
        except Exception as exc:  # a timer callback must never die: re-armed below
            self.metrics.errored(ErrorCode.INTERNAL)
            self.log.exception("retry_failed", error=repr(exc))
        self._ensure_retry()

    def _start_memory_checks(self) -> None:
        budget = self.config.memory_bytes_max
        if not budget:
            return

        def check() -> None:
            if self._closed:
                return
            self._loop.call_later(MEMORY_CHECK_S, check)  # first: an error cannot end it
            rss = rss_bytes()
            tight = rss > budget
            if tight:
                checks[0] += 1
                if checks[0] % MEMORY_TRIM_EVERY == 1:  # memory freed since comes back
                    trim_malloc()
            if tight != self.host.memory_tight:
                self.host.memory_tight = tight
                self.log.warning("memory_budget", over=tight, rss=rss, budget=budget)
        checks = [0]
        check()

    def _start_idle_sweeps(self) -> None:
        """Passivate agents idle for agent_idle_s (to twice that): a sweep starts every
        agent_idle_s and looks at a bounded number of agents per step."""
        idle_s = self.config.agent_idle_s
        if idle_s <= 0:
            return

        def start() -> None:
            if not self._closed:
                self._loop.call_later(idle_s, start)  # first: an error cannot end it
                self.host.start_sweep()

        def step() -> None:
            if not self._closed:
                self._loop.call_later(IDLE_SWEEP_STEP_S, step)
                self.host.sweep_idle(IDLE_SWEEP_LOOKS)

        self._loop.call_later(idle_s, start)
        step()

    def _gauges(self) -> dict[str, float]:
        transport = self.transport.health()
        states = self.membership.counts() if self.membership is not None else {}
        return {
            **{f"members_{state}": count for state, count in states.items()},
            "quorate": int(self.router.quorate),
            "local_health": self.membership.health if self.membership is not None else 0,
            "handoff_held": self.handoff.held_now if self.handoff is not None else 0,
            "handoff_kept": self.handoff.kept_now if self.handoff is not None else 0,
            **{f"replication_{k}": v for k, v in self.state.machine.counts().items()},
            "agents_active": len(self.host.directory),
            "mailbox_depth": self.host.mailbox_depth(),
            "mailbox_bytes": self.host.mailbox_bytes(),
            "peers_connected": transport.get("peers", 0),
            "peer_queue_depth": transport.get("queued", 0),
            "members": len(self.members),
            "forwards_in_flight": self.router.in_flight,
            "clients_tracked": len(self._admission),
        }

    def _health(self) -> tuple[bool, dict]:
        ok = not self._stopping and not self._closed
        health = {"status": "serving" if ok else "stopping", "node": self.node_id,
                  "members": len(self.members), "agents": len(self.host.directory),
                  "security": "curve" if self.curve is not None else "open"}
        if self.config.exposed_without_curve:
            health["warning"] = ("open: CURVE is off on an address other machines can "
                                 "reach; anyone there can act as a peer or a client")
        return ok, health



def swim_config(cfg: NodeConfig) -> SwimConfig:
    """The membership machine's timings, from the node's config."""
    return SwimConfig(
        probe_interval_s=cfg.probe_interval_s, probe_timeout_s=cfg.probe_timeout_s,
        indirect_probes=cfg.indirect_probes, suspicion_mult=cfg.suspicion_mult,
        suspicion_max_mult=cfg.suspicion_max_mult, retransmit_mult=cfg.gossip_retransmit_mult,
        sync_interval_s=cfg.gossip_interval_s, dead_reap_s=cfg.dead_reap_s,
        health_max=cfg.health_max, downing=cfg.downing, quorum_size=cfg.quorum_size,
        stable_after_s=cfg.stable_after_s)
