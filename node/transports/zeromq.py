"""The native ZeroMQ transport: a ROUTER for clients and peers, a DEALER per peer, PUB/SUB.

- One ROUTER, bound at the node's address, takes requests from clients and peer
  frames from other nodes.  The loop wakes when its FD is readable and drains it in
  batches with NOBLOCK until ``zmq.Again`` (the FD is edge-triggered: a partial read
  would leave messages sitting unread), then re-checks ``zmq.EVENTS``.  A client's
  handle is its ROUTER route: ``(identity,)``, or ``(identity, b"")`` for REQ framing.
- Outbound peer traffic goes over one DEALER per peer (``zmq_links.PeerLinks``),
  never over the ROUTER.
- PUB for multicast, with its high-water mark set on purpose, and a SUB connected to
  every peer's PUB.  PUB drops silently at the mark, so every multicast frame
  carries a per-origin sequence number and subscribers count the gaps.
- The connection guard (``node/guard.py``) bounds the bytes libzmq may hold per
  ROUTER connection, on a timer of its own.
- With CURVE (``node/curve.py``) every socket authenticates and encrypts; each
  message's user id is checked here: only peer keys send peer frames, each as the
  node id its key is bound to.
"""

from __future__ import annotations

import asyncio
import resource
import struct
from typing import Any, Mapping, Sequence

import zmq

from protocols.effects import seed_address
from protocols.peer import MAGIC_FAMILY  # every peer version's magic starts so
from protocols.membership import ZMQ, ZMQ_PUB

from ..curve import KEY_ENDPOINT, PUB_DOMAIN, ROUTER_DOMAIN, NodeCurve
from ..guard import ConnectionGuard, frame_wire_bytes
from .base import Inbound, OnGiveUp, Transport
from .zmq_links import LINKS_MAX, STRANGER_LINKS_MAX, PeerLinks

GROUP_PREFIX = b"G"
_SEQ = struct.Struct(">Q")
BATCH_MAX = 512            # messages read per socket per wake-up, for fairness
# Bytes read from the ROUTER per wake-up: 512 messages of 1 MiB held the loop for
# seconds, and with it the connection guard's timer, while libzmq read on unbounded.
BATCH_BYTES_MAX = 4 << 20
# ZeroMQ sockets this transport may hold: links, strangers, ROUTER, PUB, SUB, monitor.
# The context's MAX_SOCKETS is set above this on purpose (libzmq's default is 1023).
SOCKETS_MAX = LINKS_MAX + STRANGER_LINKS_MAX + 4

GUARD_TICK_S = 0.01             # how often the connection guard checks a few connections
GUARD_PER_TICK = 32             # connections checked per tick (about 3 us each)
GUARD_SCAN_S = 0.5              # how often it checks all, and the node-wide budget
GUARD_RSS_JUMP_BYTES = 16 << 20  # resident growth that checks all at once
GUARD_ALERT_TICK_S = 0.002      # the tick for GUARD_ALERT_S after a connection was cut
GUARD_ALERT_S = 2.0

# Plain ints: pyzmq's flag enums cost an enum construction per '|' on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_SRCFD = int(zmq.SRCFD)


def new_context() -> zmq.Context:
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


def _with_bound_port(endpoint: str, sock: zmq.Socket) -> str:
    """``endpoint`` (advertised) with port 0 replaced by the port ``sock`` bound.

    A bind to port 0 takes a free port; libzmq reports it in LAST_ENDPOINT
    (``tcp://127.0.0.1:54321``).  An advertised port other than 0 is kept (NAT)."""
    head, _, port = endpoint.rpartition(":")
    if port != "0":
        return endpoint
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return f"{head}:{bound.rpartition(':')[2]}"


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(self, *, node_id: str, router_bind: str, router_endpoint: str,
                 pub_bind: str, pub_endpoint: str, max_message_bytes: int, peer_hwm: int,
                 pub_hwm: int, limits: Mapping[str, int], metrics: Any, log: Any,
                 linger_ms: int = 500, curve: NodeCurve | None = None):
        self._node_id = node_id.encode()
        self._router_bind = router_bind
        self._router_endpoint = router_endpoint
        self._pub_bind = pub_bind
        self._pub_endpoint = pub_endpoint
        self._max_bytes = max_message_bytes
        self._peer_hwm = peer_hwm
        self._pub_hwm = pub_hwm
        self._limits = dict(limits)
        self._metrics = metrics
        self._log = log
        self._linger_ms = linger_ms
        self._ctx: zmq.Context | None = None   # made at start: a transport built
        self._links: PeerLinks | None = None   # but never started holds no sockets
        self._addresses: dict[str, str] = {}   # node id -> ROUTER endpoint
        self._curve = curve
        self._server_keys: dict[str, bytes] = {}  # endpoint -> its CURVE key (members)
        self._refused_logged: set[str] = set()
        self._handshakes_refused = 0
        self._seeds: frozenset[str] = frozenset()
        self._subscribed: set[str] = set()
        self._pub_seq = 0
        self._last_seq: dict[bytes, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbound: Inbound | None = None
        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._guard: ConnectionGuard | None = None
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guard_scanned_at = 0.0
        self._guard_alert_until = 0.0
        self._pump_scheduled = False
        self._in_pump = False
        self._closed = False

    # Lifecycle -------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        self._loop, self._inbound = loop, inbound
        self._ctx = new_context()
        curve = self._curve
        self._links = PeerLinks(self._ctx, peer_hwm=self._peer_hwm, metrics=self._metrics,
                                dial=self._dial if curve is not None else None)
        if curve is not None:
            curve.start(self._ctx)  # the ZAP handler, before any socket can be reached
        router = self._router = self._ctx.socket(zmq.ROUTER)
        if curve is not None:
            curve.serve(router, ROUTER_DOMAIN)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises, not a silent drop
        router.setsockopt(zmq.SNDHWM, self._peer_hwm)
        router.setsockopt(zmq.RCVHWM, self._peer_hwm)
        # A hard guard far above the protocol limit: larger frames cost the
        # sender its connection instead of our memory.  Between the two limits
        # the sender gets a too_large reply.
        router.setsockopt(zmq.MAXMSGSIZE, 4 * self._max_bytes + 65536)
        router.setsockopt(zmq.LINGER, self._linger_ms)
        router.bind(self._router_bind)
        self._router_endpoint = _with_bound_port(self._router_endpoint, router)
        limits = self._limits
        self._guard = ConnectionGuard(
            router, metrics=self._metrics, log=self._log,
            connections_max=limits["connections_max"],
            conn_inbound_bytes_max=limits["conn_inbound_bytes_max"],
            inbound_bytes_max=limits["inbound_bytes_max"],
            reply_bytes_max=limits["client_reply_bytes_max"], curve=curve is not None)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, self._pub_hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.serve(self._pub, PUB_DOMAIN)
        self._pub.bind(self._pub_bind)
        self._pub_endpoint = _with_bound_port(self._pub_endpoint, self._pub)
        if not self._node_id:  # a derived node id is HOST:PORT of the advertised ROUTER
            self._node_id = self._router_endpoint[len("tcp://"):].encode()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, self._pub_hwm)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, GROUP_PREFIX)
        loop.add_reader(router.FD, self._pump)
        loop.add_reader(self._sub.FD, self._pump)
        self._schedule_pump()  # the FDs are edge-triggered: look once after registering
        self._guard_tick()

    def stop(self, linger_ms: int = 0) -> None:
        if self._closed or self._ctx is None:
            return
        self._pump()  # answer what arrived meanwhile, flush replies
        self._closed = True
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self._loop.remove_reader(self._router.FD)
        self._loop.remove_reader(self._sub.FD)
        self._links.close(linger_ms, "node is shutting down")
        self._guard.close()
        self._router.close(linger=linger_ms)
        for sock in (self._pub, self._sub):
            sock.close(linger=0)
        if self._curve is not None:
            self._curve.stop()
        self._ctx.term()

    def endpoints(self) -> dict[str, str]:
        """The advertised endpoints; after ``start`` a port 0 in them is the bound one.
        With CURVE, also the node's public key: peers dial it with that key."""
        endpoints = {ZMQ: self._router_endpoint, ZMQ_PUB: self._pub_endpoint}
        if self._curve is not None:
            endpoints[KEY_ENDPOINT] = self._curve.public.decode()
        return endpoints

    # Peers -----------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        self._addresses = {node_id: ep[ZMQ] for node_id, ep in peers.items() if ZMQ in ep}
        self._seeds = frozenset(seeds)
        if self._curve is not None:
            self._set_server_keys(peers)
        # Close links to addresses no member uses any more (a restarted node's old one).
        self._links.retain(set(self._addresses.values()) | self._seeds)
        for address in self._addresses.values():
            self._links.connect(address)  # None (counted) when out of links
        pubs = {ep[ZMQ_PUB] for ep in peers.values() if ZMQ_PUB in ep}
        for pub in [p for p in self._subscribed if p not in pubs]:
            try:
                self._sub.disconnect(pub)
            except zmq.ZMQError:
                pass
            self._subscribed.discard(pub)
        for pub in pubs - self._subscribed:
            if len(self._subscribed) >= LINKS_MAX:
                break
            if self._curve is not None and not self._dial(self._sub, pub):
                continue
            try:
                self._sub.connect(pub)
            except zmq.ZMQError:
                continue
            self._subscribed.add(pub)

    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0, prefer: str | None = None) -> bool:
        if self._closed:
            self._metrics.peer_send_failed()
            return False
        address = self._addresses.get(peer)
        stranger = False
        if address is None:
            address = seed_address(peer)
            if address is None:  # a node id we have no address for
                self._metrics.peer_send_failed()
                if on_give_up is not None:
                    on_give_up("unavailable", f"no address for peer {peer!r}")
                return False
            stranger = address not in self._seeds and address not in self._addresses.values()
        return self._links.send(address, frames, on_give_up, now, stranger)

    # CURVE --------------------------------------------------------------------

    def _set_server_keys(self, peers: Mapping[str, Mapping[str, str]]) -> None:
        """Each member's ROUTER and PUB endpoint -> the key it advertises, if a peer
        certificate binds that key to its id; a link made with another key (the
        member rotated its key) is closed, to be made again with the new one."""
        keyring = self._curve.keyring
        keys: dict[str, bytes] = {}
        for node_id, ep in peers.items():
            key = keyring.member_key(node_id, ep.get(KEY_ENDPOINT))
            if key is not None:
                keys.update({ep[name]: key for name in (ZMQ, ZMQ_PUB) if name in ep})
        for endpoint, old in self._server_keys.items():
            if keys.get(endpoint, old) != old:
                self._links.drop(endpoint, "the peer's key changed")
                if endpoint in self._subscribed:
                    self._sub.disconnect(endpoint)
                    self._subscribed.discard(endpoint)
        self._server_keys = keys

    def _dial(self, sock: zmq.Socket, address: str) -> bool:
        """Set the server key for the next connect to ``address``; False (counted)
        when no allowed key is known for it, so no link is made."""
        key = self._server_keys.get(address) or self._curve.keyring.seed_key(address)
        if key is None:
            self._metrics.limited("curve_no_peer_key")
            self._log_once(address, "curve_no_peer_key", address=address,
                           hint="no peer certificate binds this member's advertised "
                                "key to its node id (or, for a seed, names its address)")
            return False
        self._curve.dial(sock, key)
        return True

    def _authorize(self, frame: zmq.Frame, frames: list[bytes]) -> bytes | None:
        """The principal of a message from a CURVE connection, or None when it is
        refused: its key left the allowed set, or it sends peer frames without a
        peer key or as another node than its key is bound to."""
        user = frame.get("User-Id")  # stamped by libzmq from the ZAP answer
        allowed = self._curve.keyring.allowed
        if user not in allowed:
            return self._refuse(user, "curve_key_revoked")
        if len(frames) >= 3 and frames[1][:4] == MAGIC_FAMILY:
            node = allowed[user]
            if node is None:
                return self._refuse(user, "curve_peer_frame_from_client")
            if len(frames) >= 4 and frames[3] != node:
                return self._refuse(user, "curve_sender_mismatch")
        return user.encode()

    def _refuse(self, user: str, reason: str) -> None:
        self._metrics.limited(reason)
        self._log_once(user + reason, reason, user_id=user)
        return None

    def _log_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._refused_logged and len(self._refused_logged) < 1024:
            self._refused_logged.add(key)
            self._log.warning(event, **fields)

    def drop_queued(self, peer: str) -> None:
        address = self._addresses.get(peer)
        if address is not None and self._links is not None:
            self._links.drop(address, f"peer {peer!r} stopped answering")

    def retry(self, now: float) -> None:
        self._links.retry(now)

    @property
    def has_queued(self) -> bool:
        return self._links is not None and self._links.has_queued

    # Clients ---------------------------------------------------------------

    def reply(self, handle: tuple, payload: bytes) -> bool:
        """Send a payload to a client through the ROUTER; False if it was dropped."""
        if self._closed:
            self._metrics.client_send_failed()
            return False
        send = self._router.send
        sent = True
        try:
            for frame in handle:
                send(frame, _SNDMORE_NOBLOCK)
            send(payload, _NOBLOCK)
        except zmq.ZMQError:  # client gone (EHOSTUNREACH) or its queue is full
            self._metrics.client_send_failed()
            sent = False
        else:  # counted against the client's reply budget until its peer acknowledges
            guard = self._guard  # REQ framing's empty delimiter is a frame of its own
            overhead = guard.frame_overhead
            guard.wrote(handle[0], frame_wire_bytes(len(payload), overhead)
                        + frame_wire_bytes(0, overhead) * (len(handle) - 1))
        if not self._in_pump:
            # A send outside the pump can consume the FD's edge: look again.
            self._schedule_pump()
        return sent

    # Multicast -------------------------------------------------------------

    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        self._pub_seq += 1
        self._pub.send_multipart([GROUP_PREFIX + topic, self._node_id,
                                  _SEQ.pack(self._pub_seq), *frames], zmq.NOBLOCK)

    def _on_sub(self, frames: list[bytes]) -> None:
        """A SUB message: counts sequence gaps as dropped multicasts, then delivers."""
        if len(frames) != 4 or len(frames[2]) != 8:
            self._metrics.errored("bad_request", "syn.multicast")
            return
        topic, origin, seq_bytes, envelope = frames
        (seq,) = _SEQ.unpack(seq_bytes)
        last = self._last_seq.get(origin)
        if last is not None and seq > last + 1:
            self._metrics.multicast_dropped(seq - last - 1)
        if last is None and len(self._last_seq) >= LINKS_MAX:
            self._last_seq.clear()  # origins come and go; never hold more than the bound
        self._last_seq[origin] = seq  # a restarted origin starts again from 1
        try:
            group = topic[len(GROUP_PREFIX):].decode()
        except UnicodeDecodeError:
            self._metrics.errored("bad_request", "syn.multicast")
            return
        self._inbound.multicast(group, envelope)

    # The pump ----------------------------------------------------------------

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
            self._drain_router()
            self._drain(self._sub, self._on_sub)
        finally:
            self._in_pump = False
        if (self._router.getsockopt(_EVENTS) & _POLLIN
                or self._sub.getsockopt(_EVENTS) & _POLLIN):
            self._schedule_pump()

    def _drain_router(self) -> None:
        # Frames (copy=False) tell whether more parts follow without a getsockopt
        # call, which costs more than the rest of reading a frame (measured).
        recv = self._router.recv
        inbound = self._inbound
        account = self._guard.read
        secure = self._curve is not None
        budget = BATCH_BYTES_MAX
        for _ in range(BATCH_MAX):
            if budget <= 0:
                return  # the pump runs again soon; timers (the guard's) get their turn
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            first = frame
            frames = [frame.bytes]
            while frame.more:  # the rest of a multipart message is already here
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            budget -= account(first.get(_SRCFD), frames)  # which connection: its budget
            principal = frames[0]
            if secure:
                principal = self._authorize(first, frames)
                if principal is None:
                    continue
            n = len(frames)
            try:
                if n == 2:
                    inbound.client((frames[0],), frames[1], principal)
                elif n >= 3 and frames[1][:4] == MAGIC_FAMILY:
                    inbound.peer(frames[1:])
                elif n == 3 and frames[1] == b"":
                    inbound.client((frames[0], b""), frames[2], principal)  # REQ framing
                else:
                    # The error goes after the empty delimiter when the message began
                    # with one, so a REQ socket gets it.
                    route = (frames[0], b"") if n >= 3 and frames[1] == b"" else (frames[0],)
                    inbound.malformed(route, n - 1)
            except Exception as exc:  # a bug must not take the node down
                client = n == 2 or (n == 3 and frames[1] == b"")
                inbound.failed(tuple(frames[:-1]) if client else None,
                               frames[-1] if client else None, exc)

    def _drain(self, sock: zmq.Socket, handle) -> None:
        recv = sock.recv
        for _ in range(BATCH_MAX):
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame.bytes]
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            try:
                handle(frames)
            except Exception as exc:  # a bug must not take the node down
                self._inbound.failed(None, None, exc)

    # The guard's timer ---------------------------------------------------------

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
            self._inbound.failed(None, None, exc)
            cut = 0
        if self._curve is not None:  # counted by the ZAP thread, reported from here
            refused = self._curve.handshakes_refused
            if refused > self._handshakes_refused:
                self._metrics.limited("curve_handshake_refused", refused - self._handshakes_refused)
                self._handshakes_refused = refused
        if cut:  # under attack: look much more often for a while (a few us a look)
            self._guard_alert_until = now + GUARD_ALERT_S
        tick_s = GUARD_ALERT_TICK_S if now < self._guard_alert_until else GUARD_TICK_S
        self._guard_timer = self._loop.call_later(tick_s, self._guard_tick)

    # Health ----------------------------------------------------------------

    def health(self) -> dict:
        health = self._links.health() if self._links is not None else {}
        health["curve"] = self._curve is not None
        return health
