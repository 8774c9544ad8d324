"""The 'routing' attribute (PROTOCOL.md 2.5): what is accepted, what is refused."""

from __future__ import annotations

import pytest

from protocols import wire
from protocols.wire import WireError


def req(**env):
    return wire.validate_request({"v": 1, "id": "r", "type": "t", **env})


def refused(**env) -> str:
    with pytest.raises(WireError) as info:
        req(**env)
    assert info.value.code == "bad_request" and info.value.request_id == "r"
    return info.value.message


def test_the_default_strategies_make_plain_requests_and_keep_the_raw_map():
    direct = req(subject="a/1", routing="direct")
    assert type(direct) is wire.Request and direct.routing is None
    assert direct.raw["routing"] == "direct"  # forwarded byte for byte anyway
    multicast = req(subject="g", mode="publish", routing="multicast")
    assert type(multicast) is wire.Request
    assert type(req(subject="a/1", routing="direct", delivery="exactly_once")) \
        is wire.GuaranteedRequest


def test_gossip_is_a_publish_to_a_group():
    gossip = req(subject="g", mode="publish", routing="gossip")
    assert gossip.routing == "gossip" and gossip.subject == "g"
    assert "of a call" in refused(subject="g", routing="gossip")  # a call: not allowed
    assert "must be one of" in refused(subject="g", mode="publish", routing="pipeline")


def test_a_pipeline_names_its_first_stage_and_lists_the_others():
    p = req(subject="a/1", routing="pipeline", stages=[["b/2", "u"], ["c/3", "w"]],
            timeout_ms=500)
    assert (p.subject, p.type, p.stage, p.timeout_ms) == ("a/1", "t", 0, 500)
    assert p.stages == (("b/2", "u"), ("c/3", "w"))
    last = req(subject="c/3", routing="pipeline", stages=[], stage=2)
    assert last.stages == () and last.stage == 2


@pytest.mark.parametrize("env, words", [
    ({"stages": []}, "stages"),                            # one stage is no pipeline
    ({"stages": [["b/2"]]}, "pair"),
    ({"stages": [["b/2", "syn.stop"]]}, "agent message type"),
    ({"stages": [["", "u"]]}, "agent"),
    ({"stages": [["b/2", "u"]] * 16}, "16 stages"),
    ({"stages": [["b/2", "u"]], "stage": -1}, "stage"),
    ({"stages": [["b/2", "u"]], "timeout_ms": 0}, "timeout_ms"),
    ({"stages": [["b/2", "u"]], "timeout_ms": True}, "timeout_ms"),
    ({"stages": [["b/2", "u"]], "delivery": "exactly_once"}, "delivery"),
    ({"stages": "b/2:u"}, "stages"),
])
def test_bad_pipelines_are_refused_with_the_field(env, words):
    assert words in refused(subject="a/1", routing="pipeline", **env)


def test_a_scatter_lists_distinct_targets_and_has_no_subject():
    s = req(routing="scatter", targets=["a/1", "a/2"], data=5)
    assert s.targets == ("a/1", "a/2") and s.subject is None and s.data == 5
    assert "twice" in refused(routing="scatter", targets=["a/1", "a/1"])
    assert "1..1000" in refused(routing="scatter", targets=[])
    assert "1..1000" in refused(routing="scatter", targets=[f"a/{i}" for i in range(1001)])
    assert "targets" in refused(routing="scatter", targets=["a/1", 7])
    assert "carries agent messages" in refused(routing="scatter", targets=["a/1"],
                                               type="syn.stop")


def test_an_unknown_or_ill_typed_routing_is_refused():
    assert "routing" in refused(subject="a/1", routing="teleport")
    assert "routing" in refused(subject="a/1", routing=["pipeline"])
    assert "routing" in refused(subject="a/1", mode="send", routing="scatter")
