"""Byte budgets per TCP connection of the ROUTER, which libzmq cannot enforce.

libzmq buffers a multipart message until its last frame arrives and never shows
the application a part of it; ``MAXMSGSIZE`` bounds one frame and the high-water
marks count whole messages.  So one connection sending frames with the MORE flag
and never a last frame grew a node from 66 MB to 2.1 GB in 1.7 s, and a client
that never reads its replies held gigabytes in the ROUTER's send pipe.

The guard measures what libzmq hides, per connection, from two sides:

- the kernel's count of bytes received on, and acknowledged by the peer of, each
  TCP connection (``TCP_INFO``: ``tcpi_bytes_received``, ``tcpi_bytes_acked``);
- the node's own count of bytes it read from, and wrote to, each connection
  (messages name their connection through ``ZMQ_SRCFD``; replies through the
  routing id of the request that came from it), with ZMTP framing added back.

Their difference is what libzmq holds for that connection: unread input (an
unfinished multipart message included) and unacknowledged output.  A connection
over its budget is shut down at the TCP level; libzmq sees the socket close,
drops its pipes and frees the memory, which ``malloc_trim`` then returns to the
system.  The socket monitor tells which descriptors are the ROUTER's connections,
so no other socket of the process is ever touched.

Checks are cheap (one ``getsockopt``, about 3 us, per connection) and run on a
timer: each tick checks the next ``per_tick`` connections in turn, so with few
connections each is looked at every tick, and with many the cost per tick stays
bounded; a jump in resident memory checks them all at once.  (Memory alone is a
poor trigger: buffers freed by one cut are reused by the next attack without the
resident size moving; and ``/proc/self/io`` does not count socket reads.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

_TCP_INFO_LEN = 160
_BYTES_ACKED_AT = 120      # struct tcp_info: __u64 tcpi_bytes_acked (Linux >= 4.1)
_BYTES_RECEIVED_AT = 128   # struct tcp_info: __u64 tcpi_bytes_received
_U64 = struct.Struct("=Q")
TRIM_TICKS = 5             # ticks after a cut that return freed memory (malloc_trim)
HANDSHAKE_BYTES = 512      # ZMTP greeting and READY command with metadata, generously
CURVE_HANDSHAKE_BYTES = 1024  # CURVE's HELLO and INITIATE (with metadata) instead, generously
# CURVE sends each frame as a MESSAGE command: 8 bytes of name, a flags byte, an
# 8-byte nonce and a 16-byte tag around the frame's bytes (RFC 26).
CURVE_FRAME_OVERHEAD = 33
_PAGE = os.sysconf("SC_PAGE_SIZE")
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_GONE = (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED)


def frame_wire_bytes(size: int, overhead: int = 0) -> int:
    """Bytes a ZMTP 3 frame of ``size`` takes on the wire: a short header up to 255;
    ``overhead``: what the security mechanism adds to each frame (CURVE: 33)."""
    size += overhead
    return size + (2 if size <= 255 else 9)


class _Conn:
    __slots__ = ("read", "written", "identity", "unread")

    def __init__(self, handshake: int) -> None:
        self.read = handshake           # bytes accounted for on the way in
        self.written = 0                # bytes the node wrote to it (replies)
        self.identity: bytes | None = None
        self.unread = 0                 # as of its last check


class ConnectionGuard:
    """Byte and count budgets for the connections of one ROUTER socket."""

    def __init__(self, router: zmq.Socket, *, metrics: Any, log: Any, connections_max: int,
                 conn_inbound_bytes_max: int, inbound_bytes_max: int,
                 reply_bytes_max: int, curve: bool = False):
        # Under CURVE every frame is longer on the wire, and the handshake too: counted
        # as plain ZMTP, a healthy connection's bytes would look unread and grow
        # until the guard cut it (seen after ~250k forwards on a peer link).
        self.frame_overhead = CURVE_FRAME_OVERHEAD if curve else 0
        self._handshake = CURVE_HANDSHAKE_BYTES if curve else HANDSHAKE_BYTES
        self._metrics = metrics
        self._log = log
        self._connections_max = connections_max
        self._conn_in_max = conn_inbound_bytes_max
        self._in_max = inbound_bytes_max
        self._reply_max = reply_bytes_max
        self._conns: dict[int, _Conn] = {}
        self._by_identity: dict[bytes, int] = {}
        self._monitor = router.get_monitor_socket(_EVENTS)
        self._last_rss = 0
        self.rss = 0          # resident bytes of the process, as of the last tick
        self._cursor = 0
        self._trims_due = 0
        self.cut_total = 0

    def close(self) -> None:
        self._monitor.close(linger=0)

    # --- the hot path: plain dict work ---------------------------------------------

    def read(self, fd: int, frames: list[bytes]) -> int:
        """The node read one message (routing id first) from connection ``fd``;
        returns its size on the wire."""
        total, overhead = 0, self.frame_overhead
        for frame in frames[1:]:  # the routing id is added by the ROUTER, not sent
            size = len(frame) + overhead
            total += size + (2 if size <= 255 else 9)
        conn = self._conns.get(fd)
        if conn is None:
            # The monitor's accept event may still be on its way: take it now, so
            # the connection's first messages already name its routing id.
            self._take_events()
            conn = self._conns.get(fd)
            if conn is None:
                return total
        identity = frames[0]
        if conn.identity is not None and conn.identity != identity:
            # Another routing id on this descriptor: the old connection closed and a
            # new one took its number; the monitor's events say so before we count.
            self._take_events()
            conn = self._conns.get(fd)
            if conn is None:
                return total
        conn.read += total
        if conn.identity != identity:
            conn.identity = identity
            if len(self._by_identity) >= 4 * self._connections_max:
                self._by_identity.clear()  # stale ids of gone connections; rebuilt as used
            self._by_identity[identity] = fd
        return total

    def wrote(self, identity: bytes, nbytes: int) -> None:
        """The node queued ``nbytes`` on the wire for the client with this routing id."""
        fd = self._by_identity.get(identity)
        if fd is not None:
            conn = self._conns.get(fd)
            if conn is not None:
                conn.written += nbytes

    # --- the timer -----------------------------------------------------------------

    def tick(self, per_tick: int, rss_jump_bytes: int) -> int:
        """Check the next ``per_tick`` connections (all of them if memory jumped by
        ``rss_jump_bytes``); returns how many connections were cut."""
        self._take_events()
        if self._trims_due:
            self._trims_due -= 1
            trim_malloc()
        self.rss = rss_bytes()
        if self.rss - self._last_rss >= rss_jump_bytes:
            return self.scan()
        fds = list(self._conns)
        if len(fds) > per_tick:
            start = self._cursor % len(fds)
            self._cursor = start + per_tick
            fds = (fds[start:] + fds[:start])[:per_tick]
        return self._check(fds, whole=False)

    def scan(self) -> int:
        """Apply every budget, the node-wide one included; returns connections cut."""
        self._take_events()
        return self._check(list(self._conns), whole=True)

    def _check(self, fds: list[int], whole: bool) -> int:
        cut = 0
        for fd in fds:
            conn = self._conns[fd]
            counters = _tcp_counters(fd)
            if counters is None:  # not a TCP socket any more: closed under us
                self._forget(fd)
                continue
            received, acked = counters
            conn.unread = received - conn.read
            unacked = conn.written - acked
            if conn.unread > self._conn_in_max:
                cut += self._cut(fd, "conn_inbound_bytes", conn.unread)
            elif unacked > self._reply_max:
                cut += self._cut(fd, "client_reply_bytes", unacked)
        if whole:  # the node-wide budget: largest backlogs first
            backlog = sorted(((c.unread, fd) for fd, c in self._conns.items()), reverse=True)
            total = sum(unread for unread, _ in backlog)
            for unread, fd in backlog:
                if total <= self._in_max or unread <= 0:
                    break
                cut += self._cut(fd, "inbound_bytes", unread)
                total -= unread
        if cut:
            # libzmq frees a cut connection's buffers on its own threads a moment
            # later; give them back to the system on the next few ticks.
            self._trims_due = TRIM_TICKS
        self._last_rss = self.rss = rss_bytes()
        return cut

    def _take_events(self) -> None:
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            fd = int(event["value"])  # pyzmq hands the descriptor over as an Event flag
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._forget(fd)  # a reused descriptor starts from nothing
                if len(self._conns) >= self._connections_max:
                    self._shutdown(fd)
                    self._count("connections", f"{len(self._conns)} connections")
                else:
                    self._conns[fd] = _Conn(self._handshake)
            elif event["event"] in _GONE:
                self._forget(fd)

    def _forget(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is not None and conn.identity is not None:
            if self._by_identity.get(conn.identity) == fd:
                del self._by_identity[conn.identity]

    def _cut(self, fd: int, reason: str, nbytes: int) -> int:
        self._shutdown(fd)
        self._forget(fd)
        self._count(reason, f"{nbytes} bytes")
        return 1

    def _count(self, reason: str, amount: str) -> None:
        self.cut_total += 1
        self._metrics.limited(reason)
        self._log.warning("connection_cut", reason=reason, amount=amount)

    @staticmethod
    def _shutdown(fd: int) -> None:
        """End the TCP connection under libzmq's feet; libzmq then closes it itself."""
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libzmq's to close


def _tcp_counters(fd: int) -> tuple[int, int] | None:
    """(bytes received, bytes acknowledged by the peer) of a TCP socket, or None."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.type != socket.SOCK_STREAM:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _BYTES_RECEIVED_AT + 8:
        return None
    return _U64.unpack_from(info, _BYTES_RECEIVED_AT)[0], _U64.unpack_from(info, _BYTES_ACKED_AT)[0]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_malloc() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim), if we can."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
