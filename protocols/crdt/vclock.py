"""Vector clocks, and the (ids, counts) column helpers the counters share.

A clock is two parallel ``array('Q')`` columns, replica ids strictly ascending and one
counter each (a missing replica counts 0): the representation of
:func:`core_cy.vclock_merge` / :func:`core_cy.vclock_compare`, so joins and comparisons
run in the kernel without conversion.

Bounded size: a clock holds at most :data:`VCLOCK_ENTRIES_MAX` replicas.  Replica ids
are per node *generation*, so a long-lived agent sees new ids each time a node
restarts; the node calls :meth:`VClock.prune` with the replicas that are still members.
Pruning forgets causality: two clocks that differ only in a pruned replica's entry
compare EQUAL, and a clock that was BEFORE or AFTER another only through that entry may
compare EQUAL or CONCURRENT.  For causal delivery this errs on the side of delivering:
a message whose dependency was on a pruned (departed) replica is no longer held back
waiting for it, which is what we want for a replica that will never send again, but
it also means order against such a replica's last messages is no longer enforced.
"""

from __future__ import annotations

import reprlib
from array import array
from bisect import bisect_left
from typing import Any, Iterable

from core_cy import AFTER, BEFORE, CONCURRENT, EQUAL, vclock_compare, vclock_merge

from .base import ELEMENTS_MAX, U64_MAX, Crdt, CrdtError

__all__ = [
    "AFTER",
    "BEFORE",
    "CONCURRENT",
    "EQUAL",
    "VCLOCK_ENTRIES_MAX",
    "VClock",
    "vc_compare",
    "vc_merge",
]

#: Replicas one vector clock may name (the node prunes departed ones well before this).
VCLOCK_ENTRIES_MAX = 256

Q = "Q"
#: Shared empty column: objects start with it and never mutate a column in place
#: while it is this one (saves two arrays per untouched counter or clock).
EMPTY_Q = array(Q)


# -- column helpers (also used by counters and sets) --------------------------------
def u64(x: Any, what: str) -> int:
    """``x`` if it is an int (not a bool) in 0..U64_MAX, else CrdtError."""
    if type(x) is not int or not 0 <= x <= U64_MAX:
        raise CrdtError(f"{what} must be an int in 0..2**64-1, got {reprlib.repr(x)}")
    return x


def bounded_map(data: Any, limit: int, what: str) -> dict:
    """``data`` if it is a dict of at most ``limit`` entries, else CrdtError."""
    if not isinstance(data, dict):
        raise CrdtError(f"{what} must be a map, got {type(data).__name__}")
    if len(data) > limit:
        raise CrdtError(f"{what} has {len(data)} entries, more than {limit}")
    return data


def u64_column(data: Any, what: str, limit: int = ELEMENTS_MAX) -> array:
    """A wire list of u64 ints as array('Q') (at most ``limit`` entries)."""
    if not isinstance(data, list):
        raise CrdtError(f"{what} must be a list, got {type(data).__name__}")
    if len(data) > limit:
        raise CrdtError(f"{what} has {len(data)} entries, more than {limit}")
    for x in data:
        u64(x, what)
    return array(Q, data) if data else EMPTY_Q


def ascending(ids: array, what: str) -> None:
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise CrdtError(f"{what} must be strictly ascending")


def read_columns(data: Any, n: int, what: str, limit: int = ELEMENTS_MAX) -> list[array]:
    """``n`` parallel u64 columns from the wire; the first (replica ids) strictly
    ascending, all of one length."""
    if not isinstance(data, list) or len(data) != n:
        raise CrdtError(f"{what} must be a list of {n} columns")
    cols = [u64_column(c, what, limit) for c in data]
    if any(len(c) != len(cols[0]) for c in cols):
        raise CrdtError(f"{what}: columns differ in length")
    ascending(cols[0], f"{what} replica ids")
    return cols


def find_row(ids: array, replica: int) -> int:
    """Index of ``replica`` in the ascending ``ids`` column, or -1."""
    i = bisect_left(ids, replica)
    return i if i < len(ids) and ids[i] == replica else -1


def put_row(ids: array, cols: list[array], replica: int, values: tuple[int, ...]) -> array:
    """Set ``replica``'s row of the parallel ``cols`` to ``values`` (inserting it in id
    order); returns the ids column.  Columns are changed in place, except EMPTY_Q ones,
    which are replaced by new arrays in ``cols``."""
    i = find_row(ids, replica)
    if i >= 0:
        for col, v in zip(cols, values):
            col[i] = v
        return ids
    if ids is EMPTY_Q:
        cols[:] = [array(Q, (v,)) for v in values]
        return array(Q, (replica,))
    i = bisect_left(ids, replica)
    ids.insert(i, replica)
    for col, v in zip(cols, values):
        col.insert(i, v)
    return ids


def nonzero_rows(ids: array, *cols: array) -> tuple:
    """Rows with some nonzero count (a missing replica and a zero count are the same)."""
    return tuple(row for row in zip(ids, *cols) if any(row[1:]))


# -- the type ------------------------------------------------------------------------
class VClock(Crdt):
    """A vector clock: ``tick()`` advances this replica's entry; ``merge`` is the
    pointwise max; ``compare`` orders two clocks (BEFORE, AFTER, EQUAL, CONCURRENT)."""

    TAG = "vc"
    __slots__ = ("_ids", "_counts")

    def __init__(self) -> None:
        super().__init__()
        self._ids: array = EMPTY_Q
        self._counts: array = EMPTY_Q

    def tick(self) -> "VClock":
        """Advance this replica's entry by one; the delta is that entry."""
        if len(self._ids) >= VCLOCK_ENTRIES_MAX and self.get(self.replica) == 0:
            raise CrdtError(f"vector clock is full ({VCLOCK_ENTRIES_MAX} replicas): prune it")
        now = self.get(self.replica) + 1
        if now > U64_MAX:
            raise CrdtError(f"vector clock entry of replica {self.replica} would pass 2**64-1")
        cols = [self._counts]
        self._ids = put_row(self._ids, cols, self.replica, (now,))
        self._counts = cols[0]
        return self._record(self._of({self.replica: now}))

    def get(self, replica: int) -> int:
        i = find_row(self._ids, replica)
        return self._counts[i] if i >= 0 else 0

    def compare(self, other: "VClock") -> int:
        """How self relates to ``other``: BEFORE (self < other), AFTER, EQUAL or CONCURRENT."""
        self._check_same(other)
        return vclock_compare(self._ids, self._counts, other._ids, other._counts)

    def dominates(self, other: "VClock") -> bool:
        """True when self has seen everything ``other`` has (AFTER or EQUAL)."""
        return self.compare(other) in (AFTER, EQUAL)

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        ids, counts = vclock_merge(self._ids, self._counts, other._ids, other._counts)
        if len(ids) > VCLOCK_ENTRIES_MAX:
            raise CrdtError(f"merged vector clock would name {len(ids)} replicas, "
                            f"more than {VCLOCK_ENTRIES_MAX}: prune departed replicas")
        self._ids, self._counts = ids, counts

    def prune(self, keep: Iterable[int]) -> int:
        """Drop the entries of replicas not in ``keep`` (the current members); returns
        how many were dropped.  A local compaction, not a delta (see the module doc)."""
        keep = set(keep)
        rows = [(r, c) for r, c in zip(self._ids, self._counts) if r in keep]
        dropped = len(self._ids) - len(rows)
        if dropped:
            self._ids = array(Q, [r for r, _ in rows]) if rows else EMPTY_Q
            self._counts = array(Q, [c for _, c in rows]) if rows else EMPTY_Q
        return dropped

    def value(self) -> dict[int, int]:
        return dict(nonzero_rows(self._ids, self._counts))

    def to_wire(self) -> list:
        return [self._ids.tolist(), self._counts.tolist()]

    @classmethod
    def from_wire(cls, data: Any) -> "VClock":
        ids, counts = read_columns(data, 2, "vector clock", VCLOCK_ENTRIES_MAX)
        clock = cls()
        clock._ids, clock._counts = ids, counts
        return clock

    def _state_key(self) -> Any:
        return nonzero_rows(self._ids, self._counts)

    @classmethod
    def _of(cls, entries: dict[int, int]) -> "VClock":
        clock = cls()
        if entries:
            clock._ids, clock._counts = _columns(entries)
        return clock


# -- dict-form clocks (message causality) -------------------------------------------
def _columns(clock: Any) -> tuple[array, array]:
    """A dict-form clock {replica: counter} as checked, sorted columns."""
    for r, c in bounded_map(clock, VCLOCK_ENTRIES_MAX, "a vector clock").items():
        u64(r, "vector clock replica")
        u64(c, "vector clock counter")
    ids = sorted(clock)
    return array(Q, ids), array(Q, [clock[r] for r in ids])


def vc_compare(a: dict, b: dict) -> int:
    """Compare dict-form clocks: BEFORE (a < b), AFTER, EQUAL or CONCURRENT.  CrdtError
    on a malformed clock (they come from messages)."""
    return vclock_compare(*_columns(a), *_columns(b))


def vc_merge(a: dict, b: dict) -> dict[int, int]:
    """Pointwise max of two dict-form clocks (a new dict; CrdtError if malformed or if
    the result names more than VCLOCK_ENTRIES_MAX replicas)."""
    ids, counts = vclock_merge(*_columns(a), *_columns(b))
    if len(ids) > VCLOCK_ENTRIES_MAX:
        raise CrdtError(f"merged vector clock would name more than {VCLOCK_ENTRIES_MAX} replicas")
    return dict(zip(ids, counts))
