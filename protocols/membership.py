"""Cluster membership: a grow-only member set spread by push gossip.

This is the simple, consistent membership the first node binary needs: a node
joins through any seed address, learns the whole member list, and every node
converges on the same set (the union of all views), so every node's hash ring
holds the same members and an agent has one owner whichever node a client
enters by.

Merge rule: members are keyed by node id; for the same id the higher
``generation`` wins (a restarted node comes back with a higher one), ties broken
by address so that every node keeps the same entry.  Union
with that rule is commutative, associative and idempotent, so views converge
whatever the order or duplication of gossip.

Hardening until peers authenticate (see docs/OPERATIONS.md, "Trust"):

- a generation may run at most ``generation_ahead_max_ns`` ahead of our own wall
  clock (which the node passes in as an offset to ``now``: the machine reads no
  clock), so a forged entry cannot claim a node id for ever with 2**64-1;
- the address of a known member changes only through a message from that member
  itself (``from`` is its id); a relayed address change is refused;
- a node that hears its own id with another address, or with a generation at or
  above its own, refutes it: it takes a higher generation, tells every member at
  once (at most once per gossip interval) and emits ``Refuted`` so the node logs
  it loudly.  A member that announces itself with an address we hold under a
  newer generation is sent our view, so a node whose id was taken while it was
  away learns of it and refutes.

Without authentication a sender can still claim any id in ``from``: these rules
stop relayed and replayed forgeries and give the real node the last word, they
do not stop a live attacker who keeps sending.  CURVE (the security work) does.

Wire format (versioned maps, so fields can be added without a flag day; unknown
keys are ignored): a message is ``{"v": 1, "kind": "members", "members": [entry]}``
and an entry ``{"id": str, "gen": int, "ep": {transport: endpoint}}``, one endpoint
per transport the member serves (``zmq`` for its ROUTER, ``zmq-pub`` for its PUB).
The sender's node id comes from the peer frame, not from the message.

The machine contract (``protocols/machine.py``): ``receive(sender, message, now)``,
``tick(now)``, ``next_deadline()``; peers are named by node id, seeds whose id is
not known yet by ``seed_id(address)``.

Not here yet: failure detection, leave and removal.  A SWIM machine with the
same verbs will replace this one; until then a dead node stays a member and
requests it owns answer ``unavailable`` or time out.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterable

from .effects import GOSSIP, MembersChanged, Refuted, Send, seed_id

VERSION = 1          # of the gossip message map; see docs/PROTOCOL.md for the rule
MEMBERS_MAX = 1024  # a bound on what one gossip message may make us hold
FIELD_LEN_MAX = 255  # node ids and endpoints
ENDPOINTS_MAX = 8    # transports one member may advertise
TRANSPORT_NAME_MAX = 32
ZMQ, ZMQ_PUB = "zmq", "zmq-pub"
_ENDPOINT = re.compile(r"tcp://[^\s/:]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")
FANOUT = 3          # peers each gossip round (and each change) is pushed to
GENERATION_AHEAD_MAX_NS = 60 * 10**9  # how far a generation may lead our clock


class MembershipError(Exception):
    """A gossip message from a peer that breaks the protocol (remote error)."""


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    generation: int                       # larger after a restart with the same id
    endpoints: tuple[tuple[str, str], ...]  # (transport, endpoint), sorted by transport

    @classmethod
    def of(cls, node_id: str, address: str, pub_address: str, generation: int,
           **more: str) -> "Member":
        """A member serving ZeroMQ at ``address`` (ROUTER) and ``pub_address`` (PUB),
        plus any other transports named in ``more``."""
        endpoints = {ZMQ: address, ZMQ_PUB: pub_address, **more}
        return cls(node_id, generation, tuple(sorted(endpoints.items())))

    def endpoint(self, transport: str) -> str | None:
        for name, endpoint in self.endpoints:
            if name == transport:
                return endpoint
        return None

    @property
    def address(self) -> str:
        """The ZeroMQ ROUTER endpoint, e.g. ``tcp://127.0.0.1:7400``."""
        return self.endpoint(ZMQ) or ""

    @property
    def pub_address(self) -> str:
        """The ZeroMQ PUB endpoint for multicast."""
        return self.endpoint(ZMQ_PUB) or ""

    def rank(self) -> tuple:
        """Merge order for entries with the same id: generation first, then a
        deterministic tie-break so every node keeps the same entry."""
        return (self.generation, self.endpoints)

    def to_wire(self) -> dict:
        return {"id": self.node_id, "gen": self.generation, "ep": dict(self.endpoints)}

    @classmethod
    def from_wire(cls, item: object) -> "Member":
        if not isinstance(item, dict):
            raise MembershipError(f"a member entry must be a map, got {item!r:.80}")
        node_id, generation, endpoints = item.get("id"), item.get("gen"), item.get("ep")
        if not (isinstance(node_id, str) and 0 < len(node_id) <= FIELD_LEN_MAX):
            raise MembershipError(f"member 'id' must be a string of 1..{FIELD_LEN_MAX}")
        if type(generation) is not int or not 0 <= generation < 2**64:
            raise MembershipError(f"member 'gen' must be an integer in 0..2**64-1 ({node_id!r:.40})")
        if not isinstance(endpoints, dict) or not 0 < len(endpoints) <= ENDPOINTS_MAX:
            raise MembershipError(f"member 'ep' must map 1..{ENDPOINTS_MAX} transports")
        for name, endpoint in endpoints.items():
            _check_endpoint(name, endpoint)
        if ZMQ not in endpoints or ZMQ_PUB not in endpoints:
            raise MembershipError(f"member {node_id!r:.40} lacks a '{ZMQ}' or '{ZMQ_PUB}' endpoint")
        return cls(node_id, generation, tuple(sorted(endpoints.items())))


def _check_endpoint(name: object, endpoint: object) -> None:
    if not (isinstance(name, str) and 0 < len(name) <= TRANSPORT_NAME_MAX):
        raise MembershipError(f"transport names are strings of 1..{TRANSPORT_NAME_MAX}")
    if not (isinstance(endpoint, str) and 0 < len(endpoint) <= FIELD_LEN_MAX):
        raise MembershipError(f"endpoints are strings of 1..{FIELD_LEN_MAX}")
    if name in (ZMQ, ZMQ_PUB) and (not _ENDPOINT.fullmatch(endpoint)
                                   or int(endpoint.rsplit(":", 1)[1]) > 65535):
        raise MembershipError(f"member endpoint must be tcp://HOST:PORT, got {endpoint!r:.80}")


class Membership:
    """Push-gossip member set: ``receive`` and ``tick`` return effects."""

    def __init__(self, me: Member, seeds: Iterable[str], gossip_interval_s: float,
                 rng: random.Random | None = None, fanout: int = FANOUT, *,
                 wall_offset_ns: int = 0,
                 generation_ahead_max_ns: int = GENERATION_AHEAD_MAX_NS):
        self.me = me
        self._members: dict[str, Member] = {me.node_id: me}
        self._seeds = tuple(s for s in seeds if s != me.address)
        self._interval_s = gossip_interval_s
        self._next_tick: float | None = None
        self._fanout = fanout
        # Seeded, never the module-level random: a run replays from its seed.
        self._rng = rng or random.Random(zlib.crc32(me.node_id.encode()))
        # Wall clock = wall_offset_ns + now (s) * 1e9: the node measures the offset
        # once; the machine itself never reads a clock.
        self._wall_offset_ns = wall_offset_ns
        self._ahead_max_ns = generation_ahead_max_ns
        self._refute_after = -math.inf   # refutations are rate-limited to one per interval
        self._told_at: dict[str, float] = {}  # member id -> when we last sent it our view
        self.refused_entries = 0         # entries refused by the rules above (a metric)

    @property
    def members(self) -> dict[str, Member]:
        return dict(self._members)

    # The machine contract ----------------------------------------------------

    def start(self, now: float) -> list:
        """First effects: announce ourselves to seeds; the first round is due."""
        self._next_tick = now + self._interval_s
        return [MembersChanged(self.members), *self._push()]

    def next_deadline(self) -> float | None:
        return self._next_tick

    def tick(self, now: float) -> list:
        if self._next_tick is None or now < self._next_tick:
            return []
        self._next_tick = now + self._interval_s
        return self._push()

    def receive(self, sender: str, message: object, now: float) -> list:
        """Merge a peer's gossip; on change, tell the node and push the news on."""
        entries = self._parse(message)
        new_ids = {m.node_id for m in entries} - self._members.keys()
        if len(self._members) + len(new_ids) > MEMBERS_MAX:
            # Checked before any change, so a refused message changes nothing.
            raise MembershipError(f"member limit {MEMBERS_MAX} reached")
        limit_ns = self._wall_offset_ns + int(now * 1e9) + self._ahead_max_ns
        changed, notes, tell = False, [], []
        for member in entries:
            if member.generation > limit_ns:
                self.refused_entries += 1  # from the future: forged, or a clock far off
            elif member.node_id == self.me.node_id:
                notes += self._about_me(member, now)
            else:
                changed |= self._merge(member, sender, now, tell)
        if not (changed or notes or tell):
            return []
        # One message, built after every change, to each distinct target.
        if notes:  # we refuted: every member must hear it at once, not a random few
            targets = [m for m in self._members if m != self.me.node_id]
        else:
            targets = self._push_targets() if changed else []
        targets += [t for t in tell if t not in targets]
        message = self.gossip_message()
        effects = [*notes, MembersChanged(self.members)] if changed or notes else []
        return effects + [Send(to, GOSSIP, message) for to in targets]

    # Merging -----------------------------------------------------------------

    def _merge(self, member: Member, sender: str, now: float, tell: list) -> bool:
        """Apply one entry about another node; True if the view changed."""
        known = self._members.get(member.node_id)
        if known is None:
            self._members[member.node_id] = member
            return True
        moved = member.endpoints != known.endpoints
        if moved and sender != member.node_id:
            self.refused_entries += 1  # an address changes only through its member
            return False
        if member.rank() > known.rank():
            self._members[member.node_id] = member
            return True
        if moved and self._told_at.get(member.node_id, -math.inf) + self._interval_s <= now:
            # The member itself claims an address we hold under a newer generation:
            # tell it what we hold (at the address it claims), so it can refute.
            if len(self._told_at) >= MEMBERS_MAX:
                self._told_at.clear()
            self._told_at[member.node_id] = now
            tell.append(seed_id(member.address))
        return False

    def _about_me(self, member: Member, now: float) -> list:
        """Someone gossips our own id: refute anything that could win over us."""
        me = self.me
        if member.generation < me.generation or member == me or now < self._refute_after:
            return []
        self._refute_after = now + self._interval_s
        self.me = Member(me.node_id, max(me.generation, member.generation) + 1, me.endpoints)
        self._members[me.node_id] = self.me
        return [Refuted(member.address, member.generation, self.me.generation)]

    # Gossip ------------------------------------------------------------------

    def gossip_message(self) -> dict:
        return {"v": VERSION, "kind": "members",
                "members": [m.to_wire() for m in self._members.values()]}

    def _push(self) -> list:
        message = self.gossip_message()
        return [Send(to, GOSSIP, message) for to in self._push_targets()]

    def _push_targets(self) -> list[str]:
        """``fanout`` random members, and seeds no member answers for.

        A bounded fanout keeps a round O(fanout) messages, so the cluster spreads
        news in O(log n) rounds instead of O(n^2) messages per change.
        """
        others = sorted(m for m in self._members if m != self.me.node_id)
        targets = others if len(others) <= self._fanout else self._rng.sample(others, self._fanout)
        known = {self._members[m].address for m in others}
        return targets + [seed_id(s) for s in self._seeds if s not in known]

    def _parse(self, message: object) -> list[Member]:
        """The entries that differ from our view, validated.

        Entries equal to what we hold are skipped before validation: in a
        converged cluster that is nearly all of them, every round.
        """
        if not isinstance(message, dict) or message.get("kind") != "members":
            raise MembershipError("gossip must be a map with kind='members'")
        version = message.get("v")
        if type(version) is not int or version < 1:
            raise MembershipError("gossip needs an integer version 'v' >= 1")
        entries = message.get("members")
        if not isinstance(entries, list) or len(entries) > MEMBERS_MAX:
            raise MembershipError("gossip 'members' must be a list within the member limit")
        members = self._members
        fresh = []
        for item in entries:
            if isinstance(item, dict) and type(item.get("id")) is str:
                known = members.get(item["id"])
                if (known is not None and type(item.get("gen")) is int
                        and known.generation == item["gen"]
                        and dict(known.endpoints) == item.get("ep")):
                    continue
            fresh.append(Member.from_wire(item))
        return fresh
