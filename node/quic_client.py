"""A client over the QUIC bridge: ``AsyncQuicClient`` (asyncio) and ``QuicClient`` (blocking).

Each call is one bidirectional QUIC stream: the request envelope (the same bytes as
over ZeroMQ, built by node/client.py's request code), then the node's reply on the
same stream, so no id matching is needed beyond a check.  ``send`` is one
unidirectional stream, one-way.  The node's certificate is verified against
``ca_file`` and the host in ``address``; ``cert``/``key`` (from ``synthesis-ctl certs
DIR --client NAME``) make the node name this client by its certificate rather than by
its address.  docs/PROTOCOL.md, "QUIC bridge".

Errors as node/client.py raises them: the node's error envelope -> ``RemoteError``; a
stream the node reset -> ``RemoteError`` with the code it stands for (``too_large``,
``overloaded``); a connection that closed under a call -> ``RemoteError``
``unavailable``; no reply within the timeout -> ``CallTimeout``; no handshake ->
``QuicConnectError`` (a ConnectionError).  A closed connection (the node's idle
timeout) is made again by the next call.

``QuicClient`` runs an ``AsyncQuicClient`` on a private event loop in a thread and
waits for each call; one QuicClient may be used from several threads at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from protocols import wire
from protocols.wire import ErrorCode

from .client import CallTimeout, RemoteError, _decode, _Requests, _result, check_agent, check_type
from .transports.quic_io import (STREAM_ERRORS, BatchedConnection, Inflow, StreamTooLarge,
                                 UdpEndpoint, connected_socket, dial_configuration,
                                 split_endpoint)

__all__ = ["QuicClient", "AsyncQuicClient", "QuicConnectError", "RemoteError", "CallTimeout"]

IN_FLIGHT_MAX = 1024            # calls outstanding on one client before call() waits
REPLY_BYTES_MAX = 64 << 20      # the largest reply read (the node's own limit is lower)


class QuicConnectError(ConnectionError):
    """No QUIC connection to the node: no handshake in time, or TLS refused it."""


class _ClientConnection(BatchedConnection):
    """The client's connection: replies assembled per stream, each to its call."""

    def __init__(self, quic: QuicConnection, addr: tuple):
        super().__init__(quic)
        self.calls: dict[int, asyncio.Future] = {}  # stream id -> its reply's future
        self.inflow = Inflow()
        # Own futures: aioquic's wait_connected misses a handshake that completes
        # before it is awaited (the waiter must exist first).
        self.ready = self._loop.create_future()  # set once the handshake completed
        self.ended = self._loop.create_future()  # set to why, when the connection ends
        self._addr = addr
        self._flush: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connect(self._addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):  # nobody listens: fail now, not at timeout
            self._terminated("the node refused (no QUIC listener)")

    def open(self, payload: bytes, unidirectional: bool) -> int:
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        self._quic.send_stream_data(stream_id, payload, end_stream=True)
        self.flush_soon()  # one transmit per loop turn for all calls made in it
        return stream_id

    def abandon(self, stream_id: int) -> None:
        """A call no longer waited for: ask the node to stop sending its reply."""
        self.calls.pop(stream_id, None)
        self.inflow.discard(stream_id)
        if not self.closed:
            try:
                self._quic.stop_stream(stream_id, 0)
            except ValueError:
                pass

    def quic_event_received(self, event: events.QuicEvent) -> None:
        kind = type(event)
        if kind is events.StreamDataReceived:
            self._on_data(event.stream_id, event.data, event.end_stream)
        elif kind is events.StreamReset:
            code = STREAM_ERRORS.get(event.error_code, ErrorCode.UNAVAILABLE)
            self._fail(event.stream_id, RemoteError(code, f"the node reset the stream "
                                                          f"(QUIC code {event.error_code})"))
        elif kind is events.HandshakeCompleted:
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind is events.ConnectionTerminated:
            self._terminated(event.reason_phrase or f"QUIC error {event.error_code}")

    def _on_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id not in self.calls:
            return  # an abandoned call's late bytes
        try:
            payload = self.inflow.add(stream_id, data, end, REPLY_BYTES_MAX)
        except StreamTooLarge:
            self.abandon(stream_id)
            self._fail(stream_id, RemoteError(ErrorCode.TOO_LARGE,
                                              f"a reply over {REPLY_BYTES_MAX} bytes"))
            return
        if payload is not None:
            future = self.calls.pop(stream_id)
            if not future.done():
                future.set_result(payload)

    def _fail(self, stream_id: int, exc: Exception) -> None:
        self.inflow.discard(stream_id)
        future = self.calls.pop(stream_id, None)
        if future is not None and not future.done():
            future.set_exception(exc)

    def _terminated(self, reason: str) -> None:
        self.stop_timers()
        if not self.ended.done():
            self.ended.set_result(reason)
        for stream_id in list(self.calls):
            self._fail(stream_id, RemoteError(ErrorCode.UNAVAILABLE,
                                              f"QUIC connection closed: {reason}"))
        if self._transport is not None:
            self._transport.close()


class AsyncQuicClient:
    """``async with AsyncQuicClient("127.0.0.1:7500", "certs/ca.pem") as c:
    await c.call("counter/alice", "incr", {"n": 5})``"""

    def __init__(self, address: str, ca_file: str, cert: str | None = None,
                 key: str | None = None, timeout_s: float = 5.0,
                 in_flight_max: int = IN_FLIGHT_MAX):
        self.address = address
        self.timeout_s = timeout_s
        self._host, self._port = split_endpoint(address)
        self._config = dial_configuration(ca_file, cert, key)
        self._config.server_name = self._host
        self._req = _Requests()
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight_max = in_flight_max

    async def __aenter__(self) -> "AsyncQuicClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        """Make the connection unless there is one; QuicConnectError when it fails."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
            self._slots = asyncio.Semaphore(self._in_flight_max)
        async with self._connecting:
            conn = self._conn
            if conn is not None and not conn.stale():
                return
            if conn is not None and not conn.calls:  # idle: the node may have dropped it
                conn.close()
                conn._terminated("idle: made again")
            self._conn = await self._dial()

    async def _dial(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            sock = await connected_socket(loop, self._host, self._port)
        except OSError as exc:
            raise QuicConnectError(f"cannot reach {self.address}: {exc}") from exc
        addr = sock.getpeername()
        quic = QuicConnection(configuration=self._config)
        conn = _ClientConnection(quic, addr)
        UdpEndpoint(loop, sock, conn)
        await asyncio.wait((conn.ready, conn.ended), timeout=self.timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        if conn.ready.done() and not conn.ended.done():
            return conn
        if conn.ended.done():
            raise QuicConnectError(f"QUIC handshake with {self.address} failed: "
                                   f"{conn.ended.result()}")
        conn.close()
        conn._terminated("no handshake")
        raise QuicConnectError(f"no QUIC handshake with {self.address} within "
                               f"{self.timeout_s} s")

    async def call(self, agent: str, type: str, data: Any = None, *,
                   timeout_s: float | None = None, **options: Any) -> Any:
        """Send a request and return the reply's data; raises RemoteError or CallTimeout."""
        check_agent(agent, "agent")
        check_type(type)
        rid = self._req.next_id()
        payload = self._req.encode(rid, type, agent, data, wire.MODE_CALL, options)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        await self.connect()
        async with self._slots:
            conn = self._conn
            stream_id = conn.open(payload, unidirectional=False)
            future = conn.calls[stream_id] = asyncio.get_running_loop().create_future()
            try:
                raw = await asyncio.wait_for(future, timeout_s)
            except asyncio.TimeoutError:
                conn.abandon(stream_id)
                raise CallTimeout(f"no reply to {type} for {agent!r} within {timeout_s} s") \
                    from None
        envelope = _decode(raw)
        if envelope is None or envelope.get("re") != rid:
            raise RemoteError(ErrorCode.INTERNAL, "the node's answer is not a reply to "
                              "this request", rid)
        return _result(envelope)

    async def send(self, agent: str, type: str, data: Any = None, **options: Any) -> None:
        """One-way: hand the message to the connection; no reply, errors counted at the node."""
        check_agent(agent, "agent")
        check_type(type)
        payload = self._req.encode(self._req.next_id(), type, agent, data, wire.MODE_SEND,
                                   options)
        await self.connect()
        self._conn.open(payload, unidirectional=True)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.close()
            await asyncio.wait((conn.ended,), timeout=1.0)  # the close leaves, is drained
            conn._terminated("closed by the client")


class QuicClient:
    """Blocking client: ``with QuicClient("127.0.0.1:7500", "certs/ca.pem") as c:
    c.call("counter/alice", "incr", {"n": 5})``.  Connects in the constructor."""

    def __init__(self, address: str, ca_file: str, cert: str | None = None,
                 key: str | None = None, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="quic-client", daemon=True)
        self._thread.start()
        self._client = AsyncQuicClient(address, ca_file, cert, key, timeout_s)
        try:
            self._wait(self._client.connect(), timeout_s)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "QuicClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, agent: str, type: str, data: Any = None, *,
             timeout_s: float | None = None, **options: Any) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return self._wait(self._client.call(agent, type, data, timeout_s=timeout_s,
                                            **options), timeout_s)

    def send(self, agent: str, type: str, data: Any = None, **options: Any) -> None:
        self._wait(self._client.send(agent, type, data, **options), self.timeout_s)

    def _wait(self, coro: Any, timeout_s: float) -> Any:
        """Run ``coro`` on the client's loop; the coroutine bounds its own time, and
        this waits a little longer (a handshake's own timeout, then the call's)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(2 * timeout_s + 1.0)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._client.close(),
                                                 self._loop).result(2.0)
            except Exception:  # closing is best effort: the loop stops either way
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        self._loop.close()
