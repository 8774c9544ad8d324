"""Real node processes for tests: free loopback ports, bounded waits, sure cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from node.client import CallTimeout, Client

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class NodeProcess:
    """One ``synthesis-node`` process on loopback ports of its own.

    The node binds port 0 for its ROUTER, PUB and metrics server and reports the
    ports it got in a ready file, so no other process can take a port between
    choosing it and binding it.  ``address``, ``port`` and ``metrics_port`` come
    from that file: reading one waits until the node has written it.
    """

    def __init__(self, name: str, log_dir: Path, seeds: tuple[str, ...] = (),
                 args: tuple[str, ...] = (), metrics: bool = False,
                 env: dict[str, str] | None = None,
                 client_curve: tuple[str, str] | None = None):
        self.name = name
        # (secret certificate, the node's public one) for clients of a CURVE node
        self.client_curve = client_curve
        self.log_path = log_dir / f"{name}.log"
        self.ready_path = log_dir / f"{name}.ready.json"
        self._ready: dict | None = None
        self._metrics = metrics
        cmd = [sys.executable, "-m", "node.cli", "--node-id", name,
               "--listen", "127.0.0.1:0", "--pub", "127.0.0.1:0",
               "--metrics", "127.0.0.1:0" if metrics else "off",
               "--ready-file", str(self.ready_path),
               # A generous status deadline: a member stalled on a busy machine
               # would otherwise show up as unreachable, without its counts.
               "--gossip-interval-s", "0.2", "--status-timeout-s", "3.0",
               "--behavior", "synthesis_test_behaviors", *args]
        for seed in seeds:
            cmd += ["--seed", seed]
        self.ready_path.unlink(missing_ok=True)   # a restarted name must not read the old one
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env(**(env or {})), cwd=str(REPO))

    @property
    def address(self) -> str:
        """HOST:PORT of the node's ROUTER, as it reported it."""
        return self.wait_ready()["address"].removeprefix("tcp://")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def metrics_port(self) -> int | None:
        if not self._metrics:
            return None
        return int(self.wait_ready()["metrics"].rpartition(":")[2])

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        """The node's ready file, once it has written it (it then serves)."""
        if self._ready is not None:
            return self._ready
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_path.exists():   # written atomically: whole when it exists
                self._ready = json.loads(self.ready_path.read_text())
                return self._ready
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} wrote no ready file within {timeout_s}s:\n{self.log()}")

    def client(self, timeout_s: float = 5.0) -> Client:
        secret, server = self.client_curve or (None, None)
        return Client(self.address, timeout_s=timeout_s, curve_secret=secret,
                      curve_server=server)

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the ready file is written and the node answers a ping."""
        deadline = time.monotonic() + timeout_s
        self.wait_ready(timeout_s)
        with self.client(timeout_s=0.5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
                try:
                    c.ping(timeout_s=0.3)
                    return
                except CallTimeout:
                    pass
        raise TimeoutError(f"{self.name} did not serve within {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


class Cluster:
    """N nodes, the first one the seed of the others.

    ``node_args(name)`` gives extra flags for one node (after ``args``), e.g. its own
    ``--faults-file``; ``add`` starts one more node later, seeded like the others.
    """

    def __init__(self, size: int, log_dir: Path, args: tuple[str, ...] = (),
                 metrics: bool = False,
                 node_args: Callable[[str], tuple[str, ...]] | None = None):
        self.nodes: list[NodeProcess] = []
        self._log_dir = log_dir
        self._args = args
        self._metrics = metrics
        self._node_args = node_args or (lambda name: ())
        try:
            first = self._start("n0", seeds=())
            first.wait_serving()   # its address, the others' seed, is known once it serves
            for i in range(1, size):
                self._start(f"n{i}", seeds=(first.address,))
            for node in self.nodes:
                node.wait_serving()
            self.wait_converged()
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, seeds: tuple[str, ...]) -> NodeProcess:
        node = NodeProcess(name, self._log_dir, seeds=seeds,
                           args=(*self._args, *self._node_args(name)), metrics=self._metrics)
        self.nodes.append(node)
        return node

    def add(self, name: str) -> NodeProcess:
        """Start one more node seeded with the first; it is killed by ``close``.
        Returns once it serves (not once the others know it)."""
        node = self._start(name, seeds=(self.nodes[0].address,))
        node.wait_serving()
        return node

    def restart(self, index: int) -> NodeProcess:
        """Stop node ``index`` (SIGTERM: it leaves and hands its agents off) and start
        it again under its name (a new generation), seeded by another node; returns
        once it serves and the cluster has converged again."""
        old = self.nodes[index]
        old.stop()
        seed = next(n for n in self.nodes if n is not old)
        node = NodeProcess(old.name, self._log_dir, seeds=(seed.address,),
                           args=(*self._args, *self._node_args(old.name)),
                           metrics=self._metrics)
        self.nodes[index] = node
        node.wait_serving()
        self.wait_converged()
        return node

    def wait_converged(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node's status lists every node as a reachable member."""
        names = {n.name for n in self.nodes}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._sees_all(node, names) for node in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("cluster did not converge:\n" +
                           "\n".join(n.log() for n in self.nodes))

    @staticmethod
    def _sees_all(node: NodeProcess, names: set[str]) -> bool:
        with node.client(timeout_s=2.0) as c:
            try:
                members = c.status()["members"]
            except CallTimeout:
                return False
        return {m["node"] for m in members if m.get("reachable")} == names

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "",
               poll_s: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail
    naming ``what`` at the deadline.  Tests wait on the condition they need, never
    on a fixed sleep that only usually suffices."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or condition}")
        time.sleep(poll_s)


async def wait_until_async(condition: Callable[[], Awaitable[Any]], timeout_s: float = 10.0,
                           what: str = "", poll_s: float = 0.02) -> Any:
    """``wait_until`` for a condition that must be awaited (an AsyncClient call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or condition}")
        await asyncio.sleep(poll_s)


def agent_states(status: dict) -> dict[str, int]:
    """Agents by lifecycle state on the node that answered ``status`` (a lone node)."""
    return status["members"][0]["agents_by_state"]


def member_view(node: NodeProcess, timeout_s: float = 1.0) -> dict | None:
    """The node's ``members`` reply (``{"node", "quorate", "members": [...]}``), or
    None when it does not answer in time (stopped, killed, overloaded)."""
    try:
        with node.client(timeout_s=timeout_s) as c:
            return c.members()
    except CallTimeout:
        return None


def member_states(view: dict | None) -> dict[str, str]:
    """node_id -> state in a ``members`` reply ({} for no reply)."""
    return {} if view is None else {m["node_id"]: m["state"] for m in view["members"]}


def metric_samples(node: NodeProcess) -> dict[tuple[str, tuple], float]:
    """Every sample the node's /metrics serves, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics",
                                timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
