"""Replication benchmark: what write consistency costs, how far replicas lag, and how
long a node's agents take to come back with their state after a ``kill -9``.

Real node processes on 127.0.0.1 (port 0, ports read from each node's ready file),
default timings and ``replicas = 3``; one table, every figure measured in this run:

  updates/s     raw pyzmq round trips with 1,000 in flight (the baseline), then
                ``counter incr`` with 1,000 in flight over one DEALER socket to one
                entry node of 3, spread over 1,000 counter agents (about 2/3 owned
                elsewhere), with ``"consistency"`` local, quorum and all in the
                envelope; the levels take turns within each trial, best of TRIALS.
                local is the ratio base of quorum and all (aim: quorum >= 1/3)
  lag           ``synthesis_replication_lag_seconds`` (owner sends a delta -> the
                replica's ack), summed over the 3 nodes' /metrics across a phase,
                p50/p99 interpolated linearly within histogram buckets (what
                Prometheus' histogram_quantile does): under the load above, and with
                one call in flight; beside it, quorum's minus local's call latency
                seen by the client with one call in flight (a quorum write waits for
                one replica's ack)
  failover      per repeat a fresh 3-node cluster; 300 counters each get a known
                value written at quorum; one node (not the entry) is killed with
                SIGKILL; then every counter it owned is polled with ``get`` through
                the entry until each answers its full value: seconds from the kill
                (median and spread), and counters short of their value at the end
                (acknowledged quorum writes lost; must be 0)

  storage       (when the node has storage wired in) the local workload above on 3
                nodes that each keep their state in a SQLite file, sync full and
                normal, best of TRIALS, as a ratio to the local row (storage off);
                and a lone node (sync normal) given 100,000 counters, stopped with
                SIGTERM and started again: process start to its ready file, against
                the same node's first start with an empty file, and a sample of the
                counters read back (scripts/bench_storage.py measures the storage
                layer alone)

Called by scripts/bench.py (``--only replication``, and in the full run).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import core_cy  # noqa: E402
from bench_membership import RING_VNODES, BenchNode, Cluster, wait_for  # noqa: E402
from node.metrics import LATENCY_BUCKETS_S  # noqa: E402
from protocols import wire  # noqa: E402

LEVELS = ("local", "quorum", "all")
TRIALS = 3
WINDOW = 1000               # calls in flight in the throughput rows
AGENTS = 1000               # counter agents the throughput rows spread over
SEQUENTIAL_ROUNDS = 4       # the one-in-flight calls: levels alternate in rounds
FAILOVER_COUNTERS = 300
FAILOVER_WAIT_S = 30.0      # give up on a failover after this long
POLL_TIMEOUT_S = 0.2        # a poll round waits this long for its gets (the resolution)
LAG_TARGET_S = 0.010
FAILOVER_TARGET_S = 5.0
QUORUM_TARGET = 1 / 3
LAG_METRIC = "synthesis_replication_lag_seconds"
STORAGE_SYNCS = ("full", "normal")
RESTART_AGENTS = 100_000    # agents' state a restarting node holds
RESTART_SAMPLE = 1000       # of them, read back after the restart


# ---------------------------------------------------------------------------- nodes


class MetricsNode(BenchNode):
    """A BenchNode that serves /metrics on a port of its own (from its ready file) and,
    given ``storage_sync``, keeps its state in ``workdir/NODE_ID.db``."""

    def __init__(self, node_id: str, workdir: Path, seed: str | None = None,
                 storage_sync: str | None = None, extra: tuple[str, ...] = ()):
        self.node_id = node_id
        self.ready_path = workdir / f"{node_id}.ready.json"
        self.ready_path.unlink(missing_ok=True)  # a restart must not read the old one
        self._log = open(workdir / f"{node_id}.log", "wb")
        cmd = [sys.executable, "-m", "node.cli", "--node-id", node_id,
               "--listen", "127.0.0.1:0", "--pub", "127.0.0.1:0",
               "--metrics", "127.0.0.1:0", "--ready-file", str(self.ready_path),
               "--log-level", "warning", *(["--seed", seed] if seed else []), *extra]
        if storage_sync:
            cmd += ["--storage-path", str(workdir / f"{node_id}.db"),
                    "--storage-sync", storage_sync]
        self.started_wall = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
        self._address: str | None = None

    @property
    def metrics_url(self) -> str:
        wait_for(self.ready, f"{self.node_id} ready")
        return f"http://{json.loads(self.ready_path.read_text())['metrics']}/metrics"


class MetricsCluster(Cluster):
    """bench_membership's Cluster, of MetricsNodes (with storage when given a sync)."""

    def __init__(self, prefix: str, size: int, workdir: Path, storage_sync: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.storage_sync = storage_sync
        self.extra = extra
        super().__init__(prefix, size, workdir)

    def start(self, node_id: str) -> BenchNode:
        node = MetricsNode(node_id, self.workdir, self.live[0].address if self.live else None,
                           self.storage_sync, self.extra)
        self._all.append(node)
        self.live.append(node)
        return node


# ---------------------------------------------------------------------------- requests


@dataclass
class Outcome:
    """What one pipelined run got back."""
    rate: float = 0.0                                     # replies other than errors /s
    latencies: list[float] = field(default_factory=list)  # seconds, per answered call
    values: dict[int, object] = field(default_factory=dict)  # request index -> reply data
    errors: Counter = field(default_factory=Counter)       # error replies by code
    unanswered: int = 0                                   # no reply within the timeout


class Pipe:
    """One DEALER socket to a node, sending requests with at most ``window`` of them
    unanswered.  Request ids are unique for the socket's life, so a late reply to an
    earlier run is told apart and dropped."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(f"tcp://{address}")
        self._next_id = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def run(self, requests: list[tuple[str, str, dict | None]], consistency: str | None,
            window: int, timeout_s: float = 60.0) -> Outcome:
        """Send (agent, type, data) requests; wait up to ``timeout_s`` for all replies."""
        first = self._next_id
        self._next_id += len(requests)
        sent_at: dict[str, float] = {}
        out, sent = Outcome(), 0
        started = time.perf_counter()
        deadline = started + timeout_s
        while (sent < len(requests) or sent_at) and time.perf_counter() < deadline:
            while sent < len(requests) and len(sent_at) < window:
                agent, mtype, data = requests[sent]
                rid = str(first + sent)
                self.sock.send(wire.encode(wire.request(rid, mtype, agent, data,
                                                        consistency=consistency)))
                sent_at[rid] = time.perf_counter()
                sent += 1
            if self.sock.poll(50):
                self._drain(sent_at, first, out)
        answered = len(out.latencies) - sum(out.errors.values())
        out.rate = answered / (time.perf_counter() - started)
        out.unanswered = len(requests) - len(out.latencies)
        return out

    def _drain(self, sent_at: dict[str, float], first: int, out: Outcome) -> None:
        while True:
            try:
                reply = msgpack.unpackb(self.sock.recv(zmq.NOBLOCK), raw=False,
                                        strict_map_key=False)
            except zmq.Again:
                return
            started = sent_at.pop(reply.get("re"), None)
            if started is None:
                continue  # a late reply to an earlier run
            out.latencies.append(time.perf_counter() - started)
            if reply.get("type") == wire.TYPE_ERROR:
                out.errors[(reply.get("data") or {}).get("code", "?")] += 1
            else:
                out.values[int(reply["re"]) - first] = reply.get("data")


def incr_requests(n: int) -> list[tuple[str, str, dict]]:
    return [(f"counter/rep-{i % AGENTS}", "incr", {"n": 1}) for i in range(n)]


# ---------------------------------------------------------------------------- lag


def lag_buckets(nodes: list[MetricsNode]) -> dict[float, float]:
    """Cumulative replication-lag bucket counts, upper bound -> count, summed over nodes."""
    total: dict[float, float] = {}
    for node in nodes:
        with urllib.request.urlopen(node.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == LAG_METRIC + "_bucket":
                    bound = float(s.labels["le"])
                    total[bound] = total.get(bound, 0.0) + s.value
    return total


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of what was observed between two scrapes, interpolated linearly
    within its bucket (from the bucket below's bound); inf past the last finite bound,
    nan when nothing was observed."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return bound
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return float("inf")


# ---------------------------------------------------------------------------- phases


@dataclass
class Steady:
    """The steady-state figures of one cluster."""
    rates: dict[str, float]
    errors: dict[str, Counter]    # failed calls by error code, over all trials
    lag_loaded: tuple[float, float]
    lag_single: tuple[float, float]
    latency: dict[str, list[float]]   # one call in flight, per level


def measure_steady(workdir: Path, n: int) -> Steady:
    cluster = MetricsCluster("rp", 3, workdir)
    pipe = Pipe(cluster.live[0].address)
    try:
        pipe.run([(f"counter/rep-{i}", "get", None) for i in range(AGENTS)], None, WINDOW)
        rates = dict.fromkeys(LEVELS, 0.0)
        errors: dict[str, Counter] = {level: Counter() for level in LEVELS}
        before = lag_buckets(cluster.live)
        for _ in range(TRIALS):
            for level in LEVELS:
                got = pipe.run(incr_requests(n), level, WINDOW)
                rates[level] = max(rates[level], got.rate)
                errors[level] += got.errors + Counter(unanswered=got.unanswered)
        middle = lag_buckets(cluster.live)
        latency: dict[str, list[float]] = {level: [] for level in LEVELS}
        per_round = max(n // 10 // SEQUENTIAL_ROUNDS, 50)
        for _ in range(SEQUENTIAL_ROUNDS):
            for level in LEVELS:
                latency[level] += pipe.run(incr_requests(per_round), level, 1).latencies
        after = lag_buckets(cluster.live)
    finally:
        pipe.close()
        cluster.close()
    return Steady(rates, errors,
                  (quantile(before, middle, 0.5), quantile(before, middle, 0.99)),
                  (quantile(middle, after, 0.5), quantile(middle, after, 0.99)), latency)


def measure_unreplicated(workdir: Path, n: int) -> float:
    """The same local workload on 3 nodes with replicas = 1: the cost of replication."""
    cluster = MetricsCluster("ur", 3, workdir, extra=("--replicas", "1"))
    pipe = Pipe(cluster.live[0].address)
    try:
        pipe.run([(f"counter/rep-{i}", "get", None) for i in range(AGENTS)], None, WINDOW)
        return max(pipe.run(incr_requests(n), "local", WINDOW).rate for _ in range(TRIALS))
    finally:
        pipe.close()
        cluster.close()


def owned_by(node_ids: list[str], owner: str, agents: list[str]) -> list[str]:
    """The agents the ring over ``node_ids`` gives to ``owner`` (the node's own ring)."""
    ring = core_cy.HashRing(tuple(sorted(node_ids)), vnodes=RING_VNODES)
    return [a for a in agents if ring.owner(a) == owner]


def measure_failover(workdir: Path, rep: int) -> tuple[float, int, int]:
    """Seconds from a kill -9 until every counter the victim owned answers its full
    value through the entry node; then how many of all the counters are short, and
    how many the victim owned."""
    cluster = MetricsCluster(f"fo{rep}-", 3, workdir)
    entry, victim = cluster.live[0], cluster.live[2]
    expected = {f"counter/fo{rep}-{k}": k + 1 for k in range(FAILOVER_COUNTERS)}
    pipe = Pipe(entry.address)
    try:
        written = pipe.run([(a, "incr", {"n": v}) for a, v in expected.items()], "quorum",
                           WINDOW)
        if written.errors or written.unanswered:
            raise RuntimeError(f"quorum writes failed: {written}")
        pending = owned_by([n.node_id for n in cluster.live], victim.node_id, list(expected))
        owned = len(pending)
        victim.kill9()
        killed = time.monotonic()
        while pending:
            if time.monotonic() - killed > FAILOVER_WAIT_S:
                raise TimeoutError(f"{len(pending)} counters not back in {FAILOVER_WAIT_S} s")
            pending = short_of(pipe, pending, expected)
        elapsed = time.monotonic() - killed
        short = len(short_of(pipe, list(expected), expected, timeout_s=10.0))
    finally:
        pipe.close()
        cluster.close()
    return elapsed, short, owned


def short_of(pipe: Pipe, agents: list[str], expected: dict[str, int],
             timeout_s: float = POLL_TIMEOUT_S) -> list[str]:
    """The agents whose ``get`` did not answer their expected value in time."""
    got = pipe.run([(a, "get", None) for a in agents], None, WINDOW, timeout_s)
    return [a for i, a in enumerate(agents)
            if not isinstance(got.values.get(i), dict)
            or got.values[i].get("value") != expected[a]]


def storage_wired() -> bool:
    """Whether the node keeps state in storage_path (node/storage.py wired in)."""
    return "open_storage" in (REPO / "node" / "state.py").read_text()


def measure_storage_rates(workdir: Path, n: int) -> dict[str, float]:
    """Best local updates/s of the throughput workload on 3 nodes that each keep
    their state in a file, per sync policy (a fresh cluster each)."""
    rates = {}
    for sync in STORAGE_SYNCS:
        cluster = MetricsCluster(f"st{sync}", 3, workdir, storage_sync=sync)
        pipe = Pipe(cluster.live[0].address)
        try:
            pipe.run([(f"counter/rep-{i}", "get", None) for i in range(AGENTS)], None, WINDOW)
            rates[sync] = max(pipe.run(incr_requests(n), "local", WINDOW).rate
                              for _ in range(TRIALS))
        finally:
            pipe.close()
            cluster.close()
    return rates


def measure_restart(workdir: Path, agents: int) -> tuple[float, float, int]:
    """Seconds from process start to serving of a lone node with an empty storage
    file, then of the same node restarted (SIGTERM, then start) holding ``agents``
    counters written through it; and how many of a sample of them came back short."""
    node = MetricsNode("rs0", workdir, storage_sync="normal")
    try:
        wait_for(node.ready, "rs0 ready")
        empty_s = node.ready_wall - node.started_wall
        pipe = Pipe(node.address)
        try:
            filled = pipe.run([(f"counter/rs-{i}", "incr", {"n": 1}) for i in range(agents)],
                              "local", WINDOW, timeout_s=300)
        finally:
            pipe.close()
        if filled.errors or filled.unanswered:
            raise RuntimeError(f"filling the restart node failed: {dict(filled.errors)}, "
                               f"{filled.unanswered} unanswered")
        node.terminate()
        node = MetricsNode("rs0", workdir, storage_sync="normal")
        wait_for(node.ready, "rs0 restarted", timeout_s=300)
        restart_s = node.ready_wall - node.started_wall
        sample = [f"counter/rs-{i}" for i in range(0, agents, max(agents // RESTART_SAMPLE, 1))]
        pipe = Pipe(node.address)
        try:
            short = len(short_of(pipe, sample, dict.fromkeys(sample, 1), timeout_s=30))
        finally:
            pipe.close()
    finally:
        node.kill9()
    return empty_s, restart_s, short


# ---------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def rate_rows(raw: float, steady: Steady, n: int,
              unreplicated: float) -> list[tuple[str, str, str, str]]:
    local = steady.rates["local"]
    rows = [(f"raw pyzmq round trips/s, {WINDOW} in flight", f"{raw:,.0f} calls/s", "1.00",
             "baseline"),
            (f"counter incr, replicas = 1 (nothing replicated), 3 nodes, {WINDOW} in flight",
             f"{unreplicated:,.0f} updates/s", f"{unreplicated / raw:.2f}",
             "the cost of replication: local vs this")]
    for level in LEVELS:
        rate, errors = steady.rates[level], steady.errors[level]
        failed = ", ".join(f"{count} {code}" for code, count in errors.items() if count)
        result = f"{rate:,.0f} updates/s" + (f" (failed: {failed})" if failed else "")
        if level == "local":
            ratio = f"{rate / raw:.2f} ({rate / unreplicated:.2f} vs replicas = 1)"
            target = "base of quorum/all"
        else:
            ratio = f"{rate / local:.2f} vs local ({rate / raw:.2f} vs raw)"
            target = f">= {QUORUM_TARGET:.2f} vs local" if level == "quorum" else "-"
        rows.append((f"counter incr {level}, 3 nodes, {WINDOW} in flight, {n:,} x{TRIALS}",
                     result, ratio, target))
    return rows


def lag_rows(steady: Steady) -> list[tuple[str, str, str, str]]:
    def lag(label: str, p50_p99: tuple[float, float]) -> tuple[str, str, str, str]:
        p50, p99 = p50_p99
        return (f"replication lag p50 / p99, {label} (histogram, interpolated)",
                f"{ms(p50)} / {ms(p99)}", f"p99 {p99 / LAG_TARGET_S:.2f} of target",
                f"p99 < {ms(LAG_TARGET_S)}")
    local, quorum = steady.latency["local"], steady.latency["quorum"]
    extra = [statistics.quantiles(quorum, n=100)[k] - statistics.quantiles(local, n=100)[k]
             for k in (49, 98)]
    return [lag(f"{WINDOW} in flight", steady.lag_loaded), lag("1 in flight", steady.lag_single),
            (f"quorum - local call latency p50 / p99, 1 in flight ({len(quorum):,} calls each)",
             f"{ms(extra[0])} / {ms(extra[1])}", "-", "client-side check of the lag")]


def failover_rows(runs: list[tuple[float, int, int]]) -> list[tuple[str, str, str, str]]:
    times = [t for t, _, _ in runs]
    median = statistics.median(times)
    owned = statistics.median(o for _, _, o in runs)
    short = sum(s for _, s, _ in runs)
    return [(f"failover: kill -9 to its ~{owned:.0f} counters at full value (x{len(runs)})",
             f"{median:.2f} s ({min(times):.2f}..{max(times):.2f})",
             f"{median / FAILOVER_TARGET_S:.2f} of target", f"< {FAILOVER_TARGET_S:g} s"),
            (f"failover: counters short of their quorum writes ({FAILOVER_COUNTERS} x{len(runs)})",
             f"{short}", "-", "0")]


def storage_rows(rates: dict[str, float], off: float, n: int, restart: tuple[float, float, int],
                 agents: int) -> list[tuple[str, str, str, str]]:
    rows = [(f"counter incr local, storage sync {sync}, 3 nodes, {WINDOW} in flight, "
             f"{n:,} x{TRIALS}", f"{rate:,.0f} updates/s", f"{rate / off:.2f} vs storage off",
             "-") for sync, rate in rates.items()]
    empty_s, restart_s, short = restart
    sampled = len(range(0, agents, max(agents // RESTART_SAMPLE, 1)))
    return rows + [
        ("start of a node with an empty storage file, to serving", f"{empty_s:.2f} s",
         "1.00", "baseline"),
        (f"restart of a node holding {agents:,} agents' state, to serving",
         f"{restart_s:.2f} s", f"{restart_s / empty_s:.2f} vs empty", "-"),
        (f"restart: sampled counters short of their value ({sampled:,} read)", f"{short}",
         "-", "0")]


def main(repeat: int, quick: bool = False) -> None:
    from bench import print_rows, raw_pipelined  # bench imports this module

    n = 5_000 if quick else 20_000
    raw = max(raw_pipelined(n, WINDOW) for _ in range(TRIALS))
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        workdir = Path(tmp)
        steady = measure_steady(workdir, n)
        unreplicated = measure_unreplicated(workdir, n)
        failover = [measure_failover(workdir, rep) for rep in range(repeat)]
        rows = (rate_rows(raw, steady, n, unreplicated) + lag_rows(steady)
                + failover_rows(failover))
        if storage_wired():
            agents = RESTART_AGENTS // 5 if quick else RESTART_AGENTS
            rows += storage_rows(measure_storage_rates(workdir, n // 2),
                                 steady.rates["local"], n // 2,
                                 measure_restart(workdir, agents), agents)
    bounds = ", ".join(f"{b * 1e3:g}" for b in LATENCY_BUCKETS_S)
    print("replication: 3 nodes, replicas = 3, default timings; lag quantiles are "
          "interpolated linearly within the histogram's buckets, summed over the 3 nodes "
          f"(bounds in ms: {bounds}); quorum - local latency: a quorum write waits for "
          "the first of 2 replica acks, the histogram holds both")
    print_rows(rows)
