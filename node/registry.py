"""Who owns which agent: the hash ring over the members, with a lookup cache.

Every node builds its ring from the same member set (see
``protocols.membership``), so ``owner(agent_id)`` gives the same node id on
every node once membership has converged.
"""

from __future__ import annotations

from typing import Iterable

from core_cy import HashRing

OWNER_CACHE_MAX = 65_536  # bounded: a cache per agent would break the idle-agent budget


class Registry:
    def __init__(self, self_id: str, vnodes: int = 160):
        self.self_id = self_id
        self._vnodes = vnodes
        self._ring = HashRing((self_id,), vnodes=vnodes)
        self._cache: dict[str, str] = {}

    def set_members(self, node_ids: Iterable[str]) -> None:
        """Rebuild the ring for a new member set; drops cached lookups."""
        wanted = set(node_ids) | {self.self_id}
        current = set(self._ring.nodes)
        for node_id in sorted(current - wanted):
            self._ring.remove(node_id)
        for node_id in sorted(wanted - current):
            self._ring.add(node_id)
        self._cache = {}

    def owner(self, agent_id: str) -> str:
        owner = self._cache.get(agent_id)
        if owner is None:
            if len(self._cache) >= OWNER_CACHE_MAX:
                self._cache = {}
            owner = self._cache[agent_id] = self._ring.owner(agent_id)
        return owner

    def is_local(self, agent_id: str) -> bool:
        return self.owner(agent_id) == self.self_id

    @property
    def nodes(self) -> list[str]:
        return list(self._ring.nodes)
