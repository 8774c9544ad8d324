"""CURVE benchmark: what authentication and encryption cost, raw pyzmq and Synthesis,
CURVE off and on side by side in one run.

Every measure runs with CURVE off and then on, back to back, at two request sizes
(a msgpack envelope of about 100 B and of 1 KiB; replies are as large, the echo
sends the data back); this pair is repeated R times (``--repeat``) and the table
shows medians, the on/off ratio (the median of each repeat's own ratio, so a noisy
neighbour slows both halves of a pair alike) and its range over the repeats.

  raw pyzmq     the baselines of scripts/bench.py: DEALER -> ROUTER one-way with a
                msgpack decode per message; DEALER <-> ROUTER echo round trip
                (p50/p99); round trips/s with 1,000 in flight.  With CURVE the
                ROUTER is a CURVE server without a ZAP handler: libzmq's handshake
                and per-frame crypto, nothing else
  synthesis     two 2-node clusters, one plain and one with CURVE on every socket
                (node keys, peers and clients allowed by directory, as
                docs/OPERATIONS.md sets it up), started afresh for each repeat,
                with a 1 s probe timeout (see PROBE_ARGS).  Every call enters at node b0 and
                goes to echo agents owned by b0 (direct) or by b1 (one hop: the
                forward and its reply cross the peer link, encrypted too): call
                p50/p99 (Client.call, one at a time) and calls/s with 1,000 in
                flight (AsyncClient); and one-way msgs/s to b0's agents
                (Client.send, done when b0 counts them handled)

The "vs raw" columns divide by the raw row of the same size and the same CURVE
setting, so they say what Synthesis adds on top of the transport.  The processes
share the machine's cores: client, entry node, owner node (and the raw server).

A second table says where the cost goes: CPU time per message (or call) of the
client (this process) and both nodes, from each thread's own counters, split into
libzmq's I/O threads (where CURVE encrypts and decrypts every frame) and the rest
(the Python threads).  Unlike the rates it hardly moves when a neighbour takes the
cores, so on a shared machine it is the steadier measure of what CURVE costs.

Called by scripts/bench.py (``--only curve``, and in the full run).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

import bench
from bench import Nodes, RawCurve, pct

SIZES = (("~100 B", 100), ("1 KiB", 1024))
MODES = ("off", "on")
WINDOW = 1000          # calls in flight in the in-flight rows
OWNED_AGENTS = 64      # echo agents per owner node the synthesis rows spread over
# Failure detection slow enough for an entry node kept busy on a shared machine.  With
# the defaults (a 0.2 s probe timeout) the owner now and then suspected the entry
# while it forwarded 1,000 calls in flight, and in a 2-node cluster a suspect counts
# as unreachable: the owner left quorum and answered "unavailable".
PROBE_ARGS = ("--probe-interval-s", "1.0", "--probe-timeout-s", "1.0")


@dataclass(frozen=True)
class Counts:
    raw_one_way: int
    one_way: int
    round_trip: int
    in_flight: int


FULL = Counts(raw_one_way=200_000, one_way=50_000, round_trip=5_000, in_flight=30_000)
QUICK = Counts(raw_one_way=50_000, one_way=10_000, round_trip=1_000, in_flight=10_000)


def payload(size: int) -> str:
    """Echo data that makes the raw round trip's request envelope ``size`` bytes."""
    return "x" * max(0, size - len(bench._ping(0, "")))


@dataclass
class Cluster:
    """A 2-node cluster with echo agents owned by each node: ``owned[i]`` by b<i>."""

    nodes: Nodes
    owned: list[list[str]]

    @classmethod
    def start(cls, curve_dir: Path | None) -> Cluster:
        nodes = Nodes(2, curve_dir, PROBE_ARGS)
        try:
            return cls(nodes, [bench.owned_by(nodes, i, f"own{i}", OWNED_AGENTS)
                               for i in range(2)])
        except BaseException:
            nodes.close()
            raise


# A measure: (mode, data) -> a rate, or the latency samples.
Measure = Callable[[str, Any], Any]
LATENCY = "latency"
RATE = "rate"


@dataclass(frozen=True)
class Row:
    label: str
    kind: str           # RATE or LATENCY (then a p50 and a p99 row)
    baseline: str       # the raw row this one is compared with ("" for a raw row)
    measure: Measure
    # For the CPU table: the node processes a measure loads (by mode), and how many
    # messages or calls it makes; this process (the client) is counted too.
    node_pids: Callable[[str], list[int]] | None = None
    messages: int = 0


def raw_rows(keys: RawCurve, counts: Counts) -> list[Row]:
    def curve(mode: str) -> RawCurve | None:
        return keys if mode == "on" else None
    return [
        Row("raw pyzmq one-way", RATE, "",
            lambda mode, data: bench.raw_one_way(counts.raw_one_way, curve(mode), data)),
        Row("raw pyzmq round trip", LATENCY, "",
            lambda mode, data: bench.raw_round_trip(counts.round_trip, curve(mode), data)[0]),
        Row(f"raw pyzmq {WINDOW:,} in flight", RATE, "",
            lambda mode, data: bench.raw_pipelined(counts.in_flight, WINDOW, curve(mode), data)),
    ]


def synthesis_rows(clusters: dict[str, Cluster], counts: Counts) -> list[Row]:
    def node_pids(mode: str) -> list[int]:
        return [proc.pid for proc in clusters[mode].nodes.procs]

    def one_way(mode: str, data: Any) -> float:
        cluster = clusters[mode]
        return bench.synthesis_one_way(cluster.nodes, counts.one_way,
                                       (cluster.owned[0], "ping", data))

    # One-way only direct: a burst of sends forwarded one hop has no flow control
    # from the owner back to the entry, and on 2 cores it starved the owner's failure
    # detector (the owner left quorum and dropped the rest) or filled its
    # per-connection inbound budget (the peer link was cut).
    rows = [Row("synthesis one-way, direct", RATE, "raw pyzmq one-way", one_way,
                node_pids, counts.one_way)]
    for owner, where in ((0, "direct"), (1, "1 hop")):
        def call(mode: str, data: Any, owner: int = owner) -> list[float]:
            cluster = clusters[mode]
            return bench.synthesis_round_trip(cluster.nodes.addresses[0],
                                              cluster.owned[owner][0], counts.round_trip,
                                              data, cluster.nodes.client())[0]

        def in_flight(mode: str, data: Any, owner: int = owner) -> float:
            cluster = clusters[mode]
            return bench.synthesis_in_flight(cluster.nodes.addresses[0], counts.in_flight,
                                             WINDOW, cluster.owned[owner], data,
                                             cluster.nodes.client())
        rows += [Row(f"synthesis call, {where}", LATENCY, "raw pyzmq round trip", call,
                     node_pids, counts.round_trip + bench.ROUND_TRIP_WARMUP),
                 Row(f"synthesis {WINDOW:,} in flight, {where}", RATE,
                     f"raw pyzmq {WINDOW:,} in flight", in_flight,
                     node_pids, counts.in_flight + OWNED_AGENTS)]
    return rows


# (size label, row label, mode) -> one figure per repeat
Results = dict[tuple[str, str, str], list[float]]


@contextmanager
def clusters_started(keys_dir: Path) -> Iterator[dict[str, Cluster]]:
    """A plain cluster ("off") and a CURVE one ("on"), both closed on the way out."""
    clusters: dict[str, Cluster] = {}
    try:
        clusters["off"] = Cluster.start(None)
        clusters["on"] = Cluster.start(keys_dir)
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.nodes.close()


IO_THREADS = " cpu: libzmq I/O threads"   # CURVE's crypto runs here
OTHER_THREADS = " cpu: Python and others"  # the event loop, the ZAP handler, ...


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds of the processes' libzmq I/O threads, and of all their others."""
    spent = dict.fromkeys((IO_THREADS, OTHER_THREADS), 0.0)
    for pid in pids:
        for thread in psutil.Process(pid).threads():
            try:
                name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text()
            except OSError:
                continue  # ended meanwhile
            kind = IO_THREADS if name.startswith("ZMQbg/IO") else OTHER_THREADS
            spent[kind] += thread.user_time + thread.system_time
    return spent


def measure_once(rows: list[Row], results: Results) -> None:
    """Every row, off then on, at each size, appended to ``results``; for rows with
    ``node_pids``, the CPU time per message too (by thread kind, client and nodes)."""
    for size_label, size in SIZES:
        data = payload(size)
        for row in rows:
            for mode in MODES:
                pids = [os.getpid(), *row.node_pids(mode)] if row.node_pids else []
                cpu_before = thread_cpu(pids)
                value = row.measure(mode, data)
                for kind, spent in thread_cpu(pids).items():
                    if pids:
                        results[size_label, row.label + kind, mode].append(
                            (spent - cpu_before[kind]) / row.messages)
                if row.kind == LATENCY:
                    results[size_label, row.label + " p50", mode].append(pct(value, 0.5))
                    results[size_label, row.label + " p99", mode].append(pct(value, 0.99))
                else:
                    results[size_label, row.label, mode].append(value)


def _figure(value: float, latency: bool) -> str:
    return bench.us(value) if latency else f"{value:,.0f}/s"


def table_rows(rows: list[Row], results: Results) -> list[tuple[str, ...]]:
    out = []
    for size_label, _ in SIZES:
        for row in rows:
            suffixes = (" p50", " p99") if row.kind == LATENCY else ("",)
            for suffix in suffixes:
                key = row.label + suffix
                off, on = (results[size_label, key, mode] for mode in MODES)
                ratios = [b / a for a, b in zip(off, on)]
                cells = [f"{key}, {size_label}", _figure(statistics.median(off), bool(suffix)),
                         _figure(statistics.median(on), bool(suffix)),
                         f"{statistics.median(ratios):.2f}",
                         f"{min(ratios):.2f}-{max(ratios):.2f}"]
                for mode in MODES:
                    if row.baseline:
                        raw = statistics.median(results[size_label, row.baseline + suffix, mode])
                        cells.append(f"{statistics.median(results[size_label, key, mode]) / raw:.2f}")
                    else:
                        cells.append("baseline")
                out.append(tuple(cells))
    return out


HEADER = ("measure, request size", "CURVE off", "CURVE on", "on/off", "on/off range",
          "off vs raw off", "on vs raw on")


def cpu_rows(rows: list[Row], results: Results) -> list[tuple[str, ...]]:
    """CPU per message, client and nodes together: what CURVE adds, and where."""
    out = []
    for size_label, _ in SIZES:
        for row in rows:
            if not row.node_pids:
                continue
            spent = {(kind, mode): statistics.median(results[size_label, row.label + kind, mode])
                     for kind in (IO_THREADS, OTHER_THREADS) for mode in MODES}
            total = {mode: spent[IO_THREADS, mode] + spent[OTHER_THREADS, mode]
                     for mode in MODES}
            out.append((f"{row.label}, {size_label}",
                        *(f"{_cpu_us(total[mode])} ({_cpu_us(spent[IO_THREADS, mode])} I/O)"
                          for mode in MODES),
                        f"{total['on'] / total['off']:.2f}",
                        _cpu_us(spent[IO_THREADS, "on"] - spent[IO_THREADS, "off"]),
                        _cpu_us(spent[OTHER_THREADS, "on"] - spent[OTHER_THREADS, "off"])))
    return out


def _cpu_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


CPU_HEADER = ("CPU per message, client + nodes", "CURVE off", "CURVE on", "on/off",
              "added: I/O threads", "added: other threads")


def main(repeat: int, quick: bool = False) -> None:
    counts = QUICK if quick else FULL
    print(f"CURVE off and on, {repeat} repeats (medians; on/off: the median of each "
          f"repeat's ratio, and its range); 2-node clusters, calls enter at b0")
    raw_keys = RawCurve.new()
    results: Results = defaultdict(list)
    # Fresh clusters for each repeat: repeats stay independent, and no connection
    # lives long enough for the ROUTER's byte guard (node/guard.py), which counts
    # plain ZMTP framing, to take CURVE's 33 bytes per frame for an unread backlog
    # and cut it (a peer link after about 250,000 forwards).
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp, \
                clusters_started(Path(tmp) / "keys") as clusters:
            rows = raw_rows(raw_keys, counts) + synthesis_rows(clusters, counts)
            measure_once(rows, results)
    bench.print_rows(table_rows(rows, results), HEADER)
    print()
    bench.print_rows(cpu_rows(rows, results), CPU_HEADER)
