"""Grow-only and positive-negative counters, with folding of retired replicas.

In memory a counter is the kernel's columns: ``array('Q')`` replica ids strictly
ascending plus one count column (G-Counter) or two (PN-Counter: increments ``p`` and
decrements ``n``), so :meth:`merge` is one call of :func:`core_cy.gcounter_merge` or
:func:`core_cy.pncounter_merge`.  Each replica's counts are u64: an increment that
would pass 2**64-1 raises :class:`CrdtError`.

Folding (pruning).  Replica ids are per node generation, so every restart or move of
an agent's owner adds a row that never changes again.  Only the agent's owner writes
its state, so the owner may ``fold`` the rows of retired replicas (generations that are
no longer members) into its own row.  Each fold leaves a *marker*
``replica -> (counts folded, expiry_ns)``: when a stale copy that still holds the
retired row is merged later, that row contributes only its excess over the marker (a
zombie that kept counting after the fold), never the folded part again.  Markers
max-merge and travel in the wire form and in deltas; :meth:`expire_folds` drops them
after their expiry (but not while a zombie's excess row is still unfolded).  Two
limits, both by design of the rule:

* a copy older than the markers' TTL that was never merged before they expired would
  count the folded rows twice (pick a TTL longer than any copy can stay offline);
* two replicas folding the same retired row concurrently (two owners, e.g. a split
  brain) each credit it to their own row, so it counts twice: fold only at the owner.
"""

from __future__ import annotations

from array import array
from typing import Any, ClassVar, Iterable

from core_cy import gcounter_merge, pncounter_merge

from .base import ELEMENTS_MAX, U64_MAX, Crdt, CrdtError
from .vclock import EMPTY_Q, Q, find_row, nonzero_rows, put_row, read_columns, u64

__all__ = ["GCounter", "PNCounter"]


def _amount(n: Any) -> int:
    if type(n) is not int:
        raise CrdtError(f"a counter amount must be an int, got {type(n).__name__}")
    return n


class _FoldingCounter(Crdt):
    """Rows ``replica -> counts`` (one count per side) plus fold markers
    ``replica -> (folded count per side..., expiry_ns)`` (None while there are none)."""

    SIDES: ClassVar[int] = 1
    __slots__ = ("_ids", "_folds")

    def __init__(self) -> None:
        super().__init__()
        self._ids: array = EMPTY_Q
        self._folds: dict[int, tuple[int, ...]] | None = None

    # -- per-type column access -----------------------------------------------------
    def _sides(self) -> list[array]:
        raise NotImplementedError

    def _set_sides(self, sides: list[array]) -> None:
        raise NotImplementedError

    def _kernel_merge(self, other: "_FoldingCounter") -> tuple[array, ...]:
        raise NotImplementedError

    # -- rows -----------------------------------------------------------------------
    def _row(self, replica: int) -> tuple[int, ...] | None:
        i = find_row(self._ids, replica)
        return None if i < 0 else tuple(side[i] for side in self._sides())

    def _put(self, replica: int, values: tuple[int, ...]) -> None:
        if any(v > U64_MAX for v in values):
            raise CrdtError(f"count of replica {replica} would pass 2**64-1")
        sides = self._sides()
        self._ids = put_row(self._ids, sides, replica, values)
        self._set_sides(sides)

    def _add(self, amounts: tuple[int, ...]) -> Crdt:
        """Add ``amounts`` (one per side, >= 0) to this replica's row; record the delta."""
        if not any(amounts):
            return type(self)()
        replica = self.replica
        row = self._row(replica) or (0,) * self.SIDES
        mark = (self._folds or {}).get(replica)
        if mark is not None:  # a zombie counts on from its folded total, not from 0
            row = tuple(map(max, row, mark))
        new = tuple(c + a for c, a in zip(row, amounts))
        self._put(replica, new)
        delta = self._one_row(replica, new)
        if self._delta is None:  # the hot path: a turn's first write (no copy, no merge)
            self._delta = self._one_row(replica, new)
        else:
            self._delta.merge(delta)
        return delta

    @classmethod
    def _one_row(cls, replica: int, values: tuple[int, ...]) -> "_FoldingCounter":
        """A delta of one row, built directly (``_of`` for the general case)."""
        counter = cls()
        counter._ids = array(Q, (replica,))
        counter._set_sides([array(Q, (v,)) for v in values])
        return counter

    def _keep_rows(self, keep) -> None:
        """Keep only the rows whose replica satisfies ``keep``."""
        rows = [row for row in zip(self._ids, *self._sides()) if keep(row[0])]
        if len(rows) == len(self._ids):
            return
        cols = [array(Q, col) for col in zip(*rows)] if rows else [EMPTY_Q] * (self.SIDES + 1)
        self._ids = cols[0]
        self._set_sides(cols[1:])

    def _drop_folded(self) -> None:
        """Drop rows wholly covered by their fold marker (they add nothing)."""
        folds = self._folds
        if not folds:
            return
        covered = set()
        for r, mark in folds.items():
            row = self._row(r)
            if row is not None and all(c <= m for c, m in zip(row, mark)):
                covered.add(r)
        if covered:
            self._keep_rows(lambda r: r not in covered)

    # -- folding --------------------------------------------------------------------
    def fold(self, retired: Iterable[int], into: int, now_ns: int, ttl_ns: int) -> Crdt:
        """Move the counts of the ``retired`` replicas into ``into``'s row and mark them
        folded until ``now_ns + ttl_ns``.  Call only at the agent's owner (see the module
        doc).  Returns the delta (empty when nothing was folded)."""
        into, now_ns, ttl_ns = u64(into, "into"), u64(now_ns, "now_ns"), u64(ttl_ns, "ttl_ns")
        retired = {u64(r, "retired replica") for r in retired}
        if into in retired or (self._folds and into in self._folds):
            raise CrdtError(f"cannot fold into replica {into}: it is retired or folded")
        expiry = min(U64_MAX, now_ns + ttl_ns)
        gained = [0] * self.SIDES
        markers: dict[int, tuple[int, ...]] = {}
        for r in sorted(retired):
            row = self._row(r)
            if row is None:
                continue  # nothing of r counted here: a later copy of it is new to us
            old = (self._folds or {}).get(r, (0,) * (self.SIDES + 1))
            for side, (c, m) in enumerate(zip(row, old)):
                gained[side] += max(0, c - m)
            markers[r] = tuple(max(c, m) for c, m in zip(row, old)) + (max(expiry, old[-1]),)
        if not markers:
            return type(self)()
        row = self._row(into) or (0,) * self.SIDES
        new = tuple(c + g for c, g in zip(row, gained))
        self._put(into, new)
        self._folds = {**(self._folds or {}), **markers}
        self._drop_folded()
        return self._record(self._of({into: new}, markers))

    def expire_folds(self, now_ns: int) -> int:
        """Forget the fold markers whose expiry is <= ``now_ns``; returns how many.
        A local compaction (not a delta): markers carry their absolute expiry, so every
        replica expires them at about the same time.  A marker whose replica still has a
        row here (a zombie's excess, not folded yet) is kept: without it the whole row
        would count again.  The owner's next ``fold`` covers that row; then it expires."""
        u64(now_ns, "now_ns")
        if not self._folds:
            return 0
        live = {r: m for r, m in self._folds.items()
                if m[-1] > now_ns or find_row(self._ids, r) >= 0}
        dropped = len(self._folds) - len(live)
        self._folds = live or None
        return dropped

    def replicas(self) -> list[int]:
        """The replicas with a row here (who counted), ascending."""
        return list(self._ids)

    def folds(self) -> dict[int, tuple[int, ...]]:
        """The fold markers: ``{replica: (folded count per side..., expiry_ns)}``."""
        return dict(self._folds or {})

    # -- lattice --------------------------------------------------------------------
    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        ids, *sides = self._kernel_merge(other)
        self._ids = ids
        self._set_sides(sides)
        if other._folds:
            folds = dict(self._folds or {})
            for r, mark in other._folds.items():
                mine = folds.get(r)
                folds[r] = mark if mine is None else tuple(map(max, mine, mark))
            self._folds = folds
        self._drop_folded()

    def _side_totals(self) -> list[int]:
        """Sum of each side, counting a folded replica's row only above its marker."""
        totals = [sum(side) for side in self._sides()]
        for r, mark in (self._folds or {}).items():
            row = self._row(r)
            if row is not None:
                for side, (c, m) in enumerate(zip(row, mark)):
                    totals[side] -= min(c, m)
        return totals

    # -- wire -----------------------------------------------------------------------
    def to_wire(self) -> list:
        folds = [[r, *self._folds[r]] for r in sorted(self._folds or ())]
        return [self._ids.tolist(), *(side.tolist() for side in self._sides()), folds]

    @classmethod
    def from_wire(cls, data: Any) -> "_FoldingCounter":
        width = cls.SIDES + 1
        if not isinstance(data, list) or len(data) != width + 1:
            raise CrdtError(f"{cls.__name__} wire form must be a list of {width + 1} items")
        ids, *sides = read_columns(data[:width], width, cls.__name__)
        counter = cls()
        counter._ids = ids
        counter._set_sides(sides)
        counter._folds = _read_folds(data[width], width + 1, cls.__name__) or None
        counter._drop_folded()
        return counter

    def _state_key(self) -> Any:
        return nonzero_rows(self._ids, *self._sides()), tuple(sorted((self._folds or {}).items()))

    def copy(self) -> "_FoldingCounter":
        """The columns copied as they are (no wire round trip: deltas are copied
        on every first write of a turn)."""
        twin = type(self)()
        twin._ids = array(Q, self._ids)
        twin._set_sides([array(Q, side) for side in self._sides()])
        twin._folds = dict(self._folds) if self._folds else None
        twin.replica, twin.clock = self.replica, self.clock
        return twin

    @classmethod
    def _of(cls, rows: dict[int, tuple[int, ...]], folds: dict | None) -> "_FoldingCounter":
        """A counter holding exactly ``rows`` and ``folds`` (a delta)."""
        counter = cls()
        ids = sorted(rows)
        counter._ids = array(Q, ids)
        counter._set_sides([array(Q, [rows[r][s] for r in ids]) for s in range(cls.SIDES)])
        counter._folds = folds or None
        return counter


def _read_folds(data: Any, width: int, what: str) -> dict[int, tuple[int, ...]]:
    """Fold markers from the wire: rows ``[replica, count per side..., expiry]``,
    replicas strictly ascending."""
    if not isinstance(data, list) or len(data) > ELEMENTS_MAX:
        raise CrdtError(f"{what} fold markers must be a list of at most {ELEMENTS_MAX} rows")
    folds: dict[int, tuple[int, ...]] = {}
    last = -1
    for row in data:
        if not isinstance(row, list) or len(row) != width:
            raise CrdtError(f"{what} fold marker must be a list of {width} ints")
        r, *mark = (u64(x, f"{what} fold marker") for x in row)
        if r <= last:
            raise CrdtError(f"{what} fold markers must be strictly ascending by replica")
        last = r
        folds[r] = tuple(mark)
    return folds


class GCounter(_FoldingCounter):
    """Grow-only counter: ``increment(n)``; value = total of every replica's count."""

    TAG = "gc"
    SIDES = 1
    __slots__ = ("_counts",)

    def __init__(self) -> None:
        super().__init__()
        self._counts: array = EMPTY_Q

    def increment(self, n: int = 1) -> Crdt:
        """Add ``n`` (an int >= 0) to this replica's count; returns the delta."""
        if _amount(n) < 0:
            raise CrdtError(f"a GCounter only grows: increment({n}) is negative")
        return self._add((n,))

    def value(self) -> int:
        return self._side_totals()[0]

    def _sides(self) -> list[array]:
        return [self._counts]

    def _set_sides(self, sides: list[array]) -> None:
        (self._counts,) = sides

    def _kernel_merge(self, other: "GCounter") -> tuple[array, ...]:
        return gcounter_merge(self._ids, self._counts, other._ids, other._counts)


class PNCounter(_FoldingCounter):
    """Counter that goes both ways: ``increment(n)`` / ``decrement(n)``; value = total
    increments - total decrements."""

    TAG = "pn"
    SIDES = 2
    __slots__ = ("_p", "_n")

    def __init__(self) -> None:
        super().__init__()
        self._p: array = EMPTY_Q
        self._n: array = EMPTY_Q

    def increment(self, n: int = 1) -> Crdt:
        """Add ``n`` (any int: a negative one decrements); returns the delta."""
        n = _amount(n)
        return self._add((n, 0) if n >= 0 else (0, -n))

    def decrement(self, n: int = 1) -> Crdt:
        """Subtract ``n`` (any int: a negative one increments); returns the delta."""
        return self.increment(-_amount(n))

    def value(self) -> int:
        p, n = self._side_totals()
        return p - n

    def _sides(self) -> list[array]:
        return [self._p, self._n]

    def _set_sides(self, sides: list[array]) -> None:
        self._p, self._n = sides

    def _kernel_merge(self, other: "PNCounter") -> tuple[array, ...]:
        return pncounter_merge(self._ids, self._p, self._n, other._ids, other._p, other._n)
