"""Handoff: an agent's state follows it when the ring gives it a new owner.

A pure machine (``protocols/machine.py``), one per node, playing both sides:

**Old owner.**  The node takes an agent out of its host and calls ``send_state``;
the state is kept (bounded) and resent every ``timeout_s`` until the new owner
acks it, at most ``attempts_max`` sends.  A state the new owner never acked, or
whose new owner left the members, comes back as ``Install`` so the node installs
it again locally and hands it on to whoever owns it then: a state is never
dropped silently.  A ``want`` from a peer becomes ``Surrender`` (the node takes the
agent out and calls ``send_state``, or ``none`` when it has no such agent), except
when a state for that agent is already in flight to that peer: then it is resent.

**New owner.**  After ``ring_changed`` the node asks ``expecting`` on a miss (a
request for an agent it owns but has not active); inside ``window_s`` that names
the previous owner, and the node ``hold``s the request: the first hold sends
``want`` to that owner (resent up to ``WANT_SENDS_MAX`` times, every
``timeout_s / WANT_SENDS_MAX``).  The state arriving returns ``Install`` with the
held requests in arrival order, and an ``ack``.  ``none``, the previous owner
leaving the members, or ``timeout_s`` passing without a state release them with a
fresh ``Install`` (``behavior`` None) instead.

Exactly once: every state message carries a sequence number ``seq`` (unique per
sender: it counts up from ``seq_start``, which a node sets from its generation so
a restart does not reuse numbers), echoed by its ``ack``.  The new owner
remembers each state it installed (``sender``, ``seq``) for as long as its old
owner may still resend it, so a resent or duplicated state is acked again, never
installed twice; an old owner forgets a kept state only on the ack of that very
``seq`` from that very peer.

Ring changes: the latest change wins.  ``ring_changed`` replaces the function
giving previous owners and restarts the window; waits already under way keep the
owner they asked.

Messages on the ``handoff`` channel (msgpack maps, docs/PROTOCOL.md section 9.6)::

    {"v": 1, "kind": "want",  "agent": id}
    {"v": 1, "kind": "none",  "agent": id}
    {"v": 1, "kind": "state", "agent": id, "seq": n, "behavior": name,
     "state": bytes | None, "groups": [group, ...]}
    {"v": 1, "kind": "ack",   "agent": id, "seq": n}

A message that breaks these shapes raises ``HandoffError(reason)`` (the node
counts it); keys a receiver does not know are ignored.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from core_cy import HashRing

from .effects import HANDOFF, Install, Send, Surrender
from .routing import Refusal
from .wire import SUBJECT_LEN_MAX, ErrorCode

AGENT_ID_CHARS_MAX = 1024
GROUPS_MAX = 64                   # an agent's groups (node.agents.GROUPS_PER_AGENT_MAX)
GROUP_CHARS_MAX = SUBJECT_LEN_MAX  # a group name is a publish subject
SEQ_MAX = (1 << 64) - 1
WANT_SENDS_MAX = 4                # a want is sent at most this many times per wait
KEPT_MAX = 100_000                # states in flight from this node at once
KEPT_BYTES_MAX = 1 << 30          # their bytes
KINDS = frozenset(("want", "none", "state", "ack"))


class HandoffError(ValueError):
    """A handoff message from a peer that breaks the protocol; ``reason`` is a short
    stable string for a metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Kept:
    """A state sent to ``to`` and not acked yet (old owner side)."""

    __slots__ = ("to", "behavior", "state", "groups", "seq", "sends", "due")

    def __init__(self, to: str, behavior: str, state: bytes | None, groups: tuple, seq: int,
                 due: float):
        self.to = to
        self.behavior = behavior
        self.state = state
        self.groups = groups
        self.seq = seq
        self.sends = 1
        self.due = due  # when it is resent (or given back after the last send)

    @property
    def nbytes(self) -> int:
        return len(self.state or b"")


class _Wait:
    """Requests held for an agent whose state was asked of ``owner`` (new owner side)."""

    __slots__ = ("owner", "items", "nbytes", "deadline", "wants")

    def __init__(self, owner: str, deadline: float):
        self.owner = owner
        self.items: list = []
        self.nbytes = 0
        self.deadline = deadline
        self.wants = 1


class _Done:
    """An agent installed here by a handoff, remembered to recognise its duplicates."""

    __slots__ = ("sender", "seq", "ring", "expires")

    def __init__(self, sender: str, seq: int | None, ring: int, expires: float):
        self.sender = sender
        self.seq = seq      # None: installed fresh (none, timeout, owner lost)
        self.ring = ring    # the ring change it belongs to
        self.expires = expires


class Handoff:
    """The handoff machine of one node (see the module docstring)."""

    def __init__(self, node_id: str, *, timeout_s: float, window_s: float,
                 held_max: int = 10_000, held_bytes_max: int = 64 << 20,
                 attempts_max: int = 5, kept_max: int = KEPT_MAX,
                 kept_bytes_max: int = KEPT_BYTES_MAX, seq_start: int = 0):
        if not timeout_s > 0 or not window_s >= 0 or attempts_max < 1:
            raise ValueError("timeout_s > 0, window_s >= 0 and attempts_max >= 1")
        self.node_id = node_id
        self._timeout_s = timeout_s
        self._window_s = window_s
        self._held_max = held_max
        self._held_bytes_max = held_bytes_max
        self._attempts_max = attempts_max
        self._kept_max = kept_max
        self._kept_bytes_max = kept_bytes_max
        self._seq = seq_start
        # Old owner side: ordered by due (a resend moves an entry to the end).
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._kept_bytes = 0
        # New owner side.  _held is ordered by deadline (all take timeout_s from
        # their first hold); _wants holds (due, agent, wait) in due order.
        self._previous: Callable[[str], str] | None = None
        self._window_until = 0.0
        self._ring = 0
        self._members: frozenset[str] = frozenset()
        self._held: dict[str, _Wait] = {}
        self._held_items = 0
        self._held_bytes = 0
        self._wants: deque[tuple[float, str, _Wait]] = deque()
        self._done: OrderedDict[str, _Done] = OrderedDict()  # ordered by expiry
        # Counters, read by the node's metrics.
        self.sent = 0          # states sent (first sends)
        self.acked = 0         # states acknowledged by their new owner
        self.resent = 0        # states sent again (timer or a repeated want)
        self.returned = 0      # states given back to this node (unacked, target left, full)
        self.installed = 0     # states received and installed here
        self.duplicates = 0    # states received again after their install (acked only)
        self.timed_out = 0     # waits that ended without a state: activated fresh
        self.owner_lost = 0    # waits whose previous owner left: activated fresh
        self.refused = 0       # holds refused (held_max or held_bytes_max)
        self.rerouted = 0      # waits ended because the agent's owner moved on

    @property
    def held_now(self) -> int:
        """Requests held right now, all agents together."""
        return self._held_items

    @property
    def kept_now(self) -> int:
        """States in flight from this node, not acked yet."""
        return len(self._kept)

    # --- old owner ------------------------------------------------------------------

    def send_state(self, agent_id: str, to: str, behavior: str, state: bytes | None,
                   groups: Iterable[str], now: float) -> list:
        """Hand the state of ``agent_id`` (taken out of the host) to its new owner ``to``.

        Kept until acked.  Past ``kept_max`` / ``kept_bytes_max`` it is not sent but
        given back at once (``Install``), so the node keeps the agent for now.
        """
        groups = tuple(groups)
        old = self._kept.pop(agent_id, None)
        if old is not None:  # a newer state of the same agent supersedes it
            self._kept_bytes -= old.nbytes
        nbytes = len(state or b"")
        if (len(self._kept) >= self._kept_max
                or self._kept_bytes + nbytes > self._kept_bytes_max):
            self.returned += 1
            return [Install(agent_id, behavior, state, groups, ())]
        self._seq += 1
        kept = _Kept(to, behavior, state, groups, self._seq, now + self._timeout_s)
        self._kept[agent_id] = kept
        self._kept_bytes += nbytes
        self.sent += 1
        return [self._state_send(agent_id, kept)]

    def none(self, agent_id: str, to: str) -> list:
        """Tell ``to``, which asked for ``agent_id``, that this node has no such agent."""
        return [Send(to, HANDOFF, {"v": 1, "kind": "none", "agent": agent_id})]

    def _state_send(self, agent_id: str, kept: _Kept) -> Send:
        return Send(kept.to, HANDOFF, {"v": 1, "kind": "state", "agent": agent_id,
                                       "seq": kept.seq, "behavior": kept.behavior,
                                       "state": kept.state, "groups": list(kept.groups)})

    def _give_back(self, agent_id: str) -> Install:
        kept = self._kept.pop(agent_id)
        self._kept_bytes -= kept.nbytes
        self.returned += 1
        return Install(agent_id, kept.behavior, kept.state, kept.groups, ())

    def _on_want(self, sender: str, agent_id: str) -> list:
        kept = self._kept.get(agent_id)
        if kept is not None and kept.to == sender:
            self.resent += 1  # the state (or its ack) was lost: answer with it again
            return [self._state_send(agent_id, kept)]
        return [Surrender(agent_id, sender)]

    def _on_ack(self, sender: str, agent_id: str, seq: int) -> list:
        kept = self._kept.get(agent_id)
        if kept is not None and kept.to == sender and kept.seq == seq:
            del self._kept[agent_id]
            self._kept_bytes -= kept.nbytes
            self.acked += 1
        return []

    def _tick_kept(self, now: float) -> list:
        effects: list = []
        while self._kept:
            agent_id, kept = next(iter(self._kept.items()))
            if kept.due > now:
                break
            if kept.sends >= self._attempts_max:
                effects.append(self._give_back(agent_id))
                continue
            kept.sends += 1
            kept.due = now + self._timeout_s
            self._kept.move_to_end(agent_id)
            self.resent += 1
            effects.append(self._state_send(agent_id, kept))
        return effects

    # --- new owner ------------------------------------------------------------------

    def ring_changed(self, previous_owner: Callable[[str], str], now: float,
                     owner: Callable[[str], str] | None = None) -> list:
        """The ring changed: ``previous_owner(agent_id)`` names an agent's owner before
        the change.  It is asked on misses until ``now + window_s`` (the latest
        change wins; waits under way keep the owner they asked).  With ``owner``
        (the owner now), a wait for an agent this node no longer owns ends: its
        requests come back (``Install`` with behavior None) for the node to route
        again, and no ``want`` goes on asking for an agent that belongs elsewhere."""
        self._previous = previous_owner
        self._window_until = now + self._window_s
        self._ring += 1
        if owner is None:
            return []
        gone = [a for a in self._held if owner(a) != self.node_id]
        self.rerouted += len(gone)
        return [Install(a, None, None, (), self._take_held(a)) for a in gone]

    def stop(self) -> list[tuple]:
        """The node is shutting down: every request still held, to be answered
        (``unavailable``) by the node; the waits end."""
        items: list[tuple] = []
        for agent_id in list(self._held):
            items += self._take_held(agent_id)
        return items

    def members_changed(self, member_ids: Iterable[str]) -> list:
        """The member set is now ``member_ids``: waits on an owner that left end
        fresh, and states in flight to a node that left come back."""
        self._members = frozenset(member_ids)
        effects: list = []
        for agent_id in [a for a, w in self._held.items() if w.owner not in self._members]:
            self.owner_lost += 1
            effects.append(self._release_fresh(agent_id, self._held[agent_id].owner))
        for agent_id in [a for a, k in self._kept.items() if k.to not in self._members]:
            effects.append(self._give_back(agent_id))
        return effects

    def expecting(self, agent_id: str, now: float) -> str | None:
        """On a miss: the previous owner to ask for ``agent_id``'s state, or None
        (activate it fresh).  An agent already waited on names the owner asked."""
        wait = self._held.get(agent_id)
        if wait is not None:
            return wait.owner
        if self._previous is None or now >= self._window_until:
            return None
        done = self._done.get(agent_id)
        if done is not None and done.ring == self._ring and done.expires > now:
            return None  # already handed to us after this change (then passivated)
        owner = self._previous(agent_id)
        if owner == self.node_id or owner not in self._members:
            return None
        return owner

    def hold(self, agent_id: str, item: Any, nbytes: int, now: float) -> list | Refusal:
        """Hold ``item`` (a request) for ``agent_id`` until its state arrives.

        Call it when ``expecting`` named an owner.  The first hold for an agent
        sends ``want`` to that owner.  Refused ``overloaded`` past ``held_max``
        items or ``held_bytes_max`` bytes.
        """
        if (self._held_items >= self._held_max
                or self._held_bytes + nbytes > self._held_bytes_max):
            self.refused += 1
            return Refusal(ErrorCode.OVERLOADED,
                           f"node holds its limit of requests waiting for agents to move "
                           f"({self._held_items} requests, {self._held_bytes} bytes)")
        effects: list = []
        wait = self._held.get(agent_id)
        if wait is None:
            owner = self.expecting(agent_id, now)
            if owner is None:
                raise ValueError(f"no handoff expected for {agent_id!r}: activate it fresh")
            wait = self._held[agent_id] = _Wait(owner, now + self._timeout_s)
            self._wants.append((now + self._want_interval_s, agent_id, wait))
            effects.append(self._want(agent_id, owner))
        wait.items.append(item)
        wait.nbytes += nbytes
        self._held_items += 1
        self._held_bytes += nbytes
        return effects

    @property
    def _want_interval_s(self) -> float:
        return self._timeout_s / WANT_SENDS_MAX

    @staticmethod
    def _want(agent_id: str, owner: str) -> Send:
        return Send(owner, HANDOFF, {"v": 1, "kind": "want", "agent": agent_id})

    def _take_held(self, agent_id: str) -> tuple:
        wait = self._held.pop(agent_id, None)
        if wait is None:
            return ()
        self._held_items -= len(wait.items)
        self._held_bytes -= wait.nbytes
        return tuple(wait.items)

    def _remember(self, agent_id: str, sender: str, seq: int | None, now: float) -> None:
        """Remember an install for as long as its old owner may resend the state."""
        self._done.pop(agent_id, None)
        if len(self._done) >= self._held_max:
            self._done.popitem(last=False)  # bounded: the oldest record goes first
        keep_s = max(self._window_s, self._timeout_s * (self._attempts_max + 1))
        self._done[agent_id] = _Done(sender, seq, self._ring, now + keep_s)

    def _release_fresh(self, agent_id: str, owner: str, now: float | None = None) -> Install:
        if now is not None:
            self._remember(agent_id, owner, None, now)
        return Install(agent_id, None, None, (), self._take_held(agent_id))

    def _on_state(self, sender: str, agent_id: str, message: dict, now: float) -> list:
        seq = message["seq"]
        ack = Send(sender, HANDOFF, {"v": 1, "kind": "ack", "agent": agent_id, "seq": seq})
        done = self._done.get(agent_id)
        if done is not None and done.sender == sender and done.seq == seq:
            self.duplicates += 1  # installed once already (and passivated since, if
            if agent_id in self._held:  # requests wait): those go to a fresh activation
                return [self._release_fresh(agent_id, sender), ack]
            return [ack]
        held = self._take_held(agent_id)
        self._remember(agent_id, sender, seq, now)
        self.installed += 1
        return [Install(agent_id, message.get("behavior"), message.get("state"),
                        tuple(message["groups"]), held), ack]

    def _on_none(self, sender: str, agent_id: str, now: float) -> list:
        wait = self._held.get(agent_id)
        if wait is None or wait.owner != sender:
            return []  # not waited on (any more), or not asked of this peer
        return [self._release_fresh(agent_id, sender, now)]

    def _tick_held(self, now: float) -> list:
        effects: list = []
        while self._held:
            agent_id, wait = next(iter(self._held.items()))
            if wait.deadline > now:
                break
            self.timed_out += 1
            effects.append(self._release_fresh(agent_id, wait.owner, now))
        wants = self._wants
        while wants and wants[0][0] <= now:
            _, agent_id, wait = wants.popleft()
            if self._held.get(agent_id) is not wait or wait.wants >= WANT_SENDS_MAX:
                continue  # answered, released, or asked enough
            wait.wants += 1
            wants.append((now + self._want_interval_s, agent_id, wait))
            effects.append(self._want(agent_id, wait.owner))
        return effects

    def _tick_done(self, now: float) -> None:
        while self._done:
            agent_id, done = next(iter(self._done.items()))
            if done.expires > now:
                break
            del self._done[agent_id]

    # --- the machine contract --------------------------------------------------------

    def receive(self, sender: str, message: Any, now: float) -> list:
        """A handoff message from the peer ``sender``; HandoffError if malformed."""
        kind, agent_id = _check(message)
        if kind == "want":
            return self._on_want(sender, agent_id)
        if kind == "ack":
            return self._on_ack(sender, agent_id, message["seq"])
        if kind == "state":
            return self._on_state(sender, agent_id, message, now)
        return self._on_none(sender, agent_id, now)

    def tick(self, now: float) -> list:
        effects = self._tick_kept(now)
        effects += self._tick_held(now)
        self._tick_done(now)
        if self._previous is not None and now >= self._window_until:
            self._previous = None  # the window closed: misses activate fresh
        return effects

    def next_deadline(self) -> float | None:
        candidates = []
        if self._kept:
            candidates.append(next(iter(self._kept.values())).due)
        if self._held:
            candidates.append(next(iter(self._held.values())).deadline)
        wants = self._wants
        while wants and self._held.get(wants[0][1]) is not wants[0][2]:
            wants.popleft()  # its wait ended: no reason to wake for it
        if wants:
            candidates.append(wants[0][0])
        if self._done:
            candidates.append(next(iter(self._done.values())).expires)
        if self._previous is not None:
            candidates.append(self._window_until)
        return min(candidates) if candidates else None


# --- validation of peers' messages ------------------------------------------------------

def _check(message: Any) -> tuple[str, str]:
    """(kind, agent id) of a well-formed message, or HandoffError."""
    if type(message) is not dict:
        raise HandoffError("bad_message", f"a handoff message is a map, "
                                          f"got {type(message).__name__}")
    version = message.get("v")
    if type(version) is not int or version < 1:
        raise HandoffError("bad_version", "'v' must be an integer >= 1")
    kind = message.get("kind")
    if type(kind) is not str or kind not in KINDS:
        raise HandoffError("bad_kind", f"'kind' must be one of {sorted(KINDS)}")
    agent_id = message.get("agent")
    if not _is_text(agent_id, AGENT_ID_CHARS_MAX):
        raise HandoffError("bad_agent", f"'agent' must be a string of "
                                        f"1..{AGENT_ID_CHARS_MAX} characters")
    if kind in ("state", "ack"):
        seq = message.get("seq")
        if type(seq) is not int or not 0 <= seq <= SEQ_MAX:
            raise HandoffError("bad_seq", f"'seq' must be an integer 0..{SEQ_MAX}")
    if kind == "state":
        _check_state(message)
    return kind, agent_id


def _check_state(message: dict) -> None:
    behavior = message.get("behavior")
    if behavior is not None and not _is_text(behavior, AGENT_ID_CHARS_MAX):
        raise HandoffError("bad_behavior", "'behavior' must be a non-empty string or nil")
    state = message.get("state")
    if state is not None and type(state) is not bytes:
        raise HandoffError("bad_state", "'state' must be bytes (msgpack bin) or nil")
    groups = message.get("groups")
    if (type(groups) is not list or len(groups) > GROUPS_MAX
            or not all(_is_text(g, GROUP_CHARS_MAX) for g in groups)):
        raise HandoffError("bad_groups", f"'groups' must be a list of at most {GROUPS_MAX} "
                                         f"strings of 1..{GROUP_CHARS_MAX} characters")


def _is_text(value: Any, chars_max: int) -> bool:
    return type(value) is str and 0 < len(value) <= chars_max


REASONS = frozenset(("bad_message", "bad_version", "bad_kind", "bad_agent", "bad_seq",
                     "bad_behavior", "bad_state", "bad_groups"))


def previous_ring(old: HashRing, ring: frozenset, me: str, serving: bool) -> HashRing:
    """The ring whose owners held agents before this change (the runtime uses it
    too).  A node that owned nothing before it (joining, or on the minority side)
    held no agent: they were with the owners the cluster picks without it."""
    nodes = set(old.nodes)
    if not serving and len(ring) > 1:
        nodes = set(ring) - {me}
    return HashRing(tuple(sorted(nodes)), vnodes=old.vnodes)
