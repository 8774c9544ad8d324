"""Gossip broadcast in the simulator: what one broadcast costs as the cluster grows.

Bare ``Epidemic`` machines (``protocols/epidemic.py``) in ``protocols.sim.Simulator``,
each node given every other as its peers (``tests/test_epidemic_sim.py`` builds
them; ``messages_per_node`` is the measurement its test asserts on).  For each N:
simulated seconds from publish until every node delivered it, messages each node
sent for one broadcast (pushes, wants, repair pushes) and their peer-frame bytes
(1 KiB envelopes), and the periodic anti-entropy digests per node per second; with
no loss, and with 20% of messages lost (5% duplicated).

    .venv/bin/python scripts/bench_epidemic.py [--sizes 3,10,100,1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from protocols.sim import NetworkConfig  # noqa: E402
from test_epidemic_sim import LOSSY, messages_per_node  # noqa: E402

HEADER = (f"{'N':>6} {'loss':>5} {'to all s':>9} {'msgs/node':>10} {'/log2 N':>8} "
          f"{'bytes/node':>11} {'digests/node/s':>15}")


def rows(sizes: list[int], seed: int) -> list[str]:
    lines = []
    for loss, network in (("0%", NetworkConfig()), ("20%", LOSSY)):
        for n in sizes:
            m = messages_per_node(n, seed, network)
            lines.append(f"{n:>6} {loss:>5} {m.seconds_to_all:>9.3f} "
                         f"{m.messages_per_node:>10.2f} "
                         f"{m.messages_per_node / math.log2(n):>8.2f} "
                         f"{m.bytes_per_node:>11.0f} {m.digests_per_node_s:>15.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,100,1000")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(HEADER)
    for line in rows([int(n) for n in args.sizes.split(",")], args.seed):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
