"""Delta-state CRDTs for agent state (see docs/STATE.md).

Every type subclasses :class:`Crdt` (contract in :mod:`protocols.crdt.base`) and is
registered in :data:`TYPES` by its wire tag.  An agent's state is a dict of named
fields, carried as ``{name: [tag, wire]}`` (:mod:`protocols.crdt.fields`).
"""

from __future__ import annotations

from .base import ELEMENTS_MAX, TYPES, U64_MAX, Crdt, CrdtError
from .counters import GCounter, PNCounter
from .fields import (
    FIELD_NAME_MAX,
    FIELDS_MAX,
    bind_fields,
    decode_fields,
    encode_fields,
    expire_fold_markers,
    merge_fields,
    prune_fields,
    take_deltas,
)
from .maps import LWWMap, ORMap, TTLMap
from .registers import LWWRegister
from .sequence import RGA
from .sets import GSet, ORSet, TwoPSet
from .vclock import AFTER, BEFORE, CONCURRENT, EQUAL, VCLOCK_ENTRIES_MAX, VClock, vc_compare, vc_merge

__all__ = [
    "AFTER",
    "BEFORE",
    "CONCURRENT",
    "ELEMENTS_MAX",
    "EQUAL",
    "FIELDS_MAX",
    "FIELD_NAME_MAX",
    "GCounter",
    "GSet",
    "LWWMap",
    "LWWRegister",
    "ORMap",
    "ORSet",
    "PNCounter",
    "RGA",
    "TTLMap",
    "TYPES",
    "TwoPSet",
    "U64_MAX",
    "VCLOCK_ENTRIES_MAX",
    "VClock",
    "Crdt",
    "CrdtError",
    "bind_fields",
    "decode_fields",
    "encode_fields",
    "expire_fold_markers",
    "merge_fields",
    "prune_fields",
    "take_deltas",
    "vc_compare",
    "vc_merge",
]
