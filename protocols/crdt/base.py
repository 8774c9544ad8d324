"""The contract every CRDT type of :mod:`protocols.crdt` keeps.

A CRDT here is a *delta-state* CRDT (Almeida, Shoker, Baquero, "Delta state replicated
data types", 2018): every mutator changes the object in place and returns a *delta*, a
small object of the same type whose join (``merge``) into any replica has the same
effect as the mutation.  The object also folds each delta it produced into a pending
delta, taken with :meth:`Crdt.take_delta`: the node ships that to the agent's replicas
after each handler turn.  ``merge`` of a full state and ``merge`` of a delta are the
same operation (a lattice join): commutative, associative, idempotent.

Replica ids are 64-bit ints (:func:`core_cy.replica_id` of ``"node/generation"``).  An
object is stamped with the replica that mutates it (``replica``, never serialized) and,
for the types whose writes carry a time, with ``clock``: a callable giving an int
(nanoseconds) supplied by the node, because protocols never read a clock themselves.

Wire form: ``to_wire()`` gives plain msgpack data (lists, ints < 2**64, str, bytes,
None, bool); ``from_wire(data)`` checks every shape and bound and raises
:class:`CrdtError` on anything else, since states and deltas arrive from peers.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

__all__ = ["Crdt", "CrdtError", "TYPES", "U64_MAX", "ELEMENTS_MAX", "utf8"]

U64_MAX = (1 << 64) - 1
#: Entries one decoded CRDT may hold (elements, keys, dots, replicas): a peer's message
#: never makes an unbounded object.  Agent state is further bounded in bytes by the node.
ELEMENTS_MAX = 1 << 20


#: Every concrete type by its wire tag (filled by ``Crdt.__init_subclass__``).
TYPES: dict[str, type["Crdt"]] = {}


class CrdtError(ValueError):
    """A state or delta that breaks its type's shape or bounds (from a peer, or a
    merge of two different types)."""


def utf8(s: str, what: str) -> bytes:
    """``s`` as UTF-8, or CrdtError naming ``what``.  A str with lone surrogates (JSON's
    ``"\\ud800"`` decodes to one) cannot be packed by msgpack: a state holding one
    could never be sent, so such strings are refused where they enter a state."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise CrdtError(f"{what}: not encodable as UTF-8") from None


def _no_clock() -> int:
    raise CrdtError("this object has no clock: the node binds one (crdt.clock = fn)")


class Crdt:
    """Base class.  Subclasses set ``TAG`` (a short stable string, part of the wire
    format) and implement the abstract methods below."""

    TAG: ClassVar[str] = ""
    __slots__ = ("replica", "clock", "_delta")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TAG:
            if TYPES.get(cls.TAG, cls) is not cls:
                raise TypeError(f"CRDT tag {cls.TAG!r} is taken by {TYPES[cls.TAG].__name__}")
            TYPES[cls.TAG] = cls

    def __init__(self) -> None:
        self.replica: int = 0
        self.clock: Callable[[], int] = _no_clock
        self._delta: Crdt | None = None

    # -- to implement ---------------------------------------------------------
    def value(self) -> Any:
        """The plain Python value the state stands for."""
        raise NotImplementedError

    def merge(self, other: "Crdt") -> None:
        """Join ``other`` (a full state or a delta of the same type) into self, in
        place; ``other`` is not changed.  Does not touch the pending delta."""
        raise NotImplementedError

    def to_wire(self) -> Any:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, data: Any) -> "Crdt":
        raise NotImplementedError

    def _state_key(self) -> Any:
        """A canonical, comparable form of the state (equality, tests)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def _check_same(self, other: "Crdt") -> None:
        if type(other) is not type(self):
            raise CrdtError(f"cannot merge {type(other).__name__} into {type(self).__name__}")

    def _record(self, delta: "Crdt") -> "Crdt":
        """Fold a mutator's delta into the pending delta; return it to the caller."""
        if self._delta is None:
            self._delta = delta.copy()
        else:
            self._delta.merge(delta)
        return delta

    def take_delta(self) -> "Crdt | None":
        """The join of every delta produced since the last take (None if none)."""
        delta, self._delta = self._delta, None
        return delta

    def copy(self) -> "Crdt":
        """An independent copy of the state (same replica and clock, no pending delta)."""
        twin = type(self).from_wire(self.to_wire())
        twin.replica = self.replica
        twin.clock = self.clock
        return twin

    def bind(self, replica: int, clock: Callable[[], int] | None = None) -> "Crdt":
        """Stamp the replica (and clock) this object's mutations are made by."""
        self.replica = replica
        if clock is not None:
            self.clock = clock
        return self

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._state_key() == other._state_key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value()!r})"
