"""ZeroMQ peer links: one DEALER per peer address, outbound only, with a bounded queue.

Each DEALER has ``IMMEDIATE`` set, so a send to a peer that is not connected fails
at once instead of queueing inside libzmq without a bound we can see; such sends
wait in our own bounded queue until the link is up or their deadline passes, and
then the caller is told (``on_give_up``) so it can answer ``unavailable`` rather
than let a client time out.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import zmq

from protocols.wire import ErrorCode

from .base import OnGiveUp

PEER_QUEUE_MAX = 10_000         # queued sends per peer while its link is down
PEER_QUEUE_DEADLINE_S = 1.0     # how long a queued send may wait for the link
LINKS_MAX = 1024 + 64           # members (MEMBERS_MAX) and seeds
STRANGER_LINKS_MAX = 16         # links to addresses no member has (see connect)


class _PeerLink:
    __slots__ = ("address", "socket", "queue", "sent", "failed", "stranger")

    def __init__(self, address: str, socket: zmq.Socket, stranger: bool):
        self.address = address
        self.socket = socket
        self.queue: deque = deque()
        self.sent = 0
        self.failed = 0
        self.stranger = stranger  # no member has this address (yet)


class PeerLinks:
    """The DEALERs of one node, keyed by the address they dial."""

    def __init__(self, context: zmq.Context, *, peer_hwm: int, metrics,
                 queue_deadline_s: float = PEER_QUEUE_DEADLINE_S,
                 dial: Callable[[zmq.Socket, str], bool] | None = None):
        self._ctx = context
        self._dial = dial  # prepares a socket to reach an address (CURVE keys), or says no
        self._peer_hwm = peer_hwm
        self._metrics = metrics
        self._deadline_s = queue_deadline_s
        self._links: dict[str, _PeerLink] = {}
        self._strangers = 0  # links with stranger set
        self._queued = 0  # sends waiting in all links' queues

    def close(self, linger_ms: int, reason: str) -> None:
        for link in list(self._links.values()):
            self._give_up_all(link, reason)
            link.socket.close(linger=linger_ms)
        self._links.clear()
        self._strangers = 0

    def connect(self, address: str, stranger: bool = False) -> _PeerLink | None:
        """The link to ``address``, created on first use; None if it cannot be made.

        A ``stranger`` link (an address a gossip message named, that no member
        has) comes from a small separate budget, so made-up addresses can never
        take the links members need.  A member's use makes it a normal link.
        """
        link = self._links.get(address)
        if link is not None:
            if link.stranger and not stranger:
                link.stranger = False
                self._strangers -= 1
            return link
        if stranger and self._strangers >= STRANGER_LINKS_MAX:
            self._metrics.limited("stranger_links")
            return None
        if not stranger and len(self._links) - self._strangers >= LINKS_MAX:
            self._metrics.limited("peer_links")
            return None
        try:
            sock = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError:  # out of sockets or file descriptors: refuse, never crash
            self._metrics.limited("sockets")
            return None
        sock.setsockopt(zmq.SNDHWM, self._peer_hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._dial is not None and not self._dial(sock, address):
            sock.close(linger=0)
            return None
        try:
            sock.connect(address)
        except zmq.ZMQError:  # an address a peer made up; never let it reach the loop
            sock.close(linger=0)
            return None
        link = self._links[address] = _PeerLink(address, sock, stranger)
        self._strangers += stranger
        return link

    def retain(self, addresses: set[str]) -> None:
        """Close links to addresses outside ``addresses``."""
        for address in [a for a in self._links if a not in addresses]:
            self._close_link(self._links[address], f"peer {address} left the member view")

    def drop(self, address: str, reason: str) -> None:
        """Close the link to ``address`` with what it holds (libzmq's pipe and our
        queue); a later send to the address opens a fresh one."""
        link = self._links.get(address)
        if link is not None:
            self._close_link(link, reason)

    def _close_link(self, link: _PeerLink, reason: str) -> None:
        del self._links[link.address]
        self._strangers -= link.stranger
        self._give_up_all(link, reason)
        link.socket.close(linger=0)

    def send(self, address: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0, stranger: bool = False) -> bool:
        link = self.connect(address, stranger)
        if link is None:
            self._give_up(on_give_up, ErrorCode.UNAVAILABLE, f"cannot open a link to {address!r}")
            return False
        if not link.queue and self._try_send(link, frames):
            return True
        if len(link.queue) >= PEER_QUEUE_MAX:
            self._give_up(on_give_up, ErrorCode.OVERLOADED, f"queue to {address} is full")
            return False
        # A link connects asynchronously: the first messages to a new peer (the
        # gossip that announces it, say) wait here for it rather than be lost.
        link.queue.append((now + self._deadline_s, frames, on_give_up))
        self._queued += 1
        return True

    def _give_up(self, on_give_up: OnGiveUp | None, code: str, reason: str) -> None:
        self._metrics.peer_send_failed()
        if on_give_up is not None:
            on_give_up(code, reason)

    def _try_send(self, link: _PeerLink, frames: Sequence[bytes]) -> bool:
        try:
            link.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:  # anything else: treat as not sent; the deadline decides
            self._metrics.peer_send_failed()
            return False
        link.sent += 1
        return True

    @property
    def has_queued(self) -> bool:
        return self._queued > 0

    def retry(self, now: float) -> None:
        """Send what waited for a link; give up on what waited past its deadline."""
        for link in list(self._links.values()):
            queue = link.queue
            while queue:
                deadline, frames, on_give_up = queue[0]
                if self._try_send(link, frames):
                    queue.popleft()
                    self._queued -= 1
                elif deadline <= now:
                    queue.popleft()
                    self._queued -= 1
                    link.failed += 1
                    self._give_up(on_give_up, ErrorCode.UNAVAILABLE,
                                  f"peer {link.address} unreachable")
                else:
                    break

    def _give_up_all(self, link: _PeerLink, reason: str) -> None:
        while link.queue:
            _, _, on_give_up = link.queue.popleft()
            self._queued -= 1
            self._give_up(on_give_up, ErrorCode.UNAVAILABLE, reason)

    def health(self) -> dict:
        links = list(self._links.values())  # one step: the metrics thread calls this
        return {
            "peers": len(links),
            "queued": sum(len(link.queue) for link in links),
            "send_failures": sum(link.failed for link in links),
        }
