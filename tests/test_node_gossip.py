"""Gossip broadcast on real processes (issue: every routing strategy): it reaches
every member on every node once, where PUB/SUB with a low high-water mark drops."""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest
import zmq

from support import Cluster, metric_samples

pytestmark = pytest.mark.timeout(120)
GROUP = "room"
MESSAGES = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # PUB's high-water mark of 1 message: a burst of multicasts drops at once.
    with_hwm = Cluster(3, tmp_path_factory.mktemp("gossip"), metrics=True,
                       args=("--pub-hwm", "1"))
    try:
        yield with_hwm
    finally:
        with_hwm.close()


def members(cluster, tag: str) -> list[str]:
    """Group members spread over every node (found by where spawn placed them)."""
    agents = [f"member/{tag}{i}" for i in range(12)]
    with cluster.nodes[0].client() as c:
        homes = {c.spawn("member", a, init={"group": f"{GROUP}-{tag}"})["node"] for a in agents}
    assert homes == {"n0", "n1", "n2"}, homes
    return agents


def burst(cluster, group: str, routing: str) -> None:
    """MESSAGES publishes as fast as one socket sends them, through n1."""
    with zmq.Context() as ctx:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(f"tcp://{cluster.nodes[1].address}")
        for i in range(MESSAGES):
            sock.send(msgpack.packb({"v": 1, "id": uuid.uuid4().hex, "type": "note",
                                     "subject": group, "mode": "publish",
                                     "routing": routing, "data": i}))
        sock.close()


def seen(cluster, agents: list[str]) -> dict[str, list]:
    with cluster.nodes[2].client() as c:
        return {a: c.call(a, "seen")["seen"] for a in agents}


def test_gossip_reaches_every_member_once_where_multicast_drops(cluster):
    gossiped, multicast = members(cluster, "g"), members(cluster, "m")
    time.sleep(0.5)  # SUB connections are asynchronous: let them come up
    burst(cluster, f"{GROUP}-m", "multicast")
    burst(cluster, f"{GROUP}-g", "gossip")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = seen(cluster, gossiped)
        if all(len(v) >= MESSAGES for v in got.values()):
            break
        time.sleep(0.2)
    for agent, values in got.items():
        assert sorted(values) == list(range(MESSAGES)), (agent, len(values))  # each once
    lost = sum(MESSAGES - len(v) for v in seen(cluster, multicast).values())
    assert lost > 0, "PUB/SUB at a high-water mark of 1 should have dropped some"
    samples = metric_samples(cluster.nodes[1])
    published = samples[("synthesis_gossip_events_total", (("event", "published"),))]
    assert published >= MESSAGES
