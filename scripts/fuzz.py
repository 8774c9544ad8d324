#!/usr/bin/env python3
"""Run the fuzz targets of tests/fuzz_strategies.py for a given time each.

The same targets as tests/test_fuzz.py (client envelopes, peer frames, and the
gossip, handoff and replication machines fed decoded bodies), for as long as asked,
in batches of fresh random examples.  Prints, per target, the examples tried, the
examples per second, the slowest example, and any crash: the input hypothesis shrank
it to and the exception, which go into tests/test_fuzz.py as a regression test.

    scripts/fuzz.py --seconds 60                 # every target, 60 s each
    scripts/fuzz.py --seconds 600 --target peer  # one target, longer
    nice -n 10 scripts/fuzz.py --seconds 30 --target wire --target gossip

Exit status 1 if any target crashed.  An example running past ``--hang`` seconds
(default 5) counts as a crash: every input is bounded, so none may take that long.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from fuzz_strategies import TARGETS, Target  # noqa: E402


class Hang(Exception):
    """An example ran past the hang limit."""


class Tally:
    """Examples run and the slowest one, across the batches of one target."""

    def __init__(self) -> None:
        self.examples = 0
        self.slowest_s = 0.0


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang("an example ran past the hang limit")


def batch_runner(target: Target, tally: Tally, batch: int, hang_s: float):
    """A hypothesis test running ``batch`` fresh examples of ``target`` per call."""

    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(target.inputs)
    def run(case):
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, hang_s)
        try:
            target.run(case)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            tally.examples += 1
            tally.slowest_s = max(tally.slowest_s, time.perf_counter() - started)

    return run


def fuzz(target: Target, seconds: float, batch: int, hang_s: float) -> tuple[Tally, float, bool]:
    """Run ``target`` for ``seconds``; returns the tally, the time taken, and whether it
    crashed (the crash is printed)."""
    tally = Tally()
    run = batch_runner(target, tally, batch, hang_s)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            run()
        except Exception:  # a crash: hypothesis printed the shrunk input above
            print(f"CRASH in target {target.name}:", flush=True)
            traceback.print_exc(limit=-6)
            return tally, time.monotonic() - started, True
    return tally, time.monotonic() - started, False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per target (30)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="a target to run (repeatable; default: all)")
    parser.add_argument("--batch", type=int, default=300,
                        help="examples per hypothesis run (300)")
    parser.add_argument("--hang", type=float, default=5.0,
                        help="seconds one example may take before it counts as a crash (5)")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _on_alarm)
    crashed = []
    print(f"{'target':<12} {'examples':>9} {'seconds':>8} {'ex/s':>7} {'slowest ms':>11}",
          flush=True)
    for name in args.target or list(TARGETS):
        tally, took, crash = fuzz(TARGETS[name], args.seconds, args.batch, args.hang)
        rate = tally.examples / took if took else 0.0
        print(f"{name:<12} {tally.examples:>9} {took:>8.1f} {rate:>7.0f} "
              f"{tally.slowest_s * 1000:>11.1f}{'  CRASHED' if crash else ''}", flush=True)
        if crash:
            crashed.append(name)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB; crashed: {', '.join(crashed) or 'none'}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
