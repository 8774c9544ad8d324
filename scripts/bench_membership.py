"""Membership benchmark: real node processes, and the simulator at scale.

Real processes (127.0.0.1, port 0, each node reports its ports in a ready file),
every measurement repeated ``repeat`` times, printed as p50, max and spread:

  join          4 nodes; a 5th starts; time until every node's ``syn.members``
                lists it alive, from its process start and from its ready file
  kill -9       5 nodes; one is killed; every live node's members polled every
                20 ms: until the first and until all show it dead, and until its
                counter agents answer again through another node
  handoff       3 nodes; a client calls ``counter/x`` incr one call at a time
                while the node the ring gives that agent to joins, then leaves
                gracefully (SIGTERM): the longest gap between replies, errors,
                and whether the value kept counting (its state moved with it)

Beside them: what SWIM predicts from the node's default timings, the bound the
issue sets (detect <= 3 s, agree <= 5 s) and the ratio measured / target.

Simulator (pure, in process): Membership machines in the bare simulator;
periods to agree after the last join, and peer-frame bytes each node sends per
probe period in steady state, as the cluster grows.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import core_cy  # noqa: E402
from node.client import CallTimeout, Client, RemoteError  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.runtime import swim_config  # noqa: E402
from protocols import peer  # noqa: E402
from protocols.effects import MembersChanged, Send  # noqa: E402
from protocols.membership import ALIVE, DEAD, Member, Membership  # noqa: E402
from protocols.sim import NetworkConfig, Simulator  # noqa: E402

POLL_S = 0.02             # how often the members views are read
WAIT_S = 30.0             # bound of any one wait on the cluster
RING_VNODES = 160         # the node's Router default (protocols/routing.py)
DETECT_TARGET_S = 3.0     # the bounds: first node sees the death ...
AGREE_TARGET_S = 5.0      # ... and every live node agrees
SIM_SIZES = (10, 50, 100, 200)
SIM_SIZES_LARGE = (500, 1000)
SIM_STEADY_PERIODS = 20   # probe periods over which steady-state traffic is counted
SWIM = swim_config(NodeConfig())  # the timings a node runs with by default


# ---------------------------------------------------------------------------- processes


class BenchNode:
    """One synthesis-node process on loopback port 0; its address comes from its
    ready file.  ``started_wall`` and ``ready_wall`` are wall-clock seconds (the
    ready file's mtime is the moment the node wrote it)."""

    def __init__(self, node_id: str, workdir: Path, seed: str | None = None):
        self.node_id = node_id
        self.ready_path = workdir / f"{node_id}.ready.json"
        self._log = open(workdir / f"{node_id}.log", "wb")
        cmd = [sys.executable, "-m", "node.cli", "--node-id", node_id,
               "--listen", "127.0.0.1:0", "--pub", "127.0.0.1:0", "--metrics", "off",
               "--ready-file", str(self.ready_path), "--log-level", "warning"]
        if seed:
            cmd += ["--seed", seed]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.started_wall = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(REPO))
        self._address: str | None = None

    def ready(self) -> bool:
        """True once the ready file is there (it is written whole, by a rename)."""
        if self._address is None and self.ready_path.exists():
            self._address = json.loads(self.ready_path.read_text())["address"]
        if self._address is None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.node_id} exited {self.proc.returncode}")
        return self._address is not None

    @property
    def ready_wall(self) -> float:
        return self.ready_path.stat().st_mtime

    @property
    def address(self) -> str:
        wait_for(self.ready, f"{self.node_id} ready")
        return self._address.removeprefix("tcp://")

    def client(self, timeout_s: float = 0.5) -> Client:
        return Client(self.address, timeout_s=timeout_s)

    def terminate(self) -> None:
        """SIGTERM (a graceful leave), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s: {what}")
        time.sleep(POLL_S)


def states_seen(node: BenchNode) -> dict[str, str]:
    """Node id -> state in ``node``'s member view ({} while it does not answer)."""
    try:
        with node.client() as c:
            return {row["node_id"]: row["state"] for row in c.members()["members"]}
    except (CallTimeout, RemoteError):
        return {}


class Cluster:
    """Node processes started by the benchmark, all stopped by ``close``."""

    def __init__(self, prefix: str, size: int, workdir: Path):
        self.prefix, self.workdir = prefix, workdir
        self.live: list[BenchNode] = []
        self._all: list[BenchNode] = []
        for i in range(size):
            self.start(f"{prefix}{i}")
        self.wait_settled()

    def start(self, node_id: str) -> BenchNode:
        seed = self.live[0].address if self.live else None
        node = BenchNode(node_id, self.workdir, seed)
        self._all.append(node)
        self.live.append(node)
        return node

    def forget(self, node: BenchNode) -> None:
        self.live.remove(node)

    def wait_settled(self) -> None:
        """Until every live node holds every live node alive and none suspect."""
        names = {n.node_id for n in self.live}

        def settled() -> bool:
            for node in self.live:
                view = states_seen(node)
                alive = {n for n, s in view.items() if s == ALIVE}
                if alive != names or "suspect" in view.values():
                    return False
            return True
        wait_for(settled, f"{sorted(names)} settled")

    def close(self) -> None:
        for node in self._all:
            node.kill9()


def agent_owned_by(owner: str, ring_ids: list[str], prefix: str) -> str:
    """A counter agent id the ring over ``ring_ids`` places on ``owner``."""
    ring = core_cy.HashRing(tuple(sorted(ring_ids)), vnodes=RING_VNODES)
    for k in range(100_000):
        agent = f"counter/{prefix}-{k}"
        if ring.owner(agent) == owner:
            return agent
    raise RuntimeError(f"no agent id for {owner}")


# ---------------------------------------------------------------------------- join


def measure_join(workdir: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds from a 5th node's process start, and from its ready file, until all
    five nodes list it alive.  Each joiner leaves again before the next."""
    out: dict[str, list[float]] = {"from start": [], "from ready": []}
    cluster = Cluster("jn", 4, workdir)
    try:
        for rep in range(repeat):
            joiner = cluster.start(f"jx{rep}")
            wait_for(lambda: joiner.ready() and
                     all(states_seen(n).get(joiner.node_id) == ALIVE for n in cluster.live),
                     f"{joiner.node_id} seen by all", timeout_s=WAIT_S)
            seen = time.time()
            out["from start"].append(seen - joiner.started_wall)
            out["from ready"].append(seen - joiner.ready_wall)
            cluster.forget(joiner)
            joiner.terminate()
            cluster.wait_settled()
    finally:
        cluster.close()
    return out


# ---------------------------------------------------------------------------- kill -9


class AnswerWatch(threading.Thread):
    """Calls ``get`` on an agent through ``entry`` until it answers; ``answered_at``
    is the monotonic time of the first answer."""

    def __init__(self, entry: str, agent: str):
        super().__init__(daemon=True)
        self.entry, self.agent = entry, agent
        self.answered_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.entry, timeout_s=0.25) as c:
            while not self.stop.is_set():
                try:
                    c.call(self.agent, "get")
                    self.answered_at = time.monotonic()
                    return
                except (CallTimeout, RemoteError):
                    time.sleep(POLL_S)


def measure_kill(workdir: Path, repeat: int) -> dict[str, list[float]]:
    """kill -9 of one of 5 nodes: until the first live node and until all show it
    dead, and until its agents answer through another node.  A fresh node replaces
    each victim before the next repetition."""
    out: dict[str, list[float]] = {"first": [], "all": [], "agents": []}
    cluster = Cluster("kn", 5, workdir)
    try:
        for rep in range(repeat):
            victim = cluster.live[-1]        # never the seed, cluster.live[0]
            survivors = cluster.live[:-1]
            ids = [n.node_id for n in cluster.live]
            agent = agent_owned_by(victim.node_id, ids, f"kill{rep}")
            with survivors[0].client(timeout_s=5.0) as c:
                placed = c.spawn("counter", agent)["node"]
            if placed != victim.node_id:
                raise RuntimeError(f"{agent} was placed on {placed}, not {victim.node_id}")
            watch = AnswerWatch(survivors[0].address, agent)
            killed_at = time.monotonic()
            victim.kill9()
            watch.start()
            first, every = poll_until_dead(survivors, victim.node_id, killed_at)
            watch.join(WAIT_S)
            watch.stop.set()
            if watch.answered_at is None:
                raise TimeoutError(f"{agent} did not answer again within {WAIT_S} s")
            out["first"].append(first)
            out["all"].append(every)
            out["agents"].append(watch.answered_at - killed_at)
            cluster.forget(victim)
            cluster.start(f"kx{rep}")
            cluster.wait_settled()
    finally:
        cluster.close()
    return out


def poll_until_dead(survivors: list[BenchNode], victim: str, since: float
                    ) -> tuple[float, float]:
    """Seconds from ``since`` until the first, and until every, survivor shows
    ``victim`` dead (read every POLL_S)."""
    first = None
    deadline = since + WAIT_S
    while time.monotonic() < deadline:
        dead = sum(1 for n in survivors if states_seen(n).get(victim) == DEAD)
        now = time.monotonic() - since
        if dead and first is None:
            first = now
        if dead == len(survivors):
            return first, now
        time.sleep(POLL_S)
    raise TimeoutError(f"survivors did not all see {victim} dead within {WAIT_S} s")


# ---------------------------------------------------------------------------- handoff


@dataclass
class CallLoop:
    """``incr`` on one counter agent through ``entry``, one call at a time, in a
    thread: the gaps between replies and whether the value kept counting."""

    entry: str
    agent: str
    errors: int = 0
    replies: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, value)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.entry, timeout_s=1.0) as c:
            while not self._stop.is_set():
                try:
                    value = c.call(self.agent, "incr")["value"]
                except (CallTimeout, RemoteError):
                    self.errors += 1
                    time.sleep(0.01)  # a fast refusal must not spin the loop
                    continue
                self.replies.append((time.monotonic(), value))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def mark(self) -> tuple[int, int]:
        """Where the record stands now (replies, errors)."""
        return len(self.replies), self.errors

    def window(self, since: tuple[int, int]) -> tuple[float, int, int]:
        """Longest gap between replies, errors, and resets (a reply not above the
        one before: the agent's state was lost) after ``since``."""
        first = max(since[0] - 1, 0)
        times = [t for t, _ in self.replies[first:]]
        values = [v for _, v in self.replies[first:]]
        gap = max((b - a for a, b in zip(times, times[1:])), default=float("nan"))
        resets = sum(1 for a, b in zip(values, values[1:]) if b <= a)
        return gap, self.errors - since[1], resets


def measure_handoff(workdir: Path, repeat: int) -> dict[str, list[float]]:
    """The longest pause a client sees while its agent moves to a joining node,
    and back when that node leaves on SIGTERM."""
    out: dict[str, list[float]] = {"join gap": [], "join errors": [], "leave gap": [],
                                   "leave errors": [], "join resets": [], "leave resets": []}
    cluster = Cluster("hn", 3, workdir)
    try:
        for rep in range(repeat):
            joiner_id = f"hx{rep}"
            ids = [n.node_id for n in cluster.live] + [joiner_id]
            loop = CallLoop(cluster.live[0].address, agent_owned_by(joiner_id, ids, f"x{rep}"))
            loop.start()
            wait_for(lambda: len(loop.replies) > 50, "calls before the join")
            before_join = loop.mark()
            joiner = cluster.start(joiner_id)
            wait_for(lambda: hosts_agents(joiner), f"{joiner_id} took its agent")
            time.sleep(1.0)
            gap, errors, resets = loop.window(before_join)
            out["join gap"].append(gap)
            out["join errors"].append(errors)
            out["join resets"].append(resets)
            before_leave = loop.mark()
            cluster.forget(joiner)
            joiner.terminate()
            time.sleep(1.0)
            loop.stop()
            gap2, errors2, resets2 = loop.window(before_leave)
            out["leave gap"].append(gap2)
            out["leave errors"].append(errors2)
            out["leave resets"].append(resets2)
            cluster.wait_settled()
    finally:
        cluster.close()
    return out


def hosts_agents(node: BenchNode) -> bool:
    """True once ``node`` reports an active agent of its own."""
    if not node.ready():
        return False
    try:
        with node.client() as c:
            rows = c.members()["members"]
    except (CallTimeout, RemoteError):
        return False
    return any(r["node_id"] == node.node_id and (r["agents"] or 0) > 0 for r in rows)


# ---------------------------------------------------------------------------- simulator


@dataclass
class SimResult:
    n: int
    periods_to_agree: float
    bytes_mean: float        # peer-frame bytes one node sends per probe period (mean)
    bytes_max: float         # ... the busiest node
    messages_mean: float
    wall_s: float


class _SimWatch:
    """Observes a simulation: which nodes do not yet hold all ``n`` alive (from
    their MembersChanged effects), and, once counting, the bytes each node sends."""

    def __init__(self, sim: Simulator, n: int):
        self.n = n
        self.waiting = set(sim.node_ids)
        self.counting = False
        self.sent_bytes: dict[str, int] = {}
        self.sent_messages = 0
        sim.observe(self._step)

    def _step(self, sim: Simulator, node_id: str, effects: list) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is MembersChanged:
                alive = sum(1 for m in effect.members.values() if m.state == ALIVE)
                (self.waiting.discard if alive == self.n else self.waiting.add)(node_id)
            elif kind is Send and self.counting:
                size = sum(map(len, peer.encode(effect.channel, node_id, effect.message)))
                self.sent_bytes[node_id] = self.sent_bytes.get(node_id, 0) + size
                self.sent_messages += 1


def simulate(n: int, seed: int = 1) -> SimResult:
    """n Membership machines joining through node 0 over n/50 s (a rolling start),
    then: periods from the last join until all hold all alive; then bytes sent per
    node per period over SIM_STEADY_PERIODS."""
    started = time.perf_counter()
    sim = Simulator(seed, NetworkConfig(), wire_roundtrip=False)
    sim.record_changes = False
    window = n / 50

    def address(k: int, port: int = 7400) -> str:
        return f"tcp://10.0.{k // 250}.{k % 250}:{port}"
    last_join = 0.0
    for k in range(n):
        me = Member.of(f"n{k}", address(k), address(k, 7401), 10**9 + k)
        machine = Membership(me, [address(0)], SWIM, rng=random.Random(seed * 100_000 + k))
        start_at = 0.0 if k == 0 else sim.rng.uniform(0, window)
        last_join = max(last_join, start_at)
        sim.add(f"n{k}", machine, address(k), start_at=start_at)
    watch = _SimWatch(sim, n)
    if not sim.run_until(window + 600, stop=lambda s: s.now >= last_join and not watch.waiting):
        raise TimeoutError(f"n={n}: members did not agree within 600 simulated s")
    periods = (sim.now - last_join) / SWIM.probe_interval_s
    watch.counting = True
    sim.run_for(SIM_STEADY_PERIODS * SWIM.probe_interval_s)
    per_period = [b / SIM_STEADY_PERIODS for b in watch.sent_bytes.values()]
    return SimResult(n, periods, sum(per_period) / n, max(per_period, default=0.0),
                     watch.sent_messages / n / SIM_STEADY_PERIODS,
                     time.perf_counter() - started)


# ---------------------------------------------------------------------------- report


def seconds(values: list[float]) -> tuple[str, str, str]:
    """p50, max and spread (max - min) of a measurement, in seconds."""
    return (f"{statistics.median(values):.3f} s", f"{max(values):.3f} s",
            f"{max(values) - min(values):.3f} s")


def counts(values: list[float]) -> tuple[str, str, str]:
    return (f"{statistics.median(values):g}", f"{max(values):g}",
            f"{max(values) - min(values):g}")


def suspicion_s(n: int) -> tuple[float, float]:
    """The suspicion timeout's floor and start for n members (see membership.py)."""
    floor = SWIM.suspicion_mult * max(1.0, math.log10(n)) * SWIM.probe_interval_s
    return floor, floor * SWIM.suspicion_max_mult


def theory(n: int) -> dict[str, str]:
    """What SWIM predicts with the default timings: a probe of the victim within
    about one period (every member probes one other per period), the probe timeout,
    then the suspicion timeout (its floor with confirmations, up to its start
    without); the agents move once the dead member is downed, stable_after_s later."""
    period, probe = SWIM.probe_interval_s, SWIM.probe_timeout_s
    low, high = suspicion_s(n)
    detect = (probe + low, period + probe + high)
    agents = (detect[0] + SWIM.stable_after_s, detect[1] + SWIM.stable_after_s)
    return {"detect": f"{detect[0]:.1f}..{detect[1]:.1f} s",
            "agents": f"{agents[0]:.1f}..{agents[1]:.1f} s"}


def ratio(values: list[float], target: float) -> str:
    return f"{statistics.median(values) / target:.2f} / {max(values) / target:.2f}"


def process_rows(join: dict, kill: dict, handoff: dict, repeat: int) -> list[tuple]:
    t = theory(5)
    return [
        (f"join: 5th node seen alive by all, from process start (x{repeat})",
         *seconds(join["from start"]), "-", "-", "-"),
        ("join: the same, from its ready file", *seconds(join["from ready"]), "-", "-", "-"),
        ("kill -9 of 1 in 5: first node shows it dead", *seconds(kill["first"]),
         t["detect"], f"<= {DETECT_TARGET_S:g} s", ratio(kill["first"], DETECT_TARGET_S)),
        ("kill -9 of 1 in 5: all 4 live nodes show it dead", *seconds(kill["all"]),
         t["detect"], f"<= {AGREE_TARGET_S:g} s", ratio(kill["all"], AGREE_TARGET_S)),
        ("kill -9: its agents answer again via another node", *seconds(kill["agents"]),
         t["agents"], "-", "-"),
        ("handoff to a joining node: longest reply gap", *seconds(handoff["join gap"]),
         "-", "-", "-"),
        ("handoff to a joining node: errors", *counts(handoff["join errors"]), "0", "0", "-"),
        ("handoff on SIGTERM of the owner: longest reply gap", *seconds(handoff["leave gap"]),
         "-", "-", "-"),
        ("handoff on SIGTERM of the owner: errors", *counts(handoff["leave errors"]),
         "0", "0", "-"),
        ("handoff to a joining node: counter went back (state lost)",
         *counts(handoff["join resets"]), "0", "0", "-"),
        ("handoff on SIGTERM: counter went back (state lost)",
         *counts(handoff["leave resets"]), "0", "0", "-"),
    ]


def sim_rows(results: list[SimResult]) -> list[tuple]:
    return [(f"n = {r.n}", f"{r.periods_to_agree:.1f}", f"{r.bytes_mean:,.0f}",
             f"{r.bytes_max:,.0f}", f"{r.messages_mean:.1f}", f"{r.wall_s:.1f} s")
            for r in results]


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def print_settings() -> None:
    low, high = suspicion_s(5)
    print(f"membership defaults: probe every {SWIM.probe_interval_s:g} s (ack timeout "
          f"{SWIM.probe_timeout_s:g} s), suspicion {low:g}..{high:g} s at n=5 "
          f"(suspicion_mult {SWIM.suspicion_mult:g} x max(1, log10 n) x period, up to "
          f"x{SWIM.suspicion_max_mult:g} unconfirmed), stable_after {SWIM.stable_after_s:g} s, "
          f"sync every {SWIM.sync_interval_s:g} s")


def run_processes(repeat: int) -> None:
    """The real-process rows: three small clusters, one after another."""
    print_settings()
    with tempfile.TemporaryDirectory(prefix="bench-membership-") as tmp:
        workdir = Path(tmp)
        join = measure_join(workdir, repeat)
        kill = measure_kill(workdir, repeat)
        handoff = measure_handoff(workdir, repeat)
    print_table(("measure", "p50", "max", "spread", "SWIM theory", "target",
                 "p50/max vs target"), process_rows(join, kill, handoff, repeat))


def run_simulator(large: bool) -> None:
    sizes = SIM_SIZES + (SIM_SIZES_LARGE if large else ())
    print(f"\nsimulator: Membership machines, rolling join over n/50 s, bytes = peer "
          f"frames sent over {SIM_STEADY_PERIODS} probe periods after agreement")
    print_table(("cluster", "periods to agree after last join", "bytes/node/period",
                 "busiest node", "msgs/node/period", "wall"),
                sim_rows([simulate(n) for n in sizes]))


def main(repeat: int, large: bool, processes: bool = True) -> None:
    if processes:
        run_processes(repeat)
    run_simulator(large)

