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

Not here yet: failure detection, leave and removal.  A SWIM machine with the
same ``receive``/``tick`` verbs will replace this one; until then a dead node
stays a member and requests it owns answer ``unavailable`` or time out.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterable

from .effects import MembersChanged, Refuted, Send, SetTimer

MEMBERS_MAX = 1024  # a bound on what one gossip message may make us hold
FIELD_LEN_MAX = 255  # node ids and addresses
_ENDPOINT = re.compile(r"tcp://[^\s/:]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")
FANOUT = 3          # peers each gossip round (and each change) is pushed to
GENERATION_AHEAD_MAX_NS = 60 * 10**9  # how far a generation may lead our clock


class MembershipError(Exception):
    """A gossip message from a peer that breaks the protocol (remote error)."""


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str       # the node's ROUTER endpoint, e.g. "tcp://127.0.0.1:7400"
    pub_address: str   # the node's PUB endpoint for multicast
    generation: int    # larger after a restart with the same id

    def rank(self) -> tuple:
        """Merge order for entries with the same id: generation first, then a
        deterministic tie-break so every node keeps the same entry."""
        return (self.generation, self.address, self.pub_address)

    def to_wire(self) -> list:
        return [self.node_id, self.address, self.pub_address, self.generation]

    @classmethod
    def from_wire(cls, item: object) -> "Member":
        if (not isinstance(item, (list, tuple)) or len(item) != 4
                or not all(isinstance(x, str) and 0 < len(x) <= FIELD_LEN_MAX for x in item[:3])
                or type(item[3]) is not int):
            raise MembershipError(f"malformed member entry {item!r:.80}")
        for endpoint in item[1:3]:
            if not _ENDPOINT.fullmatch(endpoint) or int(endpoint.rsplit(":", 1)[1]) > 65535:
                raise MembershipError(f"member endpoint must be tcp://HOST:PORT, got {endpoint!r:.80}")
        return cls(item[0], item[1], item[2], item[3])


class Membership:
    """Push-gossip member set.  ``receive`` and ``tick`` return effects."""

    def __init__(self, me: Member, seeds: Iterable[str], gossip_interval_s: float,
                 rng: random.Random | None = None, fanout: int = FANOUT, *,
                 wall_offset_ns: int = 0,
                 generation_ahead_max_ns: int = GENERATION_AHEAD_MAX_NS):
        self.me = me
        # Wall clock = wall_offset_ns + now (s) * 1e9: the node measures the offset
        # once; the machine itself never reads a clock.
        self._wall_offset_ns = wall_offset_ns
        self._ahead_max_ns = generation_ahead_max_ns
        self._refute_after = -math.inf   # refutations are rate-limited to one per interval
        self._told_at: dict[str, float] = {}  # member id -> when we last sent it our view
        self.refused_entries = 0         # entries refused by the rules above (a metric)
        self._members: dict[str, Member] = {me.node_id: me}
        self._seeds = tuple(s for s in seeds if s != me.address)
        self._interval_s = gossip_interval_s
        self._next_tick = 0.0
        self._fanout = fanout
        # Seeded, never the module-level random: a run replays from its seed.
        self._rng = rng or random.Random(zlib.crc32(me.node_id.encode()))

    @property
    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def start(self, now: float) -> list:
        """First effects: announce ourselves to seeds and schedule the next round."""
        self._next_tick = now + self._interval_s
        return [MembersChanged(self.members), *self._push(), SetTimer(self._next_tick)]

    def tick(self, now: float) -> list:
        if now < self._next_tick:
            return [SetTimer(self._next_tick)]
        self._next_tick = now + self._interval_s
        return [*self._push(), SetTimer(self._next_tick)]

    def receive(self, message: object, now: float) -> list:
        """Merge a peer's gossip; on change, tell the node and push the news on."""
        entries = self._parse(message)
        sender = message.get("from")
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
            targets = [m.address for m in self._members.values() if m.node_id != self.me.node_id]
        else:
            targets = self._push_targets() if changed else []
        targets += [a for a in tell if a not in targets]
        message = self.gossip_message()
        effects = [*notes, MembersChanged(self.members)] if changed or notes else []
        return effects + [Send(address, message) for address in targets]

    def _merge(self, member: Member, sender: object, now: float, tell: list) -> bool:
        """Apply one entry about another node; True if the view changed."""
        known = self._members.get(member.node_id)
        if known is None:
            self._members[member.node_id] = member
            return True
        moved = member.address != known.address or member.pub_address != known.pub_address
        if moved and sender != member.node_id:
            self.refused_entries += 1  # an address changes only through its member
            return False
        if member.rank() > known.rank():
            self._members[member.node_id] = member
            return True
        if moved and self._told_at.get(member.node_id, -math.inf) + self._interval_s <= now:
            # The member itself claims an address we hold under a newer generation:
            # tell it what we hold, so it can refute if the newer entry is not its own.
            if len(self._told_at) >= MEMBERS_MAX:
                self._told_at.clear()
            self._told_at[member.node_id] = now
            tell.append(member.address)
        return False

    def _about_me(self, member: Member, now: float) -> list:
        """Someone gossips our own id: refute anything that could win over us."""
        me = self.me
        if member.generation < me.generation or member == me or now < self._refute_after:
            return []
        self._refute_after = now + self._interval_s
        self.me = Member(me.node_id, me.address, me.pub_address,
                         max(me.generation, member.generation) + 1)
        self._members[me.node_id] = self.me
        return [Refuted(member.address, member.generation, self.me.generation)]

    def gossip_message(self) -> dict:
        return {"kind": "members", "from": self.me.node_id,
                "members": [m.to_wire() for m in self._members.values()]}

    def _push(self) -> list:
        message = self.gossip_message()
        return [Send(address, message) for address in self._push_targets()]

    def _push_targets(self) -> list[str]:
        """``fanout`` random members, and seeds no member answers for.

        A bounded fanout keeps a round O(fanout) messages, so the cluster spreads
        news in O(log n) rounds instead of O(n^2) messages per change.
        """
        others = sorted(m.address for m in self._members.values()
                        if m.node_id != self.me.node_id)
        targets = others if len(others) <= self._fanout else self._rng.sample(others, self._fanout)
        known = set(others)
        return targets + [s for s in self._seeds if s not in known]

    def _parse(self, message: object) -> list[Member]:
        """The entries that differ from our view, validated.

        Entries equal to what we hold are skipped before validation: in a
        converged cluster that is nearly all of them, every round.
        """
        if not isinstance(message, dict) or message.get("kind") != "members":
            raise MembershipError("gossip must be a map with kind='members'")
        entries = message.get("members")
        if not isinstance(entries, list) or len(entries) > MEMBERS_MAX:
            raise MembershipError("gossip 'members' must be a list within the member limit")
        members = self._members
        fresh = []
        for item in entries:
            if isinstance(item, list) and len(item) == 4 and type(item[0]) is str:
                known = members.get(item[0])
                if (known is not None and known.generation == item[3]
                        and type(item[3]) is int and known.address == item[1]
                        and known.pub_address == item[2]):
                    continue
            fresh.append(Member.from_wire(item))
        return fresh
