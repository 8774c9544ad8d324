#!/usr/bin/env python
"""Benchmark core_cy: compiled kernels vs their pure-Python twins (and uhashring).

    .venv/bin/python scripts/bench_core.py           # full run (about a minute)
    .venv/bin/python scripts/bench_core.py --quick   # short run, smaller inputs

Every number is measured in this run with time.perf_counter, best of N repeats.
Targets: compiled single-key lookup >= 5x uhashring and >= 2x twin; batch >= 10x the
twin's loop; compiled merges >= 5x twin; balance max/mean <= 1.10 (1M keys).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from array import array
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core_cy  # noqa: E402
from core_cy import LWWMapState, ORSetState  # noqa: E402

try:
    import uhashring
except ImportError:  # pragma: no cover
    uhashring = None

Q = "Q"


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{str(c):>{w}}" if i else f"{str(c):<{w}}" for i, (c, w) in enumerate(zip(r, widths))))


def fmt_rate(x):
    return f"{x / 1e6:.2f} M/s"


def fmt_t(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def bench_ring(impls, quick):
    names = [f"node-{i}" for i in range(10)]
    n_keys = 20_000 if quick else 200_000
    keys = [f"agent-{i}" for i in range(n_keys)]
    repeat = 3 if quick else 5
    rows = []
    rates = {}
    for label, impl in impls.items():
        ring = impl.HashRing(names, vnodes=160)
        owner = ring.owner

        def single(owner=owner):
            for k in keys:
                owner(k)

        t = best(single, repeat)
        rates[(label, "single")] = n_keys / t
        t = best(lambda ring=ring: ring.owners(keys), repeat)
        rates[(label, "batch")] = n_keys / t
    if uhashring is not None:
        uh = uhashring.HashRing(nodes=names)  # defaults: 160 vnodes, ketama-style md5
        get = uh.get_node

        def single_uh():
            for k in keys:
                get(k)

        t = best(single_uh, max(1, repeat - 2))
        rates[("uhashring", "single")] = n_keys / t
    uh_rate = rates.get(("uhashring", "single"))
    twin = rates[("python", "single")]
    for label in list(impls) + (["uhashring"] if uh_rate else []):
        for mode in ("single", "batch"):
            r = rates.get((label, mode))
            if r is None:
                continue
            rows.append([
                label, mode, fmt_rate(r), f"{1e9 / r:.0f} ns",
                f"{r / uh_rate:.1f}x" if uh_rate else "-",
                f"{r / twin:.1f}x",
                f"{r / rates[('python', mode)]:.1f}x" if (("python", mode) in rates) else "-",
            ])
    table(f"Ring lookups: 10 nodes x 160 vnodes, {n_keys:,} str keys (best of {repeat})",
          ["impl", "mode", "rate", "per key", "vs uhashring", "vs twin single", "vs twin same mode"], rows)
    return rates


def bench_balance(impls, quick):
    n_keys = 100_000 if quick else 1_000_000
    keys = [f"agent-{i}" for i in range(n_keys)]
    rows = []
    names = [f"node-{i}" for i in range(10)]
    for label, impl in impls.items():
        ring = impl.HashRing(names, vnodes=160)
        counts = Counter(ring.owners(keys))
        mean = n_keys / len(names)
        rows.append([label, f"{max(counts.values()) / mean:.4f}", f"{min(counts.values()) / mean:.4f}"])
    if uhashring is not None and not quick:
        uh = uhashring.HashRing(nodes=names)
        counts = Counter(map(uh.get_node, keys))
        mean = n_keys / len(names)
        rows.append(["uhashring", f"{max(counts.values()) / mean:.4f}", f"{min(counts.values()) / mean:.4f}"])
    table(f"Balance: 10 nodes x 160 vnodes, {n_keys:,} keys (target max/mean <= 1.10)",
          ["impl", "max/mean", "min/mean"], rows)


def cols(d):
    ids = sorted(d)
    return array(Q, ids), array(Q, [d[r] for r in ids])


def make_orset(n_elems, rnd):
    """Two OR-Set states of n_elems each, sharing 50% (same dots, seen by both)."""
    shared = n_elems // 2
    base_dots = [(1, c) for c in range(1, shared + 1)]

    def side(rep):
        own = [(rep, c) for c in range(1, n_elems - shared + 1)]
        dots = base_dots + own
        dots.sort()
        elems = [f"e{r}-{c}" for r, c in dots]
        vv = {1: shared, rep: n_elems - shared}
        return ORSetState(array(Q, [r for r, _ in dots]), array(Q, [c for _, c in dots]), elems,
                          *cols(vv), array(Q), array(Q))

    return side(2), side(3)


def make_lww(n_keys, rnd):
    keys = sorted({f"key-{i:07d}".encode() for i in range(n_keys)})
    a_keys = keys[: n_keys * 3 // 4]
    b_keys = keys[n_keys // 4:]

    def side(ks, rep):
        return LWWMapState(list(ks), array(Q, [rnd.randrange(1000) for _ in ks]),
                           array(Q, [rep] * len(ks)), [rnd.random() for _ in ks])

    return side(a_keys, 1), side(b_keys, 2)


def bench_merges(impls, quick):
    rnd = random.Random(1)
    n_or = 20_000 if quick else 100_000
    n_lww = 20_000 if quick else 100_000
    repeat = 3 if quick else 7
    reps = 1000
    ga = {i * 3: rnd.randrange(1 << 40) for i in range(reps)}
    gb = {i * 3 + (i % 2): rnd.randrange(1 << 40) for i in range(reps)}
    GA, GB = cols(ga), cols(gb)
    PA = (GA[0], GA[1], array(Q, [rnd.randrange(1 << 30) for _ in GA[0]]))
    PB = (GB[0], GB[1], array(Q, [rnd.randrange(1 << 30) for _ in GB[0]]))
    va = {core_cy.replica_id(f"n{i}"): rnd.randrange(1000) for i in range(64)}
    vb = dict(va)
    VA, VB = cols(va), cols({r: c + 1 for r, c in vb.items()})  # a before b: full walk
    ora, orb = make_orset(n_or, rnd)
    la, lb = make_lww(n_lww, rnd)
    cases = [
        (f"G-Counter merge, {reps} replicas", lambda m: m.gcounter_merge(*GA, *GB), 200),
        (f"PN-Counter merge, {reps} replicas", lambda m: m.pncounter_merge(*PA, *PB), 200),
        ("vector clock compare, 64 entries", lambda m: m.vclock_compare(*VA, *VB), 2000),
        ("vector clock merge, 64 entries", lambda m: m.vclock_merge(*VA, *VB), 2000),
        (f"OR-Set merge, {n_or:,} elems/side, 50% overlap", lambda m: m.orset_merge(ora, orb), 1),
        (f"LWW-Map merge, {n_lww:,} keys, 50% overlap", lambda m: m.lwwmap_merge(la, lb), 1),
    ]
    rows = []
    for title, fn, inner in cases:
        times = {}
        for label, impl in impls.items():
            def run(impl=impl, fn=fn, inner=inner):
                for _ in range(inner):
                    fn(impl)
            times[label] = best(run, repeat) / inner
        results = {label: fn(impl) for label, impl in impls.items()}
        agree = len({repr(r) for r in results.values()}) == 1
        ratio = f"{times['python'] / times['cython']:.1f}x" if "cython" in times else "-"
        rows.append([title, fmt_t(times["python"]),
                     fmt_t(times["cython"]) if "cython" in times else "-", ratio,
                     "yes" if agree else "NO"])
    table(f"CRDT merge kernels (best of {repeat}, per call)",
          ["kernel", "twin", "compiled", "speedup", "same result"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run with smaller inputs")
    args = ap.parse_args(argv)
    impls = core_cy.implementations()
    print(f"core_cy default implementation: {core_cy.IMPLEMENTATION}; loaded: {', '.join(impls)}")
    if "cython" not in impls:
        print(f"compiled kernels not loaded ({core_cy.COMPILED_IMPORT_ERROR}); twin numbers only")
    ordered = {k: impls[k] for k in ("cython", "python") if k in impls}
    bench_ring(ordered, args.quick)
    bench_balance(ordered, args.quick)
    bench_merges(ordered, args.quick)


if __name__ == "__main__":
    main()
