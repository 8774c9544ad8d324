"""The clients' routing strategies, envelope by envelope, against a scripted fake node:
``pipeline``, ``broadcast`` and ``publish(strategy=...)`` build the envelopes of
PROTOCOL.md 2.5 (``routing``, ``stages``, ``targets``, a ``timeout_ms`` under the
client's own timeout), check their arguments before sending anything, and read the
node's answers (a failing stage's index and agent, a scatter's map).
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from node.client import (AsyncClient, Client, RemoteError, check_stages, check_targets,
                         routed_timeout_ms)
from protocols import wire
from test_client import FakeNode

pytestmark = pytest.mark.timeout(30)

STAGES = [("echo/a", "x"), ("counter/b", "incr"), ("kv/c", "put")]


def send_envelope(node: FakeNode, ident: bytes, envelope: dict) -> None:
    node.send_raw(ident, msgpack.packb(envelope))


def reply(node: FakeNode, ident: bytes, request: dict, data) -> None:
    send_envelope(node, ident, {"v": 1, "id": request["id"], "re": request["id"],
                                "type": wire.TYPE_REPLY, "data": data})


def stage_error(node: FakeNode, ident: bytes, request: dict, stage: int, agent: str) -> None:
    send_envelope(node, ident, {
        "v": 1, "id": request["id"], "re": request["id"], "type": wire.TYPE_ERROR,
        "data": {"code": "unknown_type", "message": f"stage {stage} ({agent} fly): no handler",
                 "stage": stage, "agent": agent}})


def without_id(envelope: dict) -> dict:
    return {k: v for k, v in envelope.items() if k != "id"}


def assert_refused(check, argument, words: list[str]) -> None:
    """``check(argument)`` raises a ValueError whose message has every one of ``words``."""
    with pytest.raises(ValueError) as info:
        check(argument)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --- argument checks and the deadline, no socket -----------------------------------------

@pytest.mark.parametrize("timeout_s, expected_ms", [
    (5.0, 4500), (1.0, 900), (0.05, 45), (60.0, 59_500), (0.0001, 1), (10_000.0, 600_000)])
def test_the_node_deadline_is_a_little_under_the_client_timeout(timeout_s, expected_ms):
    assert routed_timeout_ms(timeout_s) == expected_ms
    assert 0 < routed_timeout_ms(timeout_s) <= wire.TIMEOUT_MS_MAX


@pytest.mark.parametrize("stages, words", [
    ([("echo/a", "x")], ["2..16 stages", "got 1"]),
    ([("echo/a", "x")] * 17, ["2..16 stages", "got 17"]),
    ("echo/a:x echo/b:y", ["list of (agent, type) pairs", "str"]),
    ([("echo/a", "x"), ("echo/b", "y", "z")], ["stage 1", "pair"]),
    ([("echo/a", "x"), "echo/b"], ["stage 1", "pair"]),
    ([("", "x"), ("echo/b", "y")], ["stage 0's agent"]),
    ([("echo/a", "x"), ("echo/b", "syn.spawn")], ["stage 1's type", "'syn.'"]),
    ([("echo/a", "x"), ("echo/b", "")], ["stage 1's type"]),
    ([("echo/a", 7), ("echo/b", "y")], ["stage 0's type"]),
    ([("e" * (wire.SUBJECT_LEN_MAX + 1), "x"), ("echo/b", "y")], ["stage 0's agent"]),
])
def test_bad_stages_are_refused_with_a_clear_value_error(stages, words):
    assert_refused(check_stages, stages, words)


def test_good_stages_come_back_as_pairs():
    assert check_stages([["echo/a", "x"], ("echo/b", "y")]) == [("echo/a", "x"), ("echo/b", "y")]
    assert len(check_stages([("echo/a", "x")] * wire.STAGES_MAX)) == wire.STAGES_MAX


@pytest.mark.parametrize("agents, words", [
    ("counter/a", ["list of agent ids", "str"]),
    ([], ["1..1000 agents", "got 0"]),
    ([f"counter/{i}" for i in range(wire.TARGETS_MAX + 1)], ["1..1000 agents", "got 1001"]),
    (["counter/a", "counter/b", "counter/a"], ["'counter/a' is named twice"]),
    (["counter/a", 5], ["each agent", "5"]),
    (["counter/a", ""], ["each agent"]),
])
def test_bad_targets_are_refused_with_a_clear_value_error(agents, words):
    assert_refused(check_targets, agents, words)


def test_a_thousand_distinct_targets_pass():
    agents = tuple(f"counter/{i}" for i in range(wire.TARGETS_MAX))
    assert check_targets(agents) == list(agents)


# --- Client: the envelopes on the wire ------------------------------------------------------

def test_pipeline_envelope_and_reply():
    def script(node: FakeNode) -> None:
        [(ident, request)] = node.requests(1)
        assert without_id(request) == {
            "v": 1, "type": "x", "mode": "call", "subject": "echo/a", "routing": "pipeline",
            "stages": [["counter/b", "incr"], ["kv/c", "put"]], "timeout_ms": 1800,
            "data": {"n": 2}}
        reply(node, ident, request, {"value": 7})
        [(ident, request)] = node.requests(1)
        assert request["timeout_ms"] == 4500  # the client's default timeout, 5 s
        reply(node, ident, request, "last")

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        assert c.pipeline(STAGES, {"n": 2}, timeout_s=2.0) == {"value": 7}
        assert c.pipeline(STAGES[:2]) == "last"


def test_a_failing_stage_raises_with_its_index_and_agent():
    def script(node: FakeNode) -> None:
        [(ident, request)] = node.requests(1)
        stage_error(node, ident, request, 1, "counter/b")
        [(ident, request)] = node.requests(1)
        node.error(ident, request["id"], "timeout")  # the whole pipeline: no stage

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        with pytest.raises(RemoteError) as info:
            c.pipeline(STAGES, 1)
        error = info.value
        assert (error.code, error.stage, error.agent) == ("unknown_type", 1, "counter/b")
        assert error.message.startswith("stage 1 (counter/b fly)")
        with pytest.raises(RemoteError) as info:
            c.pipeline(STAGES, 1)
        assert (info.value.code, info.value.stage, info.value.agent) == ("timeout", None, None)


def test_broadcast_envelope_and_the_map_it_returns():
    agents = ["counter/a", "kv/b", "slow/c", "echo/d"]

    def script(node: FakeNode) -> None:
        [(ident, request)] = node.requests(1)
        assert without_id(request) == {
            "v": 1, "type": "incr", "mode": "call", "routing": "scatter", "targets": agents,
            "timeout_ms": 2700, "data": {"n": 1}}
        reply(node, ident, request, {
            "echo/d": {"data": None},  # the node's order need not be the caller's
            "counter/a": {"data": {"value": 1}},
            "kv/b": {"error": {"code": "unknown_type", "message": "no handler for 'incr'"}},
            # slow/c missing: a node that breaks the protocol must not break the caller
        })

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        gathered = c.broadcast(agents, "incr", {"n": 1}, timeout_s=3.0)
    assert list(gathered) == agents
    assert gathered["counter/a"] == {"value": 1} and gathered["echo/d"] is None
    kv, slow = gathered["kv/b"], gathered["slow/c"]
    assert isinstance(kv, RemoteError) and (kv.code, kv.message) == (
        "unknown_type", "no handler for 'incr'")
    assert isinstance(slow, RemoteError) and slow.code == "internal" and "slow/c" in slow.message


@pytest.mark.parametrize("make", [lambda c: c.broadcast(["counter/a"], "get"),
                                  lambda c: c.call("counter/a", "get")],
                         ids=["broadcast", "call"])
def test_an_error_of_the_whole_request_raises_without_a_stage(make):
    def script(node: FakeNode) -> None:
        [(ident, request)] = node.requests(1)
        node.error(ident, request["id"], "overloaded")

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        with pytest.raises(RemoteError) as info:
            make(c)
        assert (info.value.code, info.value.stage, info.value.agent) == ("overloaded", None, None)


def test_publish_strategy_sets_routing():
    def script(node: FakeNode) -> None:
        sent = [request for _, request in node.requests(3)]
        assert [r.get("routing") for r in sent] == [None, "multicast", "gossip"]
        assert all("routing" not in r for r in sent[:1])
        for request in sent:
            assert (request["mode"], request["subject"], request["type"],
                    request["data"]) == ("publish", "room", "note", {"n": 1})

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        c.publish("room", "note", {"n": 1})
        c.publish("room", "note", {"n": 1}, strategy="multicast")
        c.publish("room", "note", {"n": 1}, strategy="gossip")


def test_bad_arguments_send_nothing():
    def script(node: FakeNode) -> None:
        assert node.no_request_within(0.5)

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        with pytest.raises(ValueError, match="strategy"):
            c.publish("room", "note", strategy="flood")
        with pytest.raises(ValueError, match="2..16 stages"):
            c.pipeline([("echo/a", "x")])
        with pytest.raises(ValueError, match="named twice"):
            c.broadcast(["echo/a", "echo/a"], "x")
        with pytest.raises(ValueError, match="'syn.'"):
            c.broadcast(["echo/a"], "syn.stop")


# --- AsyncClient: the same envelopes ----------------------------------------------------------

def test_async_client_pipeline_broadcast_and_gossip():
    def script(node: FakeNode) -> None:
        by_routing = {request.get("routing"): (ident, request)
                      for ident, request in node.requests(3)}
        ident, gossip = by_routing["gossip"]
        assert (gossip["mode"], gossip["subject"], gossip["type"]) == ("publish", "room", "note")
        ident, pipeline = by_routing["pipeline"]
        assert (pipeline["subject"], pipeline["type"], pipeline["stages"],
                pipeline["timeout_ms"]) == ("echo/a", "x", [["counter/b", "incr"],
                                                            ["kv/c", "put"]], 900)
        stage_error(node, ident, pipeline, 2, "kv/c")
        ident, scatter = by_routing["scatter"]
        assert (scatter["targets"], scatter["type"], scatter["timeout_ms"], "subject" in scatter
                ) == (["counter/a", "counter/b"], "get", 4500, False)
        reply(node, ident, scatter, {"counter/a": {"data": {"value": 1}},
                                     "counter/b": {"error": {"code": "timeout",
                                                             "message": "late"}}})

    async def main(node: FakeNode) -> None:
        async with AsyncClient(node.address, timeout_s=5) as c:
            await c.publish("room", "note", strategy="gossip")
            pipeline = c.pipeline(STAGES, {"key": "k"}, timeout_s=1.0)
            gathered = await c.broadcast(["counter/a", "counter/b"], "get")
            with pytest.raises(RemoteError) as info:
                await pipeline
            assert (info.value.code, info.value.stage, info.value.agent) == (
                "unknown_type", 2, "kv/c")
            assert gathered["counter/a"] == {"value": 1}
            assert gathered["counter/b"].code == "timeout"
            with pytest.raises(ValueError, match="2..16 stages"):
                c.pipeline([])  # refused at once, not when awaited
            with pytest.raises(ValueError, match="strategy"):
                await c.publish("room", "note", strategy="gossip ")

    with FakeNode(script) as node:
        asyncio.run(main(node))
