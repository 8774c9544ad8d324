"""Routing: where a request goes, and every forward in flight answered exactly once.

``route(subject, ttl, hops)`` decides per request: the owner's node id (this node's
own id for a local agent, another for a forward) or a ``Refusal`` (hop limit
reached, owner not a member).  It is the hot path, so it returns plain data and
builds no effect object; the ring lookup is cached.

A forward of a call is recorded with ``forward_started``, which returns its token:
eight bytes of the node's random key and eight of a counter.  The owner echoes the
token in its reply, so a reply is matched to its call by token alone, and a reply
with a token this node never issued (or already answered) is recognisably forged
or late.  Every recorded forward ends exactly once, by the first of:

- ``reply_arrived(token)``: the owner answered; returns the pending forward
  (the caller sends the reply to its handle);
- ``send_failed(token, code, message)``: the transport gave the send up;
- ``tick(now)`` past its deadline (``forward_timeout_s``: the handler timeout plus
  a margin for the hops): answered ``timeout``, so a call whose owner went silent
  is answered by the entry node, not left to the client's clock; the owner is named
  in an ``Unresponsive`` effect, so the node can drop what still waits for it;
- ``members_changed(ids)`` without its owner: answered ``unavailable``;
- ``stop()``: answered ``unavailable`` (the node is shutting down).

Each of those returns ``Fail`` effects for the forwards it ends; the table keeps no
entry afterwards, so a late reply finds nothing and is counted, not delivered twice.
The table is bounded in count (``forwards_max``) and in envelope bytes
(``forward_bytes_max``); past either a new forward is refused ``overloaded``.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

from core_cy import HashRing

from .effects import Fail, Unresponsive
from .wire import ErrorCode

OWNER_CACHE_MAX = 65_536   # ring lookups kept; bounded (a cache per agent would not be)
FORWARDS_MAX = 100_000     # forwards in flight at once
FORWARD_BYTES_MAX = 256 << 20  # envelope bytes of forwards in flight at once
RING_REBUILD_CHANGES = 8   # more members changing at once than this: build the ring anew
TOKEN_BYTES = 16
_TOKEN = struct.Struct(">8sQ")


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


class Pending:
    """One forward in flight (slotted: one per forwarded call)."""

    __slots__ = ("token", "handle", "request_id", "mtype", "owner", "deadline",
                 "arrived", "forwarded_at", "nbytes")

    def __init__(self, token: bytes, handle: Any, request_id: str, mtype: str, owner: str,
                 deadline: float, arrived: float, forwarded_at: float, nbytes: int = 0):
        self.nbytes = nbytes
        self.token = token
        self.handle = handle
        self.request_id = request_id
        self.mtype = mtype
        self.owner = owner
        self.deadline = deadline
        self.arrived = arrived            # when the request reached this node
        self.forwarded_at = forwarded_at  # when the forward left


class Router:
    """The routing machine of one node (see the module docstring)."""

    def __init__(self, node_id: str, key: bytes, *, max_hops: int, forward_timeout_s: float,
                 vnodes: int = 160, forwards_max: int = FORWARDS_MAX,
                 forward_bytes_max: int = FORWARD_BYTES_MAX):
        if len(key) != 8:
            raise ValueError("the token key is 8 bytes (random, from the node)")
        self.node_id = node_id
        self._key = key
        self._max_hops = max_hops
        self._timeout_s = forward_timeout_s
        self._forwards_max = forwards_max
        self._bytes_max = forward_bytes_max
        self._bytes = 0  # envelope bytes of the forwards in flight
        self._ring = HashRing((node_id,), vnodes=vnodes)
        self._members: frozenset[str] = frozenset((node_id,))
        self._cache: dict[str, str] = {}
        # One timeout for all, so insertion order is deadline order: the oldest is first.
        self._pending: OrderedDict[bytes, Pending] = OrderedDict()
        # Forwards given longer (a piece of a pipeline or scatter with a deadline of its
        # own): kept apart, in deadline order on a heap, so the common case stays a queue.
        self._long: dict[bytes, Pending] = {}
        self._long_heap: list[tuple[float, bytes]] = []
        self._counter = itertools.count(1)
        self._minority: Refusal | None = None  # the refusal while on a split's minority side
        self.late_replies = 0  # replies whose forward had already ended (or never was)

    # --- the hot path ---------------------------------------------------------------

    def route(self, subject: str, ttl: int | None, hops: int) -> str | Refusal:
        """The owner's node id for ``subject``, or why the request cannot go there."""
        if self._minority is not None:
            return self._minority
        owner = self._cache.get(subject)
        if owner is None:
            owner = self._owner(subject)
        if owner == self.node_id:
            return owner
        limit = self._max_hops if ttl is None else ttl
        if hops >= limit:
            return Refusal(ErrorCode.UNAVAILABLE, f"owner {owner!r} is beyond the hop limit ({limit})")
        return owner

    def follow(self, subject: str, moved_to: str, ttl: int | None, hops: int) -> str | Refusal:
        """A request for an agent this node handed to ``moved_to`` (whose ring is
        ahead of ours) follows it, as a forward within the hop limit."""
        limit = self._max_hops if ttl is None else ttl
        if hops >= limit:
            return Refusal(ErrorCode.UNAVAILABLE, f"{subject!r} is moving to {moved_to!r}, "
                                                  f"beyond the hop limit ({limit})")
        return moved_to

    def _owner(self, subject: str) -> str:
        if len(self._cache) >= OWNER_CACHE_MAX:
            self._cache = {}
        owner = self._cache[subject] = self._ring.owner(subject)
        return owner

    # --- members ---------------------------------------------------------------------

    def members_changed(self, node_ids: Iterable[str],
                        reachable: Iterable[str] | None = None) -> list:
        """Rebuild the ring; forwards to owners that left are answered ``unavailable``.

        The ring is ``node_ids``: this node too, unless it is leaving (then every
        request is forwarded to the new owners); never empty.  ``reachable`` (default
        the ring) are the nodes that still answer forwards: one leaving gracefully
        is off the ring but answers what it was sent (it forwards it on)."""
        wanted = frozenset(node_ids) or frozenset((self.node_id,))
        current = set(self._ring.nodes)
        if len(wanted ^ current) > RING_REBUILD_CHANGES:
            # Many at once (a join of a large cluster): one build merges every node's
            # points together; adding them one by one re-merges the ring each time.
            self._ring = HashRing(tuple(sorted(wanted)), vnodes=self._ring.vnodes)
        else:
            for node_id in sorted(current - wanted):
                self._ring.remove(node_id)
            for node_id in sorted(wanted - current):
                self._ring.add(node_id)
        self._cache = {}
        self._members = wanted
        answering = wanted if reachable is None else wanted | frozenset(reachable)
        gone = [p for p in (*self._pending.values(), *self._long.values())
                if p.owner not in answering]
        return [self._end(p, ErrorCode.UNAVAILABLE, f"owner {p.owner!r} left the member view")
                for p in gone]

    def set_quorate(self, quorate: bool, reachable: int, reference: int) -> None:
        """The downing strategy's verdict (membership's ``QuorumChanged``): a node
        that may not own agents refuses every agent request ``unavailable`` rather
        than let two sides of a split own one agent."""
        self._minority = None if quorate else Refusal(
            ErrorCode.UNAVAILABLE,
            f"this node is on the minority side of a split ({reachable} of {reference} "
            f"members reachable): it serves no agents until the cluster heals")

    @property
    def quorate(self) -> bool:
        return self._minority is None

    @property
    def ring(self) -> HashRing:
        return self._ring

    def is_member(self, node_id: str) -> bool:
        return node_id in self._members

    # --- forwards in flight -----------------------------------------------------------

    def forward_started(self, handle: Any, request_id: str, mtype: str, owner: str,
                        now: float, arrived: float, nbytes: int = 0,
                        timeout_s: float | None = None) -> bytes | Refusal:
        """Record a forwarded call of ``nbytes``; its token, or a Refusal when the
        table is full (in count or in bytes).  ``timeout_s`` longer than the forward
        timeout gives it that long (a pipeline's or scatter's own deadline)."""
        if len(self._pending) + len(self._long) >= self._forwards_max:
            return Refusal(ErrorCode.OVERLOADED,
                           f"{self._forwards_max} forwards in flight on this node")
        if self._bytes + nbytes > self._bytes_max:
            return Refusal(ErrorCode.OVERLOADED,
                           f"{self._bytes} bytes of forwards in flight on this node")
        token = _TOKEN.pack(self._key, next(self._counter))
        long = timeout_s is not None and timeout_s > self._timeout_s
        pending = Pending(token, handle, request_id, mtype, owner,
                          now + (timeout_s if long else self._timeout_s), arrived, now, nbytes)
        if long:
            self._long[token] = pending
            heap = self._long_heap
            if len(heap) > 2 * len(self._long) + 1024:
                # Answered forwards leave their heap entry behind until its deadline
                # (up to 10 minutes): drop them now, so the heap stays within twice
                # what is in flight however fast forwards come and go.
                heap[:] = [e for e in heap if e[1] in self._long]
                heapq.heapify(heap)
            heapq.heappush(heap, (pending.deadline, token))
        else:
            self._pending[token] = pending
        self._bytes += nbytes
        return token

    def reply_arrived(self, token: bytes) -> Pending | None:
        """The owner answered: the pending forward, ended; None if it had already
        ended or was never ours (counted in ``late_replies``)."""
        pending = self._pending.pop(token, None) or self._long.pop(token, None)
        if pending is None:
            self.late_replies += 1
        else:
            self._bytes -= pending.nbytes
        return pending

    def send_failed(self, token: bytes, code: str, message: str) -> list:
        pending = self._pending.get(token) or self._long.get(token)
        return [] if pending is None else [self._end(pending, code, message)]

    def owns_token(self, token: bytes) -> bool:
        """True if ``token`` has this node's key (it may still have ended)."""
        return len(token) == TOKEN_BYTES and token[:8] == self._key

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._long)

    # --- the machine contract -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        heap = self._long_heap
        while heap and heap[0][1] not in self._long:
            heapq.heappop(heap)  # ended already
        first = next(iter(self._pending.values())).deadline if self._pending else None
        if heap and (first is None or heap[0][0] < first):
            return heap[0][0]
        return first

    def tick(self, now: float) -> list:
        """Answer ``timeout`` for every forward past its deadline (the oldest first),
        and name each owner that let one time out (``Unresponsive``)."""
        effects, silent = [], []
        pending = self._pending
        while pending:
            oldest = next(iter(pending.values()))
            if oldest.deadline > now:
                break
            effects.append(self._end(oldest, ErrorCode.TIMEOUT,
                                     f"owner {oldest.owner!r} did not answer within "
                                     f"{self._timeout_s:g} s"))
            if oldest.owner not in silent:
                silent.append(oldest.owner)
        heap = self._long_heap
        while heap and heap[0][0] <= now:
            _, token = heapq.heappop(heap)
            pending = self._long.get(token)
            if pending is not None:
                effects.append(self._end(pending, ErrorCode.TIMEOUT,
                                         f"owner {pending.owner!r} did not answer in time"))
        return effects + [Unresponsive(owner) for owner in silent]

    def receive(self, sender: str, message: Any, now: float) -> list:
        """Routing takes no peer messages of its own (replies come through
        ``reply_arrived``, which the hot path calls directly)."""
        raise TypeError("the router receives no peer messages")

    def stop(self) -> list:
        """The node is shutting down: every forward still in flight is answered."""
        return [self._end(p, ErrorCode.UNAVAILABLE, "node is shutting down")
                for p in [*self._pending.values(), *self._long.values()]]

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes

    def _end(self, pending: Pending, code: str, message: str) -> Fail:
        if self._pending.pop(pending.token, None) is None:
            del self._long[pending.token]
        self._bytes -= pending.nbytes
        return Fail(pending.handle, pending.request_id, code, message, pending.mtype)
