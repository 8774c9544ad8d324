"""Envelope fields for per-message guarantees: consistency, delivery, session, vc.

Every bad value is ``bad_request`` naming the field, with the request id (and mode)
kept so the node answers, or not, as the request asked (PROTOCOL.md 2.1, 2.4).
"""

from __future__ import annotations

import msgpack
import pytest

from protocols import wire
from protocols.wire import ErrorCode

BIG = 1 << 20


def env(**fields) -> dict:
    base = {"v": 1, "id": "req-7", "type": "incr", "subject": "counter/a", "mode": "call"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def parse(envelope: dict) -> wire.Request:
    return wire.parse_request(wire.encode(envelope), BIG)


def refused(envelope: dict) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        parse(envelope)
    return info.value


CAUSAL = {"delivery": "causal", "session": "s1", "vc": {"s1": 3, "s2": 1}}


def test_absent_or_nil_fields_ask_for_nothing():
    for fields in ({}, {"consistency": None, "delivery": None},
                   {"session": 5, "vc": "ignored without causal delivery"}):
        req = parse(env(**fields))
        assert (req.consistency, req.delivery, req.session, req.vc) == (None,) * 4
        assert type(req) is wire.Request


@pytest.mark.parametrize("consistency", sorted(wire.CONSISTENCIES))
@pytest.mark.parametrize("delivery", [None, *sorted(wire.DELIVERIES - {"causal"})])
def test_each_consistency_and_delivery_is_taken(consistency, delivery):
    req = parse(env(consistency=consistency, delivery=delivery))
    assert (req.consistency, req.delivery, req.session, req.vc) == (
        consistency, delivery, None, None)
    assert isinstance(req, wire.Request) and req.id == "req-7" and req.mode == "call"


def test_causal_carries_its_session_and_clock():
    req = parse(env(consistency="quorum", **CAUSAL))
    assert (req.consistency, req.delivery, req.session, req.vc) == (
        "quorum", "causal", "s1", {"s1": 3, "s2": 1})
    limit = {f"p{i}": wire.VC_COUNT_MAX for i in range(wire.VC_ENTRIES_MAX - 1)}
    limit["x" * wire.SESSION_LEN_MAX] = 1
    req = parse(env(delivery="causal", session="x" * 128, vc=limit))
    assert len(req.vc) == wire.VC_ENTRIES_MAX
    assert parse(env(mode="send", **CAUSAL)).delivery == "causal"


def test_a_guaranteed_request_keeps_every_other_field():
    envelope = env(type="put", subject="kv/a", data={"k": 1}, ttl=3, consistency="all",
                   delivery="causal", session="s", vc={"s": 1, "k": 2})
    req = wire.validate_request(envelope)
    assert (req.id, req.type, req.subject, req.mode, req.data, req.ttl, req.raw, req.nbytes) \
        == ("req-7", "put", "kv/a", "call", {"k": 1}, 3, envelope, 0)
    assert (req.session, req.vc) == ("s", {"s": 1, "k": 2})  # one-character ids are fine
    frame = wire.encode(envelope)
    assert wire.parse_request(frame, BIG).nbytes == len(frame)


def test_constants():
    assert wire.CONSISTENCIES == {wire.CONSISTENCY_LOCAL, wire.CONSISTENCY_QUORUM,
                                  wire.CONSISTENCY_ALL} == {"local", "quorum", "all"}
    assert wire.DELIVERIES == {wire.DELIVERY_AT_MOST_ONCE, wire.DELIVERY_AT_LEAST_ONCE,
                               wire.DELIVERY_EXACTLY_ONCE, wire.DELIVERY_CAUSAL} == {
        "at_most_once", "at_least_once", "exactly_once", "causal"}


BAD = [
    # (fields, a word the message must contain)
    ({"consistency": "strong"}, "'consistency'"),
    ({"consistency": "QUORUM"}, "'consistency'"),
    ({"consistency": 1}, "'consistency'"),
    ({"consistency": True}, "'consistency'"),
    ({"consistency": ""}, "'consistency'"),
    ({"consistency": ["local"]}, "'consistency'"),
    ({"delivery": "once"}, "'delivery'"),
    ({"delivery": b"causal"}, "'delivery'"),
    ({"delivery": 0}, "'delivery'"),
    ({"delivery": {"mode": "causal"}}, "'delivery'"),
    ({"consistency": "local", "delivery": "twice"}, "'delivery'"),
    ({"delivery": "causal"}, "'session'"),
    ({"delivery": "causal", "session": "", "vc": {"": 1}}, "'session'"),
    ({"delivery": "causal", "session": "s" * 129, "vc": {"s": 1}}, "'session'"),
    ({"delivery": "causal", "session": 7, "vc": {"s": 1}}, "'session'"),
    ({"delivery": "causal", "session": "s1"}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {}}, "'vc' must be a map of 1..256"),
    ({"delivery": "causal", "session": "s1", "vc": [["s1", 1]]}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": 0}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": -1}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": 2**63}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": True}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": 1.0}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": 1, "": 1}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s1": 1, "k" * 129: 1}}, "'vc'"),
    ({"delivery": "causal", "session": "s1",
      "vc": {f"p{i}": 1 for i in range(wire.VC_ENTRIES_MAX + 1)}}, "'vc'"),
    ({"delivery": "causal", "session": "s1", "vc": {"s2": 1}},
     "'vc' must have an entry for the request's 'session'"),
    ({"mode": "publish", "delivery": "at_least_once"}, "published"),
    ({"mode": "publish", "delivery": "exactly_once"}, "published"),
    ({"mode": "publish", **CAUSAL}, "published"),
    ({"type": "syn.ping", "subject": ..., **CAUSAL}, "causal"),
    ({"type": "syn.join", "mode": "publish", "consistency": "all", "data": {"group": "g"}},
     "cannot be published"),
]


@pytest.mark.parametrize("fields,word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_every_bad_value_is_bad_request_naming_the_field_with_the_id_kept(fields, word):
    error = refused(env(traceparent="00-trace", **fields))
    assert error.code == ErrorCode.BAD_REQUEST
    # the message names the field first
    assert error.message.startswith(word) if word.startswith("'") else word in error.message
    assert error.request_id == "req-7"
    assert error.traceparent == "00-trace"
    assert error.mode == fields.get("mode", "call")


@pytest.mark.parametrize("fields,word", BAD[:12], ids=[str(i) for i in range(12)])
def test_a_one_way_request_with_a_bad_value_stays_unanswered(fields, word):
    error = refused(env(mode="send", **fields))
    assert error.code == ErrorCode.BAD_REQUEST and error.one_way


def test_publish_at_most_once_and_consistency_are_accepted():
    req = parse(env(mode="publish", delivery="at_most_once", consistency="all"))
    assert (req.delivery, req.consistency) == ("at_most_once", "all")


def test_guarantees_are_checked_before_system_type_data():
    error = refused(env(type="syn.spawn", delivery="nope", data="not a map"))
    assert "'delivery'" in error.message
    req = parse(env(type="syn.spawn", delivery="exactly_once",
                    data={"behavior": "counter", "init": None}))
    assert req.delivery == "exactly_once"


def test_a_reply_to_a_causal_request_carries_the_agents_clock():
    reply = msgpack.unpackb(wire.reply("7", {"value": 1}, "node-a", vc={"s1": 2}))
    assert reply["vc"] == {"s1": 2} and reply["re"] == "7"
    assert "vc" not in msgpack.unpackb(wire.reply("7", None, "node-a"))
