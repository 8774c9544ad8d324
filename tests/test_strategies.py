"""protocols/strategies.py: scatter-gather and pipelines answered exactly once."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import wire
from protocols.effects import Answer, Fail, ForwardTo, Relay, Route
from protocols.routing import Refusal
from protocols.strategies import STRATEGY, Strategies

ME = "n0"
CLIENT = (("handle", b"p"), None, None, None, 0.0)  # a local client's reply_to


def machine(**kw) -> Strategies:
    return Strategies(ME, default_timeout_s=kw.pop("timeout_s", 5.0),
                      reply_bytes_max=kw.pop("reply_bytes_max", 1 << 20), **kw)


def request(env: dict) -> wire.Request:
    return wire.validate_request({"v": 1, "id": "r1", "mode": "call", **env})


def scatter_req(targets, **kw) -> wire.Request:
    return request({"type": "get", "routing": "scatter", "targets": list(targets), **kw})


def reply(data, rid="r1") -> bytes:
    return wire.reply(rid, data, "x")


def error(code, message="m", rid="r1") -> bytes:
    return wire.error(rid, code, message, "x")


def answer_of(effects) -> dict:
    (answer,) = [e for e in effects if type(e) is Answer]
    assert answer.handle is CLIENT and answer.request_id == "r1"
    return answer.data


def test_scatter_runs_local_targets_one_by_one_and_forwards_once_per_owner():
    m = machine()
    owners = {"a/1": ME, "a/2": "n1", "a/3": "n1", "a/4": "n2", "a/5": ME}
    effects = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    routes = [e for e in effects if type(e) is Route]
    forwards = [e for e in effects if type(e) is ForwardTo]
    assert sorted(e.request.subject for e in routes) == ["a/1", "a/5"]
    assert {e.owner: e.request.targets for e in forwards} == {"n1": ("a/2", "a/3"),
                                                               "n2": ("a/4",)}
    for effect in routes + forwards:
        assert effect.reply_to[1] is STRATEGY
        # what travels is a valid envelope of its own, parsed the same way
        parsed = wire.parse_request(effect.payload, 1 << 20)
        assert parsed.id == "r1" and parsed.type == "get"
    part = wire.parse_request(forwards[0].payload, 1 << 20)
    assert part.routing == "scatter" and 0 < part.timeout_ms < 5000
    assert m.in_flight == 1


def test_scatter_answer_maps_every_target_in_order_once_all_parts_answered():
    m = machine()
    owners = {"a/1": ME, "a/2": "n1", "a/3": "n1"}
    effects = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    local = next(e for e in effects if type(e) is Route)
    remote = next(e for e in effects if type(e) is ForwardTo)
    assert m.answered(local.reply_to[0], reply(1), 0.1) == []
    done = m.answered(remote.reply_to[0], reply({"a/2": {"data": 2},
                                                 "a/3": {"error": {"code": "timeout",
                                                                   "message": "t"}}}), 0.2)
    assert list(answer_of(done).items()) == [
        ("a/1", {"data": 1}), ("a/2", {"data": 2}),
        ("a/3", {"error": {"code": "timeout", "message": "t"}})]
    assert m.in_flight == 0
    assert m.answered(local.reply_to[0], reply(9), 0.3) == []  # late: nothing twice


def test_a_failed_part_answers_each_of_its_agents_with_the_error():
    m = machine()
    owners = {"a/1": "n1", "a/2": "n1", "a/3": Refusal("unavailable", "no quorum")}
    effects = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    (part,) = [e for e in effects if type(e) is ForwardTo]
    data = answer_of(m.answered(part.reply_to[0], error("overloaded", "full"), 0.1))
    assert data["a/1"] == data["a/2"] == {"error": {"code": "overloaded", "message": "full"}}
    assert data["a/3"] == {"error": {"code": "unavailable", "message": "no quorum"}}


def test_an_owner_answer_missing_an_agent_marks_it_internal():
    m = machine()
    owners = {"a/1": "n1", "a/2": "n1"}
    (part,) = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    data = answer_of(m.answered(part.reply_to[0], reply({"a/1": {"data": 1}, "zzz": 3}), 0.1))
    assert data["a/1"] == {"data": 1} and data["a/2"]["error"]["code"] == "internal"
    assert "zzz" not in data


def test_the_deadline_answers_missing_targets_timeout_once():
    m = machine()
    owners = {"a/1": ME, "a/2": "n1"}
    effects = m.scatter(scatter_req(owners, timeout_ms=300), CLIENT, owners, 0, 10.0)
    local = next(e for e in effects if type(e) is Route)
    m.answered(local.reply_to[0], reply(1), 10.1)
    assert m.next_deadline() == pytest.approx(10.3)
    assert m.tick(10.2) == []
    data = answer_of(m.tick(10.3))
    assert data["a/1"] == {"data": 1} and data["a/2"]["error"]["code"] == "timeout"
    assert m.tick(99.0) == [] and m.next_deadline() is None


def test_gathered_answers_are_bounded_in_bytes():
    m = machine(reply_bytes_max=100)
    owners = {"a/1": ME, "a/2": ME}
    first, second = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    m.answered(first.reply_to[0], reply("x" * 20), 0.1)
    data = answer_of(m.answered(second.reply_to[0], reply("y" * 200), 0.2))
    assert data["a/1"] == {"data": "x" * 20}
    assert data["a/2"]["error"]["code"] == "too_large"


def test_a_refused_scatter_or_one_nobody_waits_for():
    m = machine(in_flight_max=1)
    owners = {"a/1": "n1"}
    assert m.scatter(scatter_req(owners), None, owners, 1, 0.0) == []  # one-way forward
    m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    (fail,) = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    assert type(fail) is Fail and fail.code == "overloaded"
    assert m.stats["refused"] == 1


def pipeline_req(**kw) -> wire.Request:
    env = {"type": "t0", "subject": "s/0", "routing": "pipeline",
           "stages": [["s/1", "t1"], ["s/2", "t2"]], "timeout_ms": 1000, **kw}
    return request(env)


def test_a_stage_answer_becomes_the_next_stage_request_with_its_data():
    m = machine()
    req = pipeline_req()
    arrived = (None, "n9", b"t" * 16, "tp", 5.0)  # forwarded to us by entry n9
    slot = m.stage(req, arrived, 5.0)
    (route,) = m.answered(slot[0], reply({"x": 1}), 5.25)
    assert type(route) is Route and route.reply_to is arrived and route.hops == 0
    nxt = wire.parse_request(route.payload, 1 << 20)
    assert (nxt.subject, nxt.type, nxt.data, nxt.stage) == ("s/1", "t1", {"x": 1}, 1)
    assert nxt.stages == (("s/2", "t2"),) and nxt.timeout_ms == 750  # the deadline moves
    last = m.stage(nxt, arrived, 5.3)
    (route,) = m.answered(last[0], reply(7), 5.4)
    final = wire.parse_request(route.payload, 1 << 20)
    assert final.stages == () and final.stage == 2
    end = m.stage(final, arrived, 5.5)
    payload = reply(8)
    assert m.answered(end[0], payload, 5.6) == [Relay(arrived, payload)]


def test_an_error_at_a_stage_names_the_stage_and_agent():
    m = machine()
    req = wire.validate_request({"v": 1, "id": "r1", "type": "t1", "subject": "s/1",
                                 "routing": "pipeline", "stages": [["s/2", "t2"]], "stage": 1})
    slot = m.stage(req, CLIENT, 0.0)
    (relay,) = m.answered(slot[0], error("unknown_type", "no t1"), 0.1)
    env = msgpack.unpackb(relay.payload)
    assert env["type"] == "syn.error" and env["re"] == "r1"
    assert env["data"]["code"] == "unknown_type" and env["data"]["stage"] == 1
    assert env["data"]["agent"] == "s/1" and "no t1" in env["data"]["message"]


def test_a_stage_past_the_deadline_ends_the_pipeline_timeout():
    m = machine()
    slot = m.stage(pipeline_req(timeout_ms=100), (None, "n9", b"t" * 16, None, 1.0), 1.0)
    (relay,) = m.answered(slot[0], reply(1), 1.2)
    assert msgpack.unpackb(relay.payload)["data"]["code"] == "timeout"


def test_the_entry_answers_a_pipeline_once_reply_or_deadline():
    m = machine()
    wrapped = m.pipeline_entry(pipeline_req(timeout_ms=500), CLIENT, 0.0)
    assert wrapped[1] is STRATEGY and m.in_flight == 1
    payload = reply("done")
    assert m.answered(wrapped[0], payload, 0.2) == [Relay(CLIENT, payload)]
    assert m.answered(wrapped[0], payload, 0.3) == [] and m.tick(1.0) == []
    late = m.pipeline_entry(pipeline_req(timeout_ms=500), CLIENT, 2.0)
    (fail,) = m.tick(2.5)
    assert type(fail) is Fail and fail.code == "timeout" and fail.handle is CLIENT
    assert m.answered(late[0], payload, 2.6) == [] and m.stats["late"] == 2


def test_stop_answers_everything_in_flight_unavailable():
    m = machine()
    m.pipeline_entry(pipeline_req(), CLIENT, 0.0)
    owners = {"a/1": "n1"}
    m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    effects = m.stop()
    assert type(effects[0]) is Fail and effects[0].code == "unavailable"
    assert answer_of(effects[1:])["a/1"]["error"]["code"] == "unavailable"
    assert m.in_flight == 0 and m.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([ME, "n1", "n2", "n3"]),
                          st.sampled_from(["reply", "error", "junk", "late"])),
                min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_every_scatter_is_answered_exactly_once_whatever_the_order(plan, rnd):
    """Any owners, any answers in any order, duplicates and junk included, then the
    deadline: exactly one Answer naming every target exactly once."""
    m = machine()
    targets = [f"a/{i}" for i in range(len(plan))]
    owners = {t: owner for t, (owner, _) in zip(targets, plan)}
    effects = m.scatter(scatter_req(targets, timeout_ms=1000), CLIENT, owners, 0, 0.0)
    answers = [e for e in effects if type(e) is Answer]
    slots = [e.reply_to[0] for e in effects if type(e) in (Route, ForwardTo)]
    rnd.shuffle(slots)
    kinds = {"reply": reply({t: {"data": 1} for t in targets}), "error": error("timeout"),
             "junk": b"\xc1", "late": None}
    for slot, (_, kind) in zip(slots, plan):
        payload = kinds[kind]
        for _ in range(2 if payload is not None else 0):  # duplicates too
            answers += [e for e in m.answered(slot, payload, 0.5) if type(e) is Answer]
    answers += [e for e in m.tick(1.0) if type(e) is Answer]
    assert len(answers) == 1
    assert list(answers[0].data) == targets
    assert m.in_flight == 0
