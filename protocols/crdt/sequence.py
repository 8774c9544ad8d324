"""Sequence CRDT: :class:`RGA`, a replicated growable array for ordered logs."""

from __future__ import annotations

from typing import Any

from protocols.crdt.base import ELEMENTS_MAX, U64_MAX, Crdt, CrdtError
from protocols.crdt.maps import plain_value, wire_list, wire_u64

__all__ = ["RGA"]

Id = tuple  # (ts, replica)
#: The virtual head every first-level element is inserted after.
ROOT: Id = (0, 0)
_NO_IDS: frozenset = frozenset()


class RGA(Crdt):
    """Replicated Growable Array (Roh et al., 2011), as a delta-state CRDT.

    Every element has an id ``(ts, replica)``: ``ts`` is a Lamport counter (one more
    than the highest ts this object has seen), so an element's id is greater than the
    id of the element it was inserted after (its *origin*) and than every id its
    inserter had seen.  State = the set of elements ``id -> (origin, value)`` plus the
    set of deleted ids; merge is the union of both, so it is trivially commutative,
    associative and idempotent.

    Order (the RGA rule): a depth-first walk of the tree of origins from ``ROOT``,
    visiting the children of an element in descending id order.  A local insert has
    the greatest id, so it lands right after its origin; concurrent inserts after the
    same element are ordered by id, newest first, identically on every replica.  An
    element whose origin has not arrived yet (deltas out of causal order) is kept but
    not shown until the origin arrives.

    Deletes leave tombstones: a deleted element's id and origin stay (elements inserted
    after it still hang off it), its value is dropped.  There is no ``compact()``:
    removing a tombstone safely needs every replica to have seen it and no insert after
    it to be in flight (causal stability), which this object cannot know.

    Deltas: an insert's delta is the one new element; a delete's delta is the one
    deleted id.  Wire form: ``[elements, deleted]``: ``elements`` rows
    ``[ts, replica, origin_ts, origin_replica, value]`` strictly ascending by id
    (value ``None`` for a deleted element); ``deleted`` rows ``[ts, replica]`` strictly
    ascending.  Checked: ``ts >= 1``, origin is ``ROOT`` or has a smaller ts (so origins
    never form a cycle).
    """

    TAG = "rga"
    __slots__ = ("_elems", "_dead", "_top", "_order")

    def __init__(self) -> None:
        super().__init__()
        self._elems: dict[Id, tuple[Id, Any]] = {}
        self._dead: frozenset | set = _NO_IDS  # a set of its own from the first delete
        self._top = 0  # highest ts seen
        self._order: list[Id] | None = None  # visible ids in order; None = recompute

    # -- mutators ----------------------------------------------------------------------
    def insert(self, index: int, value: Any) -> Crdt:
        """Insert ``value`` so that it ends up at ``index`` (0..len) of this replica's
        list.  Raises IndexError outside that range."""
        order = self._visible()
        if not 0 <= index <= len(order):
            raise IndexError(f"insert index {index} outside 0..{len(order)}")
        if self._top >= U64_MAX:
            raise CrdtError("RGA counter past 2**64-1")
        value = plain_value(value)
        new = (self._top + 1, self.replica)
        entry = (order[index - 1] if index else ROOT, value)
        self._elems[new] = entry
        self._top = new[0]
        order.insert(index, new)
        delta = RGA()
        delta._elems[new] = entry
        delta._top = new[0]
        return self._record(delta)

    def append(self, value: Any) -> Crdt:
        return self.insert(len(self), value)

    def delete(self, index: int) -> Crdt:
        """Delete the element at ``index``.  Raises IndexError outside 0..len-1."""
        order = self._visible()
        if not 0 <= index < len(order):
            raise IndexError(f"delete index {index} outside 0..{len(order) - 1}")
        gone = order.pop(index)
        self._kill([gone])
        delta = RGA()
        delta._dead = {gone}
        delta._top = gone[0]
        return self._record(delta)

    # -- reads -------------------------------------------------------------------------
    def value(self) -> list:
        elems = self._elems
        return [elems[i][1] for i in self._visible()]

    def __len__(self) -> int:
        return len(self._visible())

    def _visible(self) -> list[Id]:
        if self._order is None:
            self._order = self._walk()
        return self._order

    def _walk(self) -> list[Id]:
        """Visible ids in RGA order: pre-order walk of the origin tree, children in
        descending id order (iterative: an appended log is one long chain)."""
        children: dict[Id, list[Id]] = {}
        for eid, (origin, _) in self._elems.items():
            children.setdefault(origin, []).append(eid)
        dead = self._dead
        out = []
        stack = sorted(children.get(ROOT, ()))  # pop() takes the greatest id first
        while stack:
            eid = stack.pop()
            if eid not in dead:
                out.append(eid)
            kids = children.get(eid)
            if kids:
                stack.extend(sorted(kids))
        return out

    # -- contract ----------------------------------------------------------------------
    def _kill(self, ids) -> None:
        """Mark ``ids`` deleted and drop the values of those present."""
        if self._dead is _NO_IDS:
            self._dead = set()
        self._dead.update(ids)
        elems = self._elems
        for eid in ids:
            entry = elems.get(eid)
            if entry is not None and entry[1] is not None:
                elems[eid] = (entry[0], None)

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        elems, dead = self._elems, self._dead
        fresh = [eid for eid in other._elems if eid not in elems]
        for eid in fresh:
            origin, value = other._elems[eid]
            elems[eid] = (origin, None if eid in dead else value)
        new_dead = [eid for eid in other._dead if eid not in dead]
        if new_dead:
            self._kill(new_dead)
        if fresh or new_dead:
            self._order = None
        self._top = max(self._top, other._top)

    def to_wire(self) -> list:
        elems = [[i[0], i[1], o[0], o[1], v] for i, (o, v) in sorted(self._elems.items())]
        return [elems, [list(i) for i in sorted(self._dead)]]

    @classmethod
    def from_wire(cls, data: Any) -> "RGA":
        elems_w, dead_w = wire_list(data, "RGA", 2)
        elems_w, dead_w = wire_list(elems_w, "RGA elements"), wire_list(dead_w, "RGA deleted")
        if len(elems_w) + len(dead_w) > ELEMENTS_MAX:
            raise CrdtError(f"RGA: more than {ELEMENTS_MAX} entries")
        obj = cls()
        dead = [_read_id(row, "RGA deleted id") for row in dead_w]
        _ascending(dead, "RGA deleted ids")
        obj._dead = set(dead)
        last: Id = ROOT
        for row in elems_w:
            ts, rep, ots, orep, value = wire_list(row, "RGA element", 5)
            eid = _read_id((ts, rep), "RGA element id")
            origin = (wire_u64(ots, "origin ts"), wire_u64(orep, "origin replica"))
            if eid <= last:
                raise CrdtError("RGA elements must be strictly ascending by id")
            if origin != ROOT and not 1 <= origin[0] < eid[0]:
                raise CrdtError("RGA element origin must be ROOT or have a smaller ts")
            obj._elems[eid] = (origin, None if eid in obj._dead else plain_value(value))
            obj._top = max(obj._top, eid[0])
            last = eid
        obj._top = max(obj._top, max((d[0] for d in dead), default=0))
        return obj

    def _state_key(self) -> Any:
        return tuple(sorted(self._elems.items())), tuple(sorted(self._dead))


def _read_id(row: Any, what: str) -> Id:
    ts, rep = wire_list(row, what, 2)
    eid = (wire_u64(ts, f"{what} ts"), wire_u64(rep, f"{what} replica"))
    if eid[0] == 0:
        raise CrdtError(f"{what}: ts starts at 1")
    return eid


def _ascending(ids: list[Id], what: str) -> None:
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise CrdtError(f"{what} must be strictly ascending")
