"""Routing strategies on real processes: pipeline, scatter-gather and gossip broadcast,
each against the baseline a client would otherwise write, measured in one run.

A 3-node cluster (``tests/support.py`` ``Cluster``, n0 the seed) on loopback; every
client connects to n0 (the entry node).  Each measure runs ``--repeat`` times (at
least 3), baseline and strategy interleaved within a repetition so that a noisy
neighbour slows both; the table shows the median repetition, the ratio (median of
each repetition's own ratio) and the range over the repetitions.

  pipeline   3 ``echo`` stages owned by n0, n1 and n2 (owners from spawn's reply),
             p50/p99 of sequential ``Client.pipeline`` calls; baseline: 3 sequential
             ``Client.call``s through n0 (two of them forwarded one hop), the client
             carrying each reply to the next call; and 3 calls each made by a client
             connected to the stage's owner (no forward at all)
  scatter    ``AsyncClient.broadcast`` to 100 ``echo`` agents spread over the 3 nodes,
             p50/p99 per scatter and agents answered/s; baseline: the same 100 calls
             in flight from the same AsyncClient, ``asyncio.gather``-ed
  gossip     ``publish(strategy="gossip")`` to a group of 30 members spread over the
             3 nodes: time from the client's publish until the last member handled it
             (each member stamps its arrival with CLOCK_MONOTONIC, which every process
             on the machine shares, so polling does not blur it), and peer messages
             per broadcast from ``synthesis_gossip_events_total`` (pushes + wants +
             repair pushes; the periodic anti-entropy digests are a rate per node,
             whatever the traffic); baseline: ``strategy="multicast"`` (PUB/SUB) to a
             second group of 30 members.  Then the simulator rows of
             ``scripts/bench_epidemic.py`` (messages per node against log2 N).

The nodes load this module as a behavior module (``stamp``, below), so its top level
imports nothing heavy; the measuring code imports its helpers when it runs.

    nice -n 10 .venv/bin/python scripts/bench_routing.py [--repeat 3] [--quick]

Called by scripts/bench.py as well (``run(args)`` returns the rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for _path in (REPO, REPO / "tests", SCRIPTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from node import Agent, behavior, handler  # noqa: E402

NODES = ("n0", "n1", "n2")
SCATTER_AGENTS = 100
GROUP_MEMBERS = 30
POLL_S = 0.002          # between polls for a broadcast's stamps
BROADCAST_WAIT_S = 2.0  # a member still without the message then counts as missed
SIM_SIZES = [3, 100, 1000]
COLUMNS = ("measure", "result (median rep)", "baseline (median rep)",
           "ratio result/baseline", "spread over reps (min..max)")


@behavior("stamp")
class Stamp(Agent):
    """A group member (init {"group": g}) that records when each message arrived.

    ``note`` with data k stores time.monotonic() under k; ``stamp`` k answers
    {"t": that time or None}.  CLOCK_MONOTONIC is one clock for every process on
    the machine, so the bench compares it with its own publish time."""

    __slots__ = ("arrived",)

    def on_start(self, init: Any) -> None:
        self.arrived: dict[Any, float] = {}
        if init and init.get("group"):
            self.join(init["group"])

    @handler("note")
    def note(self, data: Any) -> None:
        self.arrived.setdefault(data, time.monotonic())

    @handler("stamp")
    def stamp(self, data: Any) -> dict:
        return {"t": self.arrived.get(data)}


@dataclass(frozen=True)
class Counts:
    pipeline: int    # pipelines (and as many baseline triples) per repetition
    scatter: int     # scatters (and as many gathers of 100 calls) per repetition
    broadcast: int   # publishes per strategy per repetition


FULL = Counts(pipeline=2000, scatter=300, broadcast=150)
QUICK = Counts(pipeline=300, scatter=60, broadcast=30)


# --- statistics and formatting ------------------------------------------------------------

def p50_p99(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def median(values: list[float]) -> float:
    return statistics.median(values)


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(min(values))}..{fmt(max(values))}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


def ratio(x: float) -> str:
    return f"{x:.2f}"


def whole(x: float) -> str:
    return f"{x:,.0f}"


@dataclass
class Reps:
    """One figure per repetition, for the result and its baseline."""
    result: list[float]
    baseline: list[float]

    def ratios(self) -> list[float]:
        return [r / b for r, b in zip(self.result, self.baseline)]


def latency_rows(name: str, base_name: str, p50: Reps, p99: Reps,
                 fmt: Callable[[float], str], unit: str) -> tuple[str, ...]:
    """One row for a p50 / p99 pair: medians, median ratios and the ranges."""
    return (name,
            f"{fmt(median(p50.result))} / {fmt(median(p99.result))} {unit}",
            f"{base_name}: {fmt(median(p50.baseline))} / {fmt(median(p99.baseline))} {unit}",
            f"{ratio(median(p50.ratios()))} / {ratio(median(p99.ratios()))}",
            f"p50 {span(p50.result, fmt)}, p99 {span(p99.result, fmt)}; ratio "
            f"{span(p50.ratios(), ratio)} / {span(p99.ratios(), ratio)}")


# --- cluster --------------------------------------------------------------------------------

@contextmanager
def cluster3(log_dir: Path) -> Iterator[Any]:
    """3 nodes with metrics that load this module's behaviors; all killed at exit."""
    from support import Cluster
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), saved) if p)
    try:
        cluster = Cluster(3, log_dir, metrics=True, args=("--behavior", "bench_routing"))
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield cluster
    finally:
        cluster.close()


def spawn_spread(client: Any, behavior_name: str, prefix: str, count: int,
                 init: Any = None) -> dict[str, str]:
    """Spawn ``count`` agents; agent -> owner node.  Fails unless every node owns one."""
    owners = {f"{behavior_name}/{prefix}{i}": "" for i in range(count)}
    for agent in owners:
        owners[agent] = client.spawn(behavior_name, agent, init)["node"]
    missing = set(NODES) - set(owners.values())
    if missing:
        raise RuntimeError(f"no {prefix} agent on {sorted(missing)}")
    return owners


def per_node(owners: dict[str, str]) -> str:
    return "/".join(str(list(owners.values()).count(n)) for n in NODES)


# --- pipeline -------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def chained(calls: list[Callable[[Any], Any]], data: Any) -> Any:
    """Each call gets the previous reply: what a client does without a pipeline."""
    for call in calls:
        data = call(data)
    return data


def pipeline_rep(cluster: Any, stages: list[tuple[str, str]], n: int) -> dict[str, list]:
    """n pipelines, n triples of calls via n0 and n triples at the owners, interleaved."""
    samples: dict[str, list[float]] = {"pipeline": [], "via_n0": [], "at_owner": []}
    entry = cluster.nodes[0].client(timeout_s=10)
    owners = [node.client(timeout_s=10) for node in cluster.nodes]
    try:
        via_n0 = [lambda d, a=a, t=t: entry.call(a, t, d) for a, t in stages]
        at_owner = [lambda d, c=c, a=a, t=t: c.call(a, t, d)
                    for c, (a, t) in zip(owners, stages)]
        for i in range(-50, n):  # the first 50 warm up every path
            data = {"i": i, "note": "x" * 32}
            ways = (("pipeline", lambda: entry.pipeline(stages, data)),
                    ("via_n0", lambda: chained(via_n0, data)),
                    ("at_owner", lambda: chained(at_owner, data)))
            for key, fn in ways:
                seconds, out = timed(fn)
                if out != data:
                    raise RuntimeError(f"{key} answered {out!r} for {data!r}")
                if i >= 0:
                    samples[key].append(seconds)
    finally:
        entry.close()
        for c in owners:
            c.close()
    return samples


def pipeline_rows(reps: list[dict[str, list]], owners: str) -> list[tuple[str, ...]]:
    n = len(reps[0]["pipeline"])
    stats = [{k: p50_p99(v) for k, v in rep.items()} for rep in reps]

    def pair(key: str, q: int) -> Reps:
        return Reps([s["pipeline"][q] for s in stats], [s[key][q] for s in stats])

    name = f"pipeline, 3 echo stages on {owners}, p50 / p99 ({n:,} x{len(reps)})"
    return [latency_rows(name, "3 calls via n0", pair("via_n0", 0), pair("via_n0", 1), us, "us"),
            latency_rows("  same pipeline, against calls at each owner", "3 calls at owners",
                         pair("at_owner", 0), pair("at_owner", 1), us, "us")]


# --- scatter-gather -------------------------------------------------------------------------

async def scatter_rep(address: str, agents: list[str], n: int) -> dict[str, list]:
    """n scatters and n gathers of direct calls, interleaved, from one AsyncClient."""
    from node.client import AsyncClient, RemoteError
    samples: dict[str, list[float]] = {"scatter": [], "gather": []}
    async with AsyncClient(address, timeout_s=10) as client:
        for i in range(-20, n):
            data = {"i": i}
            start = time.perf_counter()
            scattered = await client.broadcast(agents, "pass", data)
            middle = time.perf_counter()
            gathered = await asyncio.gather(*(client.call(a, "pass", data) for a in agents))
            end = time.perf_counter()
            bad = [v for v in (*scattered.values(), *gathered)
                   if isinstance(v, RemoteError) or v != data]
            if bad:
                raise RuntimeError(f"scatter or gather answered {bad[:3]!r}")
            if i >= 0:
                samples["scatter"].append(middle - start)
                samples["gather"].append(end - middle)
    return samples


def scatter_rows(reps: list[dict[str, list]], owners: str) -> list[tuple[str, ...]]:
    n = len(reps[0]["scatter"])
    stats = [{k: p50_p99(v) for k, v in rep.items()} for rep in reps]
    p50 = Reps([s["scatter"][0] for s in stats], [s["gather"][0] for s in stats])
    p99 = Reps([s["scatter"][1] for s in stats], [s["gather"][1] for s in stats])
    rate = Reps([SCATTER_AGENTS * n / sum(r["scatter"]) for r in reps],
                [SCATTER_AGENTS * n / sum(r["gather"]) for r in reps])
    name = (f"scatter-gather to {SCATTER_AGENTS} echo agents ({owners}), p50 / p99 "
            f"({n} x{len(reps)})")
    return [latency_rows(name, f"{SCATTER_AGENTS} calls in flight, gather", p50, p99, ms, "ms"),
            ("  agents answered/s, sequential scatters", f"{whole(median(rate.result))}/s",
             f"gathered calls: {whole(median(rate.baseline))}/s",
             ratio(median(rate.ratios())),
             f"{span(rate.result, whole)}; ratio {span(rate.ratios(), ratio)}")]


# --- gossip broadcast -----------------------------------------------------------------------

GOSSIP_EVENTS = ("pushed", "wants", "repair_pushes", "duplicates", "delivered", "digests")


def counters(cluster: Any) -> dict[str, float]:
    """The gossip event counters and publish sends, summed over the nodes."""
    from support import metric_samples
    total = dict.fromkeys((*GOSSIP_EVENTS, "publish_sends"), 0.0)
    for node in cluster.nodes:
        samples = metric_samples(node)
        for event in GOSSIP_EVENTS:
            total[event] += samples.get(("synthesis_gossip_events_total", (("event", event),)), 0)
        total["publish_sends"] += samples.get(
            ("synthesis_messages_sent_total", (("kind", "publish"),)), 0)
    return total


def arrival(client: Any, members: list[str], key: Any, sent_at: float) -> float | None:
    """Seconds from ``sent_at`` until the last member stamped ``key``; None if one
    had not within BROADCAST_WAIT_S."""
    deadline = sent_at + BROADCAST_WAIT_S
    while True:
        time.sleep(POLL_S)
        stamps = client.broadcast(members, "stamp", key)
        times = [v.get("t") if isinstance(v, dict) else None for v in stamps.values()]
        if all(t is not None for t in times):
            return max(times) - sent_at
        if time.monotonic() > deadline:
            return None


def broadcast_block(cluster: Any, client: Any, group: str, members: list[str],
                    strategy: str, n: int) -> dict[str, Any]:
    """n publishes, one at a time, each waited for at every member."""
    for warm in range(5):  # multicast: until the SUB connections carry the group
        if arrival(client, members, f"warm{warm}", _publish(client, group, f"warm{warm}",
                                                            strategy)) is not None:
            break
    before = counters(cluster)
    latencies, missed = [], 0
    for k in range(n):
        took = arrival(client, members, k, _publish(client, group, k, strategy))
        if took is None:
            missed += 1
        else:
            latencies.append(took)
    after = counters(cluster)
    return {"latency": latencies, "missed": missed,
            "per_broadcast": {key: (after[key] - before[key]) / n for key in after}}


def _publish(client: Any, group: str, key: Any, strategy: str) -> float:
    sent_at = time.monotonic()
    client.publish(group, "note", key, strategy=strategy)
    return sent_at


def broadcast_rep(cluster: Any, rep: int, n: int) -> dict[str, dict]:
    """Gossip then multicast (multicast first on odd repetitions), fresh groups."""
    order = ("gossip", "multicast") if rep % 2 == 0 else ("multicast", "gossip")
    out = {}
    with cluster.nodes[0].client(timeout_s=10) as client:
        for strategy in order:
            group = f"bench-{strategy}-{rep}"
            owners = spawn_spread(client, "stamp", f"{strategy}{rep}-", GROUP_MEMBERS,
                                  {"group": group})
            out[strategy] = broadcast_block(cluster, client, group, list(owners), strategy, n)
            out[strategy]["owners"] = per_node(owners)
    return out


def broadcast_rows(reps: list[dict[str, dict]], digests_node_s: float) -> list[tuple[str, ...]]:
    """``digests_node_s``: anti-entropy digests per node per second over the whole run
    (periodic, so a rate: a block of broadcasts lasts too little to count them)."""
    n = len(reps[0]["gossip"]["latency"]) + reps[0]["gossip"]["missed"]
    stats = [{s: p50_p99(rep[s]["latency"]) for s in rep} for rep in reps]
    p50 = Reps([s["gossip"][0] for s in stats], [s["multicast"][0] for s in stats])
    p99 = Reps([s["gossip"][1] for s in stats], [s["multicast"][1] for s in stats])
    gossip = [rep["gossip"]["per_broadcast"] for rep in reps]
    multicast = [rep["multicast"]["per_broadcast"] for rep in reps]
    peer = [g["pushed"] + g["wants"] + g["repair_pushes"] for g in gossip]
    per_node_peer = median(peer) / len(NODES)
    # A multicast is one PUB send, which libzmq copies to each subscribed node.
    pub_frames = [m["publish_sends"] * (len(NODES) - 1) for m in multicast]
    missed = {s: sum(rep[s]["missed"] for rep in reps) for s in ("gossip", "multicast")}
    duplicates = median([g["duplicates"] for g in gossip])
    owners = reps[0]["gossip"]["owners"]
    name = (f"gossip to {GROUP_MEMBERS} members ({owners}), to all p50 / p99 "
            f"({n} x{len(reps)})")
    return [
        latency_rows(name, "multicast PUB/SUB", p50, p99, ms, "ms"),
        ("  peer messages per broadcast (all nodes; per node)",
         f"{median(peer):.2f}; {per_node_peer:.2f} (dup {duplicates:.2f})",
         f"multicast: {median(pub_frames):.2f} PUB frames",
         ratio(median(peer) / median(pub_frames)), span(peer, ratio)),
        ("  node deliveries per broadcast / members missed",
         f"{median([g['delivered'] for g in gossip]):.2f} / {missed['gossip']}",
         f"multicast missed: {missed['multicast']}", "-", "-"),
        ("  anti-entropy digests per node per s (whole run)", f"{digests_node_s:.2f}",
         "-", "-", "-"),
    ]


def simulator_rows(seed: int = 1) -> list[tuple[str, ...]]:
    """scripts/bench_epidemic.py's rows, one table row each (fields as its HEADER)."""
    import bench_epidemic
    rows = []
    for line in bench_epidemic.rows(SIM_SIZES, seed):
        n, loss, to_all, msgs, per_log2, nbytes, _digests = line.split()
        rows.append((f"gossip simulator N={int(n):,}, {loss} loss: to all / msgs per node",
                     f"{float(to_all) * 1e3:,.0f} ms / {msgs}", f"{nbytes} B/node",
                     f"{per_log2} x log2 N", "-"))
    return rows


# --- the run ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Every row of this benchmark (``COLUMNS``); ``args.repeat`` (at least 3) and
    ``args.quick`` as scripts/bench.py parses them."""
    repeat = max(3, getattr(args, "repeat", 3))
    counts = QUICK if getattr(args, "quick", False) else FULL
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp, \
            cluster3(Path(tmp)) as cluster:
        with cluster.nodes[0].client(timeout_s=10) as client:
            echoes = spawn_spread(client, "echo", "spread", SCATTER_AGENTS)
        stages = [(next(a for a, n in echoes.items() if n == node), "pass") for node in NODES]
        pipelines, scatters, broadcasts = [], [], []
        before, started = counters(cluster), time.monotonic()
        for rep in range(repeat):
            pipelines.append(pipeline_rep(cluster, stages, counts.pipeline))
            scatters.append(asyncio.run(scatter_rep(cluster.nodes[0].address, list(echoes),
                                                    counts.scatter)))
            broadcasts.append(broadcast_rep(cluster, rep, counts.broadcast))
        digests = counters(cluster)["digests"] - before["digests"]
        digests_node_s = digests / len(NODES) / (time.monotonic() - started)
    load_end = os.getloadavg()
    machine = (f"machine: {os.cpu_count()} cores, load avg 1/5/15 min",
               "start " + "/".join(f"{v:.2f}" for v in load_start),
               "end " + "/".join(f"{v:.2f}" for v in load_end), "-", "-")
    return [machine, *pipeline_rows(pipelines, "n0 -> n1 -> n2"),
            *scatter_rows(scatters, f"{per_node(echoes)} on n0/n1/n2"),
            *broadcast_rows(broadcasts, digests_node_s), *simulator_rows()]


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = COLUMNS) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, metavar="R",
                        help="repetitions of every measure, at least 3 (default: 3)")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    print_table(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
