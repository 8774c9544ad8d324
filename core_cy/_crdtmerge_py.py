"""Pure-Python twin of :mod:`core_cy.crdtmerge` (same functions, same results).

Representations (shared with the compiled module; see each function):

* counters / vector clocks: two parallel ``array('Q')`` columns ``ids`` (replica ids,
  strictly ascending) and ``counts``; a missing replica counts as 0.
* OR-Set: :class:`core_cy.ORSetState` (dot store rows sorted by dot + causal context).
* LWW-Map: :class:`core_cy.LWWMapState` (rows sorted by key bytes).

Every merge returns new objects and never mutates its inputs.  Inputs that break the
sortedness/length rules raise ValueError; wrong column types raise TypeError.
"""

from __future__ import annotations

from array import array
from itertools import islice
from operator import lt

from ._common import AFTER, BEFORE, CONCURRENT, EQUAL, LWWMapState, ORSetState

__all__ = [
    "gcounter_merge",
    "pncounter_merge",
    "vclock_merge",
    "vclock_compare",
    "orset_merge",
    "lwwmap_merge",
]


def _col(a, name: str) -> array:
    if not isinstance(a, array) or a.typecode != "Q":
        raise TypeError(f"{name} must be array('Q'), got {type(a).__name__}")
    return a


def _ascending(ids, name: str) -> None:
    if len(ids) > 1 and not all(map(lt, ids, islice(ids, 1, None))):
        raise ValueError(f"{name} must be strictly ascending")


def _same_len(a, b, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: columns differ in length ({len(a)} != {len(b)})")


def _dots_ascending(reps, ctrs, name: str) -> None:
    if len(reps) > 1:
        dots = list(zip(reps, ctrs))
        if not all(map(lt, dots, islice(dots, 1, None))):
            raise ValueError(f"{name} must be strictly ascending by (replica, counter)")


def _max_merge(a_ids, a_counts, b_ids, b_counts):
    d = dict(zip(a_ids, a_counts))
    get = d.get
    for r, c in zip(b_ids, b_counts):
        if c > get(r, -1):
            d[r] = c
    ids = sorted(d)
    return array("Q", ids), array("Q", map(d.__getitem__, ids))


def gcounter_merge(a_ids, a_counts, b_ids, b_counts):
    """Per-replica max of two G-Counters.

    ``a_ids``/``b_ids``: array('Q') replica ids, strictly ascending; ``a_counts``/
    ``b_counts``: array('Q') of the same length.  Returns ``(ids, counts)``, new
    array('Q') columns over the union of replica ids.  Value = ``sum(counts)``.
    """
    for col, nm in ((a_ids, "a_ids"), (a_counts, "a_counts"), (b_ids, "b_ids"), (b_counts, "b_counts")):
        _col(col, nm)
    _same_len(a_ids, a_counts, "a")
    _same_len(b_ids, b_counts, "b")
    _ascending(a_ids, "a_ids")
    _ascending(b_ids, "b_ids")
    return _max_merge(a_ids, a_counts, b_ids, b_counts)


def vclock_merge(a_ids, a_counts, b_ids, b_counts):
    """Least upper bound of two vector clocks (same representation as gcounter_merge)."""
    return gcounter_merge(a_ids, a_counts, b_ids, b_counts)


def pncounter_merge(a_ids, a_p, a_n, b_ids, b_p, b_n):
    """Merge two PN-Counters: per-replica max of increments ``p`` and of decrements ``n``.

    Columns: ``ids`` array('Q') strictly ascending, ``p`` and ``n`` array('Q') of the same
    length.  Returns ``(ids, p, n)``; value = ``sum(p) - sum(n)``.
    """
    for col, nm in ((a_ids, "a_ids"), (a_p, "a_p"), (a_n, "a_n"),
                    (b_ids, "b_ids"), (b_p, "b_p"), (b_n, "b_n")):
        _col(col, nm)
    _same_len(a_ids, a_p, "a")
    _same_len(a_ids, a_n, "a")
    _same_len(b_ids, b_p, "b")
    _same_len(b_ids, b_n, "b")
    _ascending(a_ids, "a_ids")
    _ascending(b_ids, "b_ids")
    d = {r: [p, n] for r, p, n in zip(a_ids, a_p, a_n)}
    for r, p, n in zip(b_ids, b_p, b_n):
        cur = d.get(r)
        if cur is None:
            d[r] = [p, n]
        else:
            if p > cur[0]:
                cur[0] = p
            if n > cur[1]:
                cur[1] = n
    ids = sorted(d)
    rows = [d[r] for r in ids]
    return array("Q", ids), array("Q", [r[0] for r in rows]), array("Q", [r[1] for r in rows])


def vclock_compare(a_ids, a_counts, b_ids, b_counts) -> int:
    """Compare vector clocks a and b (missing entry = 0).

    Returns EQUAL (0), BEFORE (1: a < b), AFTER (2: a > b) or CONCURRENT (3).
    Representation as in gcounter_merge.
    """
    for col, nm in ((a_ids, "a_ids"), (a_counts, "a_counts"), (b_ids, "b_ids"), (b_counts, "b_counts")):
        _col(col, nm)
    _same_len(a_ids, a_counts, "a")
    _same_len(b_ids, b_counts, "b")
    _ascending(a_ids, "a_ids")
    _ascending(b_ids, "b_ids")
    db = dict(zip(b_ids, b_counts))
    a_gt = b_gt = False
    get = db.get
    for r, c in zip(a_ids, a_counts):
        o = get(r, 0)
        if c > o:
            a_gt = True
        elif c < o:
            b_gt = True
    if not b_gt:
        da = set(a_ids)
        for r, c in zip(b_ids, b_counts):
            if c and r not in da:
                b_gt = True
                break
    if a_gt:
        return CONCURRENT if b_gt else AFTER
    return BEFORE if b_gt else EQUAL


def _check_orset(s, name: str) -> None:
    if not isinstance(s, tuple) or len(s) != 7:
        raise TypeError(f"{name} must be an ORSetState")
    dr, dc, el, vi, vc, cr, cc = s
    for col, nm in ((dr, "dot_reps"), (dc, "dot_ctrs"), (vi, "ctx_ids"), (vc, "ctx_ctrs"),
                    (cr, "cloud_reps"), (cc, "cloud_ctrs")):
        _col(col, f"{name}.{nm}")
    if not isinstance(el, list):
        raise TypeError(f"{name}.elems must be a list")
    _same_len(dr, dc, f"{name} dots")
    _same_len(dr, el, f"{name} dots/elems")
    _same_len(vi, vc, f"{name} context")
    _same_len(cr, cc, f"{name} cloud")
    _ascending(vi, f"{name}.ctx_ids")
    _dots_ascending(dr, dc, f"{name} dots")
    _dots_ascending(cr, cc, f"{name} cloud")


def orset_merge(a, b) -> ORSetState:
    """Join of two add-wins OR-Set states (:class:`core_cy.ORSetState`).

    A dot survives when both stores hold it, or one store holds it and the other
    side's causal context has not seen it.  The result's context is the union of the
    two contexts, compacted: cloud dots covered by the version vector are dropped and
    contiguous ones are folded into it (so merge output is canonical).  For a dot held
    by both sides the element from ``a`` is kept (dots are unique, so they are equal).
    """
    _check_orset(a, "a")
    _check_orset(b, "b")
    a_dots = dict(zip(zip(a[0], a[1]), a[2]))
    b_dots = dict(zip(zip(b[0], b[1]), b[2]))
    a_vv = dict(zip(a[3], a[4]))
    b_vv = dict(zip(b[3], b[4]))
    a_cloud = set(zip(a[5], a[6]))
    b_cloud = set(zip(b[5], b[6]))
    out = {}
    b_get = b_vv.get
    for dot, e in a_dots.items():
        if dot in b_dots or not (dot[1] <= b_get(dot[0], 0) or dot in b_cloud):
            out[dot] = e
    a_get = a_vv.get
    for dot, e in b_dots.items():
        if dot not in a_dots and not (dot[1] <= a_get(dot[0], 0) or dot in a_cloud):
            out[dot] = e
    order = sorted(out)
    vv = dict(a_vv)
    for r, c in b_vv.items():
        if c > vv.get(r, -1):
            vv[r] = c
    cloud = []
    for r, c in sorted(a_cloud | b_cloud):
        cur = vv.get(r, 0)
        if c <= cur:
            continue
        if c == cur + 1:
            vv[r] = c
        else:
            cloud.append((r, c))
    ids = sorted(vv)
    return ORSetState(
        array("Q", [d[0] for d in order]),
        array("Q", [d[1] for d in order]),
        [out[d] for d in order],
        array("Q", ids),
        array("Q", [vv[r] for r in ids]),
        array("Q", [d[0] for d in cloud]),
        array("Q", [d[1] for d in cloud]),
    )


def _check_lww(s, name: str) -> None:
    if not isinstance(s, tuple) or len(s) != 4:
        raise TypeError(f"{name} must be an LWWMapState")
    keys, ts, reps, vals = s
    if not isinstance(keys, list) or not isinstance(vals, list):
        raise TypeError(f"{name}.keys and {name}.vals must be lists")
    _col(ts, f"{name}.ts")
    _col(reps, f"{name}.reps")
    _same_len(keys, ts, name)
    _same_len(keys, reps, name)
    _same_len(keys, vals, name)
    for k in keys:
        if not isinstance(k, bytes):
            raise TypeError(f"{name}.keys must be bytes")
    _ascending(keys, f"{name}.keys")


def lwwmap_merge(a, b) -> LWWMapState:
    """Join of two LWW-Maps (:class:`core_cy.LWWMapState`).

    Per key, the row with the higher ``(ts, rep)`` wins; on equal stamps the row from
    ``a`` is kept (equal stamps identify the same write).  Keys are bytes compared
    bytewise (like ``bytes.__lt__``).
    """
    _check_lww(a, "a")
    _check_lww(b, "b")
    d = dict(zip(a[0], zip(a[1], a[2], a[3])))
    get = d.get
    for k, t, r, v in zip(b[0], b[1], b[2], b[3]):
        cur = get(k)
        if cur is None or t > cur[0] or (t == cur[0] and r > cur[1]):
            d[k] = (t, r, v)
    keys = sorted(d)
    rows = [d[k] for k in keys]
    return LWWMapState(
        keys,
        array("Q", [x[0] for x in rows]),
        array("Q", [x[1] for x in rows]),
        [x[2] for x in rows],
    )
