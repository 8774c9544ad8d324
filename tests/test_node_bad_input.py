"""Bad input gets its stable error code and the node keeps serving the next request."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from node.client import RemoteError

pytestmark = pytest.mark.timeout(60)

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from support import NodeProcess
    n = NodeProcess("bad", tmp_path_factory.mktemp("bad"),
                    args=("--max-message-bytes", str(MAX_BYTES)), metrics=True)
    n.wait_serving()
    yield n
    n.kill()


@pytest.fixture
def raw(node):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    yield sock
    sock.close()


def _exchange(sock, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(5000), "no reply"
    reply = sock.recv_multipart()
    return msgpack.unpackb(reply[-1], raw=False)


def _good(sock) -> None:
    """The node still serves a well-formed request on the same socket."""
    env = {"v": 1, "id": "good", "type": "incr", "subject": "counter/survivor", "mode": "call"}
    reply = _exchange(sock, msgpack.packb(env))
    assert reply["type"] == "syn.reply" and reply["re"] == "good", reply


def _assert_error(reply: dict, code: str, re=None) -> None:
    assert reply["type"] == "syn.error", reply
    assert reply["data"]["code"] == code, reply
    assert isinstance(reply["data"]["message"], str) and reply["data"]["message"]
    assert reply["re"] == re


@pytest.mark.parametrize("frame", [
    b"\xc1",                                   # never-used msgpack byte
    b"garbage that is not msgpack \xff\xfe",
    msgpack.packb({"v": 1, "id": "t"})[:-3],   # truncated
    msgpack.packb([1, 2, 3]),                  # not a map
    msgpack.packb("just a string"),
    b"",
])
def test_undecodable_frames_get_bad_request(raw, frame):
    _assert_error(_exchange(raw, frame), "bad_request")
    _good(raw)


@pytest.mark.parametrize("env, rid", [
    ({"v": 1, "id": 7, "type": "get", "subject": "counter/a"}, None),
    ({"v": 1, "id": "r1", "type": 3, "subject": "counter/a"}, "r1"),
    ({"v": 1, "id": "r2", "type": "get", "subject": ["counter/a"]}, "r2"),
    ({"v": 1, "id": "r3", "type": "get"}, "r3"),
    ({"v": 2, "id": "r4", "type": "get", "subject": "counter/a"}, "r4"),
    ({"v": 1, "id": "r5", "type": "get", "subject": "counter/a", "mode": "shout"}, "r5"),
    ({"v": 1, "id": "r6", "type": "get", "subject": "counter/a", "ttl": "far"}, "r6"),
    ({"v": 1, "id": "r7", "type": "syn.spawn", "subject": "counter/a", "data": 5}, "r7"),
])
def test_wrong_field_types_get_bad_request_with_the_request_id(raw, env, rid):
    _assert_error(_exchange(raw, msgpack.packb(env)), "bad_request", rid)
    _good(raw)


def test_oversize_message_gets_too_large(raw):
    env = {"v": 1, "id": "big", "type": "put", "subject": "kv/a",
           "data": {"key": "k", "value": "x" * (2 * MAX_BYTES)}}
    _assert_error(_exchange(raw, msgpack.packb(env)), "too_large", "big")
    _good(raw)


def test_too_many_frames_get_bad_request(raw):
    _assert_error(_exchange(raw, b"a", b"b", b"c"), "bad_request")
    _good(raw)


def test_unknown_behavior_unknown_type_and_reserved_types(node):
    with node.client() as c:
        with pytest.raises(RemoteError) as err:
            c.call("nosuchbehavior/x", "get")
        assert err.value.code == "unknown_agent"
        with pytest.raises(RemoteError) as err:
            c.call("counter/x", "fly")
        assert err.value.code == "unknown_type"
        with pytest.raises(RemoteError) as err:
            c.call("counter/x", "syn.explode")
        assert err.value.code == "unknown_type"
        with pytest.raises(RemoteError) as err:
            c.spawn("nosuchbehavior", "y")
        assert err.value.code == "unknown_agent"
        with pytest.raises(RemoteError) as err:
            c.call("counter/x", "incr", {"n": "five"})
        assert err.value.code == "bad_request"
        assert c.call("counter/x", "incr", {"n": 2}) == {"value": 2}


def test_req_socket_framing_is_served(node):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    try:
        env = {"v": 1, "id": "req-1", "type": "echo-me", "subject": "echo/req", "data": [1, "two"]}
        sock.send(msgpack.packb(env))
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["re"] == "req-1" and reply["data"] == [1, "two"]
    finally:
        sock.close()


def test_errors_are_counted_in_metrics(node, raw):
    import urllib.request
    _exchange(raw, b"\xc1")
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    lines = [l for l in text.splitlines()
             if l.startswith("synthesis_messages_errors_total") and 'code="bad_request"' in l]
    assert lines and sum(float(l.rsplit(" ", 1)[1]) for l in lines) >= 1


@pytest.mark.parametrize("frames", [
    [b"SYNP1", b"GOSSIP", msgpack.packb({"kind": "members", "from": "evil",
                                         "members": [["evil", "zzz", "zzz", 1]]})],
    [b"SYNP1", b"GOSSIP", msgpack.packb({"kind": "members", "members": [[1, 2, 3, 4]]})],
    [b"SYNP1", b"GOSSIP", b"\xc1"],
    [b"SYNP1", b"STATR", b"1", msgpack.packb({"node": [1]})],
    [b"SYNP1", b"STATR", b"1", b"\xc1"],
    [b"SYNP1", b"STATQ", b"nobody", b"1"],
    [b"SYNP1", b"RPL"],
    [b"SYNP1", b"FWD", b"tcp://127.0.0.1:1", b"\x01", b"\xc1"],
    [b"SYNP1", b"FWD", b"not an endpoint", b"\x01",
     msgpack.packb({"v": 1, "id": "f", "type": "get", "subject": "counter/a"}), b"route"],
    [b"SYNP1", b"NOPE", b"x"],
])
def test_malformed_peer_frames_are_dropped_and_the_node_keeps_serving(node, raw, frames):
    raw.send_multipart(frames)
    _good(raw)
    with node.client() as c:
        members = c.status()["members"]
    assert [m["node"] for m in members] == ["bad"]  # no forged member got in


def test_counter_refuses_to_leave_int64_and_keeps_its_state(node):
    with node.client() as c:
        assert c.call("counter/big", "incr", {"n": 2**63 - 1}) == {"value": 2**63 - 1}
        with pytest.raises(RemoteError) as err:
            c.call("counter/big", "incr")
        assert err.value.code == "bad_request"
        with pytest.raises(RemoteError) as err:
            c.call("counter/big", "incr", {"n": 2**63})  # a uint64, not int64
        assert err.value.code == "bad_request"
        assert c.call("counter/big", "get") == {"value": 2**63 - 1}


def test_failed_on_start_leaves_no_half_started_agent(node):
    with node.client() as c:
        with pytest.raises(RemoteError) as err:
            c.spawn("counter", "jobs", init={"value": "x"})
        assert err.value.code == "bad_request"
        with pytest.raises(RemoteError) as err:
            c.call("jobs", "get")
        assert err.value.code == "unknown_agent"
        c.spawn("counter", "jobs", init={"value": 7})
        assert c.call("jobs", "get") == {"value": 7}


def test_group_membership_is_bounded_per_agent(node):
    with node.client() as c:
        for i in range(64):
            c.join("counter/joiner", f"g{i}")
        with pytest.raises(RemoteError) as err:
            c.join("counter/joiner", "one-too-many")
        assert err.value.code == "overloaded"


def test_unserialisable_handler_result_is_internal_and_agent_keeps_serving(node):
    with node.client() as c:
        with pytest.raises(RemoteError) as err:
            c.call("flaky/weird", "unserialisable")
        assert err.value.code == "internal"
        assert c.call("flaky/weird", "calls") == {"calls": 1, "init": None}
