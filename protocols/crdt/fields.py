"""An agent's state: a dict of named CRDT fields, and its wire form.

Wire form: ``{name: [tag, wire]}``: each field's type tag (``base.TYPES``) and its
``to_wire()``.  Names are str of 1..FIELD_NAME_MAX chars; at most FIELDS_MAX fields.
Merging is per name: a join of the two fields of each name, a copy for a name only the
other side has.
"""

from __future__ import annotations

import reprlib
from typing import Any, Callable, Container

from .base import TYPES, Crdt, CrdtError, utf8
from .counters import GCounter, PNCounter
from .vclock import VClock, bounded_map

__all__ = [
    "FIELDS_MAX",
    "FIELD_NAME_MAX",
    "bind_fields",
    "decode_fields",
    "encode_fields",
    "expire_fold_markers",
    "merge_fields",
    "prune_fields",
    "take_deltas",
]

#: Named fields one agent state may hold.
FIELDS_MAX = 64
#: Longest field name, in characters.
FIELD_NAME_MAX = 64


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= FIELD_NAME_MAX:
        raise CrdtError(f"a field name must be a str of 1..{FIELD_NAME_MAX} chars, got {name!r:.80}")
    utf8(name, "a field name")
    return name


def _check_fields(fields: Any) -> dict[str, Crdt]:
    for name, field in bounded_map(fields, FIELDS_MAX, "fields").items():
        _check_name(name)
        if not isinstance(field, Crdt) or not field.TAG:
            raise CrdtError(f"field {name!r} is not a CRDT: {type(field).__name__}")
    return fields


def encode_fields(fields: dict[str, Crdt]) -> dict[str, list]:
    """``{name: [tag, wire]}`` for every field (msgpack-ready)."""
    return {name: [field.TAG, field.to_wire()] for name, field in _check_fields(fields).items()}


def decode_fields(data: Any) -> dict[str, Crdt]:
    """Fields from their wire form; CrdtError on any malformed part (peer input)."""
    fields = {}
    for name, item in bounded_map(data, FIELDS_MAX, "fields").items():
        _check_name(name)
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise CrdtError(f"field {name!r} must be [tag, wire]")
        tag, wire = item
        cls = TYPES.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise CrdtError(f"field {name!r} has an unknown type tag {reprlib.repr(tag)}")
        fields[name] = cls.from_wire(wire)
    return fields


def merge_fields(into: dict[str, Crdt], other: dict[str, Crdt]) -> None:
    """Join ``other`` (full fields or deltas) into ``into``, per name.  A name only in
    ``other`` gets a new, unbound field (call :func:`bind_fields` after merging).  Two
    fields of one name but different types raise CrdtError and leave ``into`` as it
    was; so does a result of more than FIELDS_MAX names.  A field's own merge may still
    refuse (a VClock past its size bound): the names merged before it stay merged."""
    _check_fields(other)
    for name, field in other.items():
        mine = into.get(name)
        if mine is not None and type(mine) is not type(field):
            raise CrdtError(f"field {name!r} is a {type(mine).__name__} here and a "
                            f"{type(field).__name__} in the merged state")
    if len(into.keys() | other.keys()) > FIELDS_MAX:
        raise CrdtError(f"merged state would have more than {FIELDS_MAX} fields")
    for name, field in other.items():
        if name not in into:
            into[name] = type(field)()
        into[name].merge(field)


def take_deltas(fields: dict[str, Crdt]) -> dict[str, Crdt]:
    """The pending delta of each field that has one (taking them clears them)."""
    deltas = {}
    for name, field in fields.items():
        delta = field.take_delta()
        if delta is not None:
            deltas[name] = delta
    return deltas


def bind_fields(fields: dict[str, Crdt], replica: int, clock: Callable[[], int] | None = None) -> None:
    """Stamp every field with the replica (and clock) its mutations are made by."""
    for field in fields.values():
        field.bind(replica, clock)


def prune_fields(fields: dict[str, Crdt], live: Container[int], into: int, now_ns: int,
                 ttl_ns: int) -> int:
    """The node's pruning rule (docs/STATE.md, 'Pruning'), run by an agent's owner on
    a write: ``live`` holds the replica ids of the current members, ``into`` is the
    owner's own.  Each counter field folds the rows of replicas not in ``live`` into
    ``into`` (a delta, shipped with the write) and forgets its expired fold markers
    (not those of replicas in ``live``);
    each vector clock field drops the entries of replicas not in ``live`` (a local
    compaction).  Fields inside maps are left as they are.  Returns the rows and
    entries removed."""
    removed = 0
    for field in fields.values():
        kind = type(field)
        if kind is GCounter or kind is PNCounter:
            try:
                removed += field.prune(live, into, now_ns, ttl_ns)
            except CrdtError:  # the folded row would pass 2**64-1: it stays unfolded
                continue
        elif kind is VClock:
            removed += field.prune([r for r in field.value() if r in live or r == into])
    return removed


def expire_fold_markers(fields: dict[str, Crdt], clock: Callable[[], int],
                        live: Container[int]) -> int:
    """Forget the counter fields' fold markers past their expiry, by the same rule
    as ``prune_fields`` (a local compaction; a marker of a replica in ``live`` is
    kept): what a replica's copy runs, since it never folds.  ``clock`` (ns) is read
    only when a field holds markers.  Returns how many went."""
    dropped = 0
    for field in fields.values():
        kind = type(field)
        if (kind is GCounter or kind is PNCounter) and field.folds():
            dropped += field.expire_folds(clock(), live)
    return dropped
