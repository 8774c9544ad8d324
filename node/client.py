"""Python client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak wire protocol v1 (docs/PROTOCOL.md) over one ZeroMQ DEALER socket
connected to any node; the node routes each request to the agent's owner.

``AsyncClient`` keeps many calls in flight on one socket: requests are queued
and flushed in one batch per loop iteration, and replies are read by draining
the socket until ``zmq.Again`` when its (edge-triggered) FD fires, then matched
to their futures by ``re``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from typing import Any, Awaitable

import msgpack
import zmq

from protocols import wire

__all__ = ["Client", "AsyncClient", "RemoteError", "CallTimeout", "endpoint"]

IN_FLIGHT_MAX = 10_000    # calls one AsyncClient keeps outstanding before call() waits
OUTBOX_MAX = 100_000      # encoded requests waiting for the socket before send() waits
CLOSE_LINGER_MS = 1000    # time unsent messages get to leave after close()
READ_BATCH_MAX = 1024     # replies read per wake-up before yielding to the loop
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost on the hot path


class RemoteError(Exception):
    """The node answered with an error envelope."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class CallTimeout(TimeoutError):
    """No reply within the call's timeout."""


def endpoint(address: str) -> str:
    """'host:port' or 'tcp://host:port' -> 'tcp://host:port'."""
    return address if "://" in address else f"tcp://{address}"


def _new_socket(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
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


def _result(envelope: Any) -> Any:
    """A decoded reply envelope -> its data, or raise RemoteError."""
    if envelope.get("type") == wire.TYPE_ERROR:
        err = envelope.get("data") or {}
        raise RemoteError(err.get("code", wire.ErrorCode.INTERNAL),
                          err.get("message", ""), envelope.get("re"))
    return envelope.get("data")


class _Requests:
    """Envelope building shared by both clients."""

    def __init__(self) -> None:
        self.source = f"client-{os.getpid()}-{os.urandom(4).hex()}"
        self._ids = itertools.count(1)

    def next_id(self) -> str:
        return str(next(self._ids))

    def encode(self, rid: str, mtype: str, subject: str | None, data: Any, mode: str,
               options: dict) -> bytes:
        return wire.encode(wire.request(rid, mtype, subject, data, mode, **options))


class Client:
    """Blocking client.  One call at a time; safe to keep open for many calls.

    ``with Client("127.0.0.1:7400") as c: c.call("counter/alice", "incr", {"n": 5})``
    """

    def __init__(self, address: str, timeout_s: float = 5.0, *, context: zmq.Context | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = _new_socket(self._ctx, address)
        self._req = _Requests()

    def call(self, agent: str, type: str, data: Any = None, *, timeout_s: float | None = None,
             **options: Any) -> Any:
        """Send a request and return the reply data; raises RemoteError or CallTimeout."""
        return self._call(type, agent, data, timeout_s, options)

    def _call(self, mtype: str, subject: str | None, data: Any, timeout_s: float | None,
              options: dict) -> Any:
        rid = self._req.next_id()
        self._sock.send(self._req.encode(rid, mtype, subject, data, wire.MODE_CALL, options))
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        deadline = _Deadline(timeout_ms)
        while True:
            remaining = deadline.remaining_ms()
            if remaining <= 0 or not self._sock.poll(remaining, zmq.POLLIN):
                raise CallTimeout(f"no reply to {mtype} for {subject!r} within {timeout_ms} ms")
            envelope = _decode(self._sock.recv())
            if envelope is None:
                continue
            re = envelope.get("re")
            if re == rid or (re is None and envelope.get("type") == wire.TYPE_ERROR):
                return _result(envelope)
            # else: a late reply to an earlier call that timed out; drop it

    def send(self, agent: str, type: str, data: Any = None, **options: Any) -> None:
        """One-way message: no reply; errors are counted at the node."""
        rid = self._req.next_id()
        self._sock.send(self._req.encode(rid, type, agent, data, wire.MODE_SEND, options))

    def publish(self, group: str, type: str, data: Any = None, **options: Any) -> None:
        """One-way message to every agent that joined ``group``, on every node."""
        rid = self._req.next_id()
        self._sock.send(self._req.encode(rid, type, group, data, wire.MODE_PUBLISH, options))

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
        return int((self._end - time.monotonic()) * 1000)


class AsyncClient:
    """asyncio client: the same methods as ``Client``, as coroutines.

    Many calls may be in flight at once (up to ``in_flight_max``; further calls
    wait for a slot); replies are matched by request id.  Create and use it
    inside one running event loop.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, *,
                 context: zmq.Context | None = None, in_flight_max: int = IN_FLIGHT_MAX):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = _new_socket(self._ctx, address)
        self._req = _Requests()
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, asyncio.Future] = {}
        # (deadline, rid, description) in deadline order: calls with the default
        # timeout are appended in order, so one sweep timer replaces a timer per call.
        self._deadlines: deque[tuple[float, str, tuple]] = deque()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}  # calls with their own timeout
        self._outbox: deque[bytes] = deque()
        self._in_flight_max = in_flight_max
        self._slot_waiters: deque[asyncio.Future] = deque()
        self._flush_scheduled = False
        self._closed = False
        self._loop.add_reader(self._sock.FD, self._on_readable)

    # Public API ------------------------------------------------------------

    def call(self, agent: str, type: str, data: Any = None, *,
             timeout_s: float | None = None, **options: Any) -> Awaitable[Any]:
        """``await c.call(...)``: the reply data, or RemoteError / CallTimeout.

        A plain function returning the coroutine: one coroutine per call, not two.
        """
        return self._call(type, agent, data, timeout_s, options)

    async def send(self, agent: str, type: str, data: Any = None, **options: Any) -> None:
        """One-way message: no reply; errors are counted at the node."""
        await self._outbox_room()
        self._enqueue(self._req.encode(self._req.next_id(), type, agent, data,
                                       wire.MODE_SEND, options))

    async def publish(self, group: str, type: str, data: Any = None, **options: Any) -> None:
        """One-way message to every agent that joined ``group``, on every node."""
        await self._outbox_room()
        self._enqueue(self._req.encode(self._req.next_id(), type, group, data,
                                       wire.MODE_PUBLISH, options))

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

    async def close(self) -> None:
        self._shutdown()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._shutdown()

    # Calls -------------------------------------------------------------------

    async def _call(self, mtype: str, subject: str | None, data: Any, timeout_s: float | None,
                    options: dict) -> Any:
        if self._closed:
            raise RuntimeError("client is closed")
        if len(self._pending) >= self._in_flight_max:
            await self._wait_for_slot()
        rid = self._req.next_id()
        payload = self._req.encode(rid, mtype, subject, data, wire.MODE_CALL, options)
        future = self._loop.create_future()
        self._pending[rid] = future
        self._track_deadline(rid, mtype, subject, timeout_s)
        self._enqueue(payload)
        try:
            envelope = await future
        finally:
            self._pending.pop(rid, None)  # cancelled callers free their slot too
            timer = self._timers.pop(rid, None) if self._timers else None
            if timer is not None:
                timer.cancel()
            if self._slot_waiters:
                self._release_slot()
        return _result(envelope)

    async def _wait_for_slot(self) -> None:
        while len(self._pending) >= self._in_flight_max:
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._release_slot()  # pass the wake-up on rather than lose it
                raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

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
        future = self._pending.pop(rid, None)
        if future is not None and not future.done():
            mtype, subject = what
            future.set_exception(
                CallTimeout(f"no reply to {mtype} for {subject!r} within {timeout_s} s"))

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
        for _ in range(READ_BATCH_MAX):
            try:
                raw = recv(_NOBLOCK)
            except zmq.Again:
                return
            envelope = decode(raw)
            if envelope is None:
                continue  # not a reply envelope: nothing to match it to
            re = envelope.get("re")
            future = pending.pop(re, None) if type(re) is str else None
            if future is not None and not future.done():
                future.set_result(envelope)
        self._loop.call_soon(self._on_readable)  # more may wait; let others run first

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._flush()  # one-way messages queued in this loop turn still go out
        self._closed = True
        self._loop.remove_reader(self._sock.FD)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("client closed"))
        self._pending.clear()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("client closed"))
        self._sock.close(linger=CLOSE_LINGER_MS)


def _sweep_period_s(timeout_s: float) -> float:
    return min(0.1, max(0.005, timeout_s / 20))
