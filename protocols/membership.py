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

Not here yet: failure detection, leave and removal.  A SWIM machine with the
same ``receive``/``tick`` verbs will replace this one; until then a dead node
stays a member and requests it owns answer ``unavailable`` or time out.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterable

from .effects import MembersChanged, Send, SetTimer

MEMBERS_MAX = 1024  # a bound on what one gossip message may make us hold
FIELD_LEN_MAX = 255  # node ids and addresses
_ENDPOINT = re.compile(r"tcp://[^\s/:]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")
FANOUT = 3          # peers each gossip round (and each change) is pushed to


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
                 rng: random.Random | None = None, fanout: int = FANOUT):
        self.me = me
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
        new_ids = {m.node_id for m in entries} - self._members.keys()
        if len(self._members) + len(new_ids) > MEMBERS_MAX:
            # Checked before any change, so a refused message changes nothing.
            raise MembershipError(f"member limit {MEMBERS_MAX} reached")
        changed = False
        for member in entries:
            if member.node_id == self.me.node_id:
                continue  # nobody knows us better than we do
            known = self._members.get(member.node_id)
            if known is None or member.rank() > known.rank():
                self._members[member.node_id] = member
                changed = True
        if not changed:
            return []
        return [MembersChanged(self.members), *self._push()]

    def gossip_message(self) -> dict:
        return {"kind": "members", "from": self.me.node_id,
                "members": [m.to_wire() for m in self._members.values()]}

    def _push(self) -> list:
        """Our full view to ``fanout`` random members, and to seeds no member answers for.

        A bounded fanout keeps a round O(fanout) messages, so the cluster spreads
        news in O(log n) rounds instead of O(n^2) messages per change.
        """
        message = self.gossip_message()
        others = sorted(m.address for m in self._members.values()
                        if m.node_id != self.me.node_id)
        targets = others if len(others) <= self._fanout else self._rng.sample(others, self._fanout)
        known = set(others)
        targets += [s for s in self._seeds if s not in known]
        return [Send(address, message) for address in targets]

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
