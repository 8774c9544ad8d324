#!/usr/bin/env python3
"""Transport benchmark: ZeroMQ, QUIC and HTTP/2 side by side, measured in one run.

Three 2-node clusters run at once, alike but for how the entry node n0 forwards to
its peer n1: over ZeroMQ (plain nodes), over QUIC (``--quic`` with certificates from
``synthesis-ctl certs``, ``--transport-order quic,zmq``) and over HTTP/2 (h2c,
``--http2``, ``--transport-order http2,zmq``).  Every row is measured ``--repeat``
times (at least 3), the transports taking turns within each repeat so a noisy
neighbour disturbs them alike; the table shows the median and the min-max spread,
and the ratio to the section's baseline row (ratios above 1 are slower for
latencies, faster for rates).

  forward hop   the ZeroMQ AsyncClient calls echo agents owned by n1 through n0
                (client -> n0 -> n1 -> n0 -> client): p50/p99 of sequential calls,
                and calls/s with 100 calls in flight; baseline: n0 -> n1 over zmq
  HTTP/2 in     h2load (nghttp2-client) with one connection and 100 concurrent
                streams POSTing JSON to a counter agent owned by n0 of the HTTP/2
                cluster (``POST /v1/agents/counter%2Fbench-K/messages/incr``): its
                req/s and mean request time, beside the ZeroMQ AsyncClient with 100
                in flight against the same agent on the same node (the baseline)
  QUIC in       AsyncQuicClient with 100 in flight against a counter agent owned by
                n0 of the QUIC cluster, beside the ZeroMQ AsyncClient (the baseline)

Beside the rates, the CPU time per call of the client and of each node (user +
system, from the kernel's counters) and how idle the machine was: unlike the rates
they hardly move when a neighbour takes the cores, so they are the steadier measure
of what a bridge costs.  Each forward row also checks, from n0's metrics and status,
that its forwards went over the transport it names and none fell back.  The nodes
detect failures slowly (LENIENT_MEMBERSHIP), see there why.

``--profile DIR`` then samples the entry n0 and the owner n1 with py-spy while 100
forwarded calls are in flight over each transport and prints where their time goes
(the collapsed stacks stay in DIR).  ``--logs DIR`` keeps the nodes' logs.

Run it under ``nice``: the client, the nodes and h2load share the machine's cores.
Usage: scripts/bench_transports.py [--repeat R] [--quick] [--profile DIR] [--logs DIR]
Called by scripts/bench.py (``--only transports``, and in the full run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import REPO, pct, print_rows, us
from node.client import AsyncClient, Client
from node.quic_client import AsyncQuicClient

TRANSPORTS = ("zmq", "quic", "http2")
WINDOW = 100                 # calls in flight in the throughput rows
SEQUENTIAL_CALLS = 500       # per repeat, after WARMUP calls
WARMUP = 50
FORWARD_AGENTS = 8           # echo agents owned by n1 the forward rows spread over
# Membership probes ride the bridge a peer is reached by, queued behind the load: on
# a saturated machine their acks come late, a 2-node pair declares its peer dead and
# refuses every call as the minority side.  Slower failure detection keeps the rows
# measuring the transports.
LENIENT_MEMBERSHIP = ("--probe-interval-s", "1", "--probe-timeout-s", "1",
                      "--suspicion-mult", "10")
CPU_NAMES = ("client", "n0", "n1")
HEADER = ("measure", "median", "min-max", "ratio")
Row = tuple[str, str, str, str]


# ---------------------------------------------------------------------------- clusters


class Node:
    """One synthesis-node process on port 0; its ports come from its ready file."""

    def __init__(self, name: str, root: Path, args: tuple[str, ...], seed: str | None):
        self.name = name
        ready = root / f"{name}.ready.json"
        cmd = [sys.executable, "-m", "node.cli", "--node-id", name, "--listen", "127.0.0.1:0",
               "--pub", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--ready-file", str(ready),
               "--log-level", "warning", "--gossip-interval-s", "0.2", *LENIENT_MEMBERSHIP,
               *args,
               *(("--seed", seed) if seed else ())]
        self.log = open(root / f"{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
        self.ready = self._wait_ready(ready)
        self.address = self.ready["address"].removeprefix("tcp://")

    def _wait_ready(self, path: Path) -> dict:
        deadline = time.monotonic() + 20
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.log.name}")
            time.sleep(0.02)
        return json.loads(path.read_text())

    def counter(self, name: str, transport: str) -> float:
        """n0's ``synthesis_transport_<name>_total`` for ``transport`` (0 if none yet)."""
        with urllib.request.urlopen(f"http://{self.ready['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == f"synthesis_transport_{name}_total"
                        and sample.labels.get("transport") == transport):
                    return sample.value
        return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def transport_args(transport: str, certs: Path, name: str) -> tuple[str, ...]:
    """The flags that make a node forward over ``transport`` (ZeroMQ: none)."""
    if transport == "quic":
        return ("--quic", "127.0.0.1:0", "--tls-cert", str(certs / f"{name}.pem"),
                "--tls-key", str(certs / f"{name}.key"), "--tls-ca", str(certs / "ca.pem"),
                "--transport-order", "quic,zmq")
    if transport == "http2":
        return ("--http2", "127.0.0.1:0", "--transport-order", "http2,zmq")
    return ()


class Pair:
    """Nodes n0 (the entry, the seed) and n1 (the owner) forwarding over ``transport``."""

    def __init__(self, transport: str, root: Path, certs: Path):
        self.transport = transport
        self.nodes: list[Node] = []
        directory = root / transport
        directory.mkdir(exist_ok=True)
        try:
            for name in ("n0", "n1"):
                seed = self.nodes[0].address if self.nodes else None
                self.nodes.append(Node(name, directory, transport_args(transport, certs, name),
                                       seed))
            self._wait_converged()
        except BaseException:
            self.close()
            raise
        self.entry, self.owner = self.nodes

    def _wait_converged(self) -> None:
        """Until n0 sees n1 alive with every endpoint it advertises (the bridge's too)."""
        wanted = {"zmq"} | ({self.transport} - {"zmq"})
        deadline = time.monotonic() + 20
        with Client(self.nodes[0].address, timeout_s=1) as c:
            while time.monotonic() < deadline:
                rows = c.members()["members"]
                if sum(1 for r in rows if r["state"] == "alive"
                       and wanted <= set(r.get("endpoints") or {})) == 2:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"the {self.transport} pair did not converge")

    def endpoint(self, transport: str) -> str:
        """n0's own advertised endpoint for ``transport``."""
        with Client(self.entry.address) as c:
            row = next(r for r in c.members()["members"] if r["node_id"] == "n0")
        return row["endpoints"][transport]

    def owned(self, behavior: str, prefix: str, owner: str, count: int) -> list[str]:
        """``count`` agents of ``behavior`` whose owner is ``owner``, spawned."""
        found: list[str] = []
        with Client(self.entry.address) as c:
            for i in range(200 * count):
                agent = f"{behavior}/{prefix}-{i}"
                if c.spawn(behavior, agent)["node"] == owner:
                    found.append(agent)
                    if len(found) == count:
                        return found
        raise RuntimeError(f"no {behavior} agent owned by {owner}")

    def received(self) -> int:
        """Requests n0 has received from clients and peers (this one included)."""
        with Client(self.entry.address) as c:
            return next(r for r in c.status()["members"] if r["node"] == "n0")["received"]

    def forwarded_over(self, transport: str) -> tuple[float, float]:
        """n0's count of messages forwarded over ``transport`` and of fallbacks to
        ZeroMQ so far (a node with ZeroMQ alone counts forwards in its status)."""
        if transport == "zmq":
            with Client(self.entry.address) as c:
                row = next(r for r in c.status()["members"] if r["node"] == "n0")
            return row["forwarded"], 0.0
        return self.entry.counter("messages", transport), self.entry.counter("fallbacks", "zmq")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


# ---------------------------------------------------------------------------- measures


Call = Callable[[str, str, Any], Awaitable[Any]]


async def sequential(call: Call, agent: str, n: int) -> list[float]:
    """Latencies of ``n`` calls made one at a time (after WARMUP unmeasured ones)."""
    samples = []
    for i in range(WARMUP + n):
        t0 = time.perf_counter()
        await call(agent, "ping", i)
        if i >= WARMUP:
            samples.append(time.perf_counter() - t0)
    return samples


async def in_flight(call: Call, agents: list[str], type_: str, data: Any,
                    seconds: float) -> tuple[float, list[float]]:
    """WINDOW workers calling back to back for ``seconds``: (calls/s, latencies)."""
    latencies: list[float] = []
    await asyncio.gather(*(call(a, type_, data) for a in agents))  # warm: agents, links
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        agent = agents[k % len(agents)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await call(agent, type_, data)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(WINDOW)))
    return len(latencies) / (time.perf_counter() - started), latencies


async def zmq_calls(address: str, measure: Callable[[Call], Awaitable[Any]]) -> Any:
    async with AsyncClient(address, timeout_s=30) as c:
        return await measure(c.call)


async def quic_calls(endpoint: str, certs: Path, measure: Callable[[Call], Awaitable[Any]]) -> Any:
    async with AsyncQuicClient(endpoint, str(certs / "ca.pem"), str(certs / "ops.pem"),
                               str(certs / "ops.key"), timeout_s=30) as c:
        return await measure(c.call)


def h2load(url: str, body: Path, seconds: float) -> tuple[float, float, float]:
    """h2load, one connection, WINDOW concurrent streams, for ``seconds``:
    (req/s, mean and sd of the request time in seconds)."""
    ran = subprocess.run(  # -D and --warm-up-time take whole seconds
        ["h2load", "-c", "1", "-m", str(WINDOW), "-D", str(max(1, round(seconds))),
         "--warm-up-time", "1", "-d", str(body), "-H", "content-type: application/json", url],
        capture_output=True, text=True, timeout=seconds + 30)
    out = ran.stdout + ran.stderr
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if not (counts and ok and 0 < int(counts[1]) == int(counts[2]) == int(ok[1])):
        raise RuntimeError(f"h2load failed or got errors:\n{out}")
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)[1])
    row = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return rate, _seconds(row[3]), _seconds(row[4])


def _seconds(text: str) -> float:
    """h2load's durations: ``850us``, ``12.3ms``, ``1.2s``."""
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


# ---------------------------------------------------------------------------- the run


class Trials:
    """Each named measure's value per repeat."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])

    def spread(self, key: str, show: Callable[[float], str]) -> str:
        return f"{show(min(self.values[key]))}-{show(max(self.values[key]))}"


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


class CpuMeter:
    """CPU time (user + system) a pair's nodes and the client use inside ``with``; the
    client is this process and the children it waited for (h2load)."""

    def __init__(self, pair: Pair):
        self.procs = {"client": psutil.Process(),
                      **{node.name: psutil.Process(node.proc.pid) for node in pair.nodes}}
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def _times(self) -> dict[str, float]:
        times = {name: sum(p.cpu_times()[:2]) for name, p in self.procs.items()}
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)  # h2load's, once it exited
        times["client"] += waited.ru_utime + waited.ru_stime
        return times

    def __enter__(self) -> "CpuMeter":
        self._before, self._started = self._times(), time.perf_counter()
        self._machine = psutil.cpu_times()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._started
        self.used = {name: t - self._before[name] for name, t in self._times().items()}
        machine = psutil.cpu_times()
        # The machine's idle share: near 0 means every core was busy (ours or not).
        self.idle = (machine.idle - self._machine.idle) / (sum(machine) - sum(self._machine))

    def busy(self) -> str:
        """``client 0.20, n0 0.95, n1 0.60``: cores each used, on average."""
        return ", ".join(f"{name} {used / self.wall:.2f}" for name, used in self.used.items())


def forward_repeat(pairs: dict[str, Pair], agents: dict[str, list[str]], trials: Trials,
                   seconds: float, n_sequential: int) -> None:
    """One repeat of the forward rows, each transport in turn."""
    for t, pair in pairs.items():
        before = pair.forwarded_over(t)

        async def measure(call: Call) -> tuple[list[float], float, int]:
            seq = await sequential(call, agents[t][0], n_sequential)
            with cpu:
                calls_s, latencies = await in_flight(call, agents[t], "ping", 1, seconds)
            return seq, calls_s, len(latencies)
        cpu = CpuMeter(pair)
        seq, calls_s, calls = asyncio.run(zmq_calls(pair.entry.address, measure))
        forwarded, fallbacks = (b - a for a, b in zip(before, pair.forwarded_over(t)))
        if forwarded < n_sequential or fallbacks:
            raise RuntimeError(f"forwards did not all go over {t}: {forwarded} did, "
                               f"{fallbacks} fell back")
        trials.add(f"fwd {t} p50", pct(seq, 0.5))
        trials.add(f"fwd {t} p99", pct(seq, 0.99))
        trials.add(f"fwd {t} rate", calls_s)
        for name, used in cpu.used.items():
            trials.add(f"fwd {t} cpu {name}", used / calls)
            trials.add(f"fwd {t} busy {name}", used / cpu.wall)
        trials.add(f"fwd {t} idle", cpu.idle)


def client_repeat(pairs: dict[str, Pair], targets: dict[str, str], certs: Path, body: Path,
                  trials: Trials, seconds: float) -> None:
    """One repeat of the HTTP/2 and QUIC client rows, each beside the ZeroMQ client's;
    ``targets``: the counter agent owned by n0 each bridge's client calls."""
    http2, quic = pairs["http2"], pairs["quic"]
    h2_agent, q_agent = targets["http2"], targets["quic"]
    url = http2.endpoint("http2") + "/v1/agents/" + h2_agent.replace("/", "%2F") + "/messages/incr"
    (h2_rate, h2_mean, h2_sd), cpu = entry_cpu(http2, lambda: h2load(url, body, seconds))
    for stat, value in (("rate", h2_rate), ("mean", h2_mean), ("sd", h2_sd)):
        trials.add(f"h2load {stat}", value)
    _record_cpu(trials, "h2load", cpu)
    _record_in_flight(trials, "h2 zmq", *entry_cpu(http2, lambda: asyncio.run(zmq_calls(
        http2.entry.address, _load(h2_agent, seconds)))))
    _record_in_flight(trials, "quic", *entry_cpu(quic, lambda: asyncio.run(quic_calls(
        quic.endpoint("quic"), certs, _load(q_agent, seconds)))))
    _record_in_flight(trials, "q zmq", *entry_cpu(quic, lambda: asyncio.run(zmq_calls(
        quic.entry.address, _load(q_agent, seconds)))))


def entry_cpu(pair: Pair, measure: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``measure()``'s result and the CPU time n0 and the client used per request n0
    received meanwhile."""
    before = pair.received()
    with CpuMeter(pair) as cpu:
        result = measure()
    requests = max(1, pair.received() - before)
    return result, {name: cpu.used[name] / requests for name in ("n0", "client")}


def _load(agent: str, seconds: float) -> Callable[[Call], Awaitable[tuple[float, list[float]]]]:
    """What the client rows measure: WINDOW calls in flight of ``incr`` to one counter."""
    return lambda call: in_flight(call, [agent], "incr", {"n": 1}, seconds)


def _record_in_flight(trials: Trials, key: str, result: tuple[float, list[float]],
                      cpu: dict[str, float]) -> None:
    calls_s, latencies = result
    trials.add(f"{key} rate", calls_s)
    trials.add(f"{key} p50", pct(latencies, 0.5))
    trials.add(f"{key} mean", statistics.fmean(latencies))
    _record_cpu(trials, key, cpu)


def _record_cpu(trials: Trials, key: str, cpu: dict[str, float]) -> None:
    for name, seconds in cpu.items():
        trials.add(f"{key} cpu {name}", seconds)


def ratio(trials: Trials, key: str, baseline: str) -> str:
    return f"{trials.median(key) / trials.median(baseline):.2f}"


def forward_rows(trials: Trials) -> list[Row]:
    rows: list[Row] = []
    for t in TRANSPORTS:
        p50, p99 = trials.median(f"fwd {t} p50"), trials.median(f"fwd {t} p99")
        rows += [
            (f"forward hop over {t}: call p50 / p99, sequential", f"{us(p50)} / {us(p99)}",
             f"p50 {trials.spread(f'fwd {t} p50', us)}",
             f"{ratio(trials, f'fwd {t} p50', 'fwd zmq p50')} / "
             f"{ratio(trials, f'fwd {t} p99', 'fwd zmq p99')}"),
            (f"forward hop over {t}: calls/s, {WINDOW} in flight",
             rate(trials.median(f"fwd {t} rate")), trials.spread(f"fwd {t} rate", rate),
             ratio(trials, f"fwd {t} rate", "fwd zmq rate")),
            (f"forward hop over {t}: CPU per call client / n0 / n1",
             " / ".join(us(trials.median(f"fwd {t} cpu {n}")) for n in CPU_NAMES),
             "cores busy " + " / ".join(f"{trials.median(f'fwd {t} busy {n}'):.2f}"
                                        for n in CPU_NAMES)
             + f", machine idle {trials.median(f'fwd {t} idle'):.0%}",
             ratio(trials, f"fwd {t} cpu n0", "fwd zmq cpu n0") + " (n0) / "
             + ratio(trials, f"fwd {t} cpu n1", "fwd zmq cpu n1") + " (n1)")]
    return rows


def client_rows(trials: Trials) -> list[Row]:
    def in_flight_rows(label: str, key: str, baseline: str) -> list[Row]:
        return [(f"{label}: calls/s, {WINDOW} in flight", rate(trials.median(f"{key} rate")),
                 trials.spread(f"{key} rate", rate), ratio(trials, f"{key} rate",
                                                           f"{baseline} rate")),
                (f"{label}: call p50 / mean under that load",
                 f"{us(trials.median(f'{key} p50'))} / {us(trials.median(f'{key} mean'))}",
                 f"p50 {trials.spread(f'{key} p50', us)}",
                 f"{ratio(trials, f'{key} p50', f'{baseline} p50')} / "
                 f"{ratio(trials, f'{key} mean', f'{baseline} mean')}"),
                cpu_row(label, key, baseline)]

    def cpu_row(label: str, key: str, baseline: str) -> Row:
        return (f"{label}: CPU per request n0 / client",
                f"{us(trials.median(f'{key} cpu n0'))} / {us(trials.median(f'{key} cpu client'))}",
                f"n0 {trials.spread(f'{key} cpu n0', us)}",
                f"{ratio(trials, f'{key} cpu n0', f'{baseline} cpu n0')} / "
                f"{ratio(trials, f'{key} cpu client', f'{baseline} cpu client')}")
    return [
        *in_flight_rows("HTTP/2 node, ZeroMQ AsyncClient (baseline)", "h2 zmq", "h2 zmq"),
        (f"HTTP/2 node, h2load -c 1 -m {WINDOW}: req/s", rate(trials.median("h2load rate")),
         trials.spread("h2load rate", rate), ratio(trials, "h2load rate", "h2 zmq rate")),
        ("HTTP/2 node, h2load: request time mean (sd)",
         f"{us(trials.median('h2load mean'))} ({us(trials.median('h2load sd'))})",
         trials.spread("h2load mean", us), ratio(trials, "h2load mean", "h2 zmq mean")),
        cpu_row("HTTP/2 node, h2load", "h2load", "h2 zmq"),
        *in_flight_rows("QUIC node, ZeroMQ AsyncClient (baseline)", "q zmq", "q zmq"),
        *in_flight_rows("QUIC node, AsyncQuicClient", "quic", "q zmq"),
    ]


def machine_row(when: str) -> Row:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine ({when})", f"{os.cpu_count()} cores, load {load}", "", "")


def run(args: Any) -> list[Row]:
    """Every row of the transport benchmark; ``args`` may carry ``repeat`` (>= 3 is
    used), ``quick`` and ``profile`` (a directory: profile the owner node too)."""
    repeat = max(3, getattr(args, "repeat", 3) or 3)
    quick = getattr(args, "quick", False)
    seconds, n_sequential = (1.0, 200) if quick else (2.0, SEQUENTIAL_CALLS)
    if not shutil.which("h2load"):
        raise RuntimeError("h2load not found: apt-get install -y nghttp2-client")
    rows = [machine_row("start")]
    trials = Trials()
    with workdir(getattr(args, "logs", None)) as root:
        certs = make_certs(root)
        body = root / "incr.json"
        body.write_text('{"n": 1}')
        pairs: dict[str, Pair] = {}
        try:
            for t in TRANSPORTS:
                pairs[t] = Pair(t, root, certs)
            agents = {t: p.owned("echo", "fwd", "n1", FORWARD_AGENTS) for t, p in pairs.items()}
            targets = {t: pairs[t].owned("counter", "bench", "n0", 1)[0] for t in ("http2", "quic")}
            for _ in range(repeat):
                forward_repeat(pairs, agents, trials, seconds, n_sequential)
                client_repeat(pairs, targets, certs, body, trials, seconds)
            profile_dir = getattr(args, "profile", None)
            if profile_dir:
                profile_forwards(pairs, agents, Path(profile_dir), seconds=8.0)
        finally:
            for pair in pairs.values():
                pair.close()
    return [*rows, *forward_rows(trials), *client_rows(trials), machine_row("end")]


@contextlib.contextmanager
def workdir(logs: str | None) -> Iterator[Path]:
    """Where the nodes' logs, ready files and certificates go: ``logs`` (kept), or a
    temporary directory."""
    if logs:
        Path(logs).mkdir(parents=True, exist_ok=True)
        yield Path(logs)
        return
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as tmp:
        yield Path(tmp)


def make_certs(root: Path) -> Path:
    from node.cli import ctl_main
    certs = root / "certs"
    with contextlib.redirect_stdout(io.StringIO()):  # it lists the files it wrote
        made = ctl_main(["certs", str(certs), "n0", "n1", "--client", "ops"])
    if made != 0:
        raise RuntimeError("synthesis-ctl certs failed")
    return certs


# ---------------------------------------------------------------------------- profile


def profile_forwards(pairs: dict[str, Pair], agents: dict[str, list[str]], out: Path,
                   seconds: float) -> None:
    """For each pair, 100 forwarded calls in flight for ``seconds`` while py-spy samples
    the entry n0 and the owner n1; prints the CPU each process used (the one near a
    whole core bounds the rate) and where the owner's and the entry's time goes.  The
    collapsed stacks are kept in ``out`` (``n1-<transport>.txt``, for flame graphs)."""
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    for t, pair in pairs.items():
        stacks = {node.name: out / f"{node.name}-{t}.txt" for node in pair.nodes}
        samplers = [subprocess.Popen(
            [str(spy), "record", "--pid", str(node.proc.pid), "--duration", str(int(seconds)),
             "--rate", "200", "--format", "raw", "--nonblocking", "-o", str(stacks[node.name])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for node in pair.nodes]
        with CpuMeter(pair) as cpu:
            calls_s, _ = asyncio.run(zmq_calls(pair.entry.address, lambda call: in_flight(
                call, agents[t], "ping", 1, seconds)))
        for sampler in samplers:
            sampler.wait(seconds + 30)
        print(f"\nforwards over {t} under py-spy: {calls_s:,.0f} calls/s; cores busy "
              f"{cpu.busy()}; machine idle {cpu.idle:.0%}")
        for name in ("n1", "n0"):
            print(f"  {name} ({'owner' if name == 'n1' else 'entry'}), {stacks[name]}:")
            print_profile(stacks[name])


def print_profile(stacks: Path, top: int = 8) -> None:
    """Share of the busy samples (those not waiting in the selector) per package of the
    innermost frame, and the functions with the most busy samples by themselves."""
    own, packages = Counter(), Counter()
    waiting = 0
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        leaf = frames.rsplit(";", 1)[-1]
        if ".select (selectors.py" in leaf:
            waiting += int(count)
            continue
        own[re.sub(r":-?\d+\)$", ")", leaf)] += int(count)  # per function, not per line
        packages[_package(leaf)] += int(count)
    busy = sum(own.values())
    if not busy:
        print("    no samples")
        return
    print(f"    {busy} busy samples ({waiting} more waiting in select, left out): "
          + ", ".join(f"{p} {n / busy:.0%}" for p, n in packages.most_common(7)))
    for frame, n in own.most_common(top):
        print(f"    {n / busy:5.1%}  {frame}")


def _package(frame: str) -> str:
    """``send (aioquic/quic/connection.py:123)`` -> ``aioquic``; this repo's node code
    by its module (``node/transports``, ``node/runtime.py``)."""
    match = re.search(r"\((.*?):-?\d+\)", frame)
    parts = Path(match[1] if match else frame).parts or ("?",)
    if parts[0] == "node" and len(parts) > 1:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, metavar="R",
                        help="repeats of every row, at least 3 (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="shorter rows, for a smoke run")
    parser.add_argument("--logs", metavar="DIR",
                        help="keep the nodes' logs in DIR (default: a temporary directory)")
    parser.add_argument("--profile", metavar="DIR",
                        help="afterwards, profile each owner node with py-spy into DIR")
    print_rows(run(parser.parse_args()), header=HEADER)


if __name__ == "__main__":
    main()
