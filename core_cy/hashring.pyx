# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled consistent hash ring; pure-Python twin: :mod:`core_cy._hashring_py`.

The ring is two C arrays sorted by ``(point, node bytes)``: ``points`` (uint64) and
``slot`` (uint32 index into the list of node names).  Lookups hash the key with an
inline XXH64 (identical to the xxhash package) and binary-search the points.
"""

from libc.stdint cimport uint64_t, uint32_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memcmp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from collections.abc import Mapping

from ._common import (
    HASH_SEED,
    POINTS_PER_VNODE,
    EmptyRingError,
    check_vnodes,
    node_bytes,
    vnode_count,
)

__all__ = ["HashRing", "EmptyRingError", "xxh64", "key_hash", "node_points"]

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    #define SYN_P1 0x9E3779B185EBCA87ULL
    #define SYN_P2 0xC2B2AE3D27D4EB4FULL
    #define SYN_P3 0x165667B19E3779F9ULL
    #define SYN_P4 0x85EBCA77C2B2AE63ULL
    #define SYN_P5 0x27D4EB2F165667C5ULL
    #define SYN_ROTL(x, r) (((x) << (r)) | ((x) >> (64 - (r))))
    static inline uint64_t syn_read64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint64_t syn_read32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return (uint64_t)v;
    }
    static inline uint64_t syn_round(uint64_t acc, uint64_t input) {
        acc += input * SYN_P2; acc = SYN_ROTL(acc, 31); return acc * SYN_P1;
    }
    static inline uint64_t syn_merge(uint64_t acc, uint64_t val) {
        acc ^= syn_round(0, val); return acc * SYN_P1 + SYN_P4;
    }
    static uint64_t syn_xxh64(const void *input, size_t len, uint64_t seed) {
        const unsigned char *p = (const unsigned char *)input;
        const unsigned char *end = p + len;
        uint64_t h;
        if (len >= 32) {
            const unsigned char *limit = end - 32;
            uint64_t v1 = seed + SYN_P1 + SYN_P2, v2 = seed + SYN_P2, v3 = seed, v4 = seed - SYN_P1;
            do {
                v1 = syn_round(v1, syn_read64(p)); p += 8;
                v2 = syn_round(v2, syn_read64(p)); p += 8;
                v3 = syn_round(v3, syn_read64(p)); p += 8;
                v4 = syn_round(v4, syn_read64(p)); p += 8;
            } while (p <= limit);
            h = SYN_ROTL(v1, 1) + SYN_ROTL(v2, 7) + SYN_ROTL(v3, 12) + SYN_ROTL(v4, 18);
            h = syn_merge(h, v1); h = syn_merge(h, v2); h = syn_merge(h, v3); h = syn_merge(h, v4);
        } else {
            h = seed + SYN_P5;
        }
        h += (uint64_t)len;
        while (p + 8 <= end) {
            h ^= syn_round(0, syn_read64(p)); h = SYN_ROTL(h, 27) * SYN_P1 + SYN_P4; p += 8;
        }
        if (p + 4 <= end) {
            h ^= syn_read32(p) * SYN_P1; h = SYN_ROTL(h, 23) * SYN_P2 + SYN_P3; p += 4;
        }
        while (p < end) {
            h ^= (*p) * SYN_P5; h = SYN_ROTL(h, 11) * SYN_P1; p++;
        }
        h ^= h >> 33; h *= SYN_P2; h ^= h >> 29; h *= SYN_P3; h ^= h >> 32;
        return h;
    }
    /* first index i with a[i] >= x (n when none); branch-free so lookups do not
       pay a mispredicted branch per step */
    static inline Py_ssize_t syn_lower_bound(const uint64_t *a, Py_ssize_t n, uint64_t x) {
        const uint64_t *base = a;
        if (n <= 0) return 0;
        while (n > 1) {
            Py_ssize_t half = n >> 1;
            base = (base[half] < x) ? base + half : base;
            n -= half;
        }
        return (base - a) + (*base < x);
    }
    static inline uint64_t syn_index_point(uint64_t t, uint64_t seed) {
        unsigned char buf[8]; int k;
        for (k = 0; k < 8; k++) buf[k] = (unsigned char)(t >> (8 * k));
        return syn_xxh64(buf, 8, seed);
    }
    """
    uint64_t syn_xxh64(const void* data, size_t length, uint64_t seed) nogil
    uint64_t syn_index_point(uint64_t t, uint64_t seed) nogil
    Py_ssize_t syn_lower_bound(const uint64_t* a, Py_ssize_t n, uint64_t x) nogil


cdef inline uint64_t _hash_key(object key) except? 0:
    cdef const char* buf
    cdef Py_ssize_t n
    if type(key) is str:
        buf = PyUnicode_AsUTF8AndSize(key, &n)
    elif type(key) is bytes:
        buf = PyBytes_AS_STRING(key)
        n = PyBytes_GET_SIZE(key)
    elif isinstance(key, str):
        buf = PyUnicode_AsUTF8AndSize(key, &n)
    elif isinstance(key, bytes):
        buf = PyBytes_AS_STRING(key)
        n = PyBytes_GET_SIZE(key)
    else:
        raise TypeError(f"keys must be str or bytes, got {type(key).__name__}")
    return syn_xxh64(buf, <size_t>n, HASH_SEED_C)


cdef uint64_t HASH_SEED_C = HASH_SEED
cdef Py_ssize_t PPV = POINTS_PER_VNODE


def xxh64(data, seed=0):
    """XXH64 of ``data`` (bytes) as an unsigned 64-bit int."""
    cdef const unsigned char[::1] view = data
    cdef uint64_t s = seed
    if view.shape[0] == 0:
        return syn_xxh64(b"", 0, s)
    return syn_xxh64(&view[0], <size_t>view.shape[0], s)


def key_hash(key):
    """Ring position of a key: XXH64(UTF-8 or raw bytes, seed 0)."""
    return _hash_key(key)


def node_points(node, vnodes=160, weight=1.0):
    """Ring points of a node, in derivation order (point t = XXH64(le64(t), XXH64(name)))."""
    cdef bytes nb = node_bytes(node)
    cdef uint64_t seed = syn_xxh64(PyBytes_AS_STRING(nb), <size_t>PyBytes_GET_SIZE(nb), HASH_SEED_C)
    cdef Py_ssize_t count = vnode_count(check_vnodes(vnodes), weight) * PPV
    cdef Py_ssize_t t
    return [syn_index_point(<uint64_t>t, seed) for t in range(count)]


cdef inline int _cmp_entry(uint64_t pa, uint32_t sa, uint64_t pb, uint32_t sb, list names_b) except -2:
    """Order of ring entries: by point, then by node bytes."""
    cdef bytes x, y
    cdef Py_ssize_t nx, ny
    cdef int c
    if pa < pb:
        return -1
    if pa > pb:
        return 1
    if sa == sb:
        return 0
    x = <bytes>PyList_GET_ITEM(names_b, sa)
    y = <bytes>PyList_GET_ITEM(names_b, sb)
    nx = PyBytes_GET_SIZE(x)
    ny = PyBytes_GET_SIZE(y)
    c = memcmp(PyBytes_AS_STRING(x), PyBytes_AS_STRING(y), <size_t>(nx if nx < ny else ny))
    if c != 0:
        return -1 if c < 0 else 1
    return -1 if nx < ny else (1 if nx > ny else 0)


cdef tuple _merge_runs(tuple a, tuple b, list names_b):
    """Merge two sorted runs (points, slots, length), freeing both; returns the merged run."""
    cdef size_t addr_pa = a[0], addr_sa = a[1], addr_pb = b[0], addr_sb = b[1]
    cdef uint64_t* pa = <uint64_t*>addr_pa
    cdef uint32_t* sa = <uint32_t*>addr_sa
    cdef Py_ssize_t na = a[2]
    cdef uint64_t* pb = <uint64_t*>addr_pb
    cdef uint32_t* sb = <uint32_t*>addr_sb
    cdef Py_ssize_t nb = b[2]
    cdef Py_ssize_t total = na + nb
    cdef uint64_t* op = <uint64_t*>malloc(max(total, 1) * sizeof(uint64_t))
    cdef uint32_t* os = <uint32_t*>malloc(max(total, 1) * sizeof(uint32_t))
    cdef Py_ssize_t i = 0, j = 0, k = 0
    if op == NULL or os == NULL:
        free(op); free(os); free(pa); free(sa); free(pb); free(sb)
        raise MemoryError()
    try:
        while i < na and j < nb:
            if _cmp_entry(pa[i], sa[i], pb[j], sb[j], names_b) <= 0:
                op[k] = pa[i]; os[k] = sa[i]; i += 1
            else:
                op[k] = pb[j]; os[k] = sb[j]; j += 1
            k += 1
        while i < na:
            op[k] = pa[i]; os[k] = sa[i]; i += 1; k += 1
        while j < nb:
            op[k] = pb[j]; os[k] = sb[j]; j += 1; k += 1
    finally:
        free(pa); free(sa); free(pb); free(sb)
    return (<size_t>op, <size_t>os, total)


cdef void _free_runs(list runs):
    cdef size_t points, slots
    for run in runs:
        points, slots = run[0], run[1]
        free(<uint64_t*>points)
        free(<uint32_t*>slots)


cdef class HashRing:
    """Consistent hash ring with virtual nodes and weights (compiled)."""

    cdef uint64_t* _points
    cdef uint32_t* _slot
    cdef Py_ssize_t _n
    cdef int _vnodes
    cdef list _names      # slot -> node name as added
    cdef list _names_b    # slot -> encoded node name
    cdef dict _weights    # encoded name -> weight
    cdef dict _slots      # encoded name -> slot

    def __cinit__(self):
        self._points = NULL
        self._slot = NULL
        self._n = 0
        self._names = []
        self._names_b = []
        self._weights = {}
        self._slots = {}

    def __dealloc__(self):
        free(self._points)
        free(self._slot)

    def __init__(self, nodes=(), vnodes=160):
        self._vnodes = check_vnodes(vnodes)
        items = list(nodes.items()) if isinstance(nodes, Mapping) else [(n, 1.0) for n in nodes]
        names = [node_bytes(node) for node, _ in items]
        if len(set(names)) != len(names):  # a name twice: the later one wins, as add does
            for node, weight in items:
                self.add(node, weight)
            return
        self._build(items)

    cdef _build(self, list items):
        """All nodes at once: each node's points sorted, then the runs merged pairwise,
        O(points x log nodes).  (Adding them one by one merges the whole ring each
        time: 1,020 nodes took 2.4 s.)"""
        cdef list runs = []
        cdef Py_ssize_t count
        cdef uint32_t s
        cdef uint64_t seed
        cdef uint64_t* pts
        cdef uint32_t* sl
        cdef Py_ssize_t t
        for node, weight in items:
            nb = node_bytes(node)
            count = vnode_count(self._vnodes, weight) * PPV
            s = <uint32_t>len(self._names)
            seed = syn_xxh64(PyBytes_AS_STRING(nb), <size_t>PyBytes_GET_SIZE(nb), HASH_SEED_C)
            pts = <uint64_t*>malloc(max(count, 1) * sizeof(uint64_t))
            sl = <uint32_t*>malloc(max(count, 1) * sizeof(uint32_t))
            if pts == NULL or sl == NULL:
                free(pts); free(sl)
                _free_runs(runs)
                raise MemoryError()
            for t in range(count):
                pts[t] = syn_index_point(<uint64_t>t, seed)
                sl[t] = s
            _sort_u64(pts, count)
            self._names.append(node)
            self._names_b.append(nb)
            self._slots[nb] = s
            self._weights[nb] = float(weight)
            runs.append((<size_t>pts, <size_t>sl, count))
        while len(runs) > 1:
            merged = []
            for i in range(0, len(runs) - 1, 2):
                merged.append(_merge_runs(runs[i], runs[i + 1], self._names_b))
            if len(runs) % 2:
                merged.append(runs[len(runs) - 1])  # (compiled with wraparound off)
            runs = merged
        cdef size_t points, slots
        if runs:
            points, slots = runs[0][0], runs[0][1]
            free(self._points); free(self._slot)
            self._points = <uint64_t*>points
            self._slot = <uint32_t*>slots
            self._n = runs[0][2]

    # -- membership ---------------------------------------------------------------
    @property
    def vnodes(self):
        return self._vnodes

    @property
    def nodes(self):
        """Node names, sorted by their encoded bytes."""
        order = sorted(range(len(self._names_b)), key=self._names_b.__getitem__)
        return tuple([self._names[i] for i in order])

    def weight(self, node):
        return self._weights[node_bytes(node)]

    def __len__(self):
        return len(self._names)

    def __contains__(self, node):
        try:
            return node_bytes(node) in self._slots
        except TypeError:
            return False

    def __repr__(self):
        return f"HashRing(nodes={list(self.nodes)!r}, vnodes={self._vnodes})"

    def add(self, node, weight=1.0):
        """Add ``node`` (str or bytes); re-adding a node replaces its weight and name."""
        cdef bytes nb = node_bytes(node)
        cdef Py_ssize_t count = vnode_count(self._vnodes, weight) * PPV
        if nb in self._slots:
            self.remove(node)
        cdef uint32_t s = <uint32_t>len(self._names)
        cdef uint64_t seed = syn_xxh64(PyBytes_AS_STRING(nb), <size_t>PyBytes_GET_SIZE(nb), HASH_SEED_C)
        cdef uint64_t* newp = <uint64_t*>malloc(max(count, 1) * sizeof(uint64_t))
        if newp == NULL:
            raise MemoryError()
        cdef Py_ssize_t t
        for t in range(count):
            newp[t] = syn_index_point(<uint64_t>t, seed)
        _sort_u64(newp, count)
        self._names.append(node)
        self._names_b.append(nb)
        self._slots[nb] = s
        self._weights[nb] = float(weight)
        # merge the new node's points into the ring
        cdef Py_ssize_t total = self._n + count
        cdef uint64_t* op = <uint64_t*>malloc(total * sizeof(uint64_t))
        cdef uint32_t* os = <uint32_t*>malloc(total * sizeof(uint32_t))
        if op == NULL or os == NULL:
            free(op); free(os); free(newp)
            raise MemoryError()
        cdef Py_ssize_t i = 0, j = 0, k = 0
        cdef list names_b = self._names_b
        try:
            while i < self._n and j < count:
                if _cmp_entry(self._points[i], self._slot[i], newp[j], s, names_b) <= 0:
                    op[k] = self._points[i]; os[k] = self._slot[i]; i += 1
                else:
                    op[k] = newp[j]; os[k] = s; j += 1
                k += 1
            while i < self._n:
                op[k] = self._points[i]; os[k] = self._slot[i]; i += 1; k += 1
            while j < count:
                op[k] = newp[j]; os[k] = s; j += 1; k += 1
        finally:
            free(newp)
        free(self._points)
        free(self._slot)
        self._points = op
        self._slot = os
        self._n = total

    def remove(self, node):
        """Remove ``node``; raises KeyError when it is not on the ring."""
        nb = node_bytes(node)
        if nb not in self._slots:
            raise KeyError(node)
        cdef uint32_t s = self._slots.pop(nb)
        del self._weights[nb]
        del self._names[s]
        del self._names_b[s]
        for i2, b in enumerate(self._names_b):
            self._slots[b] = i2
        cdef Py_ssize_t i, k = 0
        cdef uint32_t x
        for i in range(self._n):
            x = self._slot[i]
            if x == s:
                continue
            self._points[k] = self._points[i]
            self._slot[k] = x - 1 if x > s else x
            k += 1
        self._n = k

    # -- lookups ------------------------------------------------------------------
    cdef inline Py_ssize_t _find(self, uint64_t h) noexcept:
        cdef Py_ssize_t i = syn_lower_bound(self._points, self._n, h)
        return 0 if i == self._n else i

    cpdef object owner(self, object key):
        """The node owning ``key`` (str or bytes)."""
        cdef uint64_t h = _hash_key(key)
        if self._n == 0:
            raise EmptyRingError("hash ring has no nodes")
        return <object>PyList_GET_ITEM(self._names, self._slot[self._find(h)])

    def owners(self, keys):
        """owner() of every key, as a list."""
        cdef list seq
        cdef Py_ssize_t i, n
        cdef uint64_t h
        cdef list names = self._names
        if type(keys) is list:
            seq = <list>keys
        else:
            seq = list(keys)
        n = len(seq)
        cdef list out = [None] * n
        if n and self._n == 0:
            raise EmptyRingError("hash ring has no nodes")
        for i in range(n):
            h = _hash_key(<object>PyList_GET_ITEM(seq, i))
            out[i] = <object>PyList_GET_ITEM(names, self._slot[self._find(h)])
        return out

    def preference_list(self, key, n):
        """The first ``n`` distinct nodes clockwise from ``key`` (fewer if the ring is smaller)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("n must be an int")
        if n < 0:
            raise ValueError("n must be >= 0")
        cdef uint64_t h = _hash_key(key)
        if self._n == 0:
            raise EmptyRingError("hash ring has no nodes")
        cdef Py_ssize_t want = min(n, len(self._names))
        cdef list out = []
        if want == 0:
            return out
        cdef Py_ssize_t nslots = len(self._names)
        cdef unsigned char* seen = <unsigned char*>calloc(nslots, 1)
        if seen == NULL:
            raise MemoryError()
        cdef Py_ssize_t start = self._find(h), step, got = 0, idx
        cdef uint32_t s
        try:
            for step in range(self._n):
                idx = start + step
                if idx >= self._n:
                    idx -= self._n
                s = self._slot[idx]
                if not seen[s]:
                    seen[s] = 1
                    out.append(<object>PyList_GET_ITEM(self._names, s))
                    got += 1
                    if got >= want:
                        break
        finally:
            free(seen)
        return out


cdef inline void _sift_down(uint64_t* a, Py_ssize_t root, Py_ssize_t end) noexcept nogil:
    """Restore the max-heap property below ``root`` within ``a[:end]``."""
    cdef Py_ssize_t child
    cdef uint64_t tmp
    while 2 * root + 1 < end:
        child = 2 * root + 1
        if child + 1 < end and a[child] < a[child + 1]:
            child += 1
        if a[root] < a[child]:
            tmp = a[root]; a[root] = a[child]; a[child] = tmp
            root = child
        else:
            return


cdef void _sort_u64(uint64_t* a, Py_ssize_t n) noexcept nogil:
    """In-place heap sort (n is small: one node's points)."""
    cdef Py_ssize_t start, end
    cdef uint64_t tmp
    if n < 2:
        return
    start = (n - 2) // 2
    while start >= 0:
        _sift_down(a, start, n)
        start -= 1
    end = n - 1
    while end > 0:
        tmp = a[0]; a[0] = a[end]; a[end] = tmp
        _sift_down(a, 0, end)
        end -= 1
