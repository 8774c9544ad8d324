# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CRDT merge kernels; pure-Python twin: :mod:`core_cy._crdtmerge_py`.

Same representations and results as the twin (see its docstrings): counters and
vector clocks are parallel ``array('Q')`` columns sorted by replica id, the OR-Set is
an :class:`ORSetState`, the LWW-Map an :class:`LWWMapState`.  Loops are linear merge
walks over the C buffers of the arrays.
"""

from libc.string cimport memcmp
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
import array as _pyarray

from ._common import AFTER, BEFORE, CONCURRENT, EQUAL, LWWMapState, ORSetState

__all__ = [
    "gcounter_merge",
    "pncounter_merge",
    "vclock_merge",
    "vclock_compare",
    "orset_merge",
    "lwwmap_merge",
]

ctypedef unsigned long long u64

cdef array.array _Q = _pyarray.array("Q")


cdef inline u64* _col(object a, str name) except NULL:
    cdef array.array arr
    if type(a) is not array.array and not isinstance(a, array.array):
        raise TypeError(f"{name} must be array('Q'), got {type(a).__name__}")
    arr = <array.array>a
    if arr.ob_descr.typecode != b"Q"[0]:
        raise TypeError(f"{name} must be array('Q'), got array('{chr(arr.ob_descr.typecode)}')")
    if arr.data.as_ulonglongs == NULL:
        return <u64*>&_EMPTY
    return arr.data.as_ulonglongs

cdef u64 _EMPTY = 0


cdef inline array.array _new(Py_ssize_t n):
    return array.clone(_Q, n, False)


cdef inline int _same_len(Py_ssize_t x, Py_ssize_t y, str what) except -1:
    if x != y:
        raise ValueError(f"{what}: columns differ in length ({x} != {y})")
    return 0


cdef inline int _ascending(const u64* ids, Py_ssize_t n, str name) except -1:
    cdef Py_ssize_t i
    for i in range(1, n):
        if ids[i] <= ids[i - 1]:
            raise ValueError(f"{name} must be strictly ascending")
    return 0


cdef int _check_clocks(a_ids, a_counts, b_ids, b_counts) except -1:
    """Shared input checks of the (ids, counts) kernels: equal lengths, ascending ids."""
    _same_len(len(a_ids), len(a_counts), "a")
    _same_len(len(b_ids), len(b_counts), "b")
    _ascending(_col(a_ids, "a_ids"), len(a_ids), "a_ids")
    _ascending(_col(b_ids, "b_ids"), len(b_ids), "b_ids")
    return 0


cdef inline int _dots_ascending(const u64* r, const u64* c, Py_ssize_t n, str name) except -1:
    cdef Py_ssize_t i
    for i in range(1, n):
        if r[i] < r[i - 1] or (r[i] == r[i - 1] and c[i] <= c[i - 1]):
            raise ValueError(f"{name} must be strictly ascending by (replica, counter)")
    return 0


def gcounter_merge(a_ids, a_counts, b_ids, b_counts):
    """Per-replica max of two G-Counters.

    ``a_ids``/``b_ids``: array('Q') replica ids, strictly ascending; ``a_counts``/
    ``b_counts``: array('Q') of the same length.  Returns ``(ids, counts)``, new
    array('Q') columns over the union of replica ids.  Value = ``sum(counts)``.
    """
    cdef u64* ai = _col(a_ids, "a_ids")
    cdef u64* ac = _col(a_counts, "a_counts")
    cdef u64* bi = _col(b_ids, "b_ids")
    cdef u64* bc = _col(b_counts, "b_counts")
    cdef Py_ssize_t na = len(a_ids), nb = len(b_ids)
    _check_clocks(a_ids, a_counts, b_ids, b_counts)
    cdef array.array out_i = _new(na + nb), out_c = _new(na + nb)
    cdef u64* oi = out_i.data.as_ulonglongs
    cdef u64* oc = out_c.data.as_ulonglongs
    cdef Py_ssize_t i = 0, j = 0, k = 0
    with nogil:
        while i < na and j < nb:
            if ai[i] < bi[j]:
                oi[k] = ai[i]; oc[k] = ac[i]; i += 1
            elif bi[j] < ai[i]:
                oi[k] = bi[j]; oc[k] = bc[j]; j += 1
            else:
                oi[k] = ai[i]; oc[k] = ac[i] if ac[i] >= bc[j] else bc[j]; i += 1; j += 1
            k += 1
        while i < na:
            oi[k] = ai[i]; oc[k] = ac[i]; i += 1; k += 1
        while j < nb:
            oi[k] = bi[j]; oc[k] = bc[j]; j += 1; k += 1
    array.resize(out_i, k)
    array.resize(out_c, k)
    return out_i, out_c


def vclock_merge(a_ids, a_counts, b_ids, b_counts):
    """Least upper bound of two vector clocks (same representation as gcounter_merge)."""
    return gcounter_merge(a_ids, a_counts, b_ids, b_counts)


def pncounter_merge(a_ids, a_p, a_n, b_ids, b_p, b_n):
    """Merge two PN-Counters: per-replica max of increments ``p`` and of decrements ``n``.

    Columns: ``ids`` array('Q') strictly ascending, ``p`` and ``n`` array('Q') of the same
    length.  Returns ``(ids, p, n)``; value = ``sum(p) - sum(n)``.
    """
    cdef u64* ai = _col(a_ids, "a_ids")
    cdef u64* ap = _col(a_p, "a_p")
    cdef u64* an = _col(a_n, "a_n")
    cdef u64* bi = _col(b_ids, "b_ids")
    cdef u64* bp = _col(b_p, "b_p")
    cdef u64* bn = _col(b_n, "b_n")
    cdef Py_ssize_t na = len(a_ids), nb = len(b_ids)
    _same_len(na, len(a_p), "a")
    _same_len(na, len(a_n), "a")
    _same_len(nb, len(b_p), "b")
    _same_len(nb, len(b_n), "b")
    _ascending(ai, na, "a_ids")
    _ascending(bi, nb, "b_ids")
    cdef array.array out_i = _new(na + nb), out_p = _new(na + nb), out_n = _new(na + nb)
    cdef u64* oi = out_i.data.as_ulonglongs
    cdef u64* op = out_p.data.as_ulonglongs
    cdef u64* on = out_n.data.as_ulonglongs
    cdef Py_ssize_t i = 0, j = 0, k = 0
    with nogil:
        while i < na and j < nb:
            if ai[i] < bi[j]:
                oi[k] = ai[i]; op[k] = ap[i]; on[k] = an[i]; i += 1
            elif bi[j] < ai[i]:
                oi[k] = bi[j]; op[k] = bp[j]; on[k] = bn[j]; j += 1
            else:
                oi[k] = ai[i]
                op[k] = ap[i] if ap[i] >= bp[j] else bp[j]
                on[k] = an[i] if an[i] >= bn[j] else bn[j]
                i += 1; j += 1
            k += 1
        while i < na:
            oi[k] = ai[i]; op[k] = ap[i]; on[k] = an[i]; i += 1; k += 1
        while j < nb:
            oi[k] = bi[j]; op[k] = bp[j]; on[k] = bn[j]; j += 1; k += 1
    array.resize(out_i, k)
    array.resize(out_p, k)
    array.resize(out_n, k)
    return out_i, out_p, out_n


def vclock_compare(a_ids, a_counts, b_ids, b_counts):
    """Compare vector clocks a and b (missing entry = 0).

    Returns EQUAL (0), BEFORE (1: a < b), AFTER (2: a > b) or CONCURRENT (3).
    Representation as in gcounter_merge.
    """
    cdef u64* ai = _col(a_ids, "a_ids")
    cdef u64* ac = _col(a_counts, "a_counts")
    cdef u64* bi = _col(b_ids, "b_ids")
    cdef u64* bc = _col(b_counts, "b_counts")
    cdef Py_ssize_t na = len(a_ids), nb = len(b_ids)
    _check_clocks(a_ids, a_counts, b_ids, b_counts)
    cdef bint a_gt = False, b_gt = False
    cdef Py_ssize_t i = 0, j = 0
    while i < na and j < nb and not (a_gt and b_gt):
        if ai[i] < bi[j]:
            if ac[i]:
                a_gt = True
            i += 1
        elif bi[j] < ai[i]:
            if bc[j]:
                b_gt = True
            j += 1
        else:
            if ac[i] > bc[j]:
                a_gt = True
            elif ac[i] < bc[j]:
                b_gt = True
            i += 1; j += 1
    while i < na and not a_gt:
        if ac[i]:
            a_gt = True
        i += 1
    while j < nb and not b_gt:
        if bc[j]:
            b_gt = True
        j += 1
    if a_gt:
        return CONCURRENT if b_gt else AFTER
    return BEFORE if b_gt else EQUAL


cdef struct Ctx:
    const u64* vi   # version vector ids
    const u64* vc   # version vector counters
    Py_ssize_t nv
    const u64* cr   # cloud replicas
    const u64* cc   # cloud counters
    Py_ssize_t ncl
    Py_ssize_t pv   # walking cursors (queries come in ascending dot order)
    Py_ssize_t pc


cdef inline bint _seen(Ctx* c, u64 r, u64 k) noexcept nogil:
    while c.pv < c.nv and c.vi[c.pv] < r:
        c.pv += 1
    if c.pv < c.nv and c.vi[c.pv] == r and k <= c.vc[c.pv]:
        return True
    while c.pc < c.ncl and (c.cr[c.pc] < r or (c.cr[c.pc] == r and c.cc[c.pc] < k)):
        c.pc += 1
    return c.pc < c.ncl and c.cr[c.pc] == r and c.cc[c.pc] == k


cdef tuple _orset_cols(object s, str name):
    if not isinstance(s, tuple) or len(s) != 7:
        raise TypeError(f"{name} must be an ORSetState")
    if not isinstance(s[2], list):
        raise TypeError(f"{name}.elems must be a list")
    return <tuple>s


def orset_merge(a, b):
    """Join of two add-wins OR-Set states (:class:`core_cy.ORSetState`).

    A dot survives when both stores hold it, or one store holds it and the other
    side's causal context has not seen it.  The result's context is the union of the
    two contexts, compacted: cloud dots covered by the version vector are dropped and
    contiguous ones are folded into it (so merge output is canonical).  For a dot held
    by both sides the element from ``a`` is kept (dots are unique, so they are equal).
    """
    cdef tuple ta = _orset_cols(a, "a"), tb = _orset_cols(b, "b")
    cdef u64* adr = _col(ta[0], "a.dot_reps")
    cdef u64* adc = _col(ta[1], "a.dot_ctrs")
    cdef list ael = <list>ta[2]
    cdef u64* bdr = _col(tb[0], "b.dot_reps")
    cdef u64* bdc = _col(tb[1], "b.dot_ctrs")
    cdef list bel = <list>tb[2]
    cdef Ctx ca, cb
    ca.vi = _col(ta[3], "a.ctx_ids"); ca.vc = _col(ta[4], "a.ctx_ctrs")
    ca.cr = _col(ta[5], "a.cloud_reps"); ca.cc = _col(ta[6], "a.cloud_ctrs")
    cb.vi = _col(tb[3], "b.ctx_ids"); cb.vc = _col(tb[4], "b.ctx_ctrs")
    cb.cr = _col(tb[5], "b.cloud_reps"); cb.cc = _col(tb[6], "b.cloud_ctrs")
    cdef Py_ssize_t na = len(ta[0]), nb = len(tb[0])
    _same_len(na, len(ta[1]), "a dots")
    _same_len(na, PyList_GET_SIZE(ael), "a dots/elems")
    _same_len(nb, len(tb[1]), "b dots")
    _same_len(nb, PyList_GET_SIZE(bel), "b dots/elems")
    ca.nv = len(ta[3]); _same_len(ca.nv, len(ta[4]), "a context")
    cb.nv = len(tb[3]); _same_len(cb.nv, len(tb[4]), "b context")
    ca.ncl = len(ta[5]); _same_len(ca.ncl, len(ta[6]), "a cloud")
    cb.ncl = len(tb[5]); _same_len(cb.ncl, len(tb[6]), "b cloud")
    _ascending(ca.vi, ca.nv, "a.ctx_ids")
    _ascending(cb.vi, cb.nv, "b.ctx_ids")
    _dots_ascending(adr, adc, na, "a dots")
    _dots_ascending(bdr, bdc, nb, "b dots")
    _dots_ascending(ca.cr, ca.cc, ca.ncl, "a cloud")
    _dots_ascending(cb.cr, cb.cc, cb.ncl, "b cloud")
    ca.pv = ca.pc = cb.pv = cb.pc = 0

    # 1. dot store
    cdef array.array o_r = _new(na + nb), o_c = _new(na + nb)
    cdef u64* orr = o_r.data.as_ulonglongs
    cdef u64* occ = o_c.data.as_ulonglongs
    cdef list o_el = []
    cdef Py_ssize_t i = 0, j = 0, k = 0
    while i < na or j < nb:
        if j >= nb or (i < na and (adr[i] < bdr[j] or (adr[i] == bdr[j] and adc[i] < bdc[j]))):
            if not _seen(&cb, adr[i], adc[i]):
                orr[k] = adr[i]; occ[k] = adc[i]; k += 1
                o_el.append(<object>PyList_GET_ITEM(ael, i))
            i += 1
        elif i >= na or (bdr[j] < adr[i] or (bdr[j] == adr[i] and bdc[j] < adc[i])):
            if not _seen(&ca, bdr[j], bdc[j]):
                orr[k] = bdr[j]; occ[k] = bdc[j]; k += 1
                o_el.append(<object>PyList_GET_ITEM(bel, j))
            j += 1
        else:
            orr[k] = adr[i]; occ[k] = adc[i]; k += 1
            o_el.append(<object>PyList_GET_ITEM(ael, i))
            i += 1; j += 1
    array.resize(o_r, k)
    array.resize(o_c, k)

    # 2. version vectors: per-replica max
    cdef Py_ssize_t nvm = ca.nv + cb.nv
    cdef array.array m_i = _new(nvm), m_c = _new(nvm)
    cdef u64* mi = m_i.data.as_ulonglongs
    cdef u64* mc = m_c.data.as_ulonglongs
    i = j = k = 0
    while i < ca.nv and j < cb.nv:
        if ca.vi[i] < cb.vi[j]:
            mi[k] = ca.vi[i]; mc[k] = ca.vc[i]; i += 1
        elif cb.vi[j] < ca.vi[i]:
            mi[k] = cb.vi[j]; mc[k] = cb.vc[j]; j += 1
        else:
            mi[k] = ca.vi[i]; mc[k] = ca.vc[i] if ca.vc[i] >= cb.vc[j] else cb.vc[j]; i += 1; j += 1
        k += 1
    while i < ca.nv:
        mi[k] = ca.vi[i]; mc[k] = ca.vc[i]; i += 1; k += 1
    while j < cb.nv:
        mi[k] = cb.vi[j]; mc[k] = cb.vc[j]; j += 1; k += 1
    nvm = k

    # 3. cloud union (sorted, deduplicated)
    cdef Py_ssize_t ncu = ca.ncl + cb.ncl
    cdef array.array u_r = _new(ncu), u_c = _new(ncu)
    cdef u64* ur = u_r.data.as_ulonglongs
    cdef u64* uc = u_c.data.as_ulonglongs
    i = j = k = 0
    while i < ca.ncl and j < cb.ncl:
        if ca.cr[i] < cb.cr[j] or (ca.cr[i] == cb.cr[j] and ca.cc[i] < cb.cc[j]):
            ur[k] = ca.cr[i]; uc[k] = ca.cc[i]; i += 1
        elif cb.cr[j] < ca.cr[i] or (cb.cr[j] == ca.cr[i] and cb.cc[j] < ca.cc[i]):
            ur[k] = cb.cr[j]; uc[k] = cb.cc[j]; j += 1
        else:
            ur[k] = ca.cr[i]; uc[k] = ca.cc[i]; i += 1; j += 1
        k += 1
    while i < ca.ncl:
        ur[k] = ca.cr[i]; uc[k] = ca.cc[i]; i += 1; k += 1
    while j < cb.ncl:
        ur[k] = cb.cr[j]; uc[k] = cb.cc[j]; j += 1; k += 1
    ncu = k

    # 4. compaction: fold contiguous cloud dots into the version vector
    cdef array.array v_i = _new(nvm + ncu), v_c = _new(nvm + ncu)
    cdef array.array c_r = _new(ncu), c_c = _new(ncu)
    cdef u64* vi = v_i.data.as_ulonglongs
    cdef u64* vc = v_c.data.as_ulonglongs
    cdef u64* cr = c_r.data.as_ulonglongs
    cdef u64* cc = c_c.data.as_ulonglongs
    cdef Py_ssize_t nv = 0, ncl = 0
    cdef u64 r, cur, c
    cdef bint has
    i = j = 0
    while i < nvm or j < ncu:
        if j >= ncu or (i < nvm and mi[i] < ur[j]):
            vi[nv] = mi[i]; vc[nv] = mc[i]; nv += 1; i += 1
            continue
        r = ur[j]
        if i < nvm and mi[i] == r:
            cur = mc[i]; has = True; i += 1
        else:
            cur = 0; has = False
        while j < ncu and ur[j] == r:
            c = uc[j]
            if c > cur:
                if c == cur + 1:
                    cur = c
                else:
                    cr[ncl] = r; cc[ncl] = c; ncl += 1
            j += 1
        if has or cur > 0:
            vi[nv] = r; vc[nv] = cur; nv += 1
    array.resize(v_i, nv)
    array.resize(v_c, nv)
    array.resize(c_r, ncl)
    array.resize(c_c, ncl)
    return ORSetState(o_r, o_c, o_el, v_i, v_c, c_r, c_c)


cdef inline int _bcmp(object x, object y) noexcept:
    cdef Py_ssize_t nx = PyBytes_GET_SIZE(x), ny = PyBytes_GET_SIZE(y)
    cdef int c = memcmp(PyBytes_AS_STRING(x), PyBytes_AS_STRING(y), <size_t>(nx if nx < ny else ny))
    if c != 0:
        return c
    return -1 if nx < ny else (1 if nx > ny else 0)


cdef int _check_keys(list keys, str name) except -1:
    cdef Py_ssize_t i, n = PyList_GET_SIZE(keys)
    cdef object prev = None, k
    for i in range(n):
        k = <object>PyList_GET_ITEM(keys, i)
        if not isinstance(k, bytes):
            raise TypeError(f"{name}.keys must be bytes")
        if i and _bcmp(prev, k) >= 0:
            raise ValueError(f"{name}.keys must be strictly ascending")
        prev = k
    return 0


def lwwmap_merge(a, b):
    """Join of two LWW-Maps (:class:`core_cy.LWWMapState`).

    Per key, the row with the higher ``(ts, rep)`` wins; on equal stamps the row from
    ``a`` is kept (equal stamps identify the same write).  Keys are bytes compared
    bytewise (like ``bytes.__lt__``).
    """
    if not isinstance(a, tuple) or len(a) != 4:
        raise TypeError("a must be an LWWMapState")
    if not isinstance(b, tuple) or len(b) != 4:
        raise TypeError("b must be an LWWMapState")
    if not isinstance(a[0], list) or not isinstance(a[3], list):
        raise TypeError("a.keys and a.vals must be lists")
    if not isinstance(b[0], list) or not isinstance(b[3], list):
        raise TypeError("b.keys and b.vals must be lists")
    cdef list ak = <list>a[0], av = <list>a[3], bk = <list>b[0], bv = <list>b[3]
    cdef u64* at = _col(a[1], "a.ts")
    cdef u64* ar = _col(a[2], "a.reps")
    cdef u64* bt = _col(b[1], "b.ts")
    cdef u64* br = _col(b[2], "b.reps")
    cdef Py_ssize_t na = PyList_GET_SIZE(ak), nb = PyList_GET_SIZE(bk)
    _same_len(na, len(a[1]), "a"); _same_len(na, len(a[2]), "a"); _same_len(na, PyList_GET_SIZE(av), "a")
    _same_len(nb, len(b[1]), "b"); _same_len(nb, len(b[2]), "b"); _same_len(nb, PyList_GET_SIZE(bv), "b")
    _check_keys(ak, "a")
    _check_keys(bk, "b")
    cdef array.array o_t = _new(na + nb), o_r = _new(na + nb)
    cdef u64* ot = o_t.data.as_ulonglongs
    cdef u64* orr = o_r.data.as_ulonglongs
    cdef list o_k = [], o_v = []
    cdef Py_ssize_t i = 0, j = 0, k = 0
    cdef int c
    cdef object x
    while i < na and j < nb:
        x = <object>PyList_GET_ITEM(ak, i)
        c = _bcmp(x, <object>PyList_GET_ITEM(bk, j))
        if c < 0:
            o_k.append(x); o_v.append(<object>PyList_GET_ITEM(av, i))
            ot[k] = at[i]; orr[k] = ar[i]; i += 1
        elif c > 0:
            o_k.append(<object>PyList_GET_ITEM(bk, j)); o_v.append(<object>PyList_GET_ITEM(bv, j))
            ot[k] = bt[j]; orr[k] = br[j]; j += 1
        else:
            o_k.append(x)
            if bt[j] > at[i] or (bt[j] == at[i] and br[j] > ar[i]):
                o_v.append(<object>PyList_GET_ITEM(bv, j)); ot[k] = bt[j]; orr[k] = br[j]
            else:
                o_v.append(<object>PyList_GET_ITEM(av, i)); ot[k] = at[i]; orr[k] = ar[i]
            i += 1; j += 1
        k += 1
    while i < na:
        o_k.append(<object>PyList_GET_ITEM(ak, i)); o_v.append(<object>PyList_GET_ITEM(av, i))
        ot[k] = at[i]; orr[k] = ar[i]; i += 1; k += 1
    while j < nb:
        o_k.append(<object>PyList_GET_ITEM(bk, j)); o_v.append(<object>PyList_GET_ITEM(bv, j))
        ot[k] = bt[j]; orr[k] = br[j]; j += 1; k += 1
    array.resize(o_t, k)
    array.resize(o_r, k)
    return LWWMapState(o_k, o_t, o_r, o_v)
