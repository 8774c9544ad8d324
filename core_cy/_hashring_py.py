"""Pure-Python twin of :mod:`core_cy.hashring` (same API, same results).

The ring is two parallel lists sorted by ``(point, node bytes)``: ``_points`` (ints) for
``bisect`` and ``_owners`` (node names as added).  See docs "Agent placement hash".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

import xxhash

from ._common import (
    HASH_SEED,
    POINTS_PER_VNODE,
    EmptyRingError,
    check_vnodes,
    node_bytes,
    vnode_count,
)

__all__ = ["HashRing", "EmptyRingError", "xxh64", "key_hash", "node_points"]

_xxh64 = xxhash.xxh64_intdigest


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` as an unsigned 64-bit int."""
    return _xxh64(data, seed)


def key_hash(key) -> int:
    """Ring position of a key: XXH64(UTF-8 or raw bytes, seed 0)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    elif not isinstance(key, bytes):
        raise TypeError(f"keys must be str or bytes, got {type(key).__name__}")
    return _xxh64(key, HASH_SEED)


def node_points(node, vnodes: int = 160, weight: float = 1.0) -> list[int]:
    """Ring points of a node, in derivation order (point t = XXH64(le64(t), XXH64(name)))."""
    seed = _xxh64(node_bytes(node), HASH_SEED)
    count = vnode_count(check_vnodes(vnodes), weight) * POINTS_PER_VNODE
    return [_xxh64(t.to_bytes(8, "little"), seed) for t in range(count)]


class HashRing:
    """Consistent hash ring with virtual nodes and weights."""

    __slots__ = ("_vnodes", "_nodes", "_points", "_point_nodes", "_owners")

    def __init__(self, nodes=(), vnodes: int = 160):
        self._vnodes = check_vnodes(vnodes)
        self._nodes: dict[bytes, tuple[object, float]] = {}
        self._points: list[int] = []       # sorted ring points
        self._point_nodes: list[bytes] = []  # encoded owner of each point (tie-break)
        self._owners: list[object] = []     # owner of each point, as added
        items = nodes.items() if isinstance(nodes, Mapping) else ((n, 1.0) for n in nodes)
        self._add_many(list(items))

    # -- membership ---------------------------------------------------------------
    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def nodes(self) -> tuple:
        """Node names, sorted by their encoded bytes."""
        return tuple(self._nodes[nb][0] for nb in sorted(self._nodes))

    def weight(self, node) -> float:
        return self._nodes[node_bytes(node)][1]

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node) -> bool:
        try:
            return node_bytes(node) in self._nodes
        except TypeError:
            return False

    def __repr__(self) -> str:
        return f"HashRing(nodes={list(self.nodes)!r}, vnodes={self._vnodes})"

    def add(self, node, weight: float = 1.0) -> None:
        """Add ``node`` (str or bytes); re-adding a node replaces its weight and name."""
        self._add_many([(node, weight)])

    def _add_many(self, items) -> None:
        if not items:
            return
        new = []
        for node, weight in items:
            nb = node_bytes(node)
            count = vnode_count(self._vnodes, weight)
            if nb in self._nodes:
                self._remove_points(nb)
                new = [e for e in new if e[1] != nb]
            seed = _xxh64(nb, HASH_SEED)
            new += [(_xxh64(t.to_bytes(8, "little"), seed), nb)
                    for t in range(count * POINTS_PER_VNODE)]
            self._nodes[nb] = (node, float(weight))
        # existing entries are one sorted run: timsort merges it with the new ones
        entries = sorted([*zip(self._points, self._point_nodes), *new])
        self._points = [p for p, _ in entries]
        self._point_nodes = [nb for _, nb in entries]
        self._reindex()

    def remove(self, node) -> None:
        """Remove ``node``; raises KeyError when it is not on the ring."""
        nb = node_bytes(node)
        if nb not in self._nodes:
            raise KeyError(node)
        self._remove_points(nb)
        del self._nodes[nb]
        self._reindex()

    def _remove_points(self, nb: bytes) -> None:
        keep = [i for i, b in enumerate(self._point_nodes) if b != nb]
        self._points = [self._points[i] for i in keep]
        self._point_nodes = [self._point_nodes[i] for i in keep]

    def _reindex(self) -> None:
        names = {nb: entry[0] for nb, entry in self._nodes.items()}
        self._owners = [names[nb] for nb in self._point_nodes]

    # -- lookups ------------------------------------------------------------------
    def owner(self, key):
        """The node owning ``key`` (str or bytes)."""
        if key.__class__ is str:
            key = key.encode("utf-8")
        elif not isinstance(key, (str, bytes)):
            raise TypeError(f"keys must be str or bytes, got {type(key).__name__}")
        elif isinstance(key, str):
            key = key.encode("utf-8")
        points = self._points
        if not points:
            raise EmptyRingError("hash ring has no nodes")
        i = bisect_left(points, _xxh64(key, HASH_SEED))
        if i == len(points):
            i = 0
        return self._owners[i]

    def owners(self, keys) -> list:
        """owner() of every key, as a list."""
        points = self._points
        if not points:
            keys = list(keys)
            if not keys:
                return []
            raise EmptyRingError("hash ring has no nodes")
        owners = self._owners
        n = len(points)
        out = []
        append = out.append
        h = _xxh64
        for key in keys:
            if key.__class__ is not bytes:
                if isinstance(key, str):
                    key = key.encode("utf-8")
                elif not isinstance(key, bytes):
                    raise TypeError(f"keys must be str or bytes, got {type(key).__name__}")
            i = bisect_left(points, h(key, HASH_SEED))
            append(owners[i if i < n else 0])
        return out

    def preference_list(self, key, n: int) -> list:
        """The first ``n`` distinct nodes clockwise from ``key`` (fewer if the ring is smaller)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("n must be an int")
        if n < 0:
            raise ValueError("n must be >= 0")
        first = self.owner(key)
        if n == 0:
            return []
        want = min(n, len(self._nodes))
        points = self._points
        owners = self._owners
        total = len(points)
        i = bisect_left(points, key_hash(key))
        out = [first]
        seen = {node_bytes(first)}
        for step in range(1, total):
            if len(out) >= want:
                break
            node = owners[(i + step) % total]
            nb = node_bytes(node)
            if nb not in seen:
                seen.add(nb)
                out.append(node)
        return out
