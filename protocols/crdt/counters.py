"""Grow-only and positive-negative counters, with folding of retired replicas.

In memory a counter is the kernel's columns: ``array('Q')`` replica ids strictly
ascending plus one count column (G-Counter) or two (PN-Counter: increments ``p`` and
decrements ``n``), so :meth:`merge` is one call of :func:`core_cy.gcounter_merge` or
:func:`core_cy.pncounter_merge`.  Each replica's counts are u64: an increment that
would pass 2**64-1 raises :class:`CrdtError`.

Folding (pruning).  Replica ids are per node generation, so every restart or move of
an agent's owner adds a row that never changes again.  The owner may ``fold`` the rows
of retired replicas (generations that are no longer members) into its own row.  Each
fold leaves a *marker* ``retired -> (expiry_ns, {into: counts credited})``: the counts
the folder ``into`` added to its own row for that retired replica.  Markers merge per
target by max and travel in the wire form and in deltas.  The value counts a retired
replica once, as the larger of its row (if a copy still holds it) and the largest
credit any target took for it: every row is summed, every credit is taken back out,
and that largest figure is put back in.  So

* a stale copy that still holds the retired row adds only the row's excess over the
  credit (a zombie of that generation that kept counting after the fold);
* two folders that folded the same row (two owners at once, a split brain) each
  credited it to their own row, and it still counts once.

:meth:`expire_folds` drops a marker after its expiry, when dropping it cannot change
the value: one target, no row of that replica left here, and (given the live
replicas) not a replica that still lives.  A marker with two targets is kept (its
double credit must stay taken back).  The one limit: a copy older than the markers'
TTL, merged after they expired here (or a replica folded while live that writes
again after being away that long), counts the folded rows twice; pick a TTL longer
than any copy or node can stay away.
"""

from __future__ import annotations

from array import array
from typing import Any, ClassVar, Container, Iterable

from core_cy import gcounter_merge, pncounter_merge

from .base import ELEMENTS_MAX, U64_MAX, Crdt, CrdtError
from .vclock import EMPTY_Q, Q, find_row, nonzero_rows, put_row, read_columns, u64

__all__ = ["GCounter", "PNCounter"]

#: A fold marker: ``(expiry_ns, {target replica: counts credited, one per side})``.
Marker = tuple[int, dict[int, tuple[int, ...]]]


def _amount(n: Any) -> int:
    if type(n) is not int:
        raise CrdtError(f"a counter amount must be an int, got {type(n).__name__}")
    return n


def _sidewise_max(counts: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    """Per side, the largest of ``counts`` (one or more tuples of equal length)."""
    return tuple(map(max, zip(*counts)))


def _join_markers(a: Marker, b: Marker) -> Marker:
    targets = dict(a[1])
    for target, counts in b[1].items():
        mine = targets.get(target)
        targets[target] = counts if mine is None else tuple(map(max, mine, counts))
    return max(a[0], b[0]), targets


class _FoldingCounter(Crdt):
    """Rows ``replica -> counts`` (one count per side) plus fold markers
    ``retired -> (expiry_ns, {target: counts credited})`` (None while there are none)."""

    SIDES: ClassVar[int] = 1
    __slots__ = ("_ids", "_folds")

    def __init__(self) -> None:
        super().__init__()
        self._ids: array = EMPTY_Q
        self._folds: dict[int, Marker] | None = None

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

    def _known(self, replica: int) -> tuple[int, ...]:
        """What ``replica`` counted as far as we know: its row, or the largest credit
        a fold took for it, whichever is larger (per side)."""
        row = self._row(replica) or (0,) * self.SIDES
        mark = (self._folds or {}).get(replica)
        if mark is None:
            return row
        return _sidewise_max([row, *mark[1].values()])

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
        if self._folds:  # a zombie counts on from its folded total, not from its row
            row = self._known(replica)
        else:
            row = self._row(replica) or (0,) * self.SIDES
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
        """Drop rows no larger than a credit taken for them (they add nothing)."""
        folds = self._folds
        if not folds:
            return
        covered = set()
        for r, (_, targets) in folds.items():
            row = self._row(r)
            if row is not None and all(
                    c <= m for c, m in zip(row, _sidewise_max(targets.values()))):
                covered.add(r)
        if covered:
            self._keep_rows(lambda r: r not in covered)

    # -- folding --------------------------------------------------------------------
    def fold(self, retired: Iterable[int], into: int, now_ns: int, ttl_ns: int) -> Crdt:
        """Move the rows of the ``retired`` replicas into ``into``'s row and mark them
        folded until ``now_ns + ttl_ns``.  Meant for the agent's owner, folding into its
        own replica; a second folder of the same row costs a marker kept longer, never
        a count.  Returns the delta (empty when nothing was folded)."""
        into, now_ns, ttl_ns = u64(into, "into"), u64(now_ns, "now_ns"), u64(ttl_ns, "ttl_ns")
        retired = {u64(r, "retired replica") for r in retired}
        if into in retired:
            raise CrdtError(f"cannot fold replica {into} into itself")
        expiry = min(U64_MAX, now_ns + ttl_ns)
        zero = (0,) * self.SIDES
        gained = list(zero)
        markers: dict[int, Marker] = {}
        for r in sorted(retired):
            row = self._row(r)
            if row is None:
                continue  # nothing of r counted here: a later copy of it is new to us
            # A row here is above every credit taken for it (covered rows are dropped).
            old_expiry, targets = (self._folds or {}).get(r, (0, {}))
            credited = targets.get(into, zero)
            for side, (c, m) in enumerate(zip(row, credited)):
                gained[side] += max(0, c - m)
            markers[r] = (max(expiry, old_expiry),
                          {**targets, into: tuple(map(max, row, credited))})
        if not markers:
            return type(self)()
        new = tuple(c + g for c, g in zip(self._known(into), gained))
        self._put(into, new)
        self._folds = {**(self._folds or {}), **markers}
        self._drop_folded()
        return self._record(self._of({into: new}, markers))

    def prune(self, live: Container[int], into: int, now_ns: int, ttl_ns: int) -> int:
        """The node's pruning rule for one counter: fold the rows of replicas not in
        ``live`` (nor ``into``) into ``into``, then expire markers; returns how many
        rows were folded.  Cheap when there is nothing to do (every write runs it)."""
        retired = [r for r in self._ids if r not in live and r != into]
        if retired:
            self.fold(retired, into, now_ns, ttl_ns)
        if self._folds:
            self.expire_folds(now_ns, live)
        return len(retired)

    def expire_folds(self, now_ns: int, live: Container[int] = ()) -> int:
        """Forget the fold markers whose expiry is <= ``now_ns``; returns how many.
        A local compaction (not a delta): markers carry their absolute expiry, so every
        replica expires them at about the same time.  Kept past expiry: a marker whose
        replica is in ``live`` (folded while it still lives, its view missed it: its
        row goes on from the folded total, which only the marker tells from a new
        count), a marker whose replica still has a row here (a zombie's excess, not
        folded yet: without the marker the whole row would count again), and a marker
        with two or more targets (without it their double credit would count)."""
        u64(now_ns, "now_ns")
        if not self._folds:
            return 0
        kept = {r: m for r, m in self._folds.items()
                if m[0] > now_ns or len(m[1]) > 1 or r in live or find_row(self._ids, r) >= 0}
        dropped = len(self._folds) - len(kept)
        self._folds = kept or None
        return dropped

    def replicas(self) -> list[int]:
        """The replicas with a row here (who counted), ascending."""
        return list(self._ids)

    def folds(self) -> dict[int, Marker]:
        """The fold markers: ``{retired: (expiry_ns, {target: counts credited})}``."""
        return {r: (e, dict(t)) for r, (e, t) in (self._folds or {}).items()}

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
                folds[r] = mark if mine is None else _join_markers(mine, mark)
            self._folds = folds
        self._drop_folded()

    def _side_totals(self) -> list[int]:
        """Each side's total: every row, less every credit, plus each retired
        replica's known count once (a state with credits no row holds, which no
        fold makes, stops at 0)."""
        totals = [sum(side) for side in self._sides()]
        for r, (_, targets) in (self._folds or {}).items():
            row = self._row(r) or (0,) * self.SIDES
            known = _sidewise_max([row, *targets.values()])
            for side in range(self.SIDES):
                totals[side] += known[side] - row[side] - sum(t[side] for t in targets.values())
        return [max(0, t) for t in totals]

    # -- wire -----------------------------------------------------------------------
    def to_wire(self) -> list:
        folds = [[r, e, [[t, *targets[t]] for t in sorted(targets)]]
                 for r, (e, targets) in sorted((self._folds or {}).items())]
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
        counter._folds = _read_folds(data[width], width, cls.__name__) or None
        counter._drop_folded()
        return counter

    def _state_key(self) -> Any:
        folds = tuple((r, e, tuple(sorted(t.items())))
                      for r, (e, t) in sorted((self._folds or {}).items()))
        return nonzero_rows(self._ids, *self._sides()), folds

    def copy(self) -> "_FoldingCounter":
        """The columns copied as they are (no wire round trip: deltas are copied
        on every first write of a turn)."""
        twin = type(self)()
        twin._ids = array(Q, self._ids)
        twin._set_sides([array(Q, side) for side in self._sides()])
        twin._folds = self.folds() or None
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


def _read_folds(data: Any, width: int, what: str) -> dict[int, Marker]:
    """Fold markers from the wire: ``[retired, expiry, [[target, count per side...],
    ...]]``, retired replicas strictly ascending, each marker's targets (one or more)
    strictly ascending; at most ELEMENTS_MAX targets in all."""
    if not isinstance(data, list) or len(data) > ELEMENTS_MAX:
        raise CrdtError(f"{what} fold markers must be a list of at most {ELEMENTS_MAX} rows")
    folds: dict[int, Marker] = {}
    last, entries = -1, 0
    for row in data:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], list)
                and row[2]):
            raise CrdtError(f"{what} fold marker must be [replica, expiry, [targets...]]")
        r, expiry = u64(row[0], f"{what} fold marker"), u64(row[1], f"{what} fold marker")
        if r <= last:
            raise CrdtError(f"{what} fold markers must be strictly ascending by replica")
        last = r
        entries += len(row[2])
        if entries > ELEMENTS_MAX:
            raise CrdtError(f"{what} fold markers name more than {ELEMENTS_MAX} targets")
        folds[r] = (expiry, _read_targets(row[2], width, what))
    return folds


def _read_targets(data: list, width: int, what: str) -> dict[int, tuple[int, ...]]:
    targets: dict[int, tuple[int, ...]] = {}
    last = -1
    for entry in data:
        if not isinstance(entry, list) or len(entry) != width:
            raise CrdtError(f"{what} fold target must be a list of {width} ints")
        t, *counts = (u64(x, f"{what} fold target") for x in entry)
        if t <= last:
            raise CrdtError(f"{what} fold targets must be strictly ascending by replica")
        last = t
        targets[t] = tuple(counts)
    return targets


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
