"""Last-writer-wins register, and the check that a value is plain msgpack data."""

from __future__ import annotations

from typing import Any

import msgpack

from .base import U64_MAX, Crdt, CrdtError
from .vclock import u64

__all__ = ["LWWRegister", "plain_data"]


def plain_data(value: Any) -> Any:
    """``value`` as it will read after a trip over the wire (tuples become lists), and
    an independent copy of it; CrdtError if msgpack cannot carry it."""
    try:
        return msgpack.unpackb(msgpack.packb(value), raw=False, strict_map_key=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CrdtError(f"value is not msgpack data: {exc}") from None


def _packed(value: Any) -> bytes:
    return msgpack.packb(value)


class LWWRegister(Crdt):
    """One value; the write with the highest ``(ts, replica)`` stamp wins.

    ``set(value)`` stamps ``ts = max(clock(), highest ts seen + 1)``, so a write always
    supersedes what this replica has observed even when its clock is behind a peer's;
    equal timestamps are ordered by replica id.  An unset register reads ``None`` with
    stamp ``(0, 0)``.  Wire: ``[ts, replica, value]``.
    """

    TAG = "lww"
    __slots__ = ("_ts", "_rep", "_value")

    def __init__(self) -> None:
        super().__init__()
        self._ts = 0
        self._rep = 0
        self._value: Any = None

    def set(self, value: Any) -> Crdt:
        """Write ``value`` (msgpack data; stored as a copy); returns the delta."""
        value = plain_data(value)
        now = self.clock()
        if type(now) is not int or now < 0:
            raise CrdtError(f"the clock must give an int >= 0, got {now!r:.40}")
        if self._ts >= U64_MAX:
            raise CrdtError("register timestamp would pass 2**64-1")
        ts = min(max(now, self._ts + 1), U64_MAX)
        self._ts, self._rep, self._value = ts, self.replica, value
        return self._record(self._of(ts, self.replica, value))

    def stamp(self) -> tuple[int, int]:
        """``(ts, replica)`` of the winning write."""
        return self._ts, self._rep

    def value(self) -> Any:
        return self._value

    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        if self._wins(other):
            self._ts, self._rep, self._value = other._ts, other._rep, other._value

    def _wins(self, other: "LWWRegister") -> bool:
        """Does ``other``'s write beat self's?  Equal stamps name the same write; should
        a faulty peer send two values under one stamp, the larger packed form wins so
        the join stays commutative."""
        mine, theirs = (self._ts, self._rep), (other._ts, other._rep)
        if theirs != mine:
            return theirs > mine
        return other._value != self._value and _packed(other._value) > _packed(self._value)

    def to_wire(self) -> list:
        return [self._ts, self._rep, self._value]

    @classmethod
    def from_wire(cls, data: Any) -> "LWWRegister":
        if not isinstance(data, list) or len(data) != 3:
            raise CrdtError("LWWRegister wire form must be [ts, replica, value]")
        reg = cls()
        reg._ts, reg._rep = u64(data[0], "LWWRegister ts"), u64(data[1], "LWWRegister replica")
        reg._value = plain_data(data[2])
        return reg

    def _state_key(self) -> Any:
        return self._ts, self._rep, _packed(self._value)

    @classmethod
    def _of(cls, ts: int, rep: int, value: Any) -> "LWWRegister":
        reg = cls()
        reg._ts, reg._rep, reg._value = ts, rep, value
        return reg
