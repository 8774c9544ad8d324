#!/usr/bin/env python
"""What pruning adds to an owner's write (docs/STATE.md, 'Pruning').

    .venv/bin/python scripts/bench_pruning.py           # about 20 s
    .venv/bin/python scripts/bench_pruning.py --quick

After each write turn the owner takes the fields' deltas (``take_deltas``) and, since
pruning, runs ``prune_fields`` over them.  Measured here, in one process, best of
REPEAT: one ``increment`` + ``take_deltas`` (the baseline, what a write cost before)
against the same + ``prune_fields``, per state shape; and what a fold itself costs
(once per retired generation and counter, on the first write after it retired).
The ratio column is with-pruning over the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols.crdt import LWWMap, PNCounter, prune_fields, take_deltas  # noqa: E402

OWNER, TTL_NS = 1, 7 * 86400 * 10**9
LIVE = frozenset((OWNER, 2, 3))


def counter_state(rows: int, markers: int) -> dict:
    """The counter behavior's fields: ``rows`` live writers, ``markers`` folded ones."""
    count = PNCounter().bind(OWNER)
    for r in range(2, 2 + markers):
        count.merge(PNCounter.from_wire([[10**6 + r], [5], [0], []]))
    if markers:
        count.fold([10**6 + r for r in range(2, 2 + markers)], OWNER, 0, TTL_NS)
    for r in list(LIVE)[:rows]:
        count.merge(PNCounter.from_wire([[r], [1], [0], []]))
    fields = {"count": count}
    take_deltas(fields)
    return fields


def kv_state() -> dict:
    items = LWWMap().bind(OWNER, lambda: 1)
    fields = {"items": items}
    take_deltas(fields)
    return fields


def per_turn(fields: dict, write, prune: bool, n: int, repeat: int) -> float:
    """Seconds per write turn, best of ``repeat`` runs of ``n`` turns."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            write(fields, i)
            take_deltas(fields)
            if prune:
                prune_fields(fields, LIVE, OWNER, 1, TTL_NS)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def fold_cost(retired: int, n: int, repeat: int) -> float:
    """Seconds for the first pruning write after ``retired`` generations retired."""
    best = float("inf")
    for _ in range(repeat):
        states = []
        for _ in range(n):
            count = PNCounter().bind(OWNER)
            for r in range(retired):
                count.merge(PNCounter.from_wire([[10**6 + r], [5], [0], []]))
            states.append({"count": count})
        t0 = time.perf_counter()
        for fields in states:
            prune_fields(fields, LIVE, OWNER, 1, TTL_NS)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def incr(fields: dict, i: int) -> None:
    fields["count"].increment(1)


def put(fields: dict, i: int) -> None:
    fields["items"].set(f"k{i % 64}", i)


def main(quick: bool) -> None:
    n, repeat = (5_000, 3) if quick else (50_000, 7)
    shapes = [
        ("counter, 1 row", lambda: counter_state(1, 0), incr),
        ("counter, 3 live rows", lambda: counter_state(3, 0), incr),
        ("counter, 3 rows + 4 markers", lambda: counter_state(3, 4), incr),
        ("kv (no counter)", kv_state, put),
    ]
    print(f"Python {sys.version.split()[0]}; {n:,} turns, best of {repeat}")
    print(f"{'write turn':<30}{'baseline':>12}{'+ prune':>12}{'added':>10}{'ratio':>8}")
    for name, make, write in shapes:
        base = per_turn(make(), write, False, n, repeat)
        pruned = per_turn(make(), write, True, n, repeat)
        print(f"{name:<30}{base * 1e6:>10.2f}us{pruned * 1e6:>10.2f}us"
              f"{(pruned - base) * 1e6:>8.2f}us{pruned / base:>8.2f}")
    print(f"\n{'first write after retirement':<30}{'prune_fields':>12}")
    for retired in (1, 4, 16):
        print(f"{f'{retired} retired row(s)':<30}{fold_cost(retired, n // 10, repeat) * 1e6:>10.2f}us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and repeats")
    main(parser.parse_args().quick)
