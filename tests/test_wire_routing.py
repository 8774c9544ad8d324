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


def routed_fields(r) -> tuple:
    return (r.id, r.type, r.subject, r.mode, r.data, r.ttl, r.raw, r.routing, r.stages,
            r.stage, r.targets, r.timeout_ms)


def test_a_routed_request_carries_every_field_of_its_envelope():
    env = {"v": 1, "id": "r", "type": "t", "mode": "publish", "subject": "g",
           "routing": "gossip", "data": [1], "ttl": 3}
    assert routed_fields(wire.validate_request(env)) == \
        ("r", "t", "g", "publish", [1], 3, env, "gossip", (), 0, (), None)
    env = {"v": 1, "id": "r", "type": "t", "subject": "a/1", "routing": "pipeline",
           "stages": [["b/2", "u"]], "stage": 1, "data": {"k": 1}, "ttl": 2,
           "timeout_ms": 900}
    assert routed_fields(wire.validate_request(env)) == \
        ("r", "t", "a/1", "call", {"k": 1}, 2, env, "pipeline", (("b/2", "u"),), 1, (), 900)
    env = {"v": 1, "id": "r", "type": "t", "subject": "ignored", "routing": "scatter",
           "targets": ["a/1"], "data": 5, "ttl": 0, "timeout_ms": 70}
    assert routed_fields(wire.validate_request(env)) == \
        ("r", "t", None, "call", 5, 0, env, "scatter", (), 0, ("a/1",), 70)


def test_the_stages_are_a_tuple_of_tuples():
    p = req(subject="a/1", routing="pipeline", stages=[["b/2", "u"], ["c/3", "w"]])
    assert type(p.stages) is tuple and all(type(pair) is tuple for pair in p.stages)
    assert type(req(routing="scatter", targets=["a/1"]).targets) is tuple


def test_a_multicast_routing_keeps_the_raw_map_and_the_request_its_fields():
    env = {"v": 1, "id": "r", "type": "t", "mode": "publish", "subject": "g",
           "routing": "multicast", "ttl": 4}
    multicast = wire.validate_request(env)
    assert multicast.raw is env and multicast.raw["routing"] == "multicast"
    assert (multicast.id, multicast.subject, multicast.mode, multicast.ttl) == \
        ("r", "g", "publish", 4)


STAGE_PAIRS = [["b/2", "u"]]


def pipeline(**env):
    return req(subject="a/1", routing="pipeline", **env)


def test_a_pipeline_has_16_stages_at_most_counting_the_current_one():
    assert len(pipeline(stages=STAGE_PAIRS * 15).stages) == 15
    assert "16 stages" in refused(subject="a/1", routing="pipeline", stages=STAGE_PAIRS * 16)
    assert pipeline(stages=STAGE_PAIRS * 14, stage=1).stage == 1
    assert "16 stages" in refused(subject="a/1", routing="pipeline",
                                  stages=STAGE_PAIRS * 15, stage=1)
    assert pipeline(stages=[], stage=15).stage == 15  # the last of 16 stages
    assert pipeline(stages=[], stage=1).stages == ()
    assert pipeline(stages=STAGE_PAIRS).stages == (("b/2", "u"),)


@pytest.mark.parametrize("stage", [16, -1, True, "0"])
def test_a_stage_index_past_15_or_not_an_integer_is_refused_naming_the_range(stage):
    message = refused(subject="a/1", routing="pipeline", stages=[], stage=stage)
    assert message == "'stage' must be an integer 0..15"


ROUTED_MESSAGES = [
    ({"routing": "gossip", "mode": "publish"},
     "'subject' must be a string of 1..512 characters"),
    ({"routing": "pipeline", "stages": STAGE_PAIRS},
     "'subject' must be a string of 1..512 characters"),
    ({"routing": "pipeline", "subject": "a/1", "stages": STAGE_PAIRS * 16},
     "'stages' must list the stages after the first as [agent, type] pairs, "
     "16 stages in all at most"),
    ({"routing": "pipeline", "subject": "a/1", "stages": [["b/2", "u", "x"]]},
     "each of 'stages' must be an [agent, type] pair"),
    ({"routing": "pipeline", "subject": "a/1", "stages": [[7, "u"]]},
     "a stage's agent must be a string of 1..512 characters"),
    ({"routing": "pipeline", "subject": "a/1", "stages": [["b/2", 7]]},
     "a stage's type must be an agent message type of 1..128 characters"),
    ({"routing": "scatter", "targets": ["a/1", ""]},
     "each of 'targets' must be a string of 1..512 characters"),
    ({"routing": "scatter", "targets": ["a/1", "a/2", "a/1"]},
     "'targets' must not name an agent twice"),
    ({"routing": "scatter", "targets": "a/1"}, "'targets' must list 1..1000 agent ids"),
    ({"routing": "scatter", "targets": ["a/1"], "ttl": 9}, "'ttl' must be an integer 0..8"),
    ({"routing": "scatter", "targets": ["a/1"], "timeout_ms": 600_001},
     "'timeout_ms' must be an integer 1..600000"),
    ({"routing": "pipeline", "subject": "a/1", "stages": STAGE_PAIRS, "consistency": "all"},
     "'routing' 'pipeline' takes no 'delivery' or 'consistency'"),
    ({"routing": "gossip", "mode": "publish", "subject": "g", "consistency": "local"},
     "'routing' 'gossip' takes no 'delivery' or 'consistency'"),
]


@pytest.mark.parametrize("env, message", ROUTED_MESSAGES)
def test_refused_routed_requests_name_the_field_and_its_bounds(env, message):
    assert refused(**env) == message


@pytest.mark.parametrize("routing, extra", [
    ("gossip", {"mode": "publish"}), ("pipeline", {"stages": STAGE_PAIRS})])
def test_a_routed_subject_is_an_agent_id_of_1_to_512_characters(routing, extra):
    assert req(subject="s" * 512, routing=routing, **extra).subject == "s" * 512
    assert "'subject'" in refused(subject="s" * 513, routing=routing, **extra)
    assert "'subject'" in refused(subject="", routing=routing, **extra)
    assert "'subject'" in refused(subject=["a/1"], routing=routing, **extra)


def test_a_stage_type_is_1_to_128_characters_and_not_a_system_type():
    assert pipeline(stages=[["b/2", "u" * 128]]).stages == (("b/2", "u" * 128),)
    for mtype in ("u" * 129, "", 7, "syn.ping"):
        assert "a stage's type" in refused(subject="a/1", routing="pipeline",
                                           stages=[["b/2", mtype]])


def test_a_scatter_takes_1_to_1000_targets():
    assert req(routing="scatter", targets=["a/1"]).targets == ("a/1",)
    thousand = [f"a/{i}" for i in range(1000)]
    assert req(routing="scatter", targets=thousand).targets == tuple(thousand)
    assert "'targets' must list 1..1000" in refused(routing="scatter", targets=thousand + ["b"])


@pytest.mark.parametrize("routing, extra", [
    ("gossip", {"mode": "publish", "subject": "g"}),
    ("pipeline", {"subject": "a/1", "stages": STAGE_PAIRS}),
    ("scatter", {"targets": ["a/1"]})])
def test_a_routed_ttl_is_an_integer_0_to_8(routing, extra):
    for ttl in (0, 8):
        assert req(routing=routing, ttl=ttl, **extra).ttl == ttl
    assert req(routing=routing, **extra).ttl is None
    for ttl in (-1, 9, True, "1", 1.0):
        assert refused(routing=routing, ttl=ttl, **extra) == "'ttl' must be an integer 0..8"


@pytest.mark.parametrize("routing, extra", [
    ("pipeline", {"subject": "a/1", "stages": STAGE_PAIRS}), ("scatter", {"targets": ["a/1"]})])
def test_a_timeout_is_1_to_600000_ms(routing, extra):
    for timeout_ms in (1, 600_000):
        assert req(routing=routing, timeout_ms=timeout_ms, **extra).timeout_ms == timeout_ms
    for timeout_ms in (0, 600_001, True, 1.5):
        assert "'timeout_ms' must be an integer 1..600000" in refused(
            routing=routing, timeout_ms=timeout_ms, **extra)


def test_a_nil_stage_is_the_first_stage_as_nil_means_absent():
    p = req(subject="a/1", routing="pipeline", stages=[["b/2", "u"]], stage=None)
    assert p.stage == 0
