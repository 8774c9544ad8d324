"""The QUIC bridge (aioquic): client envelopes and peer frames on QUIC streams.

Stream layout (docs/PROTOCOL.md, "QUIC bridge"; ALPN ``synthesis/1``):

- a client **bidirectional** stream carries one request envelope (the same msgpack
  bytes as over ZeroMQ), ended by the client; the node answers on the same stream
  with one envelope and ends it.  A one-way request (mode send/publish) gets its
  stream ended with no bytes;
- a client **unidirectional** stream carries one one-way envelope (no answer);
- on a **peer** connection a unidirectional stream carries one peer message,
  ``framing.encode_frames(frames)``.  Each node dials each peer it sends to: one
  connection per peer, outbound only, as with ZeroMQ's DEALERs.  Messages on
  separate streams may arrive out of order.

TLS 1.3 is QUIC's.  The node presents ``tls_cert`` and asks every connection for a
certificate: one that verifies against ``tls_ca`` with serverAuth (or no extended
key usage) makes the connection a peer's; a clientAuth-only one names a client (its
subject is the principal); none at all is an anonymous client, named by its address;
a certificate that does not verify closes the connection.  Only peer connections
may send peer frames.  When dialing, the node verifies the peer against ``tls_ca``
and the host it dials.  (aioquic's server asks no client certificate on its own and
never verifies one: see ``quic_io.ask_client_certificate`` and ``_Accepted._verify``.)

Bounds: a client stream's bytes by ``max_message_bytes`` (past it: STOP_SENDING and
a ``too_large`` envelope), a peer stream's by ``framing.MESSAGE_BYTES_MAX``, the
bytes of unfinished streams per connection by ``conn_inbound_bytes_max`` (past it
the connection is closed), concurrent streams per connection by QUIC's stream
limit (aioquic: 128 of each kind), accepted connections by ``connections_max``,
sends waiting for a handshake by count, bytes and deadline.

Back-pressure: aioquic buffers whatever it is handed.  Each connection keeps the
bytes handed to aioquic and not yet acknowledged (``quic_io.unacked_bytes``) under
``high_water_bytes``: past it sends to that peer give up ``overloaded`` and a
client's replies are answered ``overloaded`` instead, until the backlog is back
under ``low_water_bytes``.  One message over the mark is let through, so a
connection holds at most high_water_bytes plus one message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertBadCertificate, AlertCertificateExpired, verify_certificate
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols import wire
from protocols.peer import MAGIC_FAMILY
from protocols.wire import ErrorCode

from .base import BridgeHandle, Inbound, OnGiveUp, Transport
from .framing import MESSAGE_BYTES_MAX, FramingError, decode_frames, encode_frames
from .quic_io import (CONN_BAD_CERTIFICATE, CONN_REFUSED, STREAM_REFUSED, STREAM_TOO_LARGE,
                      Backlog, BatchedConnection, Inflow, StreamTooLarge, UdpEndpoint,
                      ask_client_certificate, configuration, connected_socket,
                      oldest_unacked_stream, read_ca, split_endpoint)

QUIC = "quic"                   # the endpoint name members advertise
HANDSHAKE_TIMEOUT_S = 3.0       # a dial not connected by then fails
PEER_QUEUE_MAX = 10_000         # sends waiting for one peer's handshake
PEER_QUEUE_DEADLINE_S = 1.0     # how long such a send may wait
REDIAL_AFTER_S = (0.1, 5.0)     # a failed dial waits this long (doubling) before the next
ACK_DEADLINE_S = 2.0            # a link whose oldest unacknowledged stream stays so long is dead
WATCH_INTERVAL_S = 0.25         # how often links are checked for that
LINKS_MAX = 1024 + 64           # peers dialed at once (members and a few more)
CONNECTIONS_MAX = 1024          # connections accepted at once
CONN_INBOUND_BYTES_MAX = 64 << 20  # unfinished streams' bytes per connection
REFUSED_GRACE_BYTES = 1 << 20   # bytes a refused stream may still bring before the connection closes

_ONE_WAY = frozenset((wire.MODE_SEND, wire.MODE_PUBLISH))


# Connections --------------------------------------------------------------------


class _Connection(BatchedConnection):
    """One connection of the bridge: received streams assembled within bounds,
    written bytes behind watermarks.  Event handling must never raise: it runs
    under the UDP socket's reader, shared by every accepted connection."""

    def __init__(self, quic: QuicConnection, owner: "QuicTransport"):
        super().__init__(quic)
        self.owner = owner
        self.inflow = Inflow()
        self.backlog = Backlog(quic, owner.high_water_bytes, owner.low_water_bytes)
        self.refused: dict[int, int] = {}  # refused stream -> bytes it brought since

    def write(self, stream_id: int, payload: bytes) -> bool:
        """Write a whole message on a stream and end it; False if the stream is gone."""
        try:
            self._quic.send_stream_data(stream_id, payload, end_stream=True)
        except (ValueError, RuntimeError):  # reset by the peer, or already ended
            return False
        self.backlog.handed += len(payload)
        self.flush_soon()
        return True

    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, addr)
        backlog = self.backlog
        if backlog.paused or backlog.handed > backlog.low:  # acks come in datagrams
            backlog.measure()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        try:
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._on_data(event.stream_id, event.data, event.end_stream)
            elif kind is events.HandshakeCompleted:
                self.on_handshake()
            elif kind is events.StreamReset or kind is events.StopSendingReceived:
                self.on_stream_gone(event.stream_id)
            elif kind is events.ConnectionTerminated:
                self.closed = True
                self.on_terminated(event.reason_phrase or f"QUIC error {event.error_code}",
                                   event.error_code == QuicErrorCode.NO_ERROR)
        except Exception as exc:  # a bug must not stop the socket's reader
            self.owner.bug(exc)

    def _on_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id in self.refused:
            brought = self.refused[stream_id] + len(data)
            if end:
                del self.refused[stream_id]
            elif brought > REFUSED_GRACE_BYTES:  # it ignores STOP_SENDING
                self.refuse_connection(CONN_REFUSED, "a refused stream kept sending")
            else:
                self.refused[stream_id] = brought
            return
        try:
            payload = self.inflow.add(stream_id, data, end, self.stream_limit(stream_id))
        except StreamTooLarge as exc:
            self.refuse_stream(stream_id, STREAM_TOO_LARGE)
            self.on_too_large(stream_id, exc.head)
            return
        if payload is not None:
            self.on_stream(stream_id, payload)
        elif self.inflow.total > self.owner.conn_inbound_bytes_max:
            self.owner.count("quic_conn_inbound_bytes")
            self.refuse_connection(CONN_REFUSED, "too many unfinished bytes")

    def refuse_stream(self, stream_id: int, code: int) -> None:
        """Ask the sender to stop (STOP_SENDING) and drop what comes meanwhile."""
        self.inflow.discard(stream_id)
        self.refused[stream_id] = 0
        try:
            self._quic.stop_stream(stream_id, code)
        except ValueError:
            pass
        self.flush_soon()

    def refuse_connection(self, code: int, reason: str) -> None:
        self.inflow = Inflow()
        self.refused.clear()
        self.close(error_code=code, reason_phrase=reason)

    def hard_close(self, reason: str) -> None:
        """Close now (node stopping): the CONNECTION_CLOSE leaves, timers are cancelled."""
        if not self.closed:
            self.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self.stop_timers()

    # Overridden by each side.
    def stream_limit(self, stream_id: int) -> int:
        raise NotImplementedError

    def on_handshake(self) -> None:
        pass

    def on_stream(self, stream_id: int, payload: bytes) -> None:
        self.refuse_stream(stream_id, STREAM_REFUSED)

    def on_too_large(self, stream_id: int, head: bytes) -> None:
        pass

    def on_stream_gone(self, stream_id: int) -> None:
        self.inflow.discard(stream_id)

    def on_terminated(self, reason: str, clean: bool) -> None:
        pass


class QuicHandle(BridgeHandle):
    """A reply handle: the connection and the stream a request came on."""

    __slots__ = ("conn", "stream_id")

    def __init__(self, transport: "QuicTransport", conn: "_Accepted", stream_id: int):
        super().__init__(transport)
        self.conn = conn
        self.stream_id = stream_id


class _Accepted(_Connection):
    """A connection a client or a peer made to this node."""

    def __init__(self, quic: QuicConnection, owner: "QuicTransport", over_limit: bool):
        super().__init__(quic, owner)
        ask_client_certificate(quic)
        self.is_peer = False
        self.node_name = b""   # a peer's certificate common name: the node id it speaks as
        self.verified = False  # the handshake completed and the certificate checked
        self.principal = b""
        self.awaiting: set[int] = set()  # bidirectional streams owed an answer
        self._over_limit = over_limit

    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self._over_limit and not self.closed:
            self._over_limit = False
            self.owner.count("quic_connections")
            self.close(error_code=CONN_REFUSED, reason_phrase="too many connections")

    def on_handshake(self) -> None:
        failure = self._verify()
        if failure is not None:
            self.owner.count("quic_bad_certificate")
            self.owner.log_once("quic_bad_certificate", reason=failure,
                                address=_address(self._quic))
            self.refuse_connection(CONN_BAD_CERTIFICATE, failure)
            return
        self.verified = True

    def _verify(self) -> str | None:
        """Check the client's certificate, if it sent one; None when the connection
        may go on (setting is_peer and principal), else why not."""
        tls = self._quic.tls
        cert: x509.Certificate | None = tls._peer_certificate
        if cert is None:
            self.principal = f"quic:{_address(self._quic)}".encode()
            return None
        try:
            verify_certificate(certificate=cert, chain=tls._peer_certificate_chain,
                               cadata=self.owner.ca_data)
        except (AlertBadCertificate, AlertCertificateExpired) as exc:
            return f"client certificate: {exc}"
        self.is_peer = _is_node_certificate(cert)
        self.node_name = _common_name(cert).encode()
        self.principal = cert.subject.rfc4514_string().encode()
        return None

    def stream_limit(self, stream_id: int) -> int:
        if stream_id & 2 and self.is_peer:
            return MESSAGE_BYTES_MAX
        return self.owner.max_message_bytes

    def on_stream(self, stream_id: int, payload: bytes) -> None:
        owner = self.owner
        if not self.verified:  # never: data follows the handshake; refused if it did not
            self.refuse_stream(stream_id, STREAM_REFUSED)
        elif not stream_id & 2:
            owner.on_request(self, stream_id, payload)
        elif self.is_peer:
            owner.on_peer_message(self, payload)
        else:
            owner.on_one_way(self, stream_id, payload)

    def on_too_large(self, stream_id: int, head: bytes) -> None:
        self.owner.metrics.errored(ErrorCode.TOO_LARGE)
        if stream_id & 2:
            return  # a unidirectional stream has no way back
        refused = wire.refusal(head, ErrorCode.TOO_LARGE,
                               f"a request over {self.owner.max_message_bytes} bytes")
        self.write(stream_id, b"" if refused.one_way else self.owner.error_bytes(refused))

    def on_stream_gone(self, stream_id: int) -> None:
        super().on_stream_gone(stream_id)
        self.awaiting.discard(stream_id)

    def on_terminated(self, reason: str, clean: bool) -> None:
        self.awaiting.clear()
        self.owner.forget(self)


class _Link:
    """The connection this node dials to one peer endpoint, and what waits for it."""

    __slots__ = ("endpoint", "conn", "up", "queue", "queued_bytes", "sent", "failed",
                 "redial_at", "redial_s", "dialing", "timer", "stalled_stream", "stalled_since")

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.conn: _Dialed | None = None
        self.up = False
        self.queue: deque = deque()  # (deadline, peer, payload, on_give_up)
        self.queued_bytes = 0
        self.sent = 0
        self.failed = 0
        self.redial_at = 0.0
        self.redial_s = REDIAL_AFTER_S[0]
        self.dialing: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.stalled_stream: int | None = None  # the oldest stream still unacknowledged
        self.stalled_since = 0.0


class _Dialed(_Connection):
    """The connection of a link: this node's certificate out, the peer's verified."""

    def __init__(self, quic: QuicConnection, owner: "QuicTransport", link: _Link,
                 addr: tuple):
        super().__init__(quic, owner)
        self.link = link
        self._addr = addr

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.link.conn = self  # before any datagram can come back
        self.connect(self._addr)

    def error_received(self, exc: Exception) -> None:
        """The socket is connected, so ICMP port unreachable arrives here: nobody
        listens at the peer's endpoint now.  Fail the link at once rather than
        after the handshake or idle timeout."""
        if isinstance(exc, ConnectionRefusedError) and not self.closed:
            self.closed = True
            self.owner.link_down(self.link, f"{self.link.endpoint} refused (no QUIC listener)")

    def stream_limit(self, stream_id: int) -> int:
        return 0  # the peer has nothing to send us on this connection

    def on_handshake(self) -> None:
        self.owner.link_up(self.link)

    def on_terminated(self, reason: str, clean: bool = False) -> None:
        if self.link.conn is self:
            self.owner.link_down(self.link, reason, clean and self.link.up)
        if self._transport is not None:
            self._transport.close()


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _is_node_certificate(cert: x509.Certificate) -> bool:
    """A node's certificate may serve (serverAuth), or names no usage at all."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


def _address(quic: QuicConnection) -> str:
    addr = quic.get_peer_address()
    if addr is None:
        return "?"
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return f"{host}:{addr[1]}"


# The transport ------------------------------------------------------------------------


class QuicTransport(Transport):
    name = QUIC

    def __init__(self, *, node_id: str, bind: str, tls_cert: str, tls_key: str, tls_ca: str,
                 max_message_bytes: int, metrics: Any, log: Any, advertise: str = "",
                 high_water_bytes: int = 8 << 20, low_water_bytes: int = 1 << 20,
                 connections_max: int = CONNECTIONS_MAX,
                 conn_inbound_bytes_max: int = CONN_INBOUND_BYTES_MAX,
                 queue_deadline_s: float = PEER_QUEUE_DEADLINE_S):
        if not 0 <= low_water_bytes < high_water_bytes:
            raise ValueError("QUIC watermarks need 0 <= low_water_bytes < high_water_bytes")
        self.node_id = node_id
        self._bind = split_endpoint(bind)
        self._advertise = advertise
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self._log = log
        self.high_water_bytes = high_water_bytes
        self.low_water_bytes = low_water_bytes
        self._connections_max = connections_max
        self.conn_inbound_bytes_max = conn_inbound_bytes_max
        self._deadline_s = queue_deadline_s
        self.ca_data = read_ca(tls_ca)
        self._server_config = configuration(False, tls_cert, tls_key, self.ca_data)
        self._dial_config = configuration(True, tls_cert, tls_key, self.ca_data)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbound: Inbound | None = None
        self._server: QuicServer | None = None
        self._udp: UdpEndpoint | None = None
        self._accepted: set[_Accepted] = set()
        self._endpoints: dict[str, str] = {}  # node id -> advertised QUIC endpoint
        self._links: dict[str, _Link] = {}    # endpoint -> link
        self._queued = 0
        self._logged: set[str] = set()
        self._closed = False
        self._watch_timer: asyncio.TimerHandle | None = None

    # Lifecycle -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        """Bind the UDP socket and serve it with aioquic's QuicServer, without
        aioquic's ``serve`` (a coroutine: ``start`` runs in the loop, not awaited) or
        asyncio's datagram transport (see ``UdpEndpoint``)."""
        self._loop, self._inbound = loop, inbound
        host, port = self._bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        bound_port = sock.getsockname()[1]
        self._bind = (host, bound_port)
        advertised = self._advertise or f"{host}:{port}"
        head, _, adv_port = advertised.rpartition(":")
        self._advertise = f"{head}:{bound_port}" if adv_port == "0" else advertised
        self._server = QuicServer(configuration=self._server_config,
                                  create_protocol=self._accept)
        self._udp = UdpEndpoint(loop, sock, self._server)
        self._watch_timer = loop.call_later(WATCH_INTERVAL_S, self._watch)

    def _watch(self) -> None:
        """Close links the peer stopped acknowledging (its listener went away, the
        path broke): QUIC would only notice at its idle timeout, and until then every
        send to it would be lost in silence.  Later sends then fail fast, so the
        circuit breaker opens and traffic falls back to another transport."""
        if self._closed:
            return
        now = self._loop.time()
        for link in list(self._links.values()):
            if not link.up or link.conn is None:
                continue
            oldest = oldest_unacked_stream(link.conn._quic)
            if oldest is None or oldest != link.stalled_stream:
                link.stalled_stream, link.stalled_since = oldest, now
            elif now - link.stalled_since > ACK_DEADLINE_S:
                self.count("quic_link_stalled")
                self.link_down(link, f"{link.endpoint} acknowledged nothing for "
                                     f"{ACK_DEADLINE_S} s")
        self._watch_timer = self._loop.call_later(WATCH_INTERVAL_S, self._watch)

    def _accept(self, quic: QuicConnection, stream_handler: Any = None) -> _Accepted:
        over = len(self._accepted) >= self._connections_max
        conn = _Accepted(quic, self, over_limit=over)
        if not over:
            self._accepted.add(conn)
        return conn

    def forget(self, conn: _Accepted) -> None:
        self._accepted.discard(conn)

    def stop(self, linger_ms: int = 0) -> None:
        if self._closed or self._loop is None:
            return
        self._closed = True
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        for link in list(self._links.values()):
            self._close_link(link, "node is shutting down")
        for conn in list(self._accepted):
            conn.hard_close("node is shutting down")
        self._accepted.clear()
        if self._server is not None:
            self._server.close()  # closes the UDP endpoint too

    def endpoints(self) -> dict[str, str]:
        return {QUIC: self._advertise or "%s:%d" % self._bind}

    @property
    def bound_address(self) -> tuple[str, int]:
        return self._bind

    # Clients ---------------------------------------------------------------------

    def on_request(self, conn: _Accepted, stream_id: int, payload: bytes) -> None:
        handle = QuicHandle(self, conn, stream_id)
        conn.awaiting.add(stream_id)
        inbound = self._inbound
        try:
            if not conn.backlog.has_room():
                self._refuse_overloaded(handle, payload)
            elif not payload:
                inbound.malformed(handle, 0)
            else:
                inbound.client(handle, payload, conn.principal)
        except Exception as exc:  # a bug must not take the node down
            inbound.failed(handle, payload, exc)
        if stream_id in conn.awaiting and wire.peek(payload).get("mode") in _ONE_WAY:
            conn.awaiting.discard(stream_id)  # no answer will come: end the stream now
            conn.write(stream_id, b"")

    def on_one_way(self, conn: _Accepted, stream_id: int, payload: bytes) -> None:
        handle = QuicHandle(self, conn, stream_id)  # not awaited: replies are dropped
        try:
            self._inbound.client(handle, payload, conn.principal)
        except Exception as exc:
            self._inbound.failed(None, None, exc)

    def reply(self, handle: QuicHandle, payload: bytes) -> bool:
        conn, stream_id = handle.conn, handle.stream_id
        if conn.closed or stream_id not in conn.awaiting:
            self.metrics.client_send_failed()
            return False
        conn.awaiting.discard(stream_id)
        if not conn.backlog.has_room():
            self.count("quic_reply_overloaded")
            self.metrics.client_send_failed()
            conn.write(stream_id, self._overloaded_bytes(payload))
            return False
        if not conn.write(stream_id, payload):
            self.metrics.client_send_failed()
            return False
        return True

    def _refuse_overloaded(self, handle: QuicHandle, payload: bytes) -> None:
        self.count("quic_client_overloaded")
        self.metrics.errored(ErrorCode.OVERLOADED)
        handle.conn.awaiting.discard(handle.stream_id)
        handle.conn.write(handle.stream_id, self._overloaded_bytes(payload))

    def _overloaded_bytes(self, envelope: bytes) -> bytes:
        """An ``overloaded`` error in place of ``envelope`` (a request, or a reply:
        either carries the request id as its ``id``); empty for one-way requests."""
        refused = wire.refusal(envelope, ErrorCode.OVERLOADED,
                               "the node's backlog to this connection is over "
                               f"{self.high_water_bytes} bytes; read replies, then retry")
        return b"" if refused.one_way else self.error_bytes(refused)

    def error_bytes(self, refused: wire.WireError) -> bytes:
        return wire.error(refused.request_id, refused.code, refused.message, self.node_id,
                          refused.traceparent)

    # Peers: inbound -------------------------------------------------------------------

    def on_peer_message(self, conn: Any, payload: bytes) -> None:
        try:
            frames = decode_frames(payload)
        except FramingError as exc:
            self._bad_peer_message(str(exc))
            return
        if frames[0][:4] != MAGIC_FAMILY:
            self._bad_peer_message("no peer protocol magic")
            return
        if len(frames) > 2 and frames[2] != conn.node_name:
            # A node certificate speaks for the node id it names (its common name),
            # as a CURVE key does for the id its certificate binds.
            self.metrics.limited("quic_sender_mismatch")
            self._bad_peer_message(f"sender {frames[2][:64]!r} is not the certificate's "
                                   f"{conn.node_name[:64]!r}")
            return
        try:
            self._inbound.peer(frames)
        except Exception as exc:
            self._inbound.failed(None, None, exc)

    def _bad_peer_message(self, reason: str) -> None:
        self.metrics.errored(ErrorCode.BAD_REQUEST, "syn.peer")
        self.log_once("quic_bad_peer_message", reason=reason)

    # Peers: outbound ------------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        """Members that advertise a QUIC endpoint; seeds are ZeroMQ addresses, so
        they are reached over ZeroMQ until their endpoints are known."""
        self._endpoints = {node_id: ep[QUIC] for node_id, ep in peers.items() if QUIC in ep}
        wanted = set(self._endpoints.values())
        for endpoint in [e for e in self._links if e not in wanted]:
            self._close_link(self._links[endpoint], f"peer {endpoint} left the member view")

    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0) -> bool:
        endpoint = self._endpoints.get(peer)
        if self._closed or endpoint is None:
            return self._give_up(peer, on_give_up, ErrorCode.UNAVAILABLE,
                                 "node is shutting down" if self._closed
                                 else f"peer {peer!r} advertises no QUIC endpoint")
        try:
            payload = encode_frames(frames)
        except FramingError as exc:
            return self._give_up(peer, on_give_up, ErrorCode.TOO_LARGE, str(exc))
        link = self._links.get(endpoint)
        if link is None:
            if len(self._links) >= LINKS_MAX:
                self.count("quic_links")
                return self._give_up(peer, on_give_up, ErrorCode.UNAVAILABLE,
                                     "out of QUIC links")
            link = self._links[endpoint] = _Link(endpoint)
        now = now or self._loop.time()
        if link.up and link.conn.stale():
            self._release(link, f"QUIC link to {endpoint} idle: made again")
        if link.up:
            return self._write_peer(link, peer, payload, on_give_up)
        if link.dialing is None:  # neither up nor dialing
            if now < link.redial_at:
                return self._give_up(peer, on_give_up, ErrorCode.UNAVAILABLE,
                                     f"QUIC link to {endpoint} failed; redial after "
                                     f"{link.redial_at - now:.2f} s")
            self._dial(link)
        return self._enqueue(link, peer, payload, on_give_up, now)

    def _write_peer(self, link: _Link, peer: str, payload: bytes,
                    on_give_up: OnGiveUp | None) -> bool:
        conn = link.conn
        if not conn.backlog.has_room():
            self.count("quic_peer_overloaded")
            return self._give_up(peer, on_give_up, ErrorCode.OVERLOADED,
                                 f"over {self.high_water_bytes} bytes unacknowledged to "
                                 f"{link.endpoint}")
        stream_id = conn._quic.get_next_available_stream_id(is_unidirectional=True)
        if not conn.write(stream_id, payload):
            return self._give_up(peer, on_give_up, ErrorCode.UNAVAILABLE,
                                 f"QUIC link to {link.endpoint} is closing")
        link.sent += 1
        self._outcome(peer, True)
        return True

    def _enqueue(self, link: _Link, peer: str, payload: bytes, on_give_up: OnGiveUp | None,
                 now: float) -> bool:
        if (len(link.queue) >= PEER_QUEUE_MAX
                or link.queued_bytes + len(payload) > self.high_water_bytes):
            self.count("quic_peer_queue")
            return self._give_up(peer, on_give_up, ErrorCode.OVERLOADED,
                                 f"queue to {link.endpoint} is full")
        link.queue.append((now + self._deadline_s, peer, payload, on_give_up))
        link.queued_bytes += len(payload)
        self._queued += 1
        return True

    def _give_up(self, peer: str, on_give_up: OnGiveUp | None, code: str, reason: str) -> bool:
        self.metrics.peer_send_failed()
        self._outcome(peer, False)
        if on_give_up is not None:
            on_give_up(code, reason)
        return False

    def _dial(self, link: _Link) -> None:
        host, port = split_endpoint(link.endpoint)
        config = dataclasses.replace(self._dial_config, server_name=host)
        link.dialing = self._loop.create_task(self._open(link, host, port, config))
        link.timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_late, link)

    async def _open(self, link: _Link, host: str, port: int, config: QuicConfiguration) -> None:
        """Dial; the connection sets ``link.conn`` as it is made.  Cancelled when
        the link is released while a name resolves."""
        try:
            sock = await connected_socket(self._loop, host, port)
            addr = sock.getpeername()
            UdpEndpoint(self._loop, sock, _Dialed(QuicConnection(configuration=config),
                                                  self, link, addr))
        except (OSError, ValueError) as exc:
            self.link_down(link, f"cannot dial {link.endpoint}: {exc}")

    def _handshake_late(self, link: _Link) -> None:
        link.timer = None
        if not link.up:
            self.link_down(link, f"no QUIC handshake with {link.endpoint} within "
                                 f"{HANDSHAKE_TIMEOUT_S} s")

    def link_up(self, link: _Link) -> None:
        link.up = True
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        while link.queue:
            _, peer, payload, on_give_up = link.queue.popleft()
            self._queued -= 1
            link.queued_bytes -= len(payload)
            self._write_peer(link, peer, payload, on_give_up)

    def link_down(self, link: _Link, reason: str, clean: bool = False) -> None:
        """A link failed or closed: what waits is given up.  After a failure (no
        handshake, or the peer closed it with an error: our certificate refused)
        it is redialed only after a pause that doubles, failing fast meanwhile;
        after a clean close (idle) at once, by the next send."""
        if clean:
            link.redial_s = REDIAL_AFTER_S[0]
        else:
            link.redial_at = self._loop.time() + link.redial_s
            link.redial_s = min(2 * link.redial_s, REDIAL_AFTER_S[1])
            link.failed += 1
        self.log_once(f"quic_link_down {link.endpoint}", endpoint=link.endpoint, reason=reason)
        self._release(link, reason)

    def _close_link(self, link: _Link, reason: str) -> None:
        self._links.pop(link.endpoint, None)
        self._release(link, reason)

    def _release(self, link: _Link, reason: str) -> None:
        conn, link.conn, link.up = link.conn, None, False
        dialing, link.dialing = link.dialing, None
        if dialing is not None and not dialing.done() \
                and dialing is not asyncio.current_task(self._loop):
            dialing.cancel()
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        if conn is not None:
            conn.hard_close(reason)
            if conn._transport is not None:
                conn._transport.close()
        self._give_up_queue(link, reason)

    def _give_up_queue(self, link: _Link, reason: str,
                       keep: Callable[[float], bool] = lambda deadline: False) -> None:
        kept: deque = deque()
        while link.queue:
            item = link.queue.popleft()
            if keep(item[0]):
                kept.append(item)
                continue
            self._queued -= 1
            link.queued_bytes -= len(item[2])
            self._give_up(item[1], item[3], ErrorCode.UNAVAILABLE, reason)
        link.queue = kept

    def drop_queued(self, peer: str) -> None:
        endpoint = self._endpoints.get(peer)
        link = self._links.get(endpoint) if endpoint is not None else None
        if link is not None:
            self._close_link(link, f"peer {peer!r} stopped answering")

    def retry(self, now: float) -> None:
        """Give up sends that waited past their deadline for a handshake (queued
        sends leave as soon as their link is up, without waiting for this)."""
        for link in list(self._links.values()):
            if link.queue:
                self._give_up_queue(link, f"no QUIC link to {link.endpoint} in time",
                                    keep=lambda deadline: deadline > now)

    @property
    def has_queued(self) -> bool:
        return self._queued > 0

    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        """Multicast stays on ZeroMQ's PUB/SUB."""

    # Health and logs ----------------------------------------------------------------

    def health(self) -> dict:
        links = list(self._links.values())
        dialed = [link.conn for link in links if link.conn is not None]
        return {
            "peers": len(links),
            "peers_up": sum(link.up for link in links),
            "queued": self._queued,
            "send_failures": sum(link.failed for link in links),
            "connections": len(self._accepted),
            # An upper bound, from the loop's last look: this may run in another thread.
            "backlog_bytes": sum(c.backlog.measured + c.backlog.handed
                                 for c in [*self._accepted, *dialed]),
            "overloaded_pauses": sum(c.backlog.pauses for c in [*self._accepted, *dialed]),
        }

    def count(self, reason: str) -> None:
        self.metrics.limited(reason)

    def bug(self, exc: Exception) -> None:
        if self._inbound is not None:
            self._inbound.failed(None, None, exc)

    def log_once(self, key: str, **fields: Any) -> None:
        if key not in self._logged and len(self._logged) < 1024:
            self._logged.add(key)
            self._log.warning(key.partition(" ")[0], **fields)
