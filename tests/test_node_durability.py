"""Local durability (storage_path): a whole-cluster restart loses no acknowledged write.

Real node processes on loopback, each with its own SQLite file; the cluster is stopped
(SIGTERM) or killed (SIGKILL, mid-load) as a whole, started again on the same files,
and every counter must hold at least the increments it acknowledged.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from protocols import wire
from tests.support import Cluster

pytestmark = pytest.mark.timeout(180)

COUNTERS = 120
LOAD_S = 2.0
IN_FLIGHT_MAX = 200


def storage_args(root: Path, sync: str):
    return lambda name: ("--storage-path", str(root / f"{name}.db"), "--storage-sync", sync)


def load(cluster: Cluster, seconds: float) -> tuple[dict[str, int], dict[str, int]]:
    """Pipelined increments through every node for ``seconds``: (sent, acked) per counter."""
    ctx = zmq.Context.instance()
    socks = []
    for node in cluster.nodes:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{node.address}")
        socks.append(sock)
    sent: dict[str, int] = {}
    acked: dict[str, int] = {}
    pending: dict[str, str] = {}
    rng = random.Random(7)

    def read(timeout_ms: int) -> None:
        for sock in socks:
            while sock.poll(timeout_ms):
                reply = msgpack.unpackb(sock.recv(), raw=False)
                agent = pending.pop(reply.get("re"), None)
                if agent is not None and reply["type"] == wire.TYPE_REPLY:
                    acked[agent] = acked.get(agent, 0) + 1
                timeout_ms = 0

    try:
        n, until = 0, time.monotonic() + seconds
        while time.monotonic() < until:
            agent = f"counter/d{rng.randrange(COUNTERS)}"
            rid = f"w{n}"
            socks[n % len(socks)].send(wire.encode(wire.request(rid, "incr", agent, {"n": 1})))
            sent[agent] = sent.get(agent, 0) + 1
            pending[rid] = agent
            n += 1
            read(5 if len(pending) >= IN_FLIGHT_MAX else 0)
        return sent, acked
    finally:
        for sock in socks:
            sock.close(0)


def restarted(tmp_path: Path, name: str, sync: str) -> Cluster:
    log_dir = tmp_path / name
    log_dir.mkdir()
    cluster = Cluster(3, log_dir, node_args=storage_args(tmp_path, sync))
    cluster.wait_converged()
    return cluster


def assert_nothing_lost(cluster: Cluster, sent: dict[str, int], acked: dict[str, int]) -> None:
    with cluster.nodes[0].client(timeout_s=10.0) as c:
        for k in range(COUNTERS):
            agent = f"counter/d{k}"
            value = c.call(agent, "get")["value"]
            assert acked.get(agent, 0) <= value <= sent.get(agent, 0), agent


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_kill_9_of_every_node_mid_load_loses_no_acknowledged_write(tmp_path, sync):
    first = Cluster(3, tmp_path, node_args=storage_args(tmp_path, sync))
    try:
        first.wait_converged()
        sent, acked = load(first, LOAD_S)
        for node in first.nodes:
            node.kill()
    finally:
        first.close()
    assert sum(acked.values()) > 100
    again = restarted(tmp_path, "again", sync)
    try:
        assert_nothing_lost(again, sent, acked)
    finally:
        again.close()


def test_a_stopped_cluster_starts_again_with_every_write(tmp_path):
    first = Cluster(3, tmp_path, node_args=storage_args(tmp_path, "full"))
    try:
        first.wait_converged()
        sent, acked = load(first, 1.0)
        for node in first.nodes:
            node.signal(15)
        for node in first.nodes:
            node.proc.wait(timeout=30)
    finally:
        first.close()
    again = restarted(tmp_path, "again", "full")
    try:
        assert_nothing_lost(again, sent, acked)
        with again.nodes[1].client() as c:  # the agents are there to serve, not only read
            before = c.call("counter/d0", "get")["value"]
            assert before >= 1 and c.call("counter/d0", "incr")["value"] == before + 1
    finally:
        again.close()


def test_a_storage_file_that_is_not_ours_stops_the_node_with_a_clear_error(tmp_path):
    bad = tmp_path / "n0.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(RuntimeError) as info:
        Cluster(1, tmp_path, node_args=storage_args(tmp_path, "full")).wait_converged()
    assert "storage_open_failed" in str(info.value)
