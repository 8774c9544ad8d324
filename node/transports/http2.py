"""The HTTP/2 bridge: clients call agents over HTTP/2, and peers forward frames over it.

Built on the ``h2`` state machine directly, on an ``asyncio.Protocol`` (no framework):
h2 turns bytes into events and events into bytes, this module does the I/O.

Server (one listening socket, h2c with prior knowledge, or TLS with ALPN ``h2``):

- ``POST /v1/agents/{id}/messages/{type}``: the body (JSON, or msgpack with
  ``content-type: application/msgpack``) becomes the ``data`` of a request envelope
  (``protocols/wire.py``) handed to ``Inbound.client``; the node's reply comes back
  through ``reply`` and answers the HTTP request (``STATUS_BY_CODE`` maps error codes
  to statuses).  ``?mode=send`` is answered 202 at once.  ``{id}`` is percent-encoded.
- ``POST /v1/groups/{name}/publish?type=T[&routing=gossip]``: a publish, 202.
- ``GET /v1/status``: the node's ``syn.status`` reply, sent through ``Inbound.client``
  like any client's request.
- ``POST /v1/peer``: peer frames (``framing.encode_frames``) for ``Inbound.peer``, 204.
  With ``tls_ca`` only clients with a certificate signed by that CA may use it.

Peers: ``send`` keeps one HTTP/2 client connection per peer endpoint and POSTs each
peer message on a stream of its own; while the connection is being made (or all the
streams the peer allows are busy) sends wait in a queue bounded in count, bytes and
time, as ``zmq_links`` does for ZeroMQ.

Bounds, because h2 enforces none of them by itself: concurrent streams per connection
(SETTINGS_MAX_CONCURRENT_STREAMS), connections, each body (Content-Length checked
first, DATA counted as it arrives, nothing kept past the limit), the bytes of bodies
being received across all connections, header list size, idle connections.  Received
data is acknowledged as it is read (or a sender stalls at the 64 KiB initial window),
and large bodies go out in chunks as the peer's window opens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import socket
import ssl
from collections import deque
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl, unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgpack

from protocols import wire
from protocols.wire import ErrorCode

from .base import BridgeHandle, Inbound, OnGiveUp, Transport
from .framing import MESSAGE_BYTES_MAX, FramingError, decode_frames, encode_frames
from .zmq_links import LINKS_MAX, PEER_QUEUE_DEADLINE_S, PEER_QUEUE_MAX

ENDPOINT = "http2"                    # the name peers advertise this transport under
STREAMS_MAX = 100                     # concurrent streams per connection, both ways
CONNECTIONS_MAX = 1024                # inbound connections
STREAM_WINDOW = 1 << 20               # the receive window offered per stream
CONNECTION_WINDOW = 16 << 20          # ... and per connection
FRAME_SIZE = 1 << 16                  # the largest DATA frame we accept
HEADER_LIST_MAX = 16 << 10            # bytes of headers per request, decoded
INBOUND_BYTES_MAX = 256 << 20         # bytes of bodies held while being received, in all
PEER_QUEUE_BYTES_MAX = 64 << 20       # bytes waiting per peer while its link is down
RESPONSE_BYTES_MAX = 64 << 10         # a peer's answer to our POST (204: none)
SEND_TIMEOUT_S = 30.0                 # a peer POST not answered by then has failed
CONNECT_TIMEOUT_S = 5.0               # TCP connect and TLS handshake to a peer
RECONNECT_S = (0.1, 2.0)              # backoff between connection attempts: first, most
IDLE_S = 60.0                         # an inbound connection silent this long, with no
                                      # request waiting for the node, is closed
TICK_S = 0.25                         # housekeeping: queues, timeouts, idle connections

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset((MSGPACK, "application/x-msgpack", "application/vnd.msgpack"))
_FRAMES_TYPE = b"application/octet-stream"
_HTTP1_STARTS = frozenset((b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC"))

# The node's error codes as HTTP statuses.  unknown_type is 404: the URL names the
# type, so the resource is not there (the JSON body's code tells it from unknown_agent).
STATUS_BY_CODE = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNKNOWN_AGENT: 404, ErrorCode.UNKNOWN_TYPE: 404,
    ErrorCode.TOO_LARGE: 413, ErrorCode.OVERLOADED: 429, ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500,
}

_Headers = list[tuple[bytes, bytes]]

# What ``health`` counts (and, proposed, the per-transport metrics): inbound connections
# and requests, answers by status class, requests refused by the transport itself,
# streams reset by clients, idle connections closed, bytes both ways, peer messages
# received / sent (2xx) / failed, connections to peers that failed.
COUNTERS = ("connections", "requests", "replies", "status_2xx", "status_4xx", "status_5xx",
            "refused", "streams_reset", "idle_closed", "bytes_in", "bytes_out",
            "peer_received", "peer_sent", "peer_failed", "connect_failures")


class Http2Handle(BridgeHandle):
    """The reply handle of one HTTP request: its connection and stream, and how to
    write the answer (msgpack or JSON; the status reply's data or an agent's)."""

    __slots__ = ("conn", "stream_id", "msgpack_reply", "answered")

    def __init__(self, transport: "Http2Transport", conn: "_ServerConnection",
                 stream_id: int, msgpack_reply: bool):
        super().__init__(transport)
        self.conn = conn
        self.stream_id = stream_id
        self.msgpack_reply = msgpack_reply
        self.answered = False


class _Refused(Exception):
    """A request answered by the transport itself, without reaching the node."""

    def __init__(self, status: int, code: str, message: str, headers: _Headers = ()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# Requests: routes, bodies, answers ------------------------------------------------

def _route(method: bytes, path: bytes) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """(route, path arguments, query) of a request, or _Refused (404, 405, 400)."""
    try:
        raw_path, _, raw_query = path.decode("ascii").partition("?")
        query = dict(parse_qsl(raw_query, keep_blank_values=True, strict_parsing=bool(raw_query),
                               errors="strict"))
        parts = [unquote(p, errors="strict") for p in raw_path.split("/")]
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, ErrorCode.BAD_REQUEST, "the path is not ASCII with valid "
                       "percent-encoded UTF-8") from None
    if (len(parts) == 6 and parts[:3] == ["", "v1", "agents"] and parts[4] == "messages"
            and parts[3] and parts[5]):
        route, args, allowed = "message", (parts[3], parts[5]), b"POST"
    elif (len(parts) == 5 and parts[:3] == ["", "v1", "groups"] and parts[3]
          and parts[4] == "publish"):
        route, args, allowed = "publish", (parts[3],), b"POST"
    elif parts == ["", "v1", "status"]:
        route, args, allowed = "status", (), b"GET"
    elif parts == ["", "v1", "peer"]:
        route, args, allowed = "peer", (), b"POST"
    else:
        raise _Refused(404, "not_found", f"no such resource: {raw_path[:200]}")
    if method != allowed:
        raise _Refused(405, "method_not_allowed", f"{raw_path[:200]} takes {allowed.decode()}",
                       [(b"allow", allowed)])
    return route, args, query


_QUERY_KEYS = {"message": frozenset(("mode", "consistency", "ttl")),
               "publish": frozenset(("type", "routing")), "status": frozenset(),
               "peer": frozenset()}


def _envelope(route: str, args: tuple[str, ...], query: dict[str, str], data: Any,
              traceparent: str | None) -> tuple[dict, bool]:
    """The request envelope an HTTP request stands for, and whether it is one-way."""
    unknown = set(query) - _QUERY_KEYS[route]
    if unknown:
        raise _Refused(400, ErrorCode.BAD_REQUEST, f"unknown query parameters: {sorted(unknown)}")
    rid = os.urandom(12).hex()
    if route == "status":
        return wire.request(rid, wire.TYPE_STATUS, traceparent=traceparent), False
    if route == "publish":
        if not query.get("type"):
            raise _Refused(400, ErrorCode.BAD_REQUEST, "a publish names its message type: ?type=T")
        return wire.request(rid, query["type"], args[0], data, wire.MODE_PUBLISH,
                            routing=query.get("routing") or None, traceparent=traceparent), True
    mode = query.get("mode", wire.MODE_CALL)
    if mode not in (wire.MODE_CALL, wire.MODE_SEND):
        raise _Refused(400, ErrorCode.BAD_REQUEST, "mode is call or send")
    ttl = query.get("ttl")
    if ttl is not None:
        if not (ttl.isascii() and ttl.isdigit()):
            raise _Refused(400, ErrorCode.BAD_REQUEST, "ttl is a non-negative integer")
        ttl = int(ttl)
    env = wire.request(rid, args[1], args[0], data, mode, consistency=query.get("consistency"),
                       ttl=ttl, traceparent=traceparent)
    return env, mode == wire.MODE_SEND


def _media_type(value: bytes | None) -> str:
    return (value or b"").split(b";", 1)[0].strip().lower().decode("latin-1")


def _decode_body(body: bytes, is_msgpack: bool) -> Any:
    """The request body as the envelope's data: JSON or msgpack; empty is nil."""
    if not body:
        return None
    try:
        if is_msgpack:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        return json.loads(body)
    except (ValueError, RecursionError, msgpack.StackError) as exc:  # both libraries' errors
        kind = "msgpack" if is_msgpack else "JSON"
        raise _Refused(400, ErrorCode.BAD_REQUEST, f"body is not {kind}: {exc}"[:300]) from None


def _json_default(value: Any) -> Any:
    """msgpack bin in a JSON reply: base64 text (the reply as msgpack keeps it as is)."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _to_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode()


def _error_body(code: str, message: str, retry_after_ms: Any = None) -> bytes:
    error = {"code": code, "message": message}
    if isinstance(retry_after_ms, int) and retry_after_ms > 0:
        error["retry_after_ms"] = retry_after_ms
    return _to_json(error)


def _answer_of(envelope: bytes, msgpack_reply: bool) -> tuple[int, bytes, bytes, _Headers]:
    """(status, body, content type, extra headers) for the node's reply envelope."""
    try:
        env = msgpack.unpackb(envelope, raw=False, strict_map_key=False)
        kind, data = env.get("type"), env.get("data")
    except (ValueError, AttributeError, msgpack.StackError):
        return 500, _error_body(ErrorCode.INTERNAL, "the node's reply did not decode"), b"", []
    headers = [(b"synthesis-node", str(env.get("source", "")).encode()[:255])]
    if kind == wire.TYPE_REPLY:
        if msgpack_reply:
            return 200, msgpack.packb(data, use_bin_type=True), MSGPACK.encode(), headers
        try:
            return 200, _to_json(data), b"", headers
        except (TypeError, ValueError, RecursionError) as exc:
            return 500, _error_body(ErrorCode.INTERNAL, f"the reply has no JSON form ({exc}); "
                                    f"ask with accept: {MSGPACK}"), b"", headers
    data = data if isinstance(data, dict) else {}
    code = data.get("code") if isinstance(data.get("code"), str) else ErrorCode.INTERNAL
    retry_ms = data.get("retry_after_ms")
    if code == ErrorCode.OVERLOADED and isinstance(retry_ms, int) and retry_ms > 0:
        headers.append((b"retry-after", str(math.ceil(retry_ms / 1000)).encode()))
    return (STATUS_BY_CODE.get(code, 500),
            _error_body(code, str(data.get("message", "")), retry_ms), b"", headers)


def _common_name(cert: dict) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


def _subject(cert: dict) -> str:
    """An X.509 subject as 'CN=a,O=b' (from ``SSLObject.getpeercert()``)."""
    return ",".join(f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn)


# Connections: what server and client share --------------------------------------

class _H2Protocol(asyncio.Protocol):
    """An h2 connection on an asyncio transport: feeds bytes in, writes h2's bytes out,
    sends bodies as the peer's flow-control windows allow, respects write pauses."""

    client_side = False

    def __init__(self, owner: "Http2Transport"):
        self.owner = owner
        # Headers we send are built here, valid by construction: h2's checks of them
        # cost about 15% of a peer message's CPU (measured).  What arrives is checked.
        config = h2.config.H2Configuration(
            client_side=self.client_side, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._outgoing: dict[int, list] = {}  # stream id -> [memoryview, offset]
        self._paused = False
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # In the preface's SETTINGS, and in force here from the start: a second
        # SETTINGS frame would leave the two ends disagreeing until it is acknowledged.
        codes = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(client=self.client_side, initial_values={
            codes.MAX_CONCURRENT_STREAMS: self.owner.streams_max,
            codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, codes.MAX_FRAME_SIZE: FRAME_SIZE,
            codes.MAX_HEADER_LIST_SIZE: HEADER_LIST_MAX, codes.ENABLE_PUSH: 0})
        self.h2.max_inbound_frame_size = FRAME_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        if self.client_side:  # a server sends its preface once the client's arrived
            self.flush()      # (so an HTTP/1.1 client can be told, in HTTP/1.1)

    def data_received(self, data: bytes) -> None:
        self.owner.count("bytes_in", len(data))
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.protocol_error(data, exc)
            return
        try:
            for event in events:
                self.on_event(event)
                if self.closed:
                    return
        except Exception as exc:  # a bug: it costs this connection, never the node
            self.owner.inbound.failed(None, None, exc)
            self.close()
            return
        self.flush()

    def protocol_error(self, data: bytes, exc: Exception) -> None:
        self.owner.metrics.limited("http2_protocol_error")
        self.flush()  # h2's GOAWAY
        self.close()

    def on_event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
            self.send_pending()
        elif kind is h2.events.ConnectionTerminated:
            self.close()

    def send_body(self, stream_id: int, body: bytes) -> None:
        """Send ``body`` and end the stream, as fast as the peer's windows allow."""
        if not body:
            self.h2.end_stream(stream_id)
            return
        self._outgoing[stream_id] = [memoryview(body), 0]
        self.send_pending()

    def send_pending(self) -> None:
        """Send what the flow-control windows allow of each pending body."""
        for stream_id, pending in list(self._outgoing.items()):
            if self._paused:
                break
            view, offset = pending
            try:
                window = self.h2.local_flow_control_window(stream_id)
                frame_max = self.h2.max_outbound_frame_size
                while window > 0 and offset < len(view):
                    size = min(window, frame_max, len(view) - offset)
                    self.h2.send_data(stream_id, view[offset:offset + size])
                    offset += size
                    window -= size
                if offset == len(view):
                    self.h2.end_stream(stream_id)
                    del self._outgoing[stream_id]
                else:
                    pending[1] = offset
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._outgoing.pop(stream_id, None)  # the peer reset it: nobody reads it
        self.flush_soon()

    def forget_stream(self, stream_id: int) -> None:
        self._outgoing.pop(stream_id, None)

    def flush_soon(self) -> None:
        """Write what h2 holds at the end of this loop turn: the answers of one turn
        leave in one write (on loopback a send costs about as much as the rest of a
        request, measured)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.owner.loop.call_soon(self._flush_scheduled_now)

    def _flush_scheduled_now(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed and not self.transport.is_closing():
            self.owner.count("bytes_out", len(data))
            self.transport.write(data)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.send_pending()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.flush()
            self.closed = True
            self.transport.close()
        self.closed = True


# The server side --------------------------------------------------------------------

class _Receiving:
    """A request whose body is still arriving."""

    __slots__ = ("route", "args", "query", "limit", "chunks", "size", "held", "is_msgpack",
                 "msgpack_reply", "traceparent", "refused")

    def __init__(self) -> None:
        self.route, self.args, self.query = "", (), {}
        self.limit = 0
        self.chunks: list[bytes] = []
        self.size = 0        # body bytes received
        self.held = 0        # of which kept (counted in the transport's inbound budget)
        self.is_msgpack = False
        self.msgpack_reply = False
        self.traceparent: str | None = None
        self.refused = False  # answered already; what still arrives is drained


class _ServerConnection(_H2Protocol):
    """One inbound connection: requests in, the node's answers out."""

    def __init__(self, owner: "Http2Transport"):
        super().__init__(owner)
        self.principal = b""
        self.has_peer_cert = False
        self.cert_name = b""  # the client certificate's common name: the node id it speaks as
        self.opened_at = 0.0
        self.last_read = 0.0  # 0 until the first bytes came
        self._receiving: dict[int, _Receiving] = {}
        self._waiting: dict[int, Http2Handle] = {}  # calls the node will answer

    # Lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self.owner
        if len(owner.server_conns) >= owner.conn_max:
            owner.metrics.limited("http2_connections_max")
            self.closed = True
            transport.abort()
            return
        owner.server_conns.add(self)
        owner.count("connections")
        self.opened_at = owner.loop.time()
        cert = transport.get_extra_info("peercert")
        if cert:  # verified against tls_ca, or the handshake had failed
            self.has_peer_cert = True
            self.cert_name = _common_name(cert).encode()
            self.principal = b"http2-cert:" + _subject(cert).encode()
        else:
            peer = transport.get_extra_info("peername") or ("?", 0)
            self.principal = f"http2:{peer[0]}:{peer[1]}".encode()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.server_conns.discard(self)
        for receiving in self._receiving.values():
            self._drop_body(receiving)
        self._receiving.clear()
        for handle in self._waiting.values():
            handle.answered = True  # a reply that comes later is dropped (and counted)
        self._waiting.clear()

    @property
    def idle(self) -> bool:
        """Nothing waits for the node; with no bytes for IDLE_S, the connection goes."""
        return not self._waiting

    # Events ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.last_read and data[:4] in _HTTP1_STARTS:
            self._answer_http1()
            return
        self.last_read = self.owner.loop.time()
        super().data_received(data)

    def _answer_http1(self) -> None:
        """An HTTP/1.1 request where the first bytes were due: say, in HTTP/1.1, what
        this port speaks (instead of h2's preface and a GOAWAY)."""
        self.owner.metrics.limited("http2_protocol_error")
        message = b"this port speaks HTTP/2 only (h2c with prior knowledge, or TLS with ALPN h2)\n"
        self.transport.write(b"HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\n"
                             b"content-type: text/plain\r\ncontent-length: "
                             + str(len(message)).encode() + b"\r\n\r\n" + message)
        self.h2.data_to_send()  # the preface, never sent
        self.close()

    def on_event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.RequestReceived:
            self._on_request(event)
        elif kind is h2.events.DataReceived:
            self._on_data(event)
        elif kind is h2.events.StreamEnded:
            self._on_end(event.stream_id)
        elif kind is h2.events.StreamReset:
            self._on_reset(event.stream_id)
        else:
            super().on_event(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self.owner.count("requests")
        receiving = self._receiving[event.stream_id] = _Receiving()
        try:
            self._accept_headers(receiving, dict(event.headers))
        except _Refused as refused:
            self._refuse(event.stream_id, receiving, refused)

    def _accept_headers(self, receiving: _Receiving, headers: dict[bytes, bytes]) -> None:
        route, args, query = _route(headers.get(b":method", b""), headers.get(b":path", b""))
        receiving.route, receiving.args, receiving.query = route, args, query
        receiving.limit = MESSAGE_BYTES_MAX if route == "peer" else self.owner.max_bytes
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            raise _Refused(400, ErrorCode.BAD_REQUEST, "content-length is not a number")
        if length is not None and int(length) > receiving.limit:
            raise self._too_large(receiving.limit)
        if route == "peer":
            if self.owner.tls_ca and not self.has_peer_cert:
                raise _Refused(403, "forbidden", "/v1/peer takes a client certificate "
                               "signed by the node's CA")
            return
        media = _media_type(headers.get(b"content-type"))
        if media and media != JSON and media not in _MSGPACK_TYPES and route != "status":
            raise _Refused(415, "unsupported_media_type", f"a body is {JSON} or {MSGPACK}")
        receiving.is_msgpack = media in _MSGPACK_TYPES
        accept = headers.get(b"accept", b"").decode("latin-1").lower()
        receiving.msgpack_reply = receiving.is_msgpack or "msgpack" in accept
        traceparent = headers.get(b"traceparent")
        if traceparent:
            receiving.traceparent = traceparent.decode("latin-1")

    @staticmethod
    def _too_large(limit: int) -> _Refused:
        return _Refused(413, ErrorCode.TOO_LARGE, f"body exceeds {limit} bytes")

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        # Acknowledged at once, whatever becomes of it: the bound on what is held
        # is the body limit and the inbound budget, not the peer's stalled window.
        self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        receiving = self._receiving.get(stream_id)
        if receiving is None:
            return
        size = len(event.data)
        receiving.size += size
        if receiving.refused:
            # Drained while the client still sends (some clients read the answer only
            # after sending it all); past four times the limit the stream is cut.
            if receiving.size > 4 * receiving.limit + 65536:
                self._reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return
        if receiving.size > receiving.limit:
            self._refuse(stream_id, receiving, self._too_large(receiving.limit))
        elif not self.owner.reserve(size):
            self._refuse(stream_id, receiving, _Refused(
                429, ErrorCode.OVERLOADED, "the node holds its limit of request bodies "
                "being received", [(b"retry-after", b"1")]))
        else:
            receiving.chunks.append(event.data)
            receiving.held += size

    def _drop_body(self, receiving: _Receiving) -> None:
        """Give the body's bytes back to the inbound budget (once)."""
        self.owner.release(receiving.held)
        receiving.held = 0
        receiving.chunks = []

    def _on_end(self, stream_id: int) -> None:
        receiving = self._receiving.pop(stream_id, None)
        if receiving is None or receiving.refused:
            return
        body = b"".join(receiving.chunks)
        self._drop_body(receiving)
        try:
            self._dispatch(stream_id, receiving, body)
        except _Refused as refused:
            self._refuse(stream_id, receiving, refused)

    def _on_reset(self, stream_id: int) -> None:
        self.owner.count("streams_reset")
        receiving = self._receiving.pop(stream_id, None)
        if receiving is not None:
            self._drop_body(receiving)
        handle = self._waiting.pop(stream_id, None)
        if handle is not None:
            handle.answered = True
        self.forget_stream(stream_id)

    def _reset(self, stream_id: int, code: int) -> None:
        self._on_reset(stream_id)
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass

    # Answers ----------------------------------------------------------------------

    def _dispatch(self, stream_id: int, receiving: _Receiving, body: bytes) -> None:
        owner = self.owner
        if receiving.route == "peer":
            try:
                frames = decode_frames(body)
            except FramingError as exc:
                raise _Refused(400, ErrorCode.BAD_REQUEST, str(exc)) from None
            if owner.tls_ca and len(frames) > 2 and frames[2] != self.cert_name:
                # A node certificate speaks only for the node id it names (its common
                # name), as a CURVE key does for the id its certificate binds.
                owner.metrics.limited("http2_sender_mismatch")
                raise _Refused(403, "forbidden", "the peer frames' sender is not the node "
                                                 "the client certificate names")
            self.respond(stream_id, 204, b"")
            owner.count("peer_received")
            try:
                owner.inbound.peer(frames)
            except Exception as exc:  # a bug must not take the connection down
                owner.inbound.failed(None, None, exc)
            return
        data = _decode_body(body, receiving.is_msgpack)
        env, one_way = _envelope(receiving.route, receiving.args, receiving.query, data,
                                 receiving.traceparent)
        try:
            payload = wire.encode(env)
        except (TypeError, ValueError, OverflowError) as exc:  # a JSON int past 64 bits, ...
            raise _Refused(400, ErrorCode.BAD_REQUEST, f"data has no msgpack form: {exc}") from None
        handle = Http2Handle(owner, self, stream_id, receiving.msgpack_reply)
        if one_way:
            handle.answered = True
            self.respond(stream_id, 202, b"")
        else:
            self._waiting[stream_id] = handle
        try:
            owner.inbound.client(handle, payload, self.principal)
        except Exception as exc:  # a bug must not take the connection down
            owner.inbound.failed(handle, payload, exc)

    def _refuse(self, stream_id: int, receiving: _Receiving, refused: _Refused) -> None:
        """Answer a request the transport itself turns down; drain the rest of its body."""
        self._drop_body(receiving)
        receiving.refused = True
        self.owner.metrics.limited(f"http2_{refused.code}")
        self.owner.count("refused")
        self.respond(stream_id, refused.status, _error_body(refused.code, refused.message),
                     headers=refused.headers)

    def answer(self, handle: Http2Handle, envelope: bytes) -> bool:
        """The node's reply or error for ``handle``'s request, as an HTTP response."""
        handle.answered = True
        if self._waiting.pop(handle.stream_id, None) is None or self.closed:
            return False
        status, body, content_type, headers = _answer_of(envelope, handle.msgpack_reply)
        return self.respond(handle.stream_id, status, body, content_type, headers)

    def respond(self, stream_id: int, status: int, body: bytes, content_type: bytes = b"",
                headers: _Headers = ()) -> bool:
        head = [(b":status", str(status).encode())]
        if status != 204 and status != 202:
            head += [(b"content-type", content_type or JSON.encode()),
                     (b"content-length", str(len(body)).encode())]
        head += headers
        try:
            self.h2.send_headers(stream_id, head, end_stream=not body)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False  # the client reset the stream meanwhile
        self.owner.count_status(status)
        if body:
            self.send_body(stream_id, body)
        self.flush_soon()
        return True

    def shut_down(self) -> None:
        if not self.closed:
            self.h2.close_connection()
            self.close()


# The client side: links to peers ----------------------------------------------------

class _Post:
    """One peer message: waiting to go, or in flight on a stream."""

    __slots__ = ("peer", "body", "on_give_up", "deadline", "status")

    def __init__(self, peer: str, body: bytes, on_give_up: OnGiveUp | None, deadline: float):
        self.peer, self.body, self.on_give_up, self.deadline = peer, body, on_give_up, deadline
        self.status = 0


class _PeerConnection(_H2Protocol):
    """The connection to one peer: POST /v1/peer per message, answered 204."""

    client_side = True

    def __init__(self, owner: "Http2Transport", link: "_PeerLink"):
        super().__init__(owner)
        self.link = link
        self.posts: dict[int, _Post] = {}
        self.last_used = owner.loop.time()
        self._answered: dict[int, int] = {}  # stream id -> bytes of answer body read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.link.connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        posts, self.posts = self.posts, {}
        for post in posts.values():
            self.owner.finished(post, "unavailable", f"connection to {self.link.endpoint} lost")
        self.link.disconnected(self)

    def can_post(self) -> bool:
        limit = min(self.h2.remote_settings.max_concurrent_streams, self.owner.streams_max)
        return not self.closed and len(self.posts) < limit

    def post(self, post: _Post) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", self.link.scheme),
            (b":authority", self.link.authority), (b":path", b"/v1/peer"),
            (b"content-type", _FRAMES_TYPE), (b"content-length", str(len(post.body)).encode())])
        self.posts[stream_id] = post
        self.last_used = self.owner.loop.time()
        post.deadline = self.last_used + SEND_TIMEOUT_S
        self.send_body(stream_id, post.body)
        self.flush_soon()

    def on_event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.ResponseReceived:
            post = self.posts.get(event.stream_id)
            if post is not None:
                post.status = int(dict(event.headers).get(b":status", b"0") or 0)
        elif kind is h2.events.DataReceived:
            self._on_answer_data(event)
        elif kind is h2.events.StreamEnded:
            self._end(event.stream_id, "")
        elif kind is h2.events.StreamReset:
            self._end(event.stream_id, "the peer reset the stream")
        else:
            super().on_event(event)

    def _on_answer_data(self, event: h2.events.DataReceived) -> None:
        """An answer's body (errors carry one): read and acknowledged, within a bound."""
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        read = self._answered.get(event.stream_id, 0) + len(event.data)
        self._answered[event.stream_id] = read
        if read > RESPONSE_BYTES_MAX:
            self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._end(event.stream_id, "the peer's answer is too long")

    def _end(self, stream_id: int, reason: str) -> None:
        self._answered.pop(stream_id, None)
        self.forget_stream(stream_id)
        post = self.posts.pop(stream_id, None)
        if post is None:
            return
        if not reason and 200 <= post.status < 300:
            self.owner.finished(post, "", "")
        else:
            code = ErrorCode.OVERLOADED if post.status == 429 else ErrorCode.UNAVAILABLE
            self.owner.finished(post, code, reason or f"the peer answered {post.status}")
        self.link.pump(self.owner.loop.time())

    def expire(self, now: float) -> None:
        """Posts not answered within SEND_TIMEOUT_S fail (their streams are reset)."""
        for stream_id in [s for s, post in self.posts.items() if post.deadline <= now]:
            try:
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass
            self._end(stream_id, f"no answer within {SEND_TIMEOUT_S:g} s")
        self.flush()


class _PeerLink:
    """One peer endpoint: its connection (made on demand), and the sends that wait for
    it, bounded in count, bytes and time."""

    def __init__(self, owner: "Http2Transport", endpoint: str):
        self.owner = owner
        self.endpoint = endpoint
        scheme, _, hostport = endpoint.partition("://")
        self.tls = scheme == "https"
        self.scheme = scheme.encode()
        self.authority = hostport.encode()
        self.host, self.port = _split_hostport(hostport)
        self.conn: _PeerConnection | None = None
        self.connecting: asyncio.Task | None = None
        self.retry_at = 0.0
        self.backoff_s = RECONNECT_S[0]
        self.queue: deque[_Post] = deque()
        self.queued_bytes = 0
        self.sent = 0
        self.failed = 0

    def submit(self, post: _Post, now: float) -> bool:
        if not self.queue and self.conn is not None and self.conn.can_post():
            self.conn.post(post)
            return True
        if (len(self.queue) >= PEER_QUEUE_MAX
                or self.queued_bytes + len(post.body) > PEER_QUEUE_BYTES_MAX):
            self.owner.finished(post, ErrorCode.OVERLOADED, f"queue to {self.endpoint} is full")
            return False
        self.queue.append(post)
        self.queued_bytes += len(post.body)
        self.owner.queued += 1
        self.pump(now)
        return True

    def pump(self, now: float) -> None:
        """Post what waits while streams are free; give up on what waited too long;
        make the connection when there is none (after the backoff)."""
        conn = self.conn
        while self.queue and conn is not None and conn.can_post():
            conn.post(self._pop())
        while self.queue and self.queue[0].deadline <= now:
            self.failed += 1
            self.owner.finished(self._pop(), ErrorCode.UNAVAILABLE,
                                f"peer {self.endpoint} unreachable")
        if self.queue and conn is None and self.connecting is None and now >= self.retry_at:
            self.connecting = self.owner.loop.create_task(self._connect())

    def _pop(self) -> _Post:
        post = self.queue.popleft()
        self.queued_bytes -= len(post.body)
        self.owner.queued -= 1
        return post

    async def _connect(self) -> None:
        owner = self.owner
        try:
            await asyncio.wait_for(owner.loop.create_connection(
                lambda: _PeerConnection(owner, self), self.host, self.port,
                ssl=owner.client_tls() if self.tls else None,
                server_hostname=self.host if self.tls else None), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
            owner.count("connect_failures")
            self.retry_at = owner.loop.time() + self.backoff_s
            self.backoff_s = min(2 * self.backoff_s, RECONNECT_S[1])
            owner.log_once(self.endpoint, "http2_peer_connect_failed", endpoint=self.endpoint,
                           error=str(exc) or type(exc).__name__)
        finally:
            self.connecting = None

    def connected(self, conn: _PeerConnection) -> None:
        self.conn = conn
        self.backoff_s = RECONNECT_S[0]
        self.pump(self.owner.loop.time())

    def disconnected(self, conn: _PeerConnection) -> None:
        if self.conn is conn:
            self.conn = None
            self.pump(self.owner.loop.time())

    def close_if_idle(self, now: float) -> None:
        """Close a connection unused for half of IDLE_S: before the peer's own idle
        rule closes it under a POST just sent (that POST would fail)."""
        conn = self.conn
        if conn is not None and not conn.posts and not self.queue and (
                now - conn.last_used > IDLE_S / 2):
            self.conn = None
            conn.h2.close_connection()
            conn.close()

    def close(self, reason: str) -> None:
        while self.queue:
            self.owner.finished(self._pop(), ErrorCode.UNAVAILABLE, reason)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.h2.close_connection()
            conn.close()
            conn.connection_lost(None)  # its posts fail now, not at the next loop turn


def _split_hostport(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {hostport!r}")
    return host.strip("[]"), int(port)


# The transport ------------------------------------------------------------------------

class Http2Transport(Transport):
    name = ENDPOINT

    def __init__(self, *, node_id: str, bind: str, advertise: str = "", tls_cert: str = "",
                 tls_key: str = "", tls_ca: str = "", max_message_bytes: int, metrics: Any,
                 log: Any, streams_max: int = STREAMS_MAX, conn_max: int = CONNECTIONS_MAX,
                 inbound_bytes_max: int = INBOUND_BYTES_MAX):
        self.node_id = node_id
        self._bind = bind
        self._advertise = advertise
        self.tls = bool(tls_cert and tls_key)
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.max_bytes = max_message_bytes
        self.metrics = metrics
        self.log = log
        self.streams_max = streams_max
        self.conn_max = conn_max
        self.inbound_bytes_max = inbound_bytes_max
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inbound: Inbound | None = None
        self.server_conns: set[_ServerConnection] = set()
        self.queued = 0            # peer sends waiting, all links
        self._inbound_bytes = 0    # body bytes held while being received, all connections
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._endpoint = ""
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._serving: asyncio.Task | None = None
        self._client_tls: ssl.SSLContext | None = None
        self._peers: dict[str, str] = {}       # node id -> http2 endpoint
        self._links: dict[str, _PeerLink] = {}  # endpoint -> link
        self._logged: set[str] = set()
        self._tick_timer: asyncio.TimerHandle | None = None
        self._closed = False

    # Lifecycle -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        """Bind now (so ``endpoints`` has the port), serve from the loop's next turn."""
        self.loop, self.inbound = loop, inbound
        host, port = _split_hostport(self._bind)
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = self._sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        advertised = self._advertise or self._bind
        adv_host, adv_port = _split_hostport(advertised)
        if adv_port == 0:
            adv_port = bound_port
        adv_host = f"[{adv_host}]" if ":" in adv_host else adv_host
        self._endpoint = f"{'https' if self.tls else 'http'}://{adv_host}:{adv_port}"
        self._serving = loop.create_task(self._serve(sock, self._server_tls()))
        self._tick_timer = loop.call_later(TICK_S, self._tick)

    async def _serve(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self._server = await self.loop.create_server(
            lambda: _ServerConnection(self), sock=sock, ssl=tls,
            ssl_handshake_timeout=(10.0 if tls else None), backlog=1024)

    def _server_tls(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        ctx.set_alpn_protocols(["h2"])
        if self.tls_ca:  # a certificate a client shows must be signed by it (optional
            ctx.load_verify_locations(self.tls_ca)   # for clients, checked for /v1/peer)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_tls(self) -> ssl.SSLContext:
        """The context for https peers: verified against tls_ca (else the system's
        roots), showing our certificate when we have one."""
        if self._client_tls is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca or None)
            if self.tls:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            ctx.set_alpn_protocols(["h2"])
            self._client_tls = ctx
        return self._client_tls

    def stop(self, linger_ms: int = 0) -> None:
        if self._closed or self.loop is None:
            return
        self._closed = True
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        if self._server is not None:
            self._server.close()
        elif self._serving is not None:
            self._serving.cancel()
        if self._sock is not None:
            self._sock.close()
        for conn in list(self.server_conns):
            conn.shut_down()
        for link in self._links.values():
            link.close("node is shutting down")
        self._links.clear()

    def endpoints(self) -> dict[str, str]:
        return {ENDPOINT: self._endpoint} if self._endpoint else {}

    # Peers ----------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        self._peers = {node: ep[ENDPOINT] for node, ep in peers.items()
                       if ENDPOINT in ep and "://" in ep[ENDPOINT]}
        wanted = set(self._peers.values())
        for endpoint in [e for e in self._links if e not in wanted]:
            self._links.pop(endpoint).close(f"peer {endpoint} left the member view")

    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0) -> bool:
        now = now or self.loop.time()
        endpoint = self._peers.get(peer)
        reason = ("node is shutting down" if self._closed else
                  f"no {ENDPOINT} endpoint for peer {peer!r}" if endpoint is None else "")
        body = b""
        if not reason:
            try:
                body = encode_frames(frames)
            except FramingError as exc:
                reason = str(exc)
        link = self._link(endpoint) if not reason else None
        if link is None:
            self.finished(_Post(peer, body, on_give_up, now), ErrorCode.UNAVAILABLE,
                          reason or f"cannot open a link to {endpoint}")
            return False
        return link.submit(_Post(peer, body, on_give_up, now + PEER_QUEUE_DEADLINE_S), now)

    def _link(self, endpoint: str) -> _PeerLink | None:
        link = self._links.get(endpoint)
        if link is None:
            if len(self._links) >= LINKS_MAX:
                self.metrics.limited("http2_peer_links")
                return None
            try:
                link = self._links[endpoint] = _PeerLink(self, endpoint)
            except ValueError:  # an endpoint a peer advertised that is no HOST:PORT
                return None
        return link

    def finished(self, post: _Post, code: str, reason: str) -> None:
        """A peer send ended: sent (code '') or given up (its caller told, once)."""
        ok = not code
        self.count("peer_sent" if ok else "peer_failed")
        if not ok:
            self.metrics.peer_send_failed()
            if post.on_give_up is not None:
                post.on_give_up(code, reason)
        self._outcome(post.peer, ok)

    def drop_queued(self, peer: str) -> None:
        endpoint = self._peers.get(peer)
        link = self._links.pop(endpoint, None) if endpoint else None
        if link is not None:
            link.close(f"peer {peer!r} stopped answering")

    def retry(self, now: float) -> None:
        for link in list(self._links.values()):
            link.pump(now)

    @property
    def has_queued(self) -> bool:
        return self.queued > 0

    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        """Multicast stays on ZeroMQ's PUB/SUB: nothing to do here."""

    # Clients ----------------------------------------------------------------------------

    def reply(self, handle: Any, payload: bytes) -> bool:
        if not isinstance(handle, Http2Handle) or handle.answered or not handle.conn.answer(
                handle, payload):
            self.metrics.client_send_failed()
            return False
        self.count("replies")
        return True

    # Budgets, counts, housekeeping -------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        if self._inbound_bytes + nbytes > self.inbound_bytes_max:
            return False
        self._inbound_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self._inbound_bytes -= nbytes

    def count(self, key: str, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def count_status(self, status: int) -> None:
        self.count(f"status_{status // 100}xx")

    def log_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._logged and len(self._logged) < 1024:
            self._logged.add(key)
            self.log.warning(event, **fields)

    def _tick(self) -> None:
        """Queues (deadlines, reconnects), peer posts past SEND_TIMEOUT_S, idle
        inbound connections; re-armed whatever happens."""
        now = self.loop.time()
        try:
            self.retry(now)
            for link in list(self._links.values()):
                if link.conn is not None:
                    link.conn.expire(now)
                link.close_if_idle(now)
            for conn in [c for c in self.server_conns
                         if c.idle and now - (c.last_read or c.opened_at) > IDLE_S]:
                self.count("idle_closed")
                conn.shut_down()
        except Exception as exc:  # a timer callback must never die
            self.inbound.failed(None, None, exc)
        if not self._closed:
            self._tick_timer = self.loop.call_later(TICK_S, self._tick)

    def health(self) -> dict:
        links = list(self._links.values())  # one step each: a metrics thread may call this
        health = dict(self._counts)
        health.update({
            "endpoint": self._endpoint, "tls": self.tls,
            "connections_open": len(self.server_conns),
            "inbound_body_bytes": self._inbound_bytes,
            "peers": len(links), "peers_connected": sum(l.conn is not None for l in links),
            "queued": sum(len(l.queue) for l in links),
            "in_flight": sum(len(c.posts) for c in [l.conn for l in links] if c is not None),
            "send_failures": self._counts.get("peer_failed", 0),
        })
        return health
