"""Real node processes for tests: free loopback ports, bounded waits, sure cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    """One ``synthesis-node`` process on loopback ports of its own."""

    def __init__(self, name: str, log_dir: Path, seeds: tuple[str, ...] = (),
                 args: tuple[str, ...] = (), metrics: bool = False,
                 env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port() if metrics else None
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "node.cli", "--node-id", name, "--listen", self.address,
               "--pub", f"127.0.0.1:{free_port()}",
               "--metrics", f"127.0.0.1:{self.metrics_port}" if metrics else "off",
               # A generous status deadline: a member stalled on a busy machine
               # would otherwise show up as unreachable, without its counts.
               "--gossip-interval-s", "0.2", "--status-timeout-s", "3.0",
               "--behavior", "synthesis_test_behaviors", *args]
        for seed in seeds:
            cmd += ["--seed", seed]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env(**(env or {})), cwd=str(REPO))

    def client(self, timeout_s: float = 5.0) -> Client:
        return Client(self.address, timeout_s=timeout_s)

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
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
    """N nodes, the first one the seed of the others."""

    def __init__(self, size: int, log_dir: Path, args: tuple[str, ...] = (),
                 metrics: bool = False):
        self.nodes: list[NodeProcess] = []
        try:
            first = NodeProcess("n0", log_dir, args=args, metrics=metrics)
            self.nodes.append(first)
            for i in range(1, size):
                self.nodes.append(NodeProcess(f"n{i}", log_dir, seeds=(first.address,),
                                              args=args, metrics=metrics))
            for node in self.nodes:
                node.wait_serving()
            self.wait_converged()
        except BaseException:
            self.close()
            raise

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
