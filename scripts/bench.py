#!/usr/bin/env python3
"""End-to-end benchmark: Synthesis against raw pyzmq, measured in one run.

Rows (each with its ratio to the raw pyzmq baseline of the same run):

  one-way msgs/s      raw: DEALER -> ROUTER, receiver decodes msgpack
                      synthesis: Client.send -> node -> counter agent handler,
                      every message counted as handled by the node
  call round trip     raw: DEALER <-> ROUTER echo (decode + encode), p50/p99
                      synthesis: Client.call to an echo agent on the entry node
                      synthesis: the same, forwarded one hop to the owner node
  calls/s in flight   AsyncClient with 1000 calls outstanding (vs raw pyzmq with
                      1000 requests outstanding against a trivial echo server)
  client patterns     the same `echo` calls (an agent with no replicated state, so the
                      node is not the bottleneck) written three ways against the
                      same node in the same run: one gather of every call, gather
                      with a semaphore of 256 (a task per call, asyncio's own cost),
                      gather on a client with in_flight_max=256, and 256 worker
                      coroutines; each as a ratio to the worker pattern
  memory / idle agent RSS growth of a node after activating N agents, / N
  membership          (scripts/bench_membership.py) join seen by all, kill -9 to
                      all-agree-dead, the handoff pause a client sees, against SWIM's
                      prediction and the issue's bounds; the simulator's traffic per
                      node per probe period and periods to agree as N grows
  replication         (scripts/bench_replication.py) counter updates/s at consistency
                      local, quorum and all on 3 nodes against raw pyzmq, replication
                      lag p50/p99, and kill -9 to the victim's counters answering with
                      their state
  curve               (scripts/bench_curve.py) the one-way, call and in-flight rows
                      with CURVE off and on, side by side, at about 100 B and 1 KiB,
                      raw pyzmq and synthesis (direct and forwarded one hop)
  transports          (scripts/bench_transports.py) a forwarding hop over ZeroMQ, QUIC
                      and HTTP/2; h2load (100 streams) against the HTTP/2 bridge and
                      the QUIC client beside the ZeroMQ client (needs h2load:
                      apt-get install -y nghttp2-client)
  routing             (scripts/bench_routing.py) a 3-stage pipeline, scatter-gather to
                      100 agents and gossip broadcast on 3 nodes against 3 calls, 100
                      calls in flight and PUB/SUB; gossip in the simulator at 100 and
                      1,000 nodes

Usage: scripts/bench.py [--quick]
                        [--only patterns|membership|membership-sim|replication|curve|
                                transports|routing]
                        [--repeat R] [--large]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bench_membership  # noqa: E402  (scripts/, this file's directory)
import bench_replication  # noqa: E402
from node.client import AsyncClient, Client  # noqa: E402
from node.curve import load_secret, new_certificates, write_public_cert  # noqa: E402

TRIALS = 3
ENVELOPE = {"v": 1, "id": "1", "type": "incr", "subject": "counter/bench", "mode": "send",
            "data": {"n": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- raw pyzmq


@dataclasses.dataclass(frozen=True)
class RawCurve:
    """CURVE keys (Z85) for the raw baseline: the server takes any client key (no ZAP
    handler), so what is measured is libzmq's handshake and per-frame crypto."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def new(cls) -> RawCurve:
        return cls(*zmq.curve_keypair(), *zmq.curve_keypair())

    def dial(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey, sock.curve_secretkey = self.client_public, self.client_secret


# A ROUTER drops what it cannot queue: with the default high-water mark of 1,000 and
# 1,000 requests in flight, a reply now and then (more often with CURVE slowing the
# I/O thread) was dropped and the in-flight baseline waited for it forever.
RAW_HWM = 100_000


def _raw_server(port: int, server_secret: bytes | None) -> zmq.Socket:
    """The baseline's ROUTER, a CURVE server when given its secret key."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, RAW_HWM)
    sock.setsockopt(zmq.RCVHWM, RAW_HWM)
    if server_secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = server_secret
    sock.bind(f"tcp://127.0.0.1:{port}")
    return sock


def _raw_dealer(port: int, curve: RawCurve | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, RAW_HWM)
    sock.setsockopt(zmq.RCVHWM, RAW_HWM)
    if curve is not None:
        curve.dial(sock)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _raw_sink(port: int, n: int, ready, out, server_secret: bytes | None = None) -> None:
    sock = _raw_server(port, server_secret)
    ready.set()
    poller_first = sock.recv_multipart()
    started = time.perf_counter()
    msgpack.unpackb(poller_first[1])
    for _ in range(n - 1):
        msgpack.unpackb(sock.recv_multipart()[1])
    out.put(time.perf_counter() - started)


def _raw_echo(port: int, ready, stop, server_secret: bytes | None = None) -> None:
    sock = _raw_server(port, server_secret)
    ready.set()
    while not stop.is_set():
        if sock.poll(100):
            ident, payload = sock.recv_multipart()
            env = msgpack.unpackb(payload)
            sock.send_multipart([ident, msgpack.packb({"v": 1, "re": env["id"], "data": env.get("data")})])


def _server_secret(curve: RawCurve | None) -> bytes | None:
    return curve.server_secret if curve is not None else None


def raw_one_way(n: int, curve: RawCurve | None = None, data: Any = None) -> float:
    """msgs/s from a DEALER to a ROUTER that decodes each; ``data`` replaces the
    envelope's (the message size), ``curve`` turns CURVE on."""
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_raw_sink, args=(port, n, ready, out, _server_secret(curve)))
    proc.start()
    ready.wait(10)
    sock = _raw_dealer(port, curve)
    time.sleep(0.2)
    base = ENVELOPE if data is None else dict(ENVELOPE, data=data)
    started = time.perf_counter()
    for i in range(n):
        env = dict(base, id=str(i))
        sock.send(msgpack.packb(env))
    elapsed = out.get(timeout=120)
    total = time.perf_counter() - started
    proc.join(10)
    sock.close(linger=0)
    return n / max(elapsed, total)


class RawEcho:
    """A raw pyzmq ROUTER echo server in its own process, and a DEALER connected to it."""

    def __init__(self, curve: RawCurve | None = None):
        self._curve = curve

    def __enter__(self) -> zmq.Socket:
        port = free_port()
        ctx = mp.get_context("spawn")
        ready, self._stop = ctx.Event(), ctx.Event()
        self._proc = ctx.Process(target=_raw_echo,
                                 args=(port, ready, self._stop, _server_secret(self._curve)))
        self._proc.start()
        ready.wait(10)
        self._sock = _raw_dealer(port, self._curve)
        return self._sock

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._proc.join(10)
        self._sock.close(linger=0)


def _ping(i: int, data: Any = None) -> bytes:
    return msgpack.packb({"v": 1, "id": str(i), "type": "ping", "subject": "echo/x",
                          "data": i if data is None else data})


def raw_pipelined(n: int, window: int, curve: RawCurve | None = None,
                  data: Any = None) -> float:
    """Raw round trips/s with ``window`` requests outstanding (the in-flight baseline)."""
    with RawEcho(curve) as sock:
        sent = got = 0
        started = time.perf_counter()
        while got < n:
            while sent < n and sent - got < window:
                sock.send(_ping(sent, data))
                sent += 1
            if not sock.poll(10_000):
                raise RuntimeError(f"raw echo: {sent - got} replies lost")
            while True:
                try:
                    msgpack.unpackb(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                got += 1
        return n / (time.perf_counter() - started)


def raw_round_trip(n: int, curve: RawCurve | None = None,
                   data: Any = None) -> tuple[list[float], float]:
    samples = []
    with RawEcho(curve) as sock:
        for i in range(n + 200):
            t0 = time.perf_counter()
            sock.send(_ping(i, data))
            msgpack.unpackb(sock.recv())
            if i >= 200:  # warm-up
                samples.append(time.perf_counter() - t0)
    return samples, n / sum(samples)


# ---------------------------------------------------------------------------- synthesis


class Nodes:
    """Real synthesis-node processes for the run; with ``curve_dir`` every node runs
    CURVE with keys written there (see NodeKeys) and clients need ``client(i)``;
    ``args`` go to every node."""

    def __init__(self, count: int, curve_dir: Path | None = None, args: tuple[str, ...] = ()):
        self.procs: list[subprocess.Popen] = []
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        self.keys = NodeKeys(curve_dir, count, self.addresses[0]) if curve_dir else None
        seed: list[str] = []
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for i, address in enumerate(self.addresses):
            cmd = [sys.executable, "-m", "node.cli", "--node-id", f"b{i}", "--listen", address,
                   "--pub", f"127.0.0.1:{free_port()}", "--metrics", "off",
                   "--log-level", "warning", "--gossip-interval-s", "0.2", *seed,
                   *(self.keys.node_args(i) if self.keys else ()), *args]
            self.procs.append(subprocess.Popen(cmd, env=env))
            seed = ["--seed", self.addresses[0]]
        try:
            self._wait_converged(count)
        except BaseException:
            self.close()  # no node outlives a failed start
            raise

    def client(self, index: int = 0) -> dict[str, str]:
        """Client keyword arguments to reach node ``index`` (CURVE keys, or none)."""
        return self.keys.client(index) if self.keys else {}

    def _wait_converged(self, count: int) -> None:
        deadline = time.monotonic() + 20
        for index, address in enumerate(self.addresses):
            with Client(address, timeout_s=0.5, **self.client(index)) as c:
                while True:
                    try:
                        rows = c.status()["members"]
                        if sum(1 for r in rows if r.get("reachable")) == count:
                            break
                    except Exception:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("nodes did not converge")
                    time.sleep(0.1)

    def rss(self, index: int = 0) -> int:
        return psutil.Process(self.procs[index].pid).memory_info().rss

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


class NodeKeys:
    """CURVE certificates for a bench cluster: node ``b<i>``'s pair, the peers and
    clients directories every node reads, and one client key (``bench``)."""

    def __init__(self, root: Path, count: int, seed_address: str):
        self.own, self.peers, self.clients = root / "own", root / "peers", root / "clients"
        self.peers.mkdir(parents=True)
        self.clients.mkdir()
        for i in range(count):
            public, _ = new_certificates(str(self.own), f"b{i}")
            (self.peers / public.name).write_bytes(public.read_bytes())
        client_public, _ = new_certificates(str(self.own), "bench")
        (self.clients / client_public.name).write_bytes(client_public.read_bytes())
        # The seed's certificate names its address: how joining nodes find its key.
        seed_key, _ = load_secret(self.own / "b0.key_secret")
        write_public_cert(self.peers / "b0.key", seed_key, endpoint=f"tcp://{seed_address}")

    def node_args(self, index: int) -> tuple[str, ...]:
        return ("--curve-secret", str(self.own / f"b{index}.key_secret"),
                "--curve-peers", str(self.peers), "--curve-clients", str(self.clients))

    def client(self, index: int) -> dict[str, str]:
        return {"curve_secret": str(self.own / "bench.key_secret"),
                "curve_server": str(self.own / f"b{index}.key")}


# What synthesis_one_way sends by default: counter increments over 1000 agents.
COUNTER_INCR = ([f"counter/ow-{i}" for i in range(1000)], "incr", {"n": 1})


def synthesis_one_way(nodes: Nodes, n: int, work: tuple[list[str], str, Any] = COUNTER_INCR,
                      counted_on: int = 0) -> float:
    """Client.send of n messages ``work`` = (agents, type, data) to the first node,
    spread over the agents; done when node ``counted_on`` counts all n handled."""
    agents, type_, data = work
    with Client(nodes.addresses[0], timeout_s=30, **nodes.client(0)) as c, \
            Client(nodes.addresses[counted_on], timeout_s=30,
                   **nodes.client(counted_on)) as watcher:
        def handled() -> int:
            rows = watcher.status()["members"]
            return next(r for r in rows if r["node"] == f"b{counted_on}")["handled"]
        before = handled()
        started = time.perf_counter()
        for i in range(n):
            c.send(agents[i % len(agents)], type_, data)
        deadline = time.monotonic() + 120
        while handled() < before + n:
            if time.monotonic() > deadline:
                raise RuntimeError("one-way messages were not all handled")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    return n / elapsed


ROUND_TRIP_WARMUP = 200  # calls made before the round-trip samples


def synthesis_round_trip(address: str, agent: str, n: int, data: Any = None,
                         client: dict | None = None) -> tuple[list[float], float]:
    samples = []
    with Client(address, **(client or {})) as c:
        for i in range(n + ROUND_TRIP_WARMUP):
            t0 = time.perf_counter()
            c.call(agent, "ping", i if data is None else data)
            if i >= ROUND_TRIP_WARMUP:
                samples.append(time.perf_counter() - t0)
    return samples, n / sum(samples)


def owned_by(nodes: Nodes, owner_index: int, prefix: str, count: int = 1) -> list[str]:
    """``count`` echo agent ids whose owner is node ``owner_index`` (spawned there)."""
    found: list[str] = []
    with Client(nodes.addresses[0], **nodes.client()) as c:
        for i in range(100 * count):
            agent = f"echo/{prefix}-{i}"
            if c.spawn("echo", agent)["node"] == f"b{owner_index}":
                found.append(agent)
                if len(found) == count:
                    return found
    raise RuntimeError("no agent id found for that owner")


def synthesis_in_flight(address: str, n: int, concurrency: int, agents: list[str] | None = None,
                        data: Any = None, client: dict | None = None) -> float:
    """``concurrency`` coroutines sharing one AsyncClient, each making calls back to
    back: ``concurrency`` calls are in flight at any moment.  Coroutine k calls
    ``agents[k % len(agents)]`` (default: an echo agent of its own)."""
    agents = agents or [f"echo/if-{k}" for k in range(concurrency)]

    async def main() -> float:
        async with AsyncClient(address, timeout_s=60, **(client or {})) as c:
            async def worker(k: int) -> None:
                agent = agents[k % len(agents)]
                for i in range(n // concurrency):
                    sent = i if data is None else data
                    if await c.call(agent, "ping", sent) != sent:
                        raise RuntimeError("wrong reply")

            await asyncio.gather(*(c.call(agent, "ping") for agent in agents))
            started = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return (n // concurrency) * concurrency / (time.perf_counter() - started)
    return asyncio.run(main())


PATTERN_AGENTS = 1000  # echo agents the client-pattern rows spread their calls over
PATTERN_WORKERS = 256
PATTERN_SEMAPHORE = 256


async def _gather_pattern(c: AsyncClient, n: int) -> None:
    """What users write: every call handed to gather at once."""
    await asyncio.gather(*(c.call(f"echo/pat-{i % PATTERN_AGENTS}", "ping", i)
                           for i in range(n)))


async def _gather_semaphore_pattern(c: AsyncClient, n: int) -> None:
    """gather with a semaphore bounding the calls in flight (a task per call, by design)."""
    limit = asyncio.Semaphore(PATTERN_SEMAPHORE)

    async def one(i: int) -> Any:
        async with limit:
            return await c.call(f"echo/pat-{i % PATTERN_AGENTS}", "ping", i)
    await asyncio.gather(*(one(i) for i in range(n)))


async def _worker_pattern(c: AsyncClient, n: int) -> None:
    """PATTERN_WORKERS coroutines each awaiting their share of the calls in a loop."""
    async def worker(k: int) -> None:
        for i in range(k, n, PATTERN_WORKERS):
            await c.call(f"echo/pat-{i % PATTERN_AGENTS}", "ping", i)
    await asyncio.gather(*(worker(k) for k in range(PATTERN_WORKERS)))


# name -> (pattern, AsyncClient options)
CLIENT_PATTERNS = {
    "gather": (_gather_pattern, {}),
    f"gather, semaphore {PATTERN_SEMAPHORE}": (_gather_semaphore_pattern, {}),
    # The client's own bound does a semaphore's job without a task per call.
    f"gather, in_flight_max {PATTERN_SEMAPHORE}": (_gather_pattern,
                                                   {"in_flight_max": PATTERN_SEMAPHORE}),
    f"{PATTERN_WORKERS} workers": (_worker_pattern, {}),
}


def client_patterns(address: str, n: int, trials: int) -> dict[str, float]:
    """calls/s of each way of writing n `echo` calls, best of ``trials``.

    The patterns take turns within each trial, so a noisy neighbour slows them alike.
    """
    async def timed(pattern, options: dict) -> float:
        async with AsyncClient(address, timeout_s=60, **options) as c:
            started = time.perf_counter()
            await pattern(c, n)
            return n / (time.perf_counter() - started)

    async def main() -> dict[str, float]:
        async with AsyncClient(address, timeout_s=60) as c:  # activate the agents first
            await asyncio.gather(*(c.call(f"echo/pat-{i}", "ping")
                                   for i in range(PATTERN_AGENTS)))
        best = dict.fromkeys(CLIENT_PATTERNS, 0.0)
        for _ in range(trials):
            for name, (pattern, options) in CLIENT_PATTERNS.items():
                best[name] = max(best[name], await timed(pattern, options))
        return best
    return asyncio.run(main())


def pattern_rows(rates: dict[str, float], n: int) -> list[tuple[str, str, str, str]]:
    """Rows for the client patterns, each as a ratio to the worker pattern."""
    baseline = f"{PATTERN_WORKERS} workers"
    workers = rates[baseline]
    rows = []
    semaphore = f"gather, semaphore {PATTERN_SEMAPHORE}"
    for name, rate in rates.items():
        if name == baseline:
            target = "baseline"
        elif name == semaphore:  # the user's coroutine per call costs a task, client or not
            target = "- (asyncio task per call)"
        else:
            target = ">= 0.95"
        rows.append((f"AsyncClient {n:,} calls, {name}", f"{rate:,.0f} calls/s",
                     f"{rate / workers:.2f} vs workers", target))
    return rows


def idle_agent_bytes(nodes: Nodes, count: int) -> float:
    async def activate() -> None:
        async with AsyncClient(nodes.addresses[0], timeout_s=60) as c:
            for start in range(0, count, 5000):
                await asyncio.gather(*(c.call(f"counter/idle-{i}", "get")
                                       for i in range(start, min(count, start + 5000))))
    asyncio.run(activate())  # warm up allocator pools with a first batch
    before = nodes.rss()
    async def more() -> None:
        async with AsyncClient(nodes.addresses[0], timeout_s=60) as c:
            for start in range(count, 2 * count, 5000):
                await asyncio.gather(*(c.call(f"counter/idle-{i}", "get")
                                       for i in range(start, min(2 * count, start + 5000))))
    asyncio.run(more())
    return (nodes.rss() - before) / count


# ---------------------------------------------------------------------------- report


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--only", choices=("all", "patterns", "membership", "membership-sim",
                                           "replication", "curve", "transports", "routing"),
                        default="all",
                        help="'patterns': only the client-pattern rows, against one node; "
                             "'membership': only the membership rows (processes and "
                             "simulator); 'membership-sim': only the simulator's; "
                             "'replication': only the replication rows; 'curve': only "
                             "the CURVE off/on rows; 'transports', 'routing': only "
                             "those (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, metavar="R",
                        help="repetitions of each membership, failover and CURVE "
                             "measurement (default: 5)")
    parser.add_argument("--large", action="store_true",
                        help="simulate membership at n = 500 and 1000 too (about a minute)")
    args = parser.parse_args()
    n_patterns = 20_000 if args.quick else 100_000
    n_oneway = 20_000 if args.quick else 200_000
    n_rtt = 2_000 if args.quick else 10_000
    n_flight = 20_000 if args.quick else 100_000
    n_idle = 20_000 if args.quick else 100_000

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}")
    if args.only.startswith("membership"):
        bench_membership.main(args.repeat, args.large, processes=args.only == "membership")
        return
    if args.only == "replication":
        bench_replication.main(args.repeat, args.quick)
        return
    if args.only == "curve":
        import bench_curve  # it imports this module: not at the top
        bench_curve.main(args.repeat, args.quick)
        return
    if args.only in ("transports", "routing"):
        bench_more(args, args.only)
        return
    if args.only == "patterns":
        one = Nodes(1)
        try:
            print_rows(pattern_rows(client_patterns(one.addresses[0], n_patterns, TRIALS),
                                    n_patterns))
        finally:
            one.close()
        return
    # Throughput rows are the best of TRIALS runs, baseline and Synthesis alike:
    # this machine is shared and noisy, and the best run is the least disturbed.
    raw_ow = max(raw_one_way(n_oneway) for _ in range(TRIALS))
    raw_rtt, _ = raw_round_trip(n_rtt)
    raw_pipe = max(raw_pipelined(n_flight, 1000) for _ in range(TRIALS))

    rows = [("raw pyzmq one-way (msgpack decode)", f"{raw_ow:,.0f} msg/s", "1.00", "baseline")]
    one = Nodes(1)
    try:
        ow = max(synthesis_one_way(one, n_oneway) for _ in range(TRIALS))
        rows.append(("synthesis one-way to agents, 1 node", f"{ow:,.0f} msg/s", f"{ow / raw_ow:.2f}",
                     ">= 0.40"))
        rtt, _ = synthesis_round_trip(one.addresses[0], "echo/rtt", n_rtt)
        flight = max(synthesis_in_flight(one.addresses[0], n_flight, 1000) for _ in range(TRIALS))
        patterns = client_patterns(one.addresses[0], n_patterns, TRIALS)
        idle = idle_agent_bytes(one, n_idle)
    finally:
        one.close()
    two = Nodes(2)
    try:
        remote, = owned_by(two, 1, "fwd")
        fwd, _ = synthesis_round_trip(two.addresses[0], remote, n_rtt)
    finally:
        two.close()

    raw50, raw99 = pct(raw_rtt, 0.5), pct(raw_rtt, 0.99)
    rows += [
        ("raw pyzmq round trip p50 / p99", f"{us(raw50)} / {us(raw99)}", "1.00", "baseline"),
        ("synthesis call p50 / p99, 1 node", f"{us(pct(rtt, .5))} / {us(pct(rtt, .99))}",
         f"{pct(rtt, .5) / raw50:.2f} / {pct(rtt, .99) / raw99:.2f}", "p50 <= 2.0x, p99 < 1 ms"),
        ("synthesis call p50 / p99, 1 hop", f"{us(pct(fwd, .5))} / {us(pct(fwd, .99))}",
         f"{pct(fwd, .5) / raw50:.2f} / {pct(fwd, .99) / raw99:.2f}", "p99 < 2 ms"),
        ("raw pyzmq round trips/s, 1000 in flight", f"{raw_pipe:,.0f} calls/s", "1.00", "baseline"),
        ("synthesis AsyncClient, 1000 in flight", f"{flight:,.0f} calls/s",
         f"{flight / raw_pipe:.2f}", ">= 60,000/s"),
        *pattern_rows(patterns, n_patterns),
        (f"memory per idle agent ({n_idle:,} agents)", f"{idle:,.0f} bytes", "-", "<= 1,024 B"),
    ]
    print_rows(rows)
    print()
    bench_membership.main(args.repeat, args.large)
    print()
    bench_replication.main(args.repeat, args.quick)
    print()
    import bench_curve
    bench_curve.main(args.repeat, args.quick)
    for name in ("transports", "routing"):
        print()
        bench_more(args, name)


def bench_more(args: argparse.Namespace, name: str) -> None:
    """The transports or routing table (their scripts import this module, so they
    are imported here, not at the top; the routing one is also the nodes' behavior
    module)."""
    if name == "transports":
        import bench_transports
        print_rows(bench_transports.run(args), header=bench_transports.HEADER)
    else:
        import bench_routing
        print_rows(bench_routing.run(args), bench_routing.COLUMNS)


def print_rows(rows: list[tuple[str, ...]],
               header: tuple[str, ...] = ("measure", "result", "ratio (vs raw unless said)",
                                          "target")) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
