"""Map CRDTs: :class:`LWWMap`, :class:`TTLMap` (last-writer-wins rows) and :class:`ORMap`
(an observed-remove map whose values are CRDTs).

Map keys are ``str`` of at most :data:`KEY_CHARS_MAX` characters (agent state fields are
named by strings).  LWW/TTL values are any msgpack data, checked and copied by
:func:`plain_value` when written, so a caller mutating its own list afterwards cannot
change the state behind the CRDT's back.

This module also holds the small wire-checking helpers :mod:`protocols.crdt.sequence`
uses (:func:`plain_value`, :func:`wire_list`, :func:`wire_u64`).
"""

from __future__ import annotations

import reprlib
from array import array
from bisect import bisect_left
from typing import Any, Callable

from core_cy import LWWMapState, ORSetState, empty_lwwmap, empty_orset, lwwmap_merge, orset_merge
from protocols.crdt.base import ELEMENTS_MAX, TYPES, U64_MAX, Crdt, CrdtError, utf8

__all__ = [
    "KEY_CHARS_MAX",
    "ORMAP_DEPTH_MAX",
    "VALUE_DEPTH_MAX",
    "LWWMap",
    "ORMap",
    "TTLMap",
    "plain_value",
    "wire_list",
    "wire_u64",
]

#: Longest map key, in characters.
KEY_CHARS_MAX = 1024
#: Deepest nesting of lists/dicts inside one stored value (bounds recursion on decode).
VALUE_DEPTH_MAX = 32
#: Deepest nesting of ORMaps (an ORMap holding ORMaps ... four levels in all).
ORMAP_DEPTH_MAX = 4
I64_MIN = -(1 << 63)


# -- shared checks ----------------------------------------------------------------------
def wire_u64(x: Any, what: str) -> int:
    if type(x) is not int or not 0 <= x <= U64_MAX:
        raise CrdtError(f"{what}: expected an int in 0..2**64-1, got {reprlib.repr(x)}")
    return x


def wire_list(x: Any, what: str, size: int | None = None) -> list | tuple:
    """``x`` as a list (or tuple) of ``size`` items, or of at most ELEMENTS_MAX."""
    if not isinstance(x, (list, tuple)):
        raise CrdtError(f"{what}: expected a list, got {type(x).__name__}")
    if size is not None and len(x) != size:
        raise CrdtError(f"{what}: expected {size} items, got {len(x)}")
    if len(x) > ELEMENTS_MAX:
        raise CrdtError(f"{what}: more than {ELEMENTS_MAX} entries")
    return x


def _plain_scalar(x: Any, what: str) -> Any:
    if x is None or isinstance(x, (bool, float, bytes)):
        return x
    if isinstance(x, str):
        utf8(x, what)
        return x
    if isinstance(x, int):
        if I64_MIN <= x <= U64_MAX:
            return x
        raise CrdtError(f"{what}: int out of msgpack range")
    raise CrdtError(f"{what}: not msgpack data ({type(x).__name__})")


def plain_value(value: Any, _depth: int = 0) -> Any:
    """A checked deep copy of msgpack data (tuples become lists), else CrdtError.

    Map keys inside values must be scalars (str, bytes, int, float, bool, None)."""
    if isinstance(value, (list, tuple)):
        if _depth >= VALUE_DEPTH_MAX:
            raise CrdtError(f"value nested deeper than {VALUE_DEPTH_MAX}")
        return [plain_value(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        if _depth >= VALUE_DEPTH_MAX:
            raise CrdtError(f"value nested deeper than {VALUE_DEPTH_MAX}")
        return {_plain_scalar(k, "value key"): plain_value(v, _depth + 1) for k, v in value.items()}
    return _plain_scalar(value, "value")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or len(key) > KEY_CHARS_MAX:
        raise CrdtError(f"map keys are str of at most {KEY_CHARS_MAX} chars, "
                        f"got {reprlib.repr(key)}")
    return key


def _key_bytes(key: Any) -> bytes:
    return utf8(_check_key(key), "map key")


class _Tombstone:
    """The value of a deleted LWW row (never on the wire: a row without a value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


_TOMB = _Tombstone()


# -- last-writer-wins rows ----------------------------------------------------------------
class _LwwRows(Crdt):
    """Rows ``key -> (ts, replica, payload)`` joined by :func:`core_cy.lwwmap_merge`
    (the higher ``(ts, replica)`` wins).  A delete writes a tombstone row, which wins by
    its stamp like any write, so a delete is not undone by an older write arriving
    late.  Tombstones are kept until :meth:`purge`.

    The in-memory form is the kernel's :class:`core_cy.LWWMapState` (UTF-8 key bytes
    ascending); ``_seen`` is the highest stamp this object has made or merged, so a
    local write (``ts = max(clock(), _seen + 1)``) supersedes everything it observed
    even when this replica's clock is behind a peer's.

    Wire form: a list of rows ascending by key bytes, ``[key, ts, replica]`` for a
    tombstone and ``[key, ts, replica, *payload]`` for a live row.
    """

    __slots__ = ("_s", "_seen")
    #: how many wire fields a live row's payload takes (subclasses)
    PAYLOAD_FIELDS: int = 1

    def __init__(self) -> None:
        super().__init__()
        self._s: LWWMapState = _EMPTY_LWW  # shared until the first local write
        self._seen = 0

    # -- payload hooks ----------------------------------------------------------------
    def _payload_wire(self, payload: Any) -> list:
        raise NotImplementedError

    @classmethod
    def _payload_from_wire(cls, fields: list | tuple) -> Any:
        raise NotImplementedError

    # -- writes ------------------------------------------------------------------------
    def _now(self) -> int:
        now = self.clock()
        if type(now) is not int or now < 0:
            raise CrdtError(f"clock() must give an int >= 0, got {now!r}")
        return now

    def _write(self, key: str, payload: Any, now: int) -> Crdt:
        kb = _key_bytes(key)
        ts = max(now, self._seen + 1)
        if ts > U64_MAX:
            raise CrdtError("write timestamp past 2**64-1")
        delta = type(self)()
        delta._s = LWWMapState([kb], array("Q", [ts]), array("Q", [self.replica]), [payload])
        delta._seen = ts
        self._put(kb, ts, payload)
        self._seen = ts
        return self._record(delta)

    def _put(self, kb: bytes, ts: int, payload: Any) -> None:
        """Store a local write in place (it beats every row, having the top stamp)."""
        if self._s is _EMPTY_LWW:
            self._s = empty_lwwmap()
        keys, stamps, reps, vals = self._s
        i = bisect_left(keys, kb)
        if i < len(keys) and keys[i] == kb:
            stamps[i], reps[i], vals[i] = ts, self.replica, payload
        else:
            keys.insert(i, kb)
            stamps.insert(i, ts)
            reps.insert(i, self.replica)
            vals.insert(i, payload)

    def delete(self, key: str) -> Crdt:
        """Write a tombstone for ``key`` (also when this replica has no row for it: the
        delete must still beat older writes it has not seen yet)."""
        return self._write(key, _TOMB, self._now())

    def purge(self, before_ts: int) -> int:
        """Drop tombstones stamped before ``before_ts``; return how many went.

        A local clean-up, not a mutation (no delta).  Safe only when no write to that
        key stamped before the tombstone can still arrive: once the tombstone is gone,
        such a write would bring the key back on this replica alone.  The rule: purge
        only tombstones older than the longest a replica can be out of touch (its
        partition or offline limit, after which it must resync from a full state),
        i.e. ``purge(now - max_out_of_touch_ns)``.
        """
        keys, stamps, reps, vals = self._s
        keep = [i for i, (t, v) in enumerate(zip(stamps, vals)) if v is not _TOMB or t >= before_ts]
        dropped = len(keys) - len(keep)
        if dropped:
            self._s = LWWMapState([keys[i] for i in keep], array("Q", [stamps[i] for i in keep]),
                                  array("Q", [reps[i] for i in keep]), [vals[i] for i in keep])
        return dropped

    # -- reads -------------------------------------------------------------------------
    def _payload(self, key: str) -> Any:
        """The payload stored for ``key`` (``_TOMB`` if deleted or never written)."""
        keys = self._s.keys
        kb = _key_bytes(key)
        i = bisect_left(keys, kb)
        if i < len(keys) and keys[i] == kb:
            return self._s.vals[i]
        return _TOMB

    def _live_rows(self):
        """(key str, payload) of every row that is not a tombstone, in key order."""
        return ((k.decode("utf-8"), v) for k, v in zip(self._s.keys, self._s.vals) if v is not _TOMB)

    # -- contract ----------------------------------------------------------------------
    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        self._s = lwwmap_merge(self._s, other._s)
        self._seen = max(self._seen, other._seen)

    def to_wire(self) -> list:
        rows = []
        for kb, ts, rep, v in zip(*self._s):
            row = [kb.decode("utf-8"), ts, rep]
            if v is not _TOMB:
                row.extend(self._payload_wire(v))
            rows.append(row)
        return rows

    @classmethod
    def from_wire(cls, data: Any) -> "_LwwRows":
        rows = wire_list(data, f"{cls.__name__} rows")
        keys, vals, stamps, reps = [], [], array("Q"), array("Q")
        for row in rows:
            row = wire_list(row, f"{cls.__name__} row")
            if len(row) not in (3, 3 + cls.PAYLOAD_FIELDS):
                raise CrdtError(f"{cls.__name__} row: expected 3 or {3 + cls.PAYLOAD_FIELDS} fields")
            kb = _key_bytes(row[0])
            if keys and kb <= keys[-1]:
                raise CrdtError(f"{cls.__name__} rows must be strictly ascending by key bytes")
            keys.append(kb)
            stamps.append(wire_u64(row[1], "ts"))
            reps.append(wire_u64(row[2], "replica"))
            vals.append(cls._payload_from_wire(row[3:]) if len(row) > 3 else _TOMB)
        obj = cls()
        obj._s = LWWMapState(keys, stamps, reps, vals)
        obj._seen = max(stamps, default=0)
        return obj

    def _state_key(self) -> Any:
        keys, stamps, reps, vals = self._s
        return tuple(keys), tuple(stamps), tuple(reps), tuple(vals)


_EMPTY_LWW = empty_lwwmap()  # shared by every fresh map; never changed in place


class LWWMap(_LwwRows):
    """Last-writer-wins map ``str -> msgpack value``.

    Concurrent writes to a key: the higher ``(ts, replica)`` wins, ``ts`` being
    ``max(clock(), highest stamp seen + 1)``.  :meth:`delete` writes a tombstone that
    wins by its stamp like any write; tombstones stay (so a late older write cannot
    revive the key) until :meth:`purge` drops old ones under the out-of-touch rule.
    """

    TAG = "lwwm"
    __slots__ = ()

    def set(self, key: str, value: Any) -> Crdt:
        return self._write(key, plain_value(value), self._now())

    def get(self, key: str, default: Any = None) -> Any:
        v = self._payload(key)
        return default if v is _TOMB else v

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._payload(key) is not _TOMB

    def keys(self) -> list[str]:
        """Live keys, ascending by UTF-8 bytes."""
        return [k for k, _ in self._live_rows()]

    def value(self) -> dict[str, Any]:
        return dict(self._live_rows())

    def __len__(self) -> int:
        return sum(v is not _TOMB for v in self._s.vals)

    def _payload_wire(self, payload: Any) -> list:
        return [payload]

    @classmethod
    def _payload_from_wire(cls, fields: list | tuple) -> Any:
        return plain_value(fields[0])


class TTLMap(_LwwRows):
    """Last-writer-wins map whose entries expire: :meth:`set` stores the value with
    ``expiry = clock() + ttl_ns``; an entry is visible while ``now < expiry``.

    Rows are joined exactly as in :class:`LWWMap` (a write, expired or not, beats
    older writes), so every replica agrees on the winning row of a key, and an
    expired winner means "absent" on every replica once its expiry passes.
    Wire payload of a live row: ``[expiry, value]``.
    """

    TAG = "ttl"
    __slots__ = ()
    PAYLOAD_FIELDS = 2

    def set(self, key: str, value: Any, ttl_ns: int) -> Crdt:
        if type(ttl_ns) is not int or not 1 <= ttl_ns <= U64_MAX:
            raise CrdtError(f"ttl_ns must be an int in 1..2**64-1, got {ttl_ns!r}")
        now = self._now()
        return self._write(key, (min(now + ttl_ns, U64_MAX), plain_value(value)), now)

    def get(self, key: str, now_ns: int, default: Any = None) -> Any:
        v = self._payload(key)
        return default if v is _TOMB or v[0] <= now_ns else v[1]

    def value(self, now_ns: int | None = None) -> dict[str, Any]:
        """Unexpired entries at ``now_ns`` (default: ``self.clock()``)."""
        now = self._now() if now_ns is None else now_ns
        return {k: v[1] for k, v in self._live_rows() if v[0] > now}

    def expire(self, now_ns: int) -> int:
        """Drop the values of entries expired at ``now_ns``; return how many.

        An expired row can go from this replica because the entry is gone on every
        replica once its expiry passes: all replicas pick the same winning row for a
        key, and that row's expiry is the same everywhere.  What must stay is the row's
        *stamp*: an older write of the same key (possibly with a later expiry) can
        still arrive from a lagging peer, and only the stamp makes it lose here as it
        loses everywhere else.  So an expired row becomes a tombstone (key and stamp,
        no value), and :meth:`purge` later drops those under the out-of-touch rule.
        A local clean-up: no delta (the value at any ``now >= expiry`` is unchanged).
        """
        vals = self._s.vals
        expired = [i for i, v in enumerate(vals) if v is not _TOMB and v[0] <= now_ns]
        for i in expired:
            vals[i] = _TOMB  # vals is this object's own list (merges build new ones)
        return len(expired)

    def _payload_wire(self, payload: Any) -> list:
        return [payload[0], payload[1]]

    @classmethod
    def _payload_from_wire(cls, fields: list | tuple) -> Any:
        return wire_u64(fields[0], "expiry"), plain_value(fields[1])


# -- observed-remove map of CRDTs ---------------------------------------------------------
def _crdt_class(tag_or_cls: Any) -> type[Crdt]:
    """The registered CRDT class named by a tag or given as a class."""
    tag = tag_or_cls if isinstance(tag_or_cls, str) else getattr(tag_or_cls, "TAG", None)
    cls = TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None or (cls is not tag_or_cls and not isinstance(tag_or_cls, str)):
        raise CrdtError(f"not a registered CRDT type: {tag_or_cls!r:.60}")
    return cls


def _height(value: Crdt) -> int:
    """How many ORMap levels ``value`` is (0 for any other type)."""
    if type(value) is not ORMap:
        return 0
    return 1 + max((_height(c) for _, c in value._s.elems), default=0)


def _join(contributions: list[Crdt], cls: type[Crdt]) -> Crdt:
    """A new ``cls`` holding the join of the contributions of that type (the others
    lost a type conflict)."""
    out = cls()
    for c in contributions:
        if type(c) is cls:
            out.merge(c)
    return out


def _covered(dot: tuple[int, int], vv: dict[int, int], cloud: set) -> bool:
    return dot[1] <= vv.get(dot[0], 0) or dot in cloud


class ORMap(Crdt):
    """Observed-remove (add-wins) map ``str -> CRDT``, after the delta ORMap of Almeida
    et al. with a causal context.

    State: an OR-Set dot store (:class:`core_cy.ORSetState`, merged by
    :func:`core_cy.orset_merge`) whose element for each dot is ``(key, contribution)``,
    plus the causal context of every dot seen.  A key is present while it has a live
    dot; its value is the join of the contributions of its live dots.  Each replica
    keeps one dot per key: an update by replica ``r`` makes a fresh dot whose
    contribution is ``r``'s previous contribution joined with the new nested delta,
    and its context covers ``r``'s previous dot.

    * :meth:`update` (``m.update("hits", GCounter, lambda c: c.increment(3))``) runs
      ``fn`` on a copy of the key's current value; the nested delta it produces becomes
      the map's delta, which :meth:`update` returns (the nested value never needs to
      know its parent).  Without ``fn`` the key is just made present.
    * :meth:`remove` ships the causal context of the key's observed dots: their
      contributions vanish, so a later re-add starts from an empty value.  An update
      concurrent with the remove wins (the key stays) and keeps the updating replica's
      own contributions to the key; what other replicas had contributed is gone.
    * Concurrent updates of one key with different types: the type of the key's
      greatest dot ``(replica, counter)`` is the value; updating a key with another
      type than it holds raises CrdtError (remove it first).

    Nested ORMaps are allowed down to ORMAP_DEPTH_MAX levels.  Wire form:
    ``[dots, vv, cloud]``; ``dots`` rows ``[replica, counter, key, tag, wire]`` ascending by
    dot; ``vv`` rows ``[replica, counter]`` ascending by replica; ``cloud`` rows
    ``[replica, counter]`` ascending by dot; every dot lies in the context.
    """

    TAG = "orm"
    __slots__ = ("_s",)

    def __init__(self) -> None:
        super().__init__()
        self._s: ORSetState = _EMPTY_OR  # states are never changed in place

    # -- mutators ----------------------------------------------------------------------
    def update(self, key: str, tag_or_cls: Any, fn: Callable[[Crdt], Any] | None = None) -> Crdt:
        """Apply ``fn`` to ``key``'s value (an empty one of ``tag_or_cls`` if absent)
        and return the map delta.  ``fn`` gets a copy bound to this replica and clock;
        if it raises, the map is unchanged."""
        _key_bytes(key)  # a key msgpack cannot send would make the state unshippable
        cls = _crdt_class(tag_or_cls)
        held = self._key_type(key)
        if held is not None and held is not cls:
            raise CrdtError(f"key {key!r:.60} holds a {held.__name__}, not a {cls.__name__}")
        step = None
        if fn is not None:
            view = _join([c for _, c in self._dots(key)], cls)
            view.bind(self.replica, self.clock)
            fn(view)
            step = view.take_delta()
        own = self._own_dots(key)
        contribution = _join([c for _, c in own], cls)
        if step is not None:
            contribution.merge(step)
        if 1 + _height(contribution) > ORMAP_DEPTH_MAX:
            raise CrdtError(f"ORMaps nest at most {ORMAP_DEPTH_MAX} deep")
        dot = (self.replica, self._next_counter())
        delta = self._delta_of([(dot, (key, contribution))], [d for d, _ in own] + [dot])
        self._s = orset_merge(self._s, delta._s)
        return self._record(delta)

    def remove(self, key: str) -> Crdt:
        """Remove the key's observed presence (and with it every observed
        contribution); concurrent updates elsewhere win."""
        _key_bytes(key)
        delta = self._delta_of([], [d for d, _ in self._dots(key)])
        self._s = orset_merge(self._s, delta._s)
        return self._record(delta)

    # -- reads -------------------------------------------------------------------------
    def get(self, key: str) -> Crdt | None:
        """A copy of ``key``'s value (changing it does not change the map: use
        :meth:`update`), or None if absent."""
        contributions = [c for _, c in self._dots(key)]
        return _join(contributions, type(contributions[-1])) if contributions else None

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._s.elems)

    def keys(self) -> list[str]:
        return sorted({k for k, _ in self._s.elems})

    def __len__(self) -> int:
        return len({k for k, _ in self._s.elems})

    def value(self) -> dict[str, Any]:
        by_key: dict[str, list[Crdt]] = {}
        for k, c in self._s.elems:  # ascending by dot, so a key's greatest dot comes last
            by_key.setdefault(k, []).append(c)
        return {k: _join(cs, type(cs[-1])).value() for k, cs in sorted(by_key.items())}

    # -- helpers -----------------------------------------------------------------------
    def _dots(self, key: str) -> list[tuple[tuple[int, int], Crdt]]:
        """(dot, contribution) of every live dot of ``key``, ascending by dot."""
        s = self._s
        return [((r, c), e[1]) for r, c, e in zip(s.dot_reps, s.dot_ctrs, s.elems) if e[0] == key]

    def _own_dots(self, key: str) -> list[tuple[tuple[int, int], Crdt]]:
        return [(d, c) for d, c in self._dots(key) if d[0] == self.replica]

    def _key_type(self, key: str) -> type[Crdt] | None:
        """The key's value type: that of its greatest dot (None if absent)."""
        dots = self._dots(key)
        return type(dots[-1][1]) if dots else None

    def _next_counter(self) -> int:
        s, r = self._s, self.replica
        top = max((c for rr, c in zip(s.cloud_reps, s.cloud_ctrs) if rr == r), default=0)
        i = bisect_left(s.ctx_ids, r)
        if i < len(s.ctx_ids) and s.ctx_ids[i] == r:
            top = max(top, s.ctx_ctrs[i])
        if top >= U64_MAX:
            raise CrdtError("dot counter past 2**64-1")
        return top + 1

    @staticmethod
    def _delta_of(entries: list, context: list[tuple[int, int]]) -> "ORMap":
        """A delta holding ``entries`` ((dot, (key, contribution)), ascending by dot)
        whose causal context is exactly the dots ``context``, in the kernel's canonical
        form (contiguous dots folded into the version vector)."""
        cloud = sorted(set(context))
        delta = ORMap()
        delta._s = orset_merge(_EMPTY_OR, ORSetState(
            array("Q", [d[0] for d, _ in entries]), array("Q", [d[1] for d, _ in entries]),
            [e for _, e in entries], array("Q"), array("Q"),
            array("Q", [d[0] for d in cloud]), array("Q", [d[1] for d in cloud])))
        return delta

    # -- contract ----------------------------------------------------------------------
    def merge(self, other: Crdt) -> None:
        self._check_same(other)
        self._s = orset_merge(self._s, other._s)

    def to_wire(self) -> list:
        s = self._s
        dots = [[r, c, k, v.TAG, v.to_wire()] for r, c, (k, v) in zip(s.dot_reps, s.dot_ctrs, s.elems)]
        return [dots, [list(x) for x in zip(s.ctx_ids, s.ctx_ctrs)],
                [list(x) for x in zip(s.cloud_reps, s.cloud_ctrs)]]

    @classmethod
    def from_wire(cls, data: Any) -> "ORMap":
        return cls._decode(data, 1)

    @classmethod
    def _decode(cls, data: Any, depth: int) -> "ORMap":
        dots_w, vv_w, cloud_w = wire_list(data, "ORMap", 3)
        vv = _read_dots(vv_w, "ORMap vv", by_replica=True)
        cloud = _read_dots(cloud_w, "ORMap cloud", by_replica=False)
        vv_map, cloud_set = dict(vv), set(cloud)
        dots, elems = [], []
        for row in wire_list(dots_w, "ORMap dots"):
            r, c, key, tag, wire = wire_list(row, "ORMap dot", 5)
            dot = (wire_u64(r, "replica"), wire_u64(c, "counter"))
            if c == 0 or (dots and dot <= dots[-1]):
                raise CrdtError("ORMap dots must be ascending with counters >= 1")
            if not _covered(dot, vv_map, cloud_set):
                raise CrdtError("ORMap dot outside its causal context")
            dots.append(dot)
            _key_bytes(key)
            elems.append((key, _decode_value(tag, wire, depth)))
        obj = cls()
        obj._s = ORSetState(
            array("Q", [d[0] for d in dots]), array("Q", [d[1] for d in dots]), elems,
            array("Q", [d[0] for d in vv]), array("Q", [d[1] for d in vv]),
            array("Q", [d[0] for d in cloud]), array("Q", [d[1] for d in cloud]))
        return obj

    def _state_key(self) -> Any:
        s = orset_merge(self._s, _EMPTY_OR)  # canonical: a peer may send a cloud unfolded
        elems = tuple((k, v.TAG, v._state_key()) for k, v in s.elems)
        return (tuple(s.dot_reps), tuple(s.dot_ctrs), elems, tuple(s.ctx_ids), tuple(s.ctx_ctrs),
                tuple(s.cloud_reps), tuple(s.cloud_ctrs))


_EMPTY_OR = empty_orset()


def _read_dots(data: Any, what: str, by_replica: bool) -> list[tuple[int, int]]:
    """``[[replica, counter >= 1], ...]`` strictly ascending by replica (a version
    vector) or by dot (a cloud)."""
    out: list[tuple[int, int]] = []
    for row in wire_list(data, what):
        r, c = wire_list(row, what, 2)
        dot = (wire_u64(r, "replica"), wire_u64(c, "counter"))
        if c == 0:
            raise CrdtError(f"{what}: counters start at 1")
        if out and (dot[0] <= out[-1][0] if by_replica else dot <= out[-1]):
            raise CrdtError(f"{what}: rows must be strictly ascending")
        out.append(dot)
    return out


def _decode_value(tag: Any, wire: Any, depth: int) -> Crdt:
    """A nested ORMap value from its tag and wire form (ORMaps bounded in depth)."""
    cls = TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise CrdtError(f"unknown CRDT tag {reprlib.repr(tag)}")
    if cls is ORMap:
        if depth >= ORMAP_DEPTH_MAX:
            raise CrdtError(f"ORMaps nest at most {ORMAP_DEPTH_MAX} deep")
        return ORMap._decode(wire, depth + 1)
    return cls.from_wire(wire)
