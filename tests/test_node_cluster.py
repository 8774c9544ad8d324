"""Three real node processes: routing from any entry node, one owner per agent, multicast."""

from __future__ import annotations

import time

import pytest

from node.client import Client

pytestmark = pytest.mark.timeout(90)


def _agents_per_node(cluster) -> dict[str, int]:
    with cluster.nodes[0].client() as c:
        return {m["node"]: m["agents"] for m in c.status()["members"]}


def test_calls_through_one_node_reach_owners_on_every_node(cluster3):
    entry = cluster3.nodes[1]
    before = _agents_per_node(cluster3)
    with entry.client() as c:
        for i in range(60):
            assert c.call(f"counter/route-{i}", "incr", {"n": i}) == {"value": i}
        for i in range(60):
            assert c.call(f"counter/route-{i}", "get") == {"value": i}
    after = _agents_per_node(cluster3)
    gained = {node: after[node] - before.get(node, 0) for node in after}
    assert sum(gained.values()) == 60
    assert all(count > 0 for count in gained.values()), gained  # owners on all three


def test_same_agent_from_every_entry_node_is_one_agent(cluster3):
    for i, node in enumerate(cluster3.nodes):
        with node.client() as c:
            assert c.call("counter/shared", "incr", {"n": 10}) == {"value": 10 * (i + 1)}
    for node in cluster3.nodes:
        with node.client() as c:
            assert c.call("counter/shared", "get") == {"value": 30}
            assert c.call("kv/shared", "put", {"key": f"from-{node.name}", "value": 1}) == {"ok": True}
    with cluster3.nodes[2].client() as c:
        assert c.call("kv/shared", "keys") == {"keys": ["from-n0", "from-n1", "from-n2"]}


def test_spawn_and_stop_route_to_the_owner(cluster3):
    with cluster3.nodes[0].client() as c:
        spawned = c.spawn("counter", "plain-id-without-behavior", init={"value": 41})
        assert spawned["agent"] == "plain-id-without-behavior"
    with cluster3.nodes[2].client() as c:
        assert c.call("plain-id-without-behavior", "incr") == {"value": 42}
        assert c.stop("plain-id-without-behavior")["stopped"] is True
        with pytest.raises(Exception) as err:
            c.call("plain-id-without-behavior", "get")
        assert err.value.code == "unknown_agent"


def test_status_lists_every_node_with_counts(cluster3):
    with cluster3.nodes[2].client() as c:
        before = {m["node"]: m for m in c.status()["members"]}
        owner = c.spawn("counter", "status-probe")["node"]
        c.call("status-probe", "incr")
        status = c.status()
    assert status["node"] == "n2"
    rows = {m["node"]: m for m in status["members"]}
    assert set(rows) == {"n0", "n1", "n2"}
    for name, row in rows.items():
        assert row["reachable"] is True
        assert row["members"] == 3
        # The spawn added one agent on its owner and none elsewhere.
        assert row["agents"] == before[name]["agents"] + (name == owner), name
    # The owner received at least the spawn and the call (forwarded ones included).
    assert rows[owner]["received"] >= before[owner]["received"] + 2


def test_multicast_reaches_group_members_on_every_node(cluster3):
    group = "room-1"
    agents = [f"member/m{i}" for i in range(24)]
    with cluster3.nodes[0].client() as c:
        owners = {c.spawn("member", a, init={"group": group})["node"] for a in agents}
    assert owners == {"n0", "n1", "n2"}, owners  # members live on every node
    # A SUB socket connects asynchronously: publish a probe until every node
    # delivers, then count exact deliveries of numbered notes.
    deadline = time.monotonic() + 10
    with cluster3.nodes[1].client() as pub, cluster3.nodes[2].client() as reader:
        while time.monotonic() < deadline:
            pub.publish(group, "note", "probe")
            time.sleep(0.1)
            if all("probe" in reader.call(a, "seen")["seen"] for a in agents):
                break
        else:
            pytest.fail("multicast probe never reached every member")
        for n in range(20):
            pub.publish(group, "note", n)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = {a: [x for x in reader.call(a, "seen")["seen"] if x != "probe"] for a in agents}
            if all(v == list(range(20)) for v in seen.values()):
                break
            time.sleep(0.1)
        assert all(v == list(range(20)) for v in seen.values()), seen


def test_metrics_and_health_endpoints_serve(cluster3):
    import urllib.request
    node = cluster3.nodes[0]
    with node.client() as c:
        c.call("counter/metrics-probe", "incr")
    base = f"http://127.0.0.1:{node.metrics_port}"
    with urllib.request.urlopen(base + "/health", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "synthesis_messages_received_total" in text
    assert "synthesis_members 3.0" in text
    assert "\nprocess_resident_memory_bytes " in text  # the standard name


def test_async_client_many_calls_in_flight(cluster3):
    import asyncio
    from node.client import AsyncClient

    async def main():
        async with AsyncClient(cluster3.nodes[0].address, timeout_s=10) as c:
            results = await asyncio.gather(*(c.call(f"counter/af-{i % 50}", "incr")
                                             for i in range(2000)))
            finals = await asyncio.gather(*(c.call(f"counter/af-{i}", "get") for i in range(50)))
        return results, finals

    results, finals = asyncio.run(main())
    # Each reply is matched to its own call: counter k answered its 40 incr calls
    # with the values 1..40, each once (replies matched in arrival order would
    # hand one counter's values to another's calls).
    for k in range(50):
        assert sorted(r["value"] for r in results[k::50]) == list(range(1, 41)), k
    assert finals == [{"value": 40}] * 50


def test_sync_client_is_reusable_across_nodes(cluster3):
    with Client(cluster3.nodes[0].address) as a, Client(cluster3.nodes[1].address) as b:
        for i in range(20):
            (a if i % 2 else b).call("counter/alternate", "incr")
        assert a.call("counter/alternate", "get") == {"value": 20}


def test_traceparent_is_copied_into_replies_and_errors_across_a_hop(cluster3):
    import msgpack
    import zmq
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{cluster3.nodes[0].address}")
    try:
        for i in range(12):  # some of these agents live on other nodes
            for mtype, want in (("get", "syn.reply"), ("fly", "syn.error")):
                env = {"v": 1, "id": f"{mtype}{i}", "type": mtype, "subject": f"counter/tp{i}",
                       "traceparent": tp}
                sock.send(msgpack.packb(env))
                assert sock.poll(5000)
                reply = msgpack.unpackb(sock.recv(), raw=False)
                assert reply["type"] == want and reply["re"] == env["id"]
                assert reply["traceparent"] == tp
    finally:
        sock.close()


def test_one_way_send_is_forwarded_to_the_owner(cluster3):
    with cluster3.nodes[0].client() as c:
        agents = [f"counter/oneway-{i}" for i in range(12)]  # owners on every node
        for agent in agents:
            c.send(agent, "incr", {"n": 3})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(c.call(a, "get") == {"value": 3} for a in agents):
                break
            time.sleep(0.05)
        assert [c.call(a, "get") for a in agents] == [{"value": 3}] * len(agents)


def test_ctl_send_and_publish_arrive_before_the_command_exits(cluster3):
    import subprocess
    import sys
    from support import REPO, child_env
    node = cluster3.nodes[1]

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c",
                               "import sys; from node.cli import ctl_main; sys.exit(ctl_main())",
                               "--node", node.address, *args],
                              capture_output=True, text=True, timeout=30, env=child_env(),
                              cwd=str(REPO))

    assert ctl("send", "counter/ctl-send", "incr", '{"n": 4}').returncode == 0
    with node.client() as c:
        assert c.call("counter/ctl-send", "get") == {"value": 4}
        c.spawn("member", "member/ctl-pub", init={"group": "ctl-room"})
    done = ctl("publish", "ctl-room", "note", '"hello"')
    assert done.returncode == 0, done.stderr
    # The publish reached the entry node before ctl exited; the member may live on
    # another node, reached over PUB/SUB, which is not ordered with calls.
    deadline = time.monotonic() + 10
    with node.client() as c:
        while c.call("member/ctl-pub", "seen") != {"seen": ["hello"]}:
            assert time.monotonic() < deadline, "published note never arrived"
            time.sleep(0.05)
    out = ctl("status", "--json")
    assert out.returncode == 0 and '"members"' in out.stdout
