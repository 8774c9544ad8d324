"""System types as docs/PROTOCOL.md section 4 defines them, on a live node.

The edge cases a client writer asks about: stop of an agent that never ran,
re-spawn with another init, stop of a virtual agent (its state is lost), the
``left`` field of syn.leave, and the ring parameters syn.status reports.
"""

from __future__ import annotations

import pytest

import core_cy
from node.client import RemoteError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from support import NodeProcess
    n = NodeProcess("sys", tmp_path_factory.mktemp("sys"))
    n.wait_serving()
    yield n
    n.kill()


def _code(call) -> str:
    with pytest.raises(RemoteError) as err:
        call()
    return err.value.code


def _agents(c) -> int:
    [me] = c.status()["members"]
    return me["agents"]


def test_stop_of_an_agent_that_never_ran_is_unknown_agent(node):
    with node.client() as c:
        assert _code(lambda: c.stop("never-spawned")) == "unknown_agent"
        before = _agents(c)
        # A virtual id is not activated just to be stopped.
        assert _code(lambda: c.stop("counter/never-ran")) == "unknown_agent"
        assert _agents(c) == before


def test_stop_of_a_virtual_agent_loses_its_state(node):
    with node.client() as c:
        assert c.call("counter/v", "incr", {"n": 5}) == {"value": 5}
        c.join("counter/v", "vgroup")
        assert c.stop("counter/v") == {"agent": "counter/v", "stopped": True}
        # The next message activates a fresh agent: state and groups are gone.
        assert c.leave("counter/v", "vgroup")["left"] is False
        assert c.call("counter/v", "get") == {"value": 0}


def test_stop_of_a_spawned_agent_forgets_it(node):
    with node.client() as c:
        c.spawn("counter", "jobs-1", init={"value": 3})
        assert c.stop("jobs-1") == {"agent": "jobs-1", "stopped": True}
        assert _code(lambda: c.call("jobs-1", "get")) == "unknown_agent"
        assert _code(lambda: c.stop("jobs-1")) == "unknown_agent"  # stopping twice


def test_respawn_with_another_init_keeps_the_running_agent(node):
    with node.client() as c:
        first = c.spawn("counter", "jobs-2", init={"value": 5})
        assert c.call("jobs-2", "incr") == {"value": 6}
        assert c.spawn("counter", "jobs-2", init={"value": 100}) == first  # init ignored
        assert c.call("jobs-2", "get") == {"value": 6}
        assert _code(lambda: c.spawn("kv", "jobs-2")) == "bad_request"  # another behavior
        c.stop("jobs-2")
        c.spawn("counter", "jobs-2", init={"value": 100})  # after a stop: a new agent
        assert c.call("jobs-2", "get") == {"value": 100}


def test_leave_says_whether_the_agent_was_in_the_group(node):
    with node.client() as c:
        assert c.join("counter/l", "lg") == {"agent": "counter/l", "group": "lg", "joined": True}
        assert c.join("counter/l", "lg")["joined"] is True  # joining twice is harmless
        assert c.leave("counter/l", "lg") == {"agent": "counter/l", "group": "lg",
                                              "joined": False, "left": True}
        assert c.leave("counter/l", "lg")["left"] is False   # not a member any more
        assert c.leave("counter/l", "other")["left"] is False  # never was
        before = _agents(c)
        # An agent that does not run is in no group: no error, not activated.
        assert c.leave("counter/not-running", "lg") == {
            "agent": "counter/not-running", "group": "lg", "joined": False, "left": False}
        assert c.leave("nobody-spawned-this", "lg")["left"] is False
        assert _agents(c) == before


def test_join_activates_a_virtual_agent_but_not_an_unknown_one(node):
    with node.client() as c:
        before = _agents(c)
        c.join("counter/joined-first", "jg")
        assert _agents(c) == before + 1
        assert _code(lambda: c.join("nobody-spawned-this", "jg")) == "unknown_agent"


def test_status_reports_ring_parameters(node):
    with node.client() as c:
        [me] = c.status()["members"]
    assert me["ring"] == {"vnodes": 160, "points_per_vnode": core_cy.POINTS_PER_VNODE,
                          "weight": 1.0}


def test_a_client_computes_owners_from_status_alone(cluster3):
    """PROTOCOL.md section 8: the ring from syn.status predicts where spawn places agents."""
    with cluster3.nodes[0].client() as c:
        members = c.status()["members"]
        rings = {m["node"]: m["ring"] for m in members}
        assert {r["points_per_vnode"] for r in rings.values()} == {core_cy.POINTS_PER_VNODE}
        [vnodes] = {r["vnodes"] for r in rings.values()}
        ring = core_cy.HashRing((), vnodes=vnodes)
        for node_id, params in sorted(rings.items()):
            ring.add(node_id, params["weight"])
        for i in range(30):
            agent = f"placed-{i}"
            assert c.spawn("counter", agent)["node"] == ring.owner(agent)


def test_counter_decr_counts_down_by_n(node):
    with node.client() as c:
        c.call("counter/down", "incr", {"n": 10})
        assert c.call("counter/down", "decr") == {"value": 9}
        assert c.call("counter/down", "decr", {"n": 12}) == {"value": -3}
        assert c.call("counter/down", "get") == {"value": -3}


def test_kv_delete_removes_one_key_and_says_whether_it_was_there(node):
    with node.client() as c:
        c.call("kv/del", "put", {"key": "a", "value": 1})
        c.call("kv/del", "put", {"key": "b", "value": 2})
        assert c.call("kv/del", "delete", {"key": "a"}) == {"deleted": True}
        assert c.call("kv/del", "delete", {"key": "a"}) == {"deleted": False}
        assert c.call("kv/del", "get", {"key": "a"}) == {"found": False, "value": None}
        assert c.call("kv/del", "keys") == {"keys": ["b"]}
        assert c.call("kv/never-written", "delete", {"key": "x"}) == {"deleted": False}


def test_kv_holds_at_most_10000_keys(node):
    """PROTOCOL/README: a kv agent is a small map; a new key past 10,000 is overloaded,
    an existing key can still change, and a delete makes room."""
    full = {f"k{i}": i for i in range(10_000)}
    with node.client(timeout_s=20.0) as c:
        c.spawn("kv", "kv-full", init=full)
        assert len(c.call("kv-full", "keys")["keys"]) == 10_000
        with pytest.raises(RemoteError) as err:
            c.call("kv-full", "put", {"key": "one-more", "value": 0})
        assert err.value.code == "overloaded" and "10000 keys" in err.value.message
        assert c.call("kv-full", "put", {"key": "k0", "value": "changed"}) == {"ok": True}
        c.call("kv-full", "delete", {"key": "k1"})
        assert c.call("kv-full", "put", {"key": "one-more", "value": 0}) == {"ok": True}


def test_send_mode_gets_no_reply_valid_or_not(node):
    """PROTOCOL section 3: a request in mode send is never answered, not even with an
    error; the call sent after them is the only thing that comes back."""
    import zmq

    from protocols import wire

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    try:
        for env in (wire.request("s1", "incr", "counter/sent", mode="send"),          # valid
                    wire.request("s2", "no-such-handler", "counter/sent", mode="send"),
                    wire.request("s3", "get", "", mode="send"),                          # bad
                    {"v": 2, "id": "s4", "type": "get", "mode": "send"}):
            sock.send(wire.encode(env))
        sock.send(wire.encode(wire.request("c1", "get", "counter/sent")))
        replies = []
        while sock.poll(2000, zmq.POLLIN):
            replies.append(msgpack_unpack(sock.recv()))
            if not sock.poll(300, zmq.POLLIN):  # a late reply to a send would follow
                break
        assert [(r["re"], r["type"], r["data"]) for r in replies] == [
            ("c1", "syn.reply", {"value": 1})]
    finally:
        sock.close()


def msgpack_unpack(frame: bytes):
    import msgpack
    return msgpack.unpackb(frame, raw=False)
