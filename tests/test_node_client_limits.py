"""Limits per client on a real node: a client past its rate or its in-flight cap gets
``overloaded`` with a retry hint, another client's calls keep succeeding, the node
keeps serving; a refused one-way request gets no answer and is counted."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from node.client import Client, RemoteError
from support import Cluster, NodeProcess, metric_samples

pytestmark = pytest.mark.timeout(120)

RATE, BURST = 1, 10     # a flood of FLOOD calls cannot stay under the rate (190 s)
FLOOD = 200
INFLIGHT_MAX = 3


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    node = NodeProcess("rated", tmp_path_factory.mktemp("rated"), metrics=True,
                       args=("--client-rate", str(RATE), "--client-burst", str(BURST)))
    try:
        node.wait_serving()
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    node = NodeProcess("capped", tmp_path_factory.mktemp("capped"), metrics=True,
                       args=("--client-inflight-max", str(INFLIGHT_MAX)))
    try:
        node.wait_serving()
        yield node
    finally:
        node.kill()


@pytest.fixture
def raw(request):
    """A raw DEALER: sends without waiting, reads replies as they come."""
    sockets = []

    def connect(node: NodeProcess) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{node.address}")
        sockets.append(sock)
        return sock
    yield connect
    for sock in sockets:
        sock.close()


def envelope(rid: str, agent: str, mtype: str = "echo", data=None, mode: str = "call") -> bytes:
    return msgpack.packb({"v": 1, "id": rid, "mode": mode, "type": mtype, "subject": agent,
                          "data": data})


def read_replies(sock: zmq.Socket, n: int) -> dict[str, dict]:
    """``n`` replies, by the id they answer."""
    replies = {}
    while len(replies) < n:
        assert sock.poll(10_000), f"only {len(replies)} of {n} replies"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        replies[reply["re"]] = reply
    return replies


def limited(node: NodeProcess, reason: str) -> float:
    return metric_samples(node).get(("synthesis_limited_total", (("reason", reason),)), 0)


def test_a_flooding_client_is_refused_while_another_keeps_its_calls(rated, raw):
    flooder = raw(rated)
    for i in range(FLOOD):
        flooder.send(envelope(f"f{i}", f"echo/flood-{i % 7}", data=i))
    with rated.client() as other:   # a connection of its own: a bucket of its own
        answers = [other.call(f"echo/other-{i}", "echo", i) for i in range(BURST)]
    assert answers == list(range(BURST))

    replies = read_replies(flooder, FLOOD)
    refused = [r for r in replies.values() if r["type"] == "syn.error"]
    served = [r for r in replies.values() if r["type"] == "syn.reply"]
    assert len(served) >= BURST and refused
    for reply in refused:
        assert reply["data"]["code"] == "overloaded", reply
        hint = reply["data"]["retry_after_ms"]
        assert type(hint) is int and 1 <= hint <= 1000 // RATE, reply
    assert limited(rated, "client_rate") >= len(refused)


def test_the_python_client_sees_the_hint_and_it_is_right(rated):
    with rated.client() as c:
        with pytest.raises(RemoteError) as caught:
            for i in range(FLOOD):
                c.call("echo/hinted", "echo", i)
        error = caught.value
        assert error.code == "overloaded" and 0 < error.retry_after_s <= 1 / RATE
        time.sleep(error.retry_after_s)
        assert c.call("echo/hinted", "echo", "again") == "again"


def test_a_refused_one_way_request_is_counted_not_answered(rated, raw):
    sock = raw(rated)
    for i in range(BURST):   # the bucket emptied by calls
        sock.send(envelope(f"c{i}", "echo/one-way"))
    assert all(r["type"] == "syn.reply" for r in read_replies(sock, BURST).values())
    before = limited(rated, "client_rate")
    for i in range(50):
        sock.send(envelope(f"s{i}", "counter/one-way", "incr", mode="send"))
    sock.send(envelope("probe", "echo/one-way"))
    probe = read_replies(sock, 1)   # replies come in order: none for the sends
    assert probe["probe"]["data"]["code"] == "overloaded", probe
    assert limited(rated, "client_rate") >= before + 51


def test_a_client_at_its_in_flight_cap_is_refused_until_answered(capped, raw):
    busy = raw(capped)
    for i in range(INFLIGHT_MAX):
        busy.send(envelope(f"slow{i}", f"slow/{i}", "sleep", {"s": 2.0}))
    busy.send(envelope("extra", "echo/capped"))
    extra = read_replies(busy, 1)["extra"]
    assert extra["data"]["code"] == "overloaded", extra
    assert type(extra["data"]["retry_after_ms"]) is int and extra["data"]["retry_after_ms"] > 0
    with capped.client() as other:   # the cap is the busy client's only
        assert [other.call("echo/capped", "echo", i) for i in range(10)] == list(range(10))

    slow = read_replies(busy, INFLIGHT_MAX)
    assert all(r["type"] == "syn.reply" for r in slow.values()), slow
    busy.send(envelope("after", "echo/capped", data="served"))   # its calls were settled
    assert read_replies(busy, 1)["after"]["data"] == "served"
    assert limited(capped, "client_inflight") >= 1


def test_one_way_requests_and_errors_do_not_hold_the_cap(capped, raw):
    sock = raw(capped)
    for i in range(50):
        sock.send(envelope(f"s{i}", "counter/capped", "incr", mode="send"))
    for i in range(10):   # answered with errors: each settles its call
        sock.send(envelope(f"bad{i}", "nobehavior/x"))
    errors = read_replies(sock, 10)
    assert {r["data"]["code"] for r in errors.values()} == {"unknown_agent"}
    for i in range(10):
        sock.send(envelope(f"ok{i}", "echo/capped", data=i))
        assert read_replies(sock, 1)[f"ok{i}"]["data"] == i


def test_forwarded_calls_settle_the_cap_when_their_reply_comes_back(tmp_path):
    cluster = Cluster(2, tmp_path, args=("--client-inflight-max", "1"))
    try:
        with Client(cluster.nodes[0].address, timeout_s=10.0) as c:
            for i in range(20):
                assert c.call(f"echo/fwd-{i}", "echo", i) == i   # one in flight at a time
            status = c.status()
        forwarded = {m["node"]: m["forwarded"] for m in status["members"]}
        assert forwarded[cluster.nodes[0].name] > 1, status  # more than the cap went out
    finally:
        cluster.close()
