"""Definitions shared by the compiled kernels and their pure-Python twins.

Both implementations import this module, so they raise the same exception classes,
return the same named tuples and agree on the constants below.
"""

from __future__ import annotations

import math
from array import array
from typing import NamedTuple

import xxhash

__all__ = [
    "AFTER",
    "BEFORE",
    "CONCURRENT",
    "EQUAL",
    "EmptyRingError",
    "HASH_SEED",
    "LWWMapState",
    "ORSetState",
    "POINTS_PER_VNODE",
    "REPLICA_SEED",
    "empty_lwwmap",
    "empty_orset",
    "replica_id",
    "vnode_count",
]

#: Seed of XXH64 for keys and for node names (see docs: "Agent placement hash").
HASH_SEED = 0
#: Each virtual node is POINTS_PER_VNODE points on the ring (8 keeps the most loaded of
#: 10 equal nodes within a few percent of the mean; 1 point per vnode does not).
POINTS_PER_VNODE = 8
#: Seed used by :func:`replica_id` (distinct from HASH_SEED on purpose).
REPLICA_SEED = 0x5EED_0F_2E9

# vclock_compare results: how the first clock relates to the second.
EQUAL = 0
BEFORE = 1  # a happened before b (a < b)
AFTER = 2  # a happened after b (a > b)
CONCURRENT = 3


class EmptyRingError(LookupError):
    """owner()/preference_list() was called on a ring without nodes."""


class ORSetState(NamedTuple):
    """Add-wins observed-remove set: a dot store plus a causal context.

    Dot store (one row per live dot, rows strictly ascending by ``(rep, ctr)``):
      ``dot_reps``  array('Q')  replica id of each dot
      ``dot_ctrs``  array('Q')  counter of each dot (>= 1)
      ``elems``     list        the element each dot added (any object; same dot -> same
                                element on every replica, never compared by the kernel)
    Causal context = every dot (r, c) with ``c <= ctx_ctrs[r]`` plus the dot cloud:
      ``ctx_ids``   array('Q')  strictly ascending replica ids
      ``ctx_ctrs``  array('Q')  contiguous-prefix counter per replica
      ``cloud_reps``/``cloud_ctrs``  array('Q')  extra dots, strictly ascending by (rep, ctr)
    The set's value is ``set(elems)``; an element is present while it has a dot.
    """

    dot_reps: array
    dot_ctrs: array
    elems: list
    ctx_ids: array
    ctx_ctrs: array
    cloud_reps: array
    cloud_ctrs: array


class LWWMapState(NamedTuple):
    """Last-writer-wins map, rows strictly ascending by key (bytewise).

      ``keys``  list of bytes   map keys, strictly ascending, unique
      ``ts``    array('Q')      write timestamp of each key (e.g. HLC or ns)
      ``reps``  array('Q')      replica id of the write (tie-breaker)
      ``vals``  list            values (opaque; use a sentinel of your own for deletes)
    Per key the row with the higher ``(ts, rep)`` wins; equal stamps name the same write.
    """

    keys: list
    ts: array
    reps: array
    vals: list


def empty_orset() -> ORSetState:
    q = "Q"
    return ORSetState(array(q), array(q), [], array(q), array(q), array(q), array(q))


def empty_lwwmap() -> LWWMapState:
    return LWWMapState([], array("Q"), array("Q"), [])


def replica_id(name: str | bytes) -> int:
    """Stable 64-bit replica id for a node/replica name (XXH64, seed REPLICA_SEED)."""
    if isinstance(name, str):
        name = name.encode("utf-8")
    return xxhash.xxh64_intdigest(name, REPLICA_SEED)


def vnode_count(vnodes: int, weight: float) -> int:
    """Virtual nodes for a node of ``weight``: max(1, floor(vnodes * weight + 0.5))."""
    w = float(weight)
    if not math.isfinite(w) or w <= 0.0:
        raise ValueError(f"node weight must be a finite number > 0, got {weight!r}")
    return max(1, math.floor(vnodes * w + 0.5))


def check_vnodes(vnodes) -> int:
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
    if vnodes > 1_000_000:
        raise ValueError(f"vnodes must be <= 1000000, got {vnodes!r}")
    return vnodes


def node_bytes(node) -> bytes:
    """Encoded name of a node (str -> UTF-8, bytes unchanged)."""
    if isinstance(node, str):
        return node.encode("utf-8")
    if isinstance(node, bytes):
        return bytes(node)
    raise TypeError(f"node names must be str or bytes, got {type(node).__name__}")
