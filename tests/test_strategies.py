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


# ------------------------------------------------------------------ exact pieces
# What each piece carries, field by field (scripts/mutation.sh found these unheld).

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ARRIVED = ("h", "n9", b"t" * 16, "tp-3", 4.5)  # reply_to with every field distinct
ZERO_STATS = {"scatters": 0, "scatter_targets": 0, "scatter_parts": 0, "pipelines": 0,
              "stages": 0, "timed_out": 0, "late": 0, "refused": 0}


def carried(request, payload) -> None:
    """The request object is the payload it travels as."""
    assert request.raw == msgpack.unpackb(payload, raw=False)
    assert request.nbytes == len(payload) and request.mode == "call"


def test_a_new_machine_counts_nothing():
    assert machine().stats == ZERO_STATS


def test_scatter_pieces_carry_id_type_data_ttl_and_traceparent():
    m = machine()
    owners = {"a/1": ME, "a/2": "n1", "a/3": "n1"}
    req = scatter_req(owners, data={"k": 1}, ttl=3, traceparent=TP, timeout_ms=1000)
    route, forward = m.scatter(req, ARRIVED, owners, 2, 10.0)
    one = route.request
    assert (one.id, one.type, one.subject, one.data, one.ttl) == ("r1", "get", "a/1",
                                                                  {"k": 1}, 3)
    carried(one, route.payload)
    assert one.raw["traceparent"] == TP and route.hops == 2
    assert (one.raw["data"], one.raw["ttl"]) == ({"k": 1}, 3)   # what travels, not only the object
    assert route.reply_to[1:] == (STRATEGY, None, "tp-3", 4.5)
    part = forward.request
    assert (part.id, part.type, part.subject, part.data, part.ttl) == ("r1", "get", None,
                                                                       {"k": 1}, 3)
    assert (part.routing, part.targets, part.timeout_ms) == ("scatter", ("a/2", "a/3"), 900)
    carried(part, forward.payload)
    assert part.raw["traceparent"] == TP and part.raw["targets"] == ["a/2", "a/3"]
    assert (part.raw["data"], part.raw["ttl"], "subject" in part.raw) == ({"k": 1}, 3, False)
    assert forward.hops == 2 and forward.reply_to[1:] == (STRATEGY, None, "tp-3", 4.5)
    assert m.stats == {**ZERO_STATS, "scatters": 1, "scatter_targets": 3, "scatter_parts": 1}
    assert m.deadline_of(route.reply_to[0]) == m.deadline_of(forward.reply_to[0]) == 11.0


@pytest.mark.parametrize("timeout_ms, sub_ms", [(5000, 4800), (1000, 900), (1, 1)])
def test_an_owners_part_ends_a_margin_before_the_gather(timeout_ms, sub_ms):
    """The margin: 0.2 s, or a tenth of the time left when that is less; 1 ms at least."""
    m = machine()
    owners = {"a/1": "n1"}
    (forward,) = m.scatter(scatter_req(owners, timeout_ms=timeout_ms), CLIENT, owners, 0, 3.0)
    assert forward.request.timeout_ms == sub_ms


def test_unreadable_answers_become_internal_errors():
    m = machine()
    owners = {f"a/{i}": ME for i in range(3)} | {"b/1": "n1"}
    effects = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    slots = [e.reply_to[0] for e in effects]
    unreadable = {"error": {"code": "internal", "message": "unreadable answer"}}
    m.answered(slots[0], b"\xc1", 0.1)                        # not msgpack
    m.answered(slots[1], msgpack.packb([1, 2]), 0.1)          # not a map
    m.answered(slots[2], msgpack.packb({"type": "syn.error", "data": {"code": 7}}), 0.1)
    data = answer_of(m.answered(slots[3], reply([1]), 0.1))   # an owner's map is not a map
    assert data == {"a/0": unreadable, "a/1": unreadable, "a/2": unreadable,
                    "b/1": {"error": {"code": "internal",
                                      "message": "the owner's answer lacks 'b/1'"}}}


def test_a_reply_whose_map_has_integer_keys_is_carried():
    m = machine()
    owners = {"a/1": ME}
    (route,) = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    data = answer_of(m.answered(route.reply_to[0], reply({1: "x"}), 0.1))
    assert data == {"a/1": {"data": {1: "x"}}}


def test_gathered_bytes_may_reach_the_bound_exactly():
    first, second = reply("x" * 20), reply("y" * 30)
    for bound, code in ((len(first) + len(second), None),
                        (len(first) + len(second) - 1, "too_large")):
        m = machine(reply_bytes_max=bound)
        owners = {"a/1": ME, "a/2": ME}
        r1, r2 = m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
        m.answered(r1.reply_to[0], first, 0.1)
        data = answer_of(m.answered(r2.reply_to[0], second, 0.1))
        if code is None:
            assert data["a/2"] == {"data": "y" * 30}
        else:
            assert data["a/2"] == {"error": {"code": "too_large", "message":
                                             f"the gathered answers exceed {bound} bytes"}}


def test_refusals_name_the_limit_and_the_request():
    m = machine(in_flight_max=1)
    owners = {"a/1": "n1"}
    m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    why = "1 scatters and pipelines in flight on this node"
    assert m.scatter(scatter_req(owners), ARRIVED, owners, 0, 0.0) == [
        Fail(ARRIVED, "r1", "overloaded", why, "get")]
    assert m.pipeline_entry(pipeline_req(), ARRIVED, 0.0) == Fail(ARRIVED, "r1", "overloaded",
                                                                  why, "t0")
    assert m.stats["refused"] == 2


def test_expiry_and_stop_answer_with_these_messages_and_count():
    m = machine(timeout_s=2.0)
    for _ in range(3):
        m.pipeline_entry(pipeline_req(timeout_ms=None), ARRIVED, 0.0)
    owners = {"a/1": "n1"}
    m.scatter(scatter_req(owners, timeout_ms=500), CLIENT, owners, 0, 0.0)
    m.scatter(scatter_req(owners, timeout_ms=700), CLIENT, owners, 0, 0.0)
    assert m.in_flight == 5 and m.next_deadline() == 0.5
    (scattered,) = m.tick(0.5)
    assert answer_of([scattered]) == {"a/1": {"error": {
        "code": "timeout", "message": "no answer before the scatter's deadline"}}}
    assert m.in_flight == 4 and m.next_deadline() == 0.7
    m.tick(0.7)
    assert m.stats["timed_out"] == 2 and m.in_flight == 3
    assert m.next_deadline() == 2.0       # the pipelines' default timeout
    late = m.pipeline_entry(pipeline_req(timeout_ms=100), ARRIVED, 1.0)
    assert m.tick(1.1) == [Fail(ARRIVED, "r1", "timeout",
                                "the pipeline did not finish before its deadline", "t0")]
    assert m.in_flight == 3 and m.stats["timed_out"] == 3
    for _ in range(2):
        assert m.answered(late[0], reply(1), 1.2) == []
    assert m.stats["late"] == 2
    stopped = m.stop()
    assert stopped == [Fail(ARRIVED, "r1", "unavailable", "node is shutting down", "t0")] * 3
    assert m.in_flight == 0


def test_stop_answers_scatter_targets_shutting_down():
    m = machine()
    owners = {"a/1": "n1"}
    m.scatter(scatter_req(owners), CLIENT, owners, 0, 0.0)
    assert answer_of(m.stop()) == {"a/1": {"error": {"code": "unavailable",
                                                     "message": "node is shutting down"}}}


def test_the_entry_wraps_the_reply_to_and_answers_it_once():
    m = machine()
    first = m.pipeline_entry(pipeline_req(timeout_ms=300), ARRIVED, 1.0)
    second = m.pipeline_entry(pipeline_req(timeout_ms=300), ARRIVED, 1.0)
    assert first[1:] == (STRATEGY, None, "tp-3", 4.5) and m.deadline_of(first[0]) == 1.3
    assert m.stats["pipelines"] == 2 and m.in_flight == 2
    assert m.answered(first[0], reply(1), 1.1) == [Relay(ARRIVED, reply(1))]
    assert m.in_flight == 1
    assert m.answered(second[0], reply(2), 1.1) == [Relay(ARRIVED, reply(2))]
    assert m.in_flight == 0


def test_a_stage_wraps_its_reply_to_once_with_its_own_deadline():
    m = machine()
    slot = m.stage(pipeline_req(timeout_ms=400), ARRIVED, 2.0)
    assert slot[1:] == (STRATEGY, None, "tp-3", 4.5) and m.deadline_of(slot[0]) == 2.4
    assert m.stage(pipeline_req(), slot, 2.1) is slot          # wrapped already
    no_deadline = m.stage(pipeline_req(timeout_ms=None), ARRIVED, 2.0)
    assert m.deadline_of(no_deadline[0]) is None
    assert m.stats["stages"] == 2 and m.stage(pipeline_req(), None, 2.0) is None


def test_the_next_stage_request_carries_everything_on():
    m = machine()
    req = pipeline_req(ttl=4, traceparent=TP, stage=2)
    slot = m.stage(req, ARRIVED, 5.0)
    (route,) = m.answered(slot[0], reply({"x": 1}), 5.25)
    nxt = route.request
    assert (nxt.id, nxt.type, nxt.subject, nxt.data, nxt.ttl) == ("r1", "t1", "s/1",
                                                                  {"x": 1}, 4)
    assert (nxt.routing, nxt.stages, nxt.stage, nxt.timeout_ms) == (
        "pipeline", (("s/2", "t2"),), 3, 750)
    carried(nxt, route.payload)
    assert nxt.raw["traceparent"] == TP and route.reply_to is ARRIVED
    assert (nxt.raw["data"], nxt.raw["ttl"], nxt.raw["timeout_ms"]) == ({"x": 1}, 4, 750)
    assert m.answered(slot[0], reply({"x": 1}), 5.3) == []     # answered once
    untimed = m.stage(pipeline_req(timeout_ms=None), ARRIVED, 5.0)
    (route,) = m.answered(untimed[0], reply(1), 99.0)
    assert route.request.timeout_ms is None and "timeout_ms" not in route.request.raw


def stage_error_env(relay: Relay) -> dict:
    return msgpack.unpackb(relay.payload, raw=False)


def test_a_stage_error_is_this_exact_envelope():
    m = machine()
    req = pipeline_req(traceparent=TP, stage=1)
    slot = m.stage(req, ARRIVED, 0.0)
    (relay,) = m.answered(slot[0], msgpack.packb(
        {"type": "syn.error", "data": {"code": "bad_request"}}), 0.1)
    assert relay.reply_to is ARRIVED
    assert stage_error_env(relay) == {
        "v": 1, "id": "r1", "re": "r1", "type": "syn.error", "source": ME, "traceparent": TP,
        "data": {"code": "bad_request", "message": "stage 1 (s/0 t0): ", "stage": 1,
                 "agent": "s/0"}}
    plain = m.stage(pipeline_req(), ARRIVED, 0.0)
    (relay,) = m.answered(plain[0], error("x", "y"), 0.1)
    assert "traceparent" not in stage_error_env(relay)


def test_a_stage_answered_exactly_at_its_deadline_times_out():
    m = machine()
    slot = m.stage(pipeline_req(timeout_ms=500), ARRIVED, 1.0)
    (relay,) = m.answered(slot[0], reply(1), 1.5)
    assert relay.reply_to is ARRIVED and stage_error_env(relay)["data"]["message"] == (
        "stage 0 (s/0 t0): the pipeline's deadline passed")


def test_a_stage_reply_too_large_for_the_next_request_ends_the_pipeline():
    data = "z" * 100
    probe = wire.encode(wire.request("r1", "t1", "s/1", data, routing="pipeline",
                                     stages=[["s/2", "t2"]], stage=1, timeout_ms=1000))
    for bound, ends in ((len(probe), False), (len(probe) - 1, True)):
        m = machine(reply_bytes_max=bound)
        slot = m.stage(pipeline_req(), ARRIVED, 0.0)
        (effect,) = m.answered(slot[0], reply(data), 0.0)
        assert (type(effect) is Relay) is ends
        if ends:
            assert effect.reply_to is ARRIVED
            assert stage_error_env(effect)["data"] == {
                "code": "too_large", "stage": 0, "agent": "s/0",
                "message": f"stage 0 (s/0 t0): its reply makes a request of {len(probe)} "
                           f"bytes, over {bound}"}


def test_answered_requests_leave_no_timers_behind():
    """A pipeline answered at once must not keep its 10-minute timer on the heap."""
    m = machine()
    for i in range(20_000):
        slot = m.pipeline_entry(pipeline_req(timeout_ms=600_000), CLIENT, 0.0)
        m.answered(slot[0], reply("done"), 0.0)
    assert m.in_flight == 0 and len(m._timers) <= 1024 + 1


def test_every_counter_counts_each_event_once():
    m = machine(in_flight_max=2)
    first = {"a/1": ME, "a/2": "n1", "a/3": "n1"}
    second = {"b/1": "n1", "b/2": "n2"}
    parts = m.scatter(scatter_req(first), CLIENT, first, 0, 0.0)
    m.scatter(scatter_req(second), CLIENT, second, 0, 0.0)
    for _ in range(2):
        (fail,) = m.scatter(scatter_req(first), CLIENT, first, 0, 0.0)
        assert fail.code == "overloaded"
    for effect in parts:
        m.answered(effect.reply_to[0], reply({"a/2": {"data": 2}, "a/3": {"data": 3}}), 0.1)
    for effect in parts[:2]:  # the gather is done: both are late
        assert m.answered(effect.reply_to[0], reply(1), 0.2) == []
    # scatter_parts: the parts forwarded to other owners (n1; n1 and n2)
    assert m.stats == {**ZERO_STATS, "scatters": 2, "scatter_targets": 5, "scatter_parts": 3,
                       "refused": 2, "late": 2}


def test_requests_due_at_one_tick_all_time_out():
    m = machine()
    for _ in range(3):
        m.pipeline_entry(pipeline_req(timeout_ms=500), CLIENT, 0.0)
    fails = m.tick(1.0)
    assert [f.code for f in fails] == ["timeout"] * 3 and m.stats["timed_out"] == 3


def test_the_next_deadline_skips_requests_answered_already():
    m = machine()
    early = m.pipeline_entry(pipeline_req(timeout_ms=100), CLIENT, 0.0)
    m.pipeline_entry(pipeline_req(timeout_ms=900), CLIENT, 0.0)
    m.answered(early[0], reply("done"), 0.05)
    assert m.next_deadline() == 0.9


def test_the_timer_heap_is_compacted_just_past_twice_the_live_count_plus_1024():
    """The bound is exact: with 11 requests live (10 waiting, 1 just started), the
    heap grows to 2 * 11 + 1024 + 1 timers and is compacted on the next start."""
    m = machine()
    for _ in range(10):
        m.pipeline_entry(pipeline_req(timeout_ms=600_000), CLIENT, 0.0)
    sizes = []
    for _ in range(3000):
        slot = m.pipeline_entry(pipeline_req(timeout_ms=600_000), CLIENT, 0.0)
        sizes.append(len(m._timers))
        m.answered(slot[0], reply("done"), 0.0)
    assert max(sizes) == 2 * 11 + 1024 + 1
    assert min(sizes[1100:]) == 11
    assert m.in_flight == 10


def test_the_next_stage_gets_the_time_left_in_whole_milliseconds():
    m = machine()
    slot = m.stage(pipeline_req(timeout_ms=5000), ARRIVED, 10.0)
    (route,) = m.answered(slot[0], reply(1), 11.0)
    assert route.request.timeout_ms == 4000
    slot = m.stage(pipeline_req(timeout_ms=500), ARRIVED, 1.0)
    (route,) = m.answered(slot[0], reply(1), 1.4985)  # 1.5 ms left: 1 ms, still on time
    assert type(route) is Route and route.request.timeout_ms == 1


def test_a_next_stage_request_that_cannot_be_encoded_ends_the_pipeline_internal(monkeypatch):
    """Defence in depth: the reply's data came from msgpack, so it re-encodes; if the
    encoder ever refuses it, the pipeline ends with an error, not an exception."""
    real = wire.encode

    def encode(envelope):
        if "stages" in envelope:
            raise ValueError("refused by the encoder")
        return real(envelope)
    monkeypatch.setattr(wire, "encode", encode)
    m = machine()
    slot = m.stage(pipeline_req(traceparent=TP), ARRIVED, 0.0)
    (relay,) = m.answered(slot[0], reply(1), 0.1)
    assert type(relay) is Relay and relay.reply_to is ARRIVED
    assert stage_error_env(relay) == {
        "v": 1, "id": "r1", "re": "r1", "type": "syn.error", "source": ME, "traceparent": TP,
        "data": {"code": "internal", "message": "stage 0 (s/0 t0): refused by the encoder",
                 "stage": 0, "agent": "s/0"}}


def test_strategies_take_no_peer_messages_and_the_sentinel_names_itself():
    with pytest.raises(TypeError, match=r"^strategies take no peer messages \(answers come "
                                        r"through answered\)$"):
        machine().receive("n1", {}, 0.0)
    assert repr(STRATEGY) == "STRATEGY"
