"""Fast kernels with pure-Python twins: the agent placement ring and CRDT merge loops.

``IMPLEMENTATION`` is ``"cython"`` when the compiled modules loaded and ``"python"``
otherwise; ``SYNTHESIS_PURE=1`` in the environment forces the twins.  Both
implementations stay reachable through :func:`implementations` (for tests/benchmarks).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from . import _crdtmerge_py, _hashring_py
from ._common import (
    AFTER,
    BEFORE,
    CONCURRENT,
    EQUAL,
    POINTS_PER_VNODE,
    EmptyRingError,
    LWWMapState,
    ORSetState,
    empty_lwwmap,
    empty_orset,
    replica_id,
)

_KERNEL_NAMES = tuple(_crdtmerge_py.__all__)  # the twin defines the kernel set
_RING_NAMES = ("HashRing", "xxh64", "key_hash", "node_points")


def _bundle(name, ring_mod, merge_mod) -> SimpleNamespace:
    ns = SimpleNamespace(name=name, hashring=ring_mod, crdtmerge=merge_mod)
    for attr in _RING_NAMES:
        setattr(ns, attr, getattr(ring_mod, attr))
    for attr in _KERNEL_NAMES:
        setattr(ns, attr, getattr(merge_mod, attr))
    return ns


_PYTHON = _bundle("python", _hashring_py, _crdtmerge_py)
try:
    from . import crdtmerge as _crdtmerge_c
    from . import hashring as _hashring_c
except ImportError as exc:  # not built (no compiler) or broken build
    _CYTHON = None
    COMPILED_IMPORT_ERROR: ImportError | None = exc
else:
    _CYTHON = _bundle("cython", _hashring_c, _crdtmerge_c)
    COMPILED_IMPORT_ERROR = None


def implementations() -> dict[str, SimpleNamespace]:
    """{"python": twin bundle, "cython": compiled bundle (only if it loaded)}."""
    impls = {"python": _PYTHON}
    if _CYTHON is not None:
        impls["cython"] = _CYTHON
    return impls


_active = _PYTHON if (_CYTHON is None or os.environ.get("SYNTHESIS_PURE") == "1") else _CYTHON
IMPLEMENTATION: str = _active.name

HashRing = _active.HashRing
xxh64 = _active.xxh64
key_hash = _active.key_hash
node_points = _active.node_points
gcounter_merge = _active.gcounter_merge
pncounter_merge = _active.pncounter_merge
vclock_merge = _active.vclock_merge
vclock_compare = _active.vclock_compare
orset_merge = _active.orset_merge
lwwmap_merge = _active.lwwmap_merge

__all__ = [
    "AFTER",
    "BEFORE",
    "CONCURRENT",
    "EQUAL",
    "IMPLEMENTATION",
    "POINTS_PER_VNODE",
    "EmptyRingError",
    "HashRing",
    "LWWMapState",
    "ORSetState",
    "empty_lwwmap",
    "empty_orset",
    "gcounter_merge",
    "implementations",
    "key_hash",
    "lwwmap_merge",
    "node_points",
    "orset_merge",
    "pncounter_merge",
    "replica_id",
    "vclock_compare",
    "vclock_merge",
    "xxh64",
]
