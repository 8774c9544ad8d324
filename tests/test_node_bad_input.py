"""Bad input gets its stable error code and the node keeps serving the next request."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from node.client import RemoteError
from protocols import peer

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

    def bad_requests_counted() -> float:
        url = f"http://127.0.0.1:{node.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                   if l.startswith("synthesis_messages_errors_total")
                   and 'code="bad_request"' in l)

    before = bad_requests_counted()  # other tests of this module moved it already
    _exchange(raw, b"\xc1")
    assert bad_requests_counted() == before + 1


M = peer.MAGIC
S = peer.seal  # a checksum that matches, so each message reaches the check it is for


@pytest.mark.parametrize("frames", [
    S([M, b"GOSSIP", b"evil", msgpack.packb({"v": 1, "kind": "members", "members": [
        {"id": "evil", "gen": 1, "ep": {"zmq": "zzz", "zmq-pub": "zzz"}}]})]),
    S([M, b"GOSSIP", b"evil", msgpack.packb({"v": 1, "kind": "members",
                                             "members": [[1, 2, 3, 4]]})]),
    S([M, b"GOSSIP", b"evil", msgpack.packb({"kind": "members", "members": []})]),  # no v
    S([M, b"GOSSIP", b"evil", b"\xc1"]),
    S([M, b"STATR", b"evil", msgpack.packb({"token": "1", "status": {"node": [1]}})]),
    S([M, b"STATR", b"evil", b"\xc1"]),
    S([M, b"STATQ", b"nobody", b"1"]),
    S([M, b"RPL", b"evil"]),
    S([M, b"RPL", b"evil", b"\0" * 16, b"\xc1"]),                  # a token never issued
    S([M, b"FWD", b"evil", b"evil", b"\x01", b"\0" * 16, b"\xc1"]),
    S([M, b"FWD", b"evil", b"evil", b"\x00", b"", b"x"]),           # hops 0
    [M, b"FWD", b"evil", b"evil", b"\x01", b"", b"x", b"\0" * 4],   # a wrong checksum
    S([M, b"NOPE", b"evil", b"x"]),
    [b"SYNP2", b"GOSSIP", b"evil", msgpack.packb({"v": 1, "kind": "members",
                                                  "members": []})],  # the previous version
    [b"SYNP1", b"GOSSIP", msgpack.packb({"kind": "members", "members": []})],  # old version
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


# ------------------------------------------------------------------ correlation of refused requests
# docs/PROTOCOL.md 2.3: an error carries re = id = the request id whenever the id
# was readable, and the request's traceparent whenever it was a str.

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _envelope_then(rid: str, *raw_pairs: bytes) -> bytes:
    """A request map (id, traceparent, ...) followed by hand-written raw key/value pairs."""
    head = {"v": 1, "id": rid, "type": "echo", "subject": "echo/x", "traceparent": TRACEPARENT}
    packed = msgpack.packb(head)
    return bytes((packed[0] + len(raw_pairs),)) + packed[1:] + b"".join(raw_pairs)


@pytest.mark.parametrize("frame, code", [
    (msgpack.packb({"v": 1, "id": "c1", "type": "get", "subject": "counter/a",
                    "traceparent": TRACEPARENT}) + b"\x00", "bad_request"),   # trailing bytes
    (_envelope_then("c2", b"\x07\x00"), "bad_request"),                      # int key at the top
    (_envelope_then("c3", b"\xa4data\x81\x01\x02"), "bad_request"),          # int key in data
    (_envelope_then("c4", b"\xa6source\xa2\xff\xfe"), "bad_request"),        # invalid UTF-8
    (_envelope_then("c5", b"\xa4data" + b"\x91" * 2000 + b"\x80"), "bad_request"),  # too deep
    (_envelope_then("c6", b"\xa4data\xc5" + (3 * MAX_BYTES).to_bytes(2, "big")
                    + b"\x00" * (3 * MAX_BYTES)), "too_large"),
    (msgpack.packb({"v": 2, "id": "c7", "type": "get", "subject": "counter/a",
                    "traceparent": TRACEPARENT}), "bad_request"),            # decodes, invalid
])
def test_refused_requests_are_answered_with_their_id_and_traceparent(raw, frame, code):
    reply = _exchange(raw, frame)
    _assert_error(reply, code, reply["re"])
    rid = reply["re"]
    assert rid is not None and rid.startswith("c"), reply
    assert reply["id"] == rid and reply["traceparent"] == TRACEPARENT, reply
    _good(raw)


def test_deep_nesting_error_says_so(raw):
    reply = _exchange(raw, _envelope_then("deep", b"\xa4data" + b"\x91" * 2000 + b"\x80"))
    assert "nesting deeper than 1024 levels" in reply["data"]["message"], reply


def test_extra_frames_after_a_delimiter_are_answered_in_req_framing(raw, node):
    raw.send_multipart([b"", b"one", b"two"])
    assert raw.poll(5000), "no reply"
    delimiter, body = raw.recv_multipart()
    assert delimiter == b""
    _assert_error(msgpack.unpackb(body, raw=False), "bad_request")
    sock = zmq.Context.instance().socket(zmq.REQ)  # a REQ socket sees the error, not a hang
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    try:
        sock.send_multipart([b"one", b"two"])
        assert sock.poll(5000), "a REQ socket got no error for a two-frame request"
        _assert_error(msgpack.unpackb(sock.recv(), raw=False), "bad_request")
    finally:
        sock.close()


# ------------------------------------------------------------------ the send-mode rule
# docs/PROTOCOL.md 3: a request whose mode reads "send" or "publish" never gets a
# reply, whatever is wrong with it; each error is counted instead.  Each case
# is followed by a call that the node handles after it (same socket, or same
# agent mailbox), so an error reply, if any, would arrive first.

def _errors(node) -> int:
    with node.client() as c:
        [me] = c.status()["members"]
    return me["errors"]


def _one_way(mode: str, mtype: str, subject: str | None, data=None, **extra) -> bytes:
    env = {"v": 1, "id": f"ow-{mtype}", "type": mtype, "mode": mode, "data": data,
           "traceparent": TRACEPARENT, **extra}
    if subject is not None:
        env["subject"] = subject
    return msgpack.packb(env)


# (why, envelope overrides, agent whose mailbox orders the follow-up call or None)
SEND_CASES = [
    ("unknown syn.* type", {"type": "syn.explode"}, "counter/sm"),
    ("non-map spawn data", {"type": "syn.spawn", "data": 5}, "counter/sm"),
    ("empty group", {"type": "syn.join", "data": {"group": ""}}, "counter/sm"),
    ("unknown behavior", {"type": "syn.spawn", "subject": "sm-agent",
                          "data": {"behavior": "nosuch"}}, None),
    ("bad handler data", {"type": "incr", "data": {"n": "five"}}, "counter/sm"),
    ("unknown agent", {"subject": "nosuchbehavior/x"}, None),
    ("no such handler", {"type": "fly"}, "counter/sm"),
    ("system type published", {"mode": "publish", "type": "syn.join", "subject": "g",
                               "data": {"group": "g"}}, None),
    ("bad version", {"v": 2}, None),
    ("bad ttl", {"ttl": 99}, None),
    ("no subject", {"subject": None}, None),
]


@pytest.mark.parametrize("why, overrides, then_agent", SEND_CASES,
                         ids=[c[0].replace(" ", "-") for c in SEND_CASES])
def test_one_way_requests_get_no_reply_and_errors_are_counted(node, raw, why, overrides,
                                                              then_agent):
    env = {"v": 1, "id": "one-way", "type": "get", "subject": "counter/sm", "mode": "send",
           "traceparent": TRACEPARENT, **overrides}
    env = {k: v for k, v in env.items() if v is not None}
    before = _errors(node)
    raw.send(msgpack.packb(env))
    if then_agent is not None:  # the agent's mailbox handles the send first
        after = {"v": 1, "id": "after", "type": "get", "subject": then_agent}
    else:  # the node handled the send synchronously, before reading this
        after = {"v": 1, "id": "after", "type": "syn.ping"}
    reply = _exchange(raw, msgpack.packb(after))
    assert reply["re"] == "after", f"{why}: the one-way request was answered: {reply}"
    assert _errors(node) == before + 1, why


def test_a_good_one_way_request_is_not_counted_as_an_error(node, raw):
    before = _errors(node)
    raw.send(_one_way("send", "incr", "counter/sm-ok"))
    reply = _exchange(raw, msgpack.packb({"v": 1, "id": "after", "type": "get",
                                          "subject": "counter/sm-ok"}))
    assert reply["data"] == {"value": 1}
    assert _errors(node) == before


def test_oversize_send_is_not_answered_but_counted(node, raw):
    before = _errors(node)
    raw.send(_one_way("send", "put", "kv/big", {"key": "k", "value": "x" * (2 * MAX_BYTES)}))
    reply = _exchange(raw, msgpack.packb({"v": 1, "id": "after", "type": "syn.ping"}))
    assert reply["re"] == "after", reply
    assert _errors(node) == before + 1


def test_unreadable_mode_is_answered(raw):
    # The mode is behind trailing garbage it cannot be read past: answered.
    reply = _exchange(raw, b"\xc1" + _one_way("send", "get", "counter/a"))
    _assert_error(reply, "bad_request")
    # A mode that is no mode is not one-way: answered, with the id.
    reply = _exchange(raw, _one_way("shout", "get", "counter/a"))
    _assert_error(reply, "bad_request", "ow-get")


# ------------------------------------------------------------------ a request that meets a node bug

def test_a_node_bug_is_answered_internal_with_the_id_unless_one_way():
    """An in-process node with one injected fault: requests of type 'boom' raise
    inside the node (not in an agent).  A call gets 'internal' with its id and
    traceparent; a send gets nothing (the send-mode rule holds for bugs too)."""
    import asyncio
    import threading

    from node.config import NodeConfig
    from node.runtime import Node
    from support import free_port

    port = free_port()
    node = Node(NodeConfig(node_id="buggy", listen=f"127.0.0.1:{port}",
                           pub=f"127.0.0.1:{free_port()}", metrics="off"))
    dispatch = node._dispatch

    def faulty_dispatch(req, *args):
        if req.type == "boom":
            raise RuntimeError("injected fault")
        return dispatch(req, *args)

    node._dispatch = faulty_dispatch
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(node.serve(),), daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        boom = {"v": 1, "type": "boom", "subject": "echo/x", "traceparent": TRACEPARENT}
        reply = _exchange(sock, msgpack.packb({**boom, "id": "b1"}))
        _assert_error(reply, "internal", "b1")
        assert reply["traceparent"] == TRACEPARENT and "RuntimeError" in reply["data"]["message"]
        sock.send(msgpack.packb({**boom, "id": "b2", "mode": "send"}))
        reply = _exchange(sock, msgpack.packb({"v": 1, "id": "after", "type": "syn.ping"}))
        assert reply["re"] == "after", reply
    finally:
        sock.close()
        loop.call_soon_threadsafe(node.request_stop)
        thread.join(15)
        loop.close()
    assert not thread.is_alive()


def test_a_reply_over_the_size_limit_is_refused_too_large(node, raw):
    """Replies obey max_message_bytes as requests do: a larger one would cost the link
    between two nodes (the entry node's hard guard drops such frames)."""
    with node.client() as c:
        for i in range(300):  # each request small; the list of keys is not
            c.call("kv/many-keys", "put", {"key": f"key-number-{i:06d}", "value": 1})
    reply = _exchange(raw, msgpack.packb({"v": 1, "id": "big", "type": "keys",
                                          "subject": "kv/many-keys", "mode": "call"}))
    _assert_error(reply, "too_large", re="big")
    assert "reply of" in reply["data"]["message"]
    _good(raw)
