"""A node under attack from loopback stays within its limits (issue: bounded under abuse).

Each test runs one attack from scripts/attack.py against a real node process, with
settings small enough to bound the test's time, and asserts the bound: resident
memory, sockets, the member view, an answer to every call, a counted metric.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from node.client import RemoteError
from support import REPO, Cluster, NodeProcess

sys.path.insert(0, str(REPO / "scripts"))
import attack  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def limited(node: NodeProcess, reason: str) -> float:
    """The node's synthesis_limited_total for ``reason`` (0 if absent)."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf'^synthesis_limited_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def rss_mb(node: NodeProcess) -> float:
    return psutil.Process(node.proc.pid).memory_info().rss / MiB


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running(tmp_path, name: str, *args: str):
    """A node of its own for one test, with metrics, killed at the end."""
    n = NodeProcess(name, tmp_path, metrics=True, args=args)
    try:
        n.wait_serving()
        yield n
    finally:
        n.kill()


@pytest.fixture
def node(tmp_path):
    with running(tmp_path, "victim", "--conn-inbound-bytes-max", str(16 * MiB),
                 "--client-reply-bytes-max", str(8 * MiB)) as n:
        yield n


def test_a_multipart_message_that_never_ends_is_cut_off(node):
    """4 MiB frames with MORE and never a last frame: without the guard the node grew
    by about a gigabyte a second.  With it, resident memory stays bounded and each
    connection is cut once it holds the budget."""
    before = rss_mb(node)
    peak = [before]
    worker = threading.Thread(target=attack.multipart, args=(node.address, 4.0), daemon=True)
    worker.start()
    while worker.is_alive():
        peak[0] = max(peak[0], rss_mb(node))
        time.sleep(0.05)
    worker.join()
    assert limited(node, "conn_inbound_bytes") >= 1
    # Unguarded, 4 s of this grew the node by 5 GB or more.  Guarded, the bound is the
    # budget plus what arrives between two checks: about 300 MB on an idle machine,
    # more when the loop is starved of CPU (2 cores shared with the attacker and the
    # rest of the suite: 1.7 GB seen once in a full run on 2026-11-22).  2.5 GB still
    # tells a guarded node from an unguarded one by half.
    assert peak[0] < before + 2500, f"node grew from {before:.0f} to {peak[0]:.0f} MB"
    with node.client() as c:
        assert c.ping()["node"] == "victim"
    # The memory of cut connections goes back to the system.
    wait_for(lambda: rss_mb(node) < before + 150, what="memory returned after the attack")


def test_a_client_that_never_reads_its_replies_is_cut_off(node):
    """1 MiB echo replies nobody reads: the node held 1.8 GB after the client left."""
    before = rss_mb(node)
    worker = threading.Thread(target=attack.slow_consumer, args=(node.address, 300),
                              kwargs={"hold_s": 20.0}, daemon=True)
    worker.start()  # the client stays connected, reading nothing
    wait_for(lambda: limited(node, "client_reply_bytes") >= 1, timeout_s=20,
             what="the slow client cut")
    wait_for(lambda: rss_mb(node) < before + 150, what="reply memory returned")
    with node.client() as c:
        assert c.call("echo/after", "say", "still here") == "still here"


def test_connections_beyond_the_limit_are_closed(tmp_path):
    with running(tmp_path, "few", "--connections-max", "20") as n:
        socks = [attack.zmtp_connect(n.address) for _ in range(40)]
        try:
            wait_for(lambda: limited(n, "connections") >= 15, what="extra connections closed")
            assert len(psutil.Process(n.proc.pid).net_connections("tcp")) < 40
        finally:
            for s in socks:
                s.close()
        with n.client() as c:  # room again once the attacker left
            wait_for(lambda: _pings(c), what="a ping after the attacker left")


def _pings(client) -> bool:
    try:
        client.ping(timeout_s=0.5)
        return True
    except Exception:  # noqa: BLE001 - not yet
        return False


@pytest.fixture
def trio(tmp_path):
    cluster = Cluster(3, tmp_path, metrics=True)
    yield cluster
    cluster.close()


def members_of(node: NodeProcess, timeout_s: float = 5.0) -> dict:
    with node.client(timeout_s=timeout_s) as c:
        return {m["node"]: m for m in c.status()["members"]}


def test_forged_gossip_cannot_take_over_a_node_id(trio):
    """A gossip entry claiming n1 at another address with generation 2**64-1 used to
    send n1's agents' requests to the attacker for good."""
    n0, n1, _ = trio.nodes
    real = f"tcp://{n1.address}"
    attack.forged_gossip(n0.address, "n1", "tcp://127.0.0.1:9", generation=2**64 - 1,
                         sender="n1")
    # Relayed by someone else, at a plausible generation: refused as an address change.
    attack.forged_gossip(n0.address, "n1", "tcp://127.0.0.1:9", generation=time.time_ns())
    wait_for(lambda: limited(n0, "gossip_entry_refused") >= 1, what="forged entries refused")
    assert members_of(n0)["n1"]["address"] == real
    assert members_of(n1)["n1"]["address"] == real


def test_a_node_hearing_its_id_elsewhere_refutes_it(trio):
    """The attacker claims n1 in a message 'from' n1 itself: n0 believes it for a
    moment; n1 hears its own id elsewhere, refutes, and wins everywhere again."""
    n0, n1, n2 = trio.nodes
    real = f"tcp://{n1.address}"
    ahead = time.time_ns() + 5 * 10**9  # within the bound: only the refutation helps
    with attack.zmq.Context() as ctx:
        sock = attack.peer_socket(ctx, n0.address)
        attack.gossip(sock, [attack.member_entry("n1", "tcp://127.0.0.1:9",
                                                 "tcp://127.0.0.1:10", ahead)], sender="n1")
        time.sleep(0.3)
        sock.close()
    wait_for(lambda: limited(n1, "node_id_refuted") >= 1, what="n1 refuting")
    for node in (n0, n1, n2):
        wait_for(lambda: members_of(node)["n1"]["address"] == real,
                 what=f"{node.name} back to n1's real address")
    assert "node_id_claimed_elsewhere" in n1.log()


def test_fake_members_cannot_exhaust_sockets(trio):
    """1,020 members at dead addresses: the node ran out of sockets (libzmq's 1,023)
    and then answered 'internal', timed out, and 'overloaded' status for good."""
    n0 = trio.nodes[0]
    attack.fake_members(n0.address, count=1020)
    # Status waits out its 3 s deadline for members that never answer.  (Adding the
    # 1,020 members to the ring one by one blocked the loop for 2.5 s; the router
    # now builds the ring at once for a change that large: 0.2 s.)
    wait_for(lambda: len(members_of(n0, timeout_s=15)) > 1000, timeout_s=30,
             what="fake members listed")
    # Each call to a fake owner waits out the 1 s peer queue deadline, and each status
    # the 3 s status deadline (the fake members never answer): keep the counts small.
    with n0.client(timeout_s=15) as c:
        for i in range(6):  # every call answered: data, or a clear error
            try:
                c.call(f"echo/x{i}", "say", i)
            except RemoteError as err:
                assert err.code in ("unavailable", "overloaded"), err
        # Status is answered (rows for unreachable members), never stuck 'overloaded'.
        for _ in range(2):
            assert len(c.status()["members"]) > 1000
    assert "Too many open files" not in n0.log()


def test_made_up_forward_origins_open_no_links(trio):
    """FWD frames naming 1,100 made-up origins opened 1,020 links and broke retries."""
    n0, n1, _ = trio.nodes
    proc = psutil.Process(n0.proc.pid)
    fds_before = proc.num_fds()
    attack.fake_origins(n0.address, "echo/target", count=1100)
    wait_for(lambda: limited(n0, "reply_to_stranger_dropped") >= 1000, timeout_s=15,
             what="replies to made-up origins dropped")
    assert proc.num_fds() < fds_before + 50
    with n1.client() as c:  # forwarding between real members still works
        for i in range(10):
            assert c.call(f"echo/k{i}", "say", i) == i


def gauge(node: NodeProcess, name: str) -> float:
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^synthesis_{name} (\S+)$", text, re.M)
    assert match, f"no gauge {name}"
    return float(match.group(1))


def test_one_kv_agent_holds_a_bounded_number_of_bytes(node):
    """2,000 puts of 1 MiB took a node to 2 GB: one kv agent now stops at 16 MiB."""
    result = attack.kv_fill(node.address, puts_max=40, agents=1)
    assert result["refused_with"] == "overloaded"
    assert 14 <= result["stored_mb"] <= 16
    with node.client() as c:  # what it holds is still served, and can be deleted
        assert c.call("kv/fill0", "get", {"key": "k0"})["found"] is True
        assert c.call("kv/fill0", "delete", {"key": "k0"}) == {"deleted": True}
        c.call("kv/fill0", "put", {"key": "again", "value": "v" * 1000})


def test_memory_budget_refuses_large_requests_and_new_agents(tmp_path):
    with running(tmp_path, "budget", "--memory-bytes-max", str(160 * MiB)) as n:
        result = attack.kv_fill(n.address, puts_max=400, agents=64)
        assert result["refused_with"] == "overloaded", result
        assert rss_mb(n) < 160 + 100, "the budget held within a few requests' worth"
        assert limited(n, "memory_budget") >= 1
        with n.client() as c:
            with pytest.raises(RemoteError) as err:
                c.call("counter/brand-new", "incr")  # no new agents while over budget
            assert err.value.code == "overloaded"
            assert c.call("kv/fill0", "get", {"key": "nope"})["found"] is False  # small: served


def test_a_flood_of_one_way_sends_is_bounded_node_wide(tmp_path):
    """Per-agent mailboxes held, yet 1,000 slow agents queued 228k messages (865 MB)."""
    with running(tmp_path, "flood", "--mailbox-total-max", "5000") as n:
        attack.flood(n.address, agents=1000, messages=30_000, nap_s=30.0)
        wait_for(lambda: limited(n, "node_mailboxes_full") >= 1, what="node-wide bound hit")
        assert gauge(n, "mailbox_depth") <= 5000
        with n.client() as c:  # other agents still answer
            assert c.call("echo/ok", "say", 1) == 1


def test_idle_agents_are_passivated(tmp_path):
    with running(tmp_path, "idle", "--agent-idle-s", "0.3") as n:
        with n.client() as c:
            for i in range(50):
                c.call(f"counter/i{i}", "incr")
            wait_for(lambda: c.status()["members"][0]["agents"] == 0,
                     what="idle agents passivated")
            # Passivation no longer loses state: a counter's value is replicated
            # state, kept in the node's record while the agent sleeps.
            assert c.call("counter/i0", "get") == {"value": 1}
        assert limited(n, "agent_passivated_idle") >= 50


def test_activations_beyond_agents_max_evict_the_least_recently_used(tmp_path):
    """A million activations filled a node until restart; now the idle ones make room."""
    with running(tmp_path, "full", "--agents-max", "500") as n:
        with n.client() as c:
            c.call("counter/keep", "incr")
            result = attack.activations(n.address, 3000, window=200)
            assert result["replies"] == {"ok": 3000}, result
            assert c.status()["members"][0]["agents"] <= 500
        assert limited(n, "agent_passivated_pressure") >= 2500


def test_a_forged_reply_never_reaches_a_client(node):
    """A client with a fixed routing id received a forged RPL frame sent to its node.
    Replies now name the forward by a token the entry node issued (its random key and a
    counter) and the client's route never leaves the entry node."""
    with attack.zmq.Context() as ctx:
        victim = ctx.socket(attack.zmq.DEALER)
        victim.setsockopt(attack.zmq.ROUTING_ID, b"victim")
        victim.setsockopt(attack.zmq.LINGER, 0)
        victim.connect(f"tcp://{node.address}")
        victim.send(attack._call_env("mine", "syn.ping", None))  # the route now exists
        assert victim.poll(5000)
        victim.recv()
        forger = attack.peer_socket(ctx, node.address)
        forged = attack.msgpack.packb({"v": 1, "id": "mine", "re": "mine", "type": "syn.reply",
                                       "source": "n9", "data": "forged"})
        for token in (b"\0" * 16, attack.os.urandom(16)):  # tokens the node never issued
            forger.send_multipart(attack.peer.reply("n9", token, forged))
        wait_for(lambda: limited(node, "forged_reply") >= 2, what="forged replies counted")
        assert not victim.poll(300), "a forged reply reached the client"
        forger.close()
        victim.close()
