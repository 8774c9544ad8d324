"""Sets: grow-only (GSet), two-phase (TwoPSet) and add-wins observed-remove (ORSet).

Elements are hashable msgpack scalars: str, bytes, int (in the i64 or u64 range), bool
or None.  They compare as Python values, so ``True``/``1`` and ``False``/``0`` are one
element (as in a Python set).
"""

from __future__ import annotations

import reprlib
from array import array
from typing import Any, Hashable, Iterable

from core_cy import ORSetState, orset_merge

from .base import ELEMENTS_MAX, U64_MAX, Crdt, CrdtError, utf8
from .vclock import EMPTY_Q, Q, read_columns, u64_column

__all__ = ["GSet", "ORSet", "TwoPSet", "check_element", "element_key"]

I64_MIN = -(1 << 63)


def check_element(e: Any) -> Hashable:
    """``e`` if it may be a set element or map key, else CrdtError."""
    if isinstance(e, str):
        utf8(e, "a set element")
        return e
    if e is None or isinstance(e, (bytes, bool)):
        return e
    if type(e) is int and I64_MIN <= e <= U64_MAX:
        return e
    raise CrdtError(f"an element must be str, bytes, int (i64/u64), bool or None, "
                    f"got {reprlib.repr(e)}")


def element_key(e: Any) -> tuple:
    """A total order over elements (for canonical wire order and state keys)."""
    if e is None:
        return (0, 0)
    if isinstance(e, (bool, int)):
        return (1, int(e))
    return (2, e) if isinstance(e, bytes) else (3, e)


def _sorted(elems: Iterable) -> list:
    return sorted(elems, key=element_key)


def _read_elements(data: Any, what: str) -> set:
    if not isinstance(data, list) or len(data) > ELEMENTS_MAX:
        raise CrdtError(f"{what} must be a list of at most {ELEMENTS_MAX} elements")
    return {check_element(e) for e in data}


class GSet(Crdt):
    """Grow-only set: ``add(e)``; merge is union.  Wire: ``[element, ...]``."""

    TAG = "gs"
    __slots__ = ("_elems",)

    def __init__(self) -> None:
        super().__init__()
        self._elems: set | None = None  # allocated on first add

    def add(self, e: Any) -> Crdt:
        e = check_element(e)
        if self._elems is None:
            self._elems = set()
        self._elems.add(e)
        return self._record(self._of({e}))

    def __contains__(self, e: Any) -> bool:
        return bool(self._elems) and e in self._elems

    def __len__(self) -> int:
        return len(self._elems or ())

    def value(self) -> frozenset:
        return frozenset(self._elems or ())

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        if other._elems:
            self._elems = (self._elems or set()) | other._elems

    def to_wire(self) -> list:
        return _sorted(self._elems or ())

    @classmethod
    def from_wire(cls, data: Any) -> "GSet":
        return cls._of(_read_elements(data, "GSet"))

    def _state_key(self) -> Any:
        return tuple(map(element_key, self.to_wire()))

    @classmethod
    def _of(cls, elems: set) -> "GSet":
        s = cls()
        s._elems = elems or None
        return s


class TwoPSet(Crdt):
    """Two-phase set: ``add(e)``, ``remove(e)``.  A removal is forever: once removed
    (here or at any replica), ``e`` never comes back, whatever adds follow.  Removing an
    element that was never added is allowed and bars it in advance.  The removed
    elements are kept as tombstones for the life of the set.  Wire: ``[added,
    removed]`` (two element lists; ``added`` holds only elements not removed)."""

    TAG = "2p"
    __slots__ = ("_added", "_removed")

    def __init__(self) -> None:
        super().__init__()
        self._added: set | None = None
        self._removed: set | None = None

    def add(self, e: Any) -> Crdt:
        e = check_element(e)
        if not (self._removed and e in self._removed):
            self._added = (self._added or set()) | {e}
        return self._record(self._of({e}, set()))

    def remove(self, e: Any) -> Crdt:
        e = check_element(e)
        self._removed = (self._removed or set()) | {e}
        if self._added:
            self._added.discard(e)
        return self._record(self._of(set(), {e}))

    def __contains__(self, e: Any) -> bool:
        return bool(self._added) and e in self._added

    def __len__(self) -> int:
        return len(self._added or ())

    def value(self) -> frozenset:
        return frozenset(self._added or ())

    def removed(self) -> frozenset:
        """The tombstones: elements that can never be (re)added."""
        return frozenset(self._removed or ())

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        removed = (self._removed or set()) | (other._removed or set())
        added = ((self._added or set()) | (other._added or set())) - removed
        self._added, self._removed = added or None, removed or None

    def to_wire(self) -> list:
        return [_sorted(self._added or ()), _sorted(self._removed or ())]

    @classmethod
    def from_wire(cls, data: Any) -> "TwoPSet":
        if not isinstance(data, list) or len(data) != 2:
            raise CrdtError("TwoPSet wire form must be [added, removed]")
        added, removed = (_read_elements(d, "TwoPSet") for d in data)
        return cls._of(added, removed)

    def _state_key(self) -> Any:
        return tuple(tuple(map(element_key, side)) for side in self.to_wire())

    @classmethod
    def _of(cls, added: set, removed: set) -> "TwoPSet":
        s = cls()
        s._added, s._removed = (added - removed) or None, removed or None
        return s


_EMPTY_ORSET = ORSetState(EMPTY_Q, EMPTY_Q, [], EMPTY_Q, EMPTY_Q, EMPTY_Q, EMPTY_Q)


class ORSet(Crdt):
    """Add-wins observed-remove set (Almeida et al.'s AWORSet), dot-based.

    Each ``add(e)`` tags ``e`` with a new *dot* (this replica, next counter); ``remove``
    and ``clear`` remove the dots this replica has observed.  The causal context (every
    dot seen: a contiguous prefix per replica plus a cloud of extra dots) is the only
    memory of removals, so there are no per-element tombstones.  A remove concurrent
    with an add cannot have observed the add's dot: the element stays (add wins).

    In memory: :class:`core_cy.ORSetState`, joined by :func:`core_cy.orset_merge`.
    Wire: the state's seven columns ``[dot_reps, dot_ctrs, elems, ctx_ids, ctx_ctrs,
    cloud_reps, cloud_ctrs]``, dots strictly ascending by (replica, counter).
    """

    TAG = "or"
    __slots__ = ("_s",)

    def __init__(self) -> None:
        super().__init__()
        self._s: ORSetState = _EMPTY_ORSET  # shared until the first change (never mutated)

    def add(self, e: Any) -> Crdt:
        """Add ``e`` with a new dot; the delta's context also covers ``e``'s older dots,
        so they are replaced rather than accumulated."""
        e = check_element(e)
        dot = (self.replica, self._next_counter())
        delta = self._delta_of([dot], [e], self._dots_of(e) + [dot])
        self._s = orset_merge(self._s, delta._s)
        return self._record(delta)

    def remove(self, e: Any) -> Crdt:
        """Remove ``e`` as observed here: the delta is no dots plus a context holding
        ``e``'s dots (a concurrent add elsewhere survives)."""
        return self._remove_dots(self._dots_of(check_element(e)))

    def clear(self) -> Crdt:
        """Remove every observed element."""
        return self._remove_dots(list(zip(self._s.dot_reps, self._s.dot_ctrs)))

    def _remove_dots(self, dots: list[tuple[int, int]]) -> Crdt:
        if not dots:
            return ORSet()
        delta = self._delta_of([], [], dots)
        self._s = orset_merge(self._s, delta._s)
        return self._record(delta)

    def _dots_of(self, e: Any) -> list[tuple[int, int]]:
        s = self._s
        return [(r, c) for r, c, x in zip(s.dot_reps, s.dot_ctrs, s.elems) if x == e]

    def _next_counter(self) -> int:
        s, me = self._s, self.replica
        seen = [c for r, c in zip(s.ctx_ids, s.ctx_ctrs) if r == me]
        seen += [c for r, c in zip(s.cloud_reps, s.cloud_ctrs) if r == me]
        top = max(seen, default=0)
        if top >= U64_MAX:
            raise CrdtError(f"dot counter of replica {me} would pass 2**64-1")
        return top + 1

    @classmethod
    def _delta_of(cls, dots: list, elems: list, context: list) -> "ORSet":
        """An ORSet of the given dot store and a context of exactly ``context`` dots."""
        context = sorted(set(context))
        delta = cls()
        delta._s = orset_merge(ORSetState(
            array(Q, [r for r, _ in dots]), array(Q, [c for _, c in dots]), list(elems),
            EMPTY_Q, EMPTY_Q,
            array(Q, [r for r, _ in context]), array(Q, [c for _, c in context]),
        ), _EMPTY_ORSET)  # compacts the context into its canonical form
        return delta

    def __contains__(self, e: Any) -> bool:
        return e in self._s.elems

    def __len__(self) -> int:
        return len(self.value())

    def value(self) -> frozenset:
        return frozenset(self._s.elems)

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        self._s = orset_merge(self._s, other._s)

    def to_wire(self) -> list:
        s = self._s
        return [list(col) if col is s.elems else col.tolist() for col in s]

    @classmethod
    def from_wire(cls, data: Any) -> "ORSet":
        if not isinstance(data, list) or len(data) != 7:
            raise CrdtError("ORSet wire form must be a list of 7 columns")
        dot_reps, dot_ctrs = _dot_columns(data[0:2], "ORSet dots")
        elems = data[2]
        if not isinstance(elems, list) or len(elems) != len(dot_reps):
            raise CrdtError("ORSet elems must be a list, one element per dot")
        elems = [check_element(e) for e in elems]
        ctx_ids, ctx_ctrs = read_columns(data[3:5], 2, "ORSet context")
        cloud_reps, cloud_ctrs = _dot_columns(data[5:7], "ORSet cloud")
        vv = dict(zip(ctx_ids, ctx_ctrs))
        cloud = set(zip(cloud_reps, cloud_ctrs))
        for dot in zip(dot_reps, dot_ctrs):
            if dot[1] > vv.get(dot[0], 0) and dot not in cloud:
                raise CrdtError(f"ORSet dot {dot} is not in its own causal context")
        s = cls()
        state = ORSetState(dot_reps, dot_ctrs, elems, ctx_ids, ctx_ctrs, cloud_reps, cloud_ctrs)
        s._s = orset_merge(state, _EMPTY_ORSET)  # canonical (compacted) context
        return s

    def _state_key(self) -> Any:
        s = self._s
        return (tuple(zip(s.dot_reps, s.dot_ctrs, map(element_key, s.elems))),
                tuple((r, c) for r, c in zip(s.ctx_ids, s.ctx_ctrs) if c),
                tuple(zip(s.cloud_reps, s.cloud_ctrs)))


def _dot_columns(data: list, what: str) -> tuple[array, array]:
    """Two columns of dots (replica, counter >= 1), strictly ascending by dot."""
    if len(data) != 2:
        raise CrdtError(f"{what} must be two columns")
    reps, ctrs = (u64_column(c, what) for c in data)
    if len(reps) != len(ctrs):
        raise CrdtError(f"{what}: columns differ in length")
    if 0 in ctrs:
        raise CrdtError(f"{what}: a dot counter is >= 1")
    dots = list(zip(reps, ctrs))
    if any(a >= b for a, b in zip(dots, dots[1:])):
        raise CrdtError(f"{what} must be strictly ascending by (replica, counter)")
    return reps, ctrs

