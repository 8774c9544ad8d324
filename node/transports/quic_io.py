"""aioquic plumbing for the QUIC bridge, shared by the node (quic.py) and the client.

- ``configuration``/``dial_configuration``: TLS 1.3 settings (ALPN ``synthesis/1``);
- ``UdpEndpoint``: a UDP socket for aioquic that reads datagrams in batches and never
  buffers sends; ``BatchedConnection``: an aioquic connection that transmits once per
  loop turn;
- ``Inflow``: received streams assembled within byte limits; ``Backlog``: watermarks
  over the bytes handed to aioquic and not yet acknowledged;
- the application error codes streams and connections are reset or closed with.

aioquic's privates used here, each pinned by tests/test_transport_quic.py: the TLS
context's client-certificate flag and peer certificate (``ask_client_certificate``,
quic.py's certificate check) and the streams' send buffers (``unacked_bytes``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from protocols import wire
from protocols.wire import ErrorCode

ALPN = "synthesis/1"
DATAGRAM_BYTES = 1350           # UDP payload: under a 1500-byte MTU with IPv6 headers
IDLE_TIMEOUT_S = 30.0           # a connection silent this long is closed (redialed on use)
# A dialed connection silent this long is made again before use rather than used: the
# other side may have dropped it already (its idle timer runs apart from ours), and
# what is written to a dropped connection is lost without a word.
STALE_AFTER_S = IDLE_TIMEOUT_S / 2
FLOW_WINDOW_BYTES = 4 << 20     # initial connection flow-control window (aioquic grows it)

# Application error codes (RESET_STREAM, STOP_SENDING, CONNECTION_CLOSE).
STREAM_REFUSED = 0x10           # peer frames from a connection that is not a peer's
STREAM_TOO_LARGE = 0x11         # past the stream's byte limit
STREAM_OVERLOADED = 0x12        # the node's backlog to this connection is over its mark
CONN_BAD_CERTIFICATE = 0x20     # a certificate that does not verify against the CA
CONN_REFUSED = 0x21             # over connections_max, or over conn_inbound_bytes_max
# What a client makes of a stream reset with one of these codes.
STREAM_ERRORS = {STREAM_REFUSED: ErrorCode.BAD_REQUEST, STREAM_TOO_LARGE: ErrorCode.TOO_LARGE,
                 STREAM_OVERLOADED: ErrorCode.OVERLOADED}


# Configuration -----------------------------------------------------------------


def configuration(is_client: bool, cert: str | None, key: str | None,
                  ca_data: bytes | None) -> QuicConfiguration:
    """TLS 1.3 for either side: ``cert``/``key`` presented, ``ca_data`` trusted."""
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN],
                               idle_timeout=IDLE_TIMEOUT_S, max_datagram_size=DATAGRAM_BYTES,
                               max_data=FLOW_WINDOW_BYTES)
    if cert is not None:
        try:
            config.load_cert_chain(cert, key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the TLS certificate {cert!r} / key {key!r}: "
                             f"{exc}") from exc
    if ca_data is not None:
        config.load_verify_locations(cadata=ca_data)
    return config


def dial_configuration(ca_file: str, cert: str | None = None,
                       key: str | None = None) -> QuicConfiguration:
    """A client configuration that verifies servers against ``ca_file`` and, with
    ``cert``/``key``, presents that certificate when asked (server_name is set per
    dial)."""
    return configuration(True, cert, key, read_ca(ca_file))


def read_ca(ca_file: str) -> bytes:
    try:
        with open(ca_file, "rb") as fp:
            data = fp.read()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS CA {ca_file!r}: {exc}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{ca_file!r} holds no PEM certificate")
    return data


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); ValueError when it is neither."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"a QUIC endpoint is HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def ask_client_certificate(quic: QuicConnection) -> None:
    """Have aioquic's server ask the client for a certificate.

    Its TLS context keeps a flag for that ("for test purposes only") and makes the
    context on the first datagram, so the flag is set right after.  RFC 8446 lets a
    client answer with no certificate; quic.py's ``_Accepted._verify`` decides what each
    answer may do.  Pinned by tests/test_transport_quic.py."""
    initialize = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = _initialize


def unacked_bytes(quic: QuicConnection) -> int:
    """Bytes handed to aioquic on this connection and not acknowledged by the peer.

    aioquic offers no count: this sums its streams' send buffers (trimmed as acks
    arrive; a stream is dropped once all of it was acknowledged).  Pinned by the
    watermark tests in tests/test_transport_quic.py."""
    return sum(len(stream.sender._buffer) for stream in quic._streams.values())


def oldest_unacked_stream(quic: QuicConnection) -> int | None:
    """The lowest id of this end's streams still holding unacknowledged data, or None.
    (Same aioquic internals as ``unacked_bytes``.)"""
    waiting = [sid for sid, stream in quic._streams.items() if stream.sender._buffer]
    return min(waiting) if waiting else None


# Streams being received ------------------------------------------------------------


class StreamTooLarge(Exception):
    """A stream past its byte limit; ``head`` is its first bytes, to peek at."""

    def __init__(self, head: bytes):
        self.head = head


class Inflow:
    """The streams being received on one connection: bytes kept until each ends,
    a stream within its own limit, all of them counted in ``total``."""

    __slots__ = ("parts", "total")

    def __init__(self) -> None:
        self.parts: dict[int, list] = {}  # stream id -> [size, chunk, chunk, ...]
        self.total = 0

    def add(self, stream_id: int, data: bytes, end: bool, limit: int) -> bytes | None:
        """The stream's bytes once it ended, else None; StreamTooLarge past ``limit``."""
        held = self.parts.get(stream_id)
        if held is None:
            if len(data) > limit:
                raise StreamTooLarge(data[:wire.PEEK_BYTES_MAX])
            if end:
                return data  # the common case: a message in one piece
            self.parts[stream_id] = [len(data), data]
            self.total += len(data)
            return None
        size = held[0] + len(data)
        if size > limit:
            self.discard(stream_id)
            raise StreamTooLarge(b"".join(held[1:])[:wire.PEEK_BYTES_MAX])
        held[0] = size
        held.append(data)
        self.total += len(data)
        if not end:
            return None
        self.discard(stream_id)
        return b"".join(held[1:])

    def discard(self, stream_id: int) -> None:
        held = self.parts.pop(stream_id, None)
        if held is not None:
            self.total -= held[0]


# Connections and sockets ------------------------------------------------------


class Backlog:
    """Watermarks over a connection's unacknowledged bytes (see the module doc).

    Measuring walks the connection's streams, so it is done only when an estimate
    (the last measure plus what was handed since) crosses the high mark, and on a
    datagram (acks arrive in datagrams) once low-mark bytes were handed since the
    last measure, or while paused."""

    __slots__ = ("quic", "high", "low", "measured", "handed", "paused", "pauses")

    def __init__(self, quic: QuicConnection, high: int, low: int):
        self.quic, self.high, self.low = quic, high, low
        self.measured = 0
        self.handed = 0
        self.paused = False
        self.pauses = 0

    def has_room(self) -> bool:
        if self.paused:
            return False
        if self.measured + self.handed <= self.high:
            return True
        self.measure()
        if self.measured > self.high:
            self.paused = True
            self.pauses += 1
            return False
        return True

    def measure(self) -> None:
        self.measured = unacked_bytes(self.quic)
        self.handed = 0
        if self.paused and self.measured <= self.low:
            self.paused = False


class BatchedConnection(QuicConnectionProtocol):
    """An aioquic connection that transmits once per loop turn, not once per
    datagram received or message written; with ``UdpEndpoint``'s batched reads,
    what bounds a busy connection is fewer packet-building walks.  Never transmits
    on a closed socket."""

    def __init__(self, quic: QuicConnection):
        super().__init__(quic)
        self.closed = False  # terminated, or closed by us: nothing more is sent
        self.received_at = self._loop.time()  # when the last datagram came
        self._flush: asyncio.Handle | None = None

    def flush_soon(self) -> None:
        if self._flush is None and not self.closed:
            self._flush = self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        if not self.closed:
            self.transmit()

    def transmit(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            super().transmit()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received_at = now = self._loop.time()
        self._quic.receive_datagram(data, addr, now=now)
        self._process_events()
        self.flush_soon()

    def stale(self) -> bool:
        return self.closed or self._loop.time() - self.received_at > STALE_AFTER_S

    def stop_timers(self) -> None:
        """For a connection dropped at once: nothing left to send or time."""
        self.closed = True
        for handle in (self._flush, self._timer):
            if handle is not None:
                handle.cancel()


READ_BATCH_MAX = 64  # datagrams read per wake-up of a socket


class UdpEndpoint(asyncio.DatagramTransport):
    """A UDP socket serving one aioquic protocol (a QuicServer or a connection).

    In place of asyncio's datagram transport, for two reasons: that one reads one
    datagram per wake-up, and aioquic builds packets after each (a walk over every
    stream), where this reads up to READ_BATCH_MAX and the connections transmit
    once at the end of the turn (``_Connection.datagram_received``); and it
    buffers sends the kernel will not take without a bound, where this drops
    them, as a full network would, and QUIC's loss recovery resends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.DatagramProtocol):
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._connected = _is_connected(sock)
        self._closing = False
        self._reading = False
        self.dropped = 0  # datagrams the kernel would not take
        protocol.connection_made(self)
        self.resume_reading()

    def _drain(self) -> None:
        sock, protocol = self._sock, self._protocol
        for _ in range(READ_BATCH_MAX):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors, on a connected socket
                protocol.error_received(exc)
                continue
            protocol.datagram_received(data, addr)
            if self._closing or not self._reading:
                return

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            if self._connected or addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:
            self._protocol.error_received(exc)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._drain)

    def is_reading(self) -> bool:
        return self._reading

    def close(self) -> None:
        if self._closing:
            return
        self.pause_reading()
        self._closing = True
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return None if self._closing else self._sock.getsockname()
        return default


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def connected_socket(loop: asyncio.AbstractEventLoop, host: str,
                            port: int) -> socket.socket:
    """A non-blocking UDP socket connected to (host, port): the kernel then reports
    ICMP port unreachable to it (see ``_Dialed.error_received``)."""
    try:
        ipaddress.ip_address(host)
        infos = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
    except ValueError:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        infos = [(family, addr) for family, _, _, _, addr in found]
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    family, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock
