"""Per-message delivery guarantees: exactly-once dedup, causal order, retry backoff.

Pure (no clock reads, no I/O, no unseeded random): the node passes ``now`` in and
carries out what these objects decide.  docs/PROTOCOL.md section 2.4 is the
normative description of the guarantees; this module holds their state machines:

- ``AppliedIds``: the exactly-once dedup window, a CRDT kept inside an agent's
  replicated state, so a new owner after failover still knows which message ids the
  agent already applied and what it answered.
- ``CausalOrder``: a node's hold buffer for causal delivery (Birman, Schiper,
  Stephenson 1991): a message waits until every message it causally depends on was
  delivered to its agent.
- ``Backoff``: the retry schedule of an at_least_once / exactly_once client.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from .crdt.base import Crdt, CrdtError, U64_MAX
from .routing import Refusal
from .wire import ID_LEN_MAX, ErrorCode

__all__ = ["AppliedId", "AppliedIds", "IDS_MAX", "REPLY_KEEP_MAX", "CausalOrder", "Held",
           "DELIVER", "DUPLICATE", "HELD", "deliverable", "mark_delivered", "Backoff"]

# ---------------------------------------------------------------------------- exactly once

IDS_MAX = 1024              # message ids one agent remembers (the newest by (ts, id))
REPLY_KEEP_MAX = 64 * 1024  # a longer reply is remembered as None (the id still is)


class AppliedId(NamedTuple):
    """One applied message: when (``ts``, the node's clock in ns), its id, and the
    reply envelope the first run produced (None: longer than REPLY_KEEP_MAX)."""

    ts: int
    msg_id: str
    reply: bytes | None


def _rank(ts: int, reply: bytes | None) -> tuple:
    """Order of two entries for the same id: the later one wins, then the reply
    (None lowest), so every replica picks the same one."""
    return (ts, reply is not None, reply or b"")


class AppliedIds(Crdt):
    """The ids of messages an agent applied, with their replies: the exactly-once window.

    State: a ``floor`` (entries with ts below it are expired) and at most IDS_MAX
    entries, at most one per id.  The join of two states is

        f(A u B) = the IDS_MAX greatest entries, by (ts, id), of
                   { the greatest entry (by ts, then reply) of each id } among
                   the entries of A and B with ts >= max(floor A, floor B)

    That is a join (commutative, associative, idempotent) because each step only
    drops entries that would be dropped from any larger union too: an entry below
    the floor stays below the max of floors; an entry beaten for its id stays beaten
    when more entries come; an entry with IDS_MAX greater entries of other ids keeps
    them (each id's greatest entry only grows).  So f(f(X) u Y) = f(X u Y): order
    and repetition of merges do not matter, and replicas converge.

    Two entries for one id exist only when a handler ran twice (a failover before
    the first entry reached the new owner; ``consistency: quorum`` narrows that):
    the later one wins everywhere.  ``expire`` raises the floor, as a delta, so
    replicas expire the same entries and an expired entry never comes back from a
    peer that had not expired it yet.
    """

    TAG = "ids"
    __slots__ = ("_floor", "_entries", "_heap")

    def __init__(self) -> None:
        super().__init__()
        self._floor = 0
        self._entries: dict[str, tuple[int, bytes | None]] = {}
        # (ts, id) of entries, smallest first, for eviction; an item whose entry was
        # replaced or removed is stale and skipped (rebuilt when it grows too long).
        self._heap: list[tuple[int, str]] = []

    # -- mutations (each returns its delta) ------------------------------------
    def add(self, msg_id: str, reply_bytes: bytes | None, ts: int) -> "AppliedIds":
        """Remember that ``msg_id`` was applied at ``ts`` and answered ``reply_bytes``."""
        if type(msg_id) is not str or not 0 < len(msg_id) <= ID_LEN_MAX:
            raise CrdtError(f"message id must be a string of 1..{ID_LEN_MAX} characters")
        if type(ts) is not int or not 0 <= ts <= U64_MAX:
            raise CrdtError("ts must be an integer 0..2**64-1")
        if reply_bytes is not None and not isinstance(reply_bytes, bytes):
            raise CrdtError("reply must be bytes or None")
        if reply_bytes is not None and len(reply_bytes) > REPLY_KEEP_MAX:
            reply_bytes = None
        delta = AppliedIds()
        delta._put(ts, msg_id, reply_bytes)
        self._put(ts, msg_id, reply_bytes)
        return self._record(delta)

    def expire(self, before_ts: int) -> "AppliedIds":
        """Forget entries with ts < ``before_ts`` (the window's start), here and, via
        the returned delta, on every replica."""
        if type(before_ts) is not int or not 0 <= before_ts <= U64_MAX:
            raise CrdtError("before_ts must be an integer 0..2**64-1")
        delta = AppliedIds()
        delta._floor = before_ts
        self._raise_floor(before_ts)
        return self._record(delta)

    # -- reads -----------------------------------------------------------------
    def get(self, msg_id: str) -> AppliedId | None:
        entry = self._entries.get(msg_id)
        return None if entry is None else AppliedId(entry[0], msg_id, entry[1])

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def floor(self) -> int:
        return self._floor

    def value(self) -> dict[str, AppliedId]:
        return {msg_id: AppliedId(ts, msg_id, reply)
                for msg_id, (ts, reply) in self._entries.items()}

    # -- lattice ---------------------------------------------------------------
    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        assert isinstance(other, AppliedIds)
        self._raise_floor(other._floor)
        for msg_id, (ts, reply) in other._entries.items():
            self._put(ts, msg_id, reply)

    def _put(self, ts: int, msg_id: str, reply: bytes | None) -> None:
        """Join one entry in, keeping the invariants of the state (class docstring)."""
        if ts < self._floor:
            return
        old = self._entries.get(msg_id)
        if old is not None:
            if _rank(ts, reply) <= _rank(*old):
                return
        elif len(self._entries) >= IDS_MAX and (ts, msg_id) < self._lowest():
            return  # it would be the one evicted
        self._entries[msg_id] = (ts, reply)
        if old is None or old[0] != ts:
            heapq.heappush(self._heap, (ts, msg_id))
        if len(self._entries) > IDS_MAX:
            del self._entries[heapq.heappop(self._heap)[1]]  # _lowest() left it on top
        if len(self._heap) > 2 * IDS_MAX:
            self._rebuild_heap()

    def _lowest(self) -> tuple[int, str]:
        """The smallest (ts, id) held, with stale heap items dropped from the top."""
        heap, entries = self._heap, self._entries
        while True:
            ts, msg_id = heap[0]
            entry = entries.get(msg_id)
            if entry is not None and entry[0] == ts:
                return ts, msg_id
            heapq.heappop(heap)

    def _raise_floor(self, floor: int) -> None:
        if floor <= self._floor:
            return
        self._floor = floor
        self._entries = {msg_id: entry for msg_id, entry in self._entries.items()
                         if entry[0] >= floor}
        self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(ts, msg_id) for msg_id, (ts, _) in self._entries.items()]
        heapq.heapify(self._heap)

    # -- wire ------------------------------------------------------------------
    def to_wire(self) -> list:
        """``[floor, [[ts, id, reply], ...]]``, entries sorted by (ts, id)."""
        return [self._floor, sorted([ts, msg_id, reply]
                                    for msg_id, (ts, reply) in self._entries.items())]

    @classmethod
    def from_wire(cls, data: Any) -> "AppliedIds":
        if type(data) is not list or len(data) != 2:
            raise CrdtError("ids: expected [floor, entries]")
        floor, entries = data
        if type(floor) is not int or not 0 <= floor <= U64_MAX:
            raise CrdtError("ids: floor must be an integer 0..2**64-1")
        if type(entries) is not list or len(entries) > IDS_MAX:
            raise CrdtError(f"ids: entries must be a list of at most {IDS_MAX}")
        state = cls()
        state._floor = floor
        for entry in entries:
            ts, msg_id, reply = _wire_entry(entry)
            state._put(ts, msg_id, reply)
        return state

    def _state_key(self) -> Any:
        return self.to_wire()


def _wire_entry(entry: Any) -> tuple[int, str, bytes | None]:
    if type(entry) is not list or len(entry) != 3:
        raise CrdtError("ids: an entry must be [ts, id, reply]")
    ts, msg_id, reply = entry
    if type(ts) is not int or not 0 <= ts <= U64_MAX:
        raise CrdtError("ids: ts must be an integer 0..2**64-1")
    if type(msg_id) is not str or not 0 < len(msg_id) <= ID_LEN_MAX:
        raise CrdtError(f"ids: id must be a string of 1..{ID_LEN_MAX} characters")
    if reply is not None and (type(reply) is not bytes or len(reply) > REPLY_KEEP_MAX):
        raise CrdtError(f"ids: reply must be nil or bytes of at most {REPLY_KEEP_MAX}")
    return ts, msg_id, reply


# ---------------------------------------------------------------------------- causal

DELIVER = "deliver"      # deliver it now (then mark_delivered, then ready)
DUPLICATE = "duplicate"  # delivered already, or a copy is held: do not deliver it
HELD = "held"            # kept until what it depends on was delivered, or its deadline

HELD_PER_AGENT_MAX = 1_000
HELD_MAX = 10_000
HELD_BYTES_MAX = 64 << 20
HOLD_TIMEOUT_S = 30.0


def deliverable(delivered: dict[str, int], sender: str, vc: dict[str, int]) -> str:
    """The Birman-Schiper-Stephenson rule for a message from ``sender`` stamped ``vc``
    at an agent that has delivered ``delivered``: DELIVER when it is the sender's
    next message (vc[sender] == delivered[sender] + 1) and every message it depends
    on from others was delivered (vc[k] <= delivered[k] for each other k);
    DUPLICATE when vc[sender] <= delivered[sender]; otherwise HELD."""
    count = vc[sender]
    done = delivered.get(sender, 0)
    if count <= done:
        return DUPLICATE
    if count != done + 1:
        return HELD
    for process, seen in vc.items():
        if seen > delivered.get(process, 0) and process != sender:
            return HELD
    return DELIVER


def mark_delivered(delivered: dict[str, int], sender: str, vc: dict[str, int]) -> None:
    """Record in ``delivered`` (the agent's clock) the delivery of the sender's message
    stamped ``vc``.  Its other entries are already covered (the rule required it)."""
    delivered[sender] = vc[sender]


@dataclass(frozen=True, slots=True)
class Held:
    """A message waiting in the hold buffer."""

    agent_id: str
    sender: str
    vc: dict[str, int]
    item: Any       # what the node will deliver (its request, reply handle, ...)
    nbytes: int
    deadline: float


class _AgentHold:
    """The held messages of one agent, by sender and the sender's counter."""

    __slots__ = ("by_sender", "items", "nbytes")

    def __init__(self) -> None:
        self.by_sender: dict[str, dict[int, Held]] = {}
        self.items = 0
        self.nbytes = 0


class CausalOrder:
    """A node's hold buffer for causal delivery.  One per node; each agent's
    ``delivered`` clock is kept by the caller (with the agent's state) and passed in.

    ``offer`` a causal message: DELIVER (deliver it, ``mark_delivered``, then call
    ``ready`` for messages it unblocked), DUPLICATE, HELD, or a ``Refusal``
    (``overloaded``) when holding it would pass a bound: HELD_PER_AGENT_MAX per agent,
    HELD_MAX in all, HELD_BYTES_MAX bytes in all.  A held message is kept until it
    becomes deliverable (returned by ``ready``) or ``timeout_s`` after it was held
    (returned by ``tick``: the node answers it ``timeout``), or its agent leaves the
    node (``drop_agent``).
    """

    def __init__(self, timeout_s: float = HOLD_TIMEOUT_S, per_agent_max: int = HELD_PER_AGENT_MAX,
                 items_max: int = HELD_MAX, bytes_max: int = HELD_BYTES_MAX):
        self.timeout_s = timeout_s
        self.per_agent_max = per_agent_max
        self.items_max = items_max
        self.bytes_max = bytes_max
        self.items = 0
        self.nbytes = 0
        self.refused = 0   # offers refused at a bound
        self.expired = 0   # held messages that timed out
        self._agents: dict[str, _AgentHold] = {}
        self._deadlines: list[tuple[float, int, Held]] = []  # heap; removed ones are stale
        self._serial = 0  # heap tie-break, so Held is never compared

    def offer(self, agent_id: str, delivered: dict[str, int], sender: str,
              vc: dict[str, int], item: Any, nbytes: int, now: float) -> str | Refusal:
        verdict = deliverable(delivered, sender, vc)
        if verdict != HELD:
            return verdict
        hold = self._agents.get(agent_id)
        if hold is not None and vc[sender] in hold.by_sender.get(sender, ()):
            return DUPLICATE  # a copy is held already; it will be delivered
        refusal = self._over_bound(hold, nbytes)
        if refusal is not None:
            self.refused += 1
            return refusal
        if hold is None:
            hold = self._agents[agent_id] = _AgentHold()
        held = Held(agent_id, sender, vc, item, nbytes, now + self.timeout_s)
        hold.by_sender.setdefault(sender, {})[vc[sender]] = held
        hold.items += 1
        hold.nbytes += nbytes
        self.items += 1
        self.nbytes += nbytes
        self._serial += 1
        heapq.heappush(self._deadlines, (held.deadline, self._serial, held))
        if len(self._deadlines) > 2 * self.items + 1024:
            self._compact_deadlines()
        return HELD

    def _compact_deadlines(self) -> None:
        """Drop the deadlines of messages no longer held (delivered, dropped), so the
        heap stays in proportion to what is held, whatever passes through."""
        self._deadlines = [entry for entry in self._deadlines if self._is_held(entry[2])]
        heapq.heapify(self._deadlines)

    def _over_bound(self, hold: _AgentHold | None, nbytes: int) -> Refusal | None:
        if hold is not None and hold.items >= self.per_agent_max:
            return Refusal(ErrorCode.OVERLOADED, f"agent holds {hold.items} causal messages "
                                                 f"waiting for earlier ones (its limit)")
        if self.items >= self.items_max or self.nbytes + nbytes > self.bytes_max:
            return Refusal(ErrorCode.OVERLOADED, f"node holds its limit of causal messages "
                                                 f"({self.items} messages, {self.nbytes} bytes)")
        return None

    def ready(self, agent_id: str, delivered: dict[str, int]) -> list[tuple[str, Held]]:
        """Held messages of ``agent_id`` that ``delivered`` now lets through, in an order
        that respects causality: ``(DELIVER, held)`` to deliver in this order (marking
        each delivered), ``(DUPLICATE, held)`` for copies the clock has passed (its
        clock advanced by other means, e.g. state merged from a replica).

        ``delivered`` is not changed; the list is computed on a copy, as if each
        DELIVER was delivered in turn.  Call it after each delivery to the agent.
        """
        hold = self._agents.get(agent_id)
        if hold is None:
            return []
        clock = dict(delivered)
        out: list[tuple[str, Held]] = []
        progress = True
        while progress and hold.items:
            progress = False
            for sender in list(hold.by_sender):
                for held in self._take_passed(hold, sender, clock):
                    out.append((DUPLICATE, held))
                waiting = hold.by_sender.get(sender)
                while waiting:  # the sender's next messages, while their deps are met
                    held = waiting.get(clock.get(sender, 0) + 1)
                    if held is None or deliverable(clock, sender, held.vc) != DELIVER:
                        break
                    self._remove(hold, held)
                    mark_delivered(clock, sender, held.vc)
                    out.append((DELIVER, held))
                    progress = True
        if not hold.items:
            del self._agents[agent_id]
        return out

    def _take_passed(self, hold: _AgentHold, sender: str, clock: dict[str, int]) -> list[Held]:
        done = clock.get(sender, 0)
        passed = [h for count, h in hold.by_sender[sender].items() if count <= done]
        for held in passed:
            self._remove(hold, held)
        return passed

    def _remove(self, hold: _AgentHold, held: Held) -> None:
        waiting = hold.by_sender[held.sender]
        del waiting[held.vc[held.sender]]
        if not waiting:
            del hold.by_sender[held.sender]
        hold.items -= 1
        hold.nbytes -= held.nbytes
        self.items -= 1
        self.nbytes -= held.nbytes

    def _is_held(self, held: Held) -> bool:
        hold = self._agents.get(held.agent_id)
        return (hold is not None
                and hold.by_sender.get(held.sender, {}).get(held.vc[held.sender]) is held)

    def tick(self, now: float) -> list[Held]:
        """Held messages whose deadline passed, removed: the node answers them
        ``timeout`` (or counts them, for a one-way message)."""
        expired: list[Held] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            held = heapq.heappop(heap)[2]
            if self._is_held(held):
                hold = self._agents[held.agent_id]
                self._remove(hold, held)
                if not hold.items:
                    del self._agents[held.agent_id]
                expired.append(held)
        self.expired += len(expired)
        return expired

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and not self._is_held(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def drop_agent(self, agent_id: str) -> list[Held]:
        """Every message held for ``agent_id``, removed (the agent stopped or moved:
        the node answers them or routes them again)."""
        hold = self._agents.pop(agent_id, None)
        if hold is None:
            return []
        dropped = [held for waiting in hold.by_sender.values() for held in waiting.values()]
        self.items -= hold.items
        self.nbytes -= hold.nbytes
        return dropped

    def held(self, agent_id: str) -> int:
        """How many messages are held for ``agent_id``."""
        hold = self._agents.get(agent_id)
        return 0 if hold is None else hold.items


# ---------------------------------------------------------------------------- retries


class Backoff:
    """Retry delays for an at_least_once / exactly_once client: "full jitter"
    (a uniform draw in [0, min(max_s, base_s * 2**attempt)]), never past
    ``deadline_s`` (a time on the caller's clock).  ``next_delay(now)`` gives the
    next delay in seconds, or None when ``now`` is at or past the deadline."""

    def __init__(self, *, deadline_s: float, rng: random.Random, base_s: float = 0.05,
                 max_s: float = 1.0):
        if not 0 < base_s <= max_s:
            raise ValueError("need 0 < base_s <= max_s")
        self.deadline_s = deadline_s
        self.base_s = base_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng

    def next_delay(self, now: float) -> float | None:
        left = self.deadline_s - now
        if left <= 0:
            return None
        ceiling = self.max_s if self.attempt >= 32 else min(self.max_s,
                                                             self.base_s * (1 << self.attempt))
        self.attempt += 1
        return min(self._rng.uniform(0, ceiling), left)
