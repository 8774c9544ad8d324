"""Wire protocol v1: codec round trips, validation and error codes (protocols/wire.py)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocols import wire
from protocols.wire import ErrorCode, WireError

BIG = 1 << 20
FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies

keys = st.text(max_size=12)
scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=40) | st.binary(max_size=40))
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25)

ids = st.text(min_size=1, max_size=wire.ID_LEN_MAX)
agent_types = st.text(min_size=1, max_size=wire.TYPE_LEN_MAX).filter(
    lambda t: not t.startswith(wire.SYSTEM_PREFIX))
subjects = st.text(min_size=1, max_size=wire.SUBJECT_LEN_MAX)
modes = st.sampled_from(sorted(wire.MODES))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

optional_fields = st.fixed_dictionaries({}, optional={
    "ttl": st.integers(0, wire.TTL_MAX),
    "source": st.text(max_size=30),
    "time": st.text(max_size=30),
    "datacontenttype": st.just("application/msgpack"),
    "traceparent": st.just(TRACEPARENT),
    "vclock": st.dictionaries(st.text(min_size=1, max_size=10),
                              st.integers(0, 2 ** 63 - 1), max_size=4),
    "seq": st.integers(0, 2 ** 63 - 1),
    "ack": st.integers(0, 2 ** 63 - 1),
    "x-unknown-extension": msgpack_values,  # unknown fields are ignored, and kept
})


@st.composite
def agent_requests(draw):
    env = {"v": 1, "id": draw(ids), "type": draw(agent_types), "subject": draw(subjects)}
    mode = draw(st.none() | modes)
    if mode is not None:
        env["mode"] = mode
    data = draw(st.none() | msgpack_values)
    if data is not None:
        env["data"] = data
    env.update(draw(optional_fields))
    return env


@st.composite
def system_requests(draw):
    mtype = draw(st.sampled_from(sorted(wire.SYSTEM_TYPES)))
    env = {"v": 1, "id": draw(ids), "type": mtype,
           "mode": draw(st.sampled_from([wire.MODE_CALL, wire.MODE_SEND]))}
    if mtype not in wire.NODE_TYPES:
        env["subject"] = draw(subjects)
    if mtype == wire.TYPE_SPAWN:
        env["data"] = {"behavior": draw(st.text(max_size=20)), "init": draw(msgpack_values)}
    elif mtype in (wire.TYPE_JOIN, wire.TYPE_LEAVE):
        env["data"] = {"group": draw(st.text(min_size=1, max_size=40))}
    return env


valid_requests = agent_requests() | system_requests()


def base(**overrides) -> dict:
    env = {"v": 1, "id": "req-1", "type": "get", "subject": "counter/alice", "mode": "call"}
    env.update(overrides)
    return env


def parse(env: dict, max_bytes: int = BIG) -> wire.Request:
    return wire.parse_request(wire.encode(env), max_bytes)


def wire_error(env_or_frame, max_bytes: int = BIG) -> WireError:
    frame = env_or_frame if isinstance(env_or_frame, bytes) else wire.encode(env_or_frame)
    with pytest.raises(WireError) as info:
        wire.parse_request(frame, max_bytes)
    assert info.value.code in ErrorCode.ALL
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


# ------------------------------------------------------------------ the spec, written plainly
# PROTOCOL.md section 2's rules restated without wire.py's code, as an oracle for
# the property tests: which code a decoded request map must be refused with.

def _is_int(value) -> bool:
    return type(value) is int  # bool is not an integer on the wire


def _str_of(value, longest: int) -> bool:
    return type(value) is str and 1 <= len(value) <= longest


def readable_id(rid):
    """The id an error carries: the request's, when it is a str of 1..ID_LEN_MAX."""
    return rid if _str_of(rid, wire.ID_LEN_MAX) else None


def spec_refusal(env: dict) -> str | None:
    """None when ``env`` is a valid request, else the code it must be refused with."""
    mode = env.get("mode")
    subject = env.get("subject")
    mtype = env.get("type")
    ttl = env.get("ttl")
    if not (_str_of(env.get("id"), wire.ID_LEN_MAX) and _is_int(env.get("v"))
            and env["v"] == 1 and _str_of(mtype, wire.TYPE_LEN_MAX)
            and (mode is None or mode in ("call", "send", "publish") and type(mode) is str)
            and (_str_of(subject, wire.SUBJECT_LEN_MAX)
                 or subject is None and mtype in ("syn.status", "syn.ping"))
            and (ttl is None or _is_int(ttl) and 0 <= ttl <= 8)):
        return ErrorCode.BAD_REQUEST
    if not mtype.startswith("syn."):
        return None
    if mtype not in ("syn.spawn", "syn.stop", "syn.status", "syn.join", "syn.leave",
                     "syn.ping"):
        return ErrorCode.UNKNOWN_TYPE
    data = env.get("data")
    if (mode == "publish"
            or mtype == "syn.spawn" and not (isinstance(data, dict)
                                             and type(data.get("behavior")) is str)
            or mtype in ("syn.join", "syn.leave") and not (
                isinstance(data, dict) and _str_of(data.get("group"), wire.SUBJECT_LEN_MAX))):
        return ErrorCode.BAD_REQUEST
    return None


# ------------------------------------------------------------------ round trips

@FAST
@given(valid_requests)
def test_valid_requests_round_trip(env):
    frame = wire.encode(env)
    assert msgpack.unpackb(frame, raw=False) == env
    req = wire.parse_request(frame, BIG)
    assert req.raw == env
    assert (req.id, req.type, req.subject) == (env["id"], env["type"], env.get("subject"))
    assert req.mode == env.get("mode", wire.MODE_CALL)
    assert req.data == env.get("data")
    assert req.ttl == env.get("ttl")


@FAST
@given(ids, agent_types, subjects, msgpack_values, modes, optional_fields)
def test_request_builder_round_trips(rid, mtype, subject, data, mode, extensions):
    env = wire.request(rid, mtype, subject, data, mode, **extensions)
    assert env["v"] == wire.VERSION
    req = parse(env)
    assert (req.id, req.type, req.subject, req.mode) == (rid, mtype, subject, mode)
    assert req.data == data
    for key, value in extensions.items():  # None means "leave the field out"
        assert env[key] == value if value is not None else key not in env


def test_request_builder_drops_none_extensions():
    env = wire.request("1", "get", "counter/a", traceparent=None, ttl=3)
    assert "traceparent" not in env and env["ttl"] == 3
    assert "subject" not in wire.request("1", wire.TYPE_PING)
    assert "data" not in wire.request("1", "get", "counter/a")


@FAST
@given(st.text(min_size=1, max_size=wire.ID_LEN_MAX), msgpack_values, st.text(max_size=30),
       st.none() | st.just(TRACEPARENT))
def test_reply_is_a_decodable_envelope(rid, data, source, traceparent):
    env = msgpack.unpackb(wire.reply(rid, data, source, traceparent), raw=False)
    expected = {"v": 1, "id": rid, "re": rid, "type": wire.TYPE_REPLY, "source": source,
                "data": data}
    if traceparent is not None:
        expected["traceparent"] = traceparent
    assert env == expected


@FAST
@given(st.none() | st.text(min_size=1, max_size=wire.ID_LEN_MAX),
       st.sampled_from(sorted(ErrorCode.ALL)), st.text(max_size=80), st.text(max_size=30))
def test_error_is_a_decodable_envelope(rid, code, message, source):
    env = msgpack.unpackb(wire.error(rid, code, message, source), raw=False)
    assert env == {"v": 1, "id": rid if rid is not None else "", "re": rid,
                   "type": wire.TYPE_ERROR, "source": source,
                   "data": {"code": code, "message": message}}


def test_error_carries_retry_after_ms_only_when_given():
    def data(**kw):
        return msgpack.unpackb(wire.error("r", "overloaded", "busy", "n1", **kw), raw=False)["data"]
    assert data(retry_after_ms=250) == {"code": "overloaded", "message": "busy",
                                        "retry_after_ms": 250}
    assert data(retry_after_ms=None) == data() == {"code": "overloaded", "message": "busy"}


def test_error_codes_are_stable():
    assert ErrorCode.ALL == {"bad_request", "too_large", "unknown_agent", "unknown_type",
                             "overloaded", "timeout", "unavailable", "internal"}


def test_worked_example_bytes_match_protocol_doc():
    """The hex in docs/PROTOCOL.md's worked example."""
    request = {"v": 1, "id": "1", "type": "get", "subject": "counter/alice", "mode": "call"}
    assert wire.encode(request).hex() == (
        "85a17601a26964a131a474797065a3676574a77375626a656374ad636f756e7465722f616c696365"
        "a46d6f6465a463616c6c")
    assert wire.reply("1", {"value": 0}, "node-a").hex() == (
        "86a17601a26964a131a27265a131a474797065a973796e2e7265706c79a6736f75726365a66e6f64"
        "652d61a46461746181a576616c756500")


# ------------------------------------------------------------------ validation

REQUIRED = ["v", "id", "type", "subject"]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field_is_bad_request(field):
    env = base()
    del env[field]
    err = wire_error(env)
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == (None if field == "id" else "req-1")


WRONG = {
    "id": ["", "x" * (wire.ID_LEN_MAX + 1), 1, None, b"req-1", ["a"], {"a": 1}, 1.5, True],
    "v": [0, 2, "1", None, 1.5, b"\x01", [1], {"v": 1}],
    "type": ["", "t" * (wire.TYPE_LEN_MAX + 1), 1, None, b"get", ["get"], {}, False],
    "subject": ["", "s" * (wire.SUBJECT_LEN_MAX + 1), 1, b"counter/a", ["a"], {}, 0.0],
    "mode": ["", "CALL", "reply", 1, b"call", 2.5, True, ["call"], {"call": 1}],
    "ttl": [-1, wire.TTL_MAX + 1, "1", 1.5, True, [1], {}, b"\x01"],
}
WRONG_CASES = [(f, v) for f, vs in WRONG.items() for v in vs]


def test_nil_mode_means_call():
    assert parse(base(mode=None)).mode == wire.MODE_CALL


@pytest.mark.parametrize("field,value", WRONG_CASES, ids=[f"{f}-{i}" for i, (f, _) in
                                                          enumerate(WRONG_CASES)])
def test_wrong_typed_field_is_bad_request(field, value):
    err = wire_error(base(**{field: value}))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == (None if field == "id" else "req-1")


@FAST
@given(st.sampled_from(["v", "type", "subject", "ttl"]), msgpack_values, ids)
def test_any_wrong_value_is_bad_request_with_the_id(field, value, rid):
    env = base(id=rid, **{field: value})
    valid = spec_refusal(env) is None  # PROTOCOL.md's rule for the field, written plainly
    try:
        req = parse(env)
    except WireError as err:
        assert not valid, f"{field}={value!r} is valid but was refused: {err}"
        assert err.code == ErrorCode.BAD_REQUEST, err
        assert err.request_id == rid
    else:
        assert valid, f"{field}={value!r} is invalid but was accepted"
        assert req.raw[field] == value
        if field != "v":  # the Request has no attribute for the version
            assert getattr(req, field) == value


@pytest.mark.parametrize("mode", [["call"], {"call": 1}])
def test_unhashable_mode_is_bad_request(mode):
    assert wire_error(base(mode=mode)).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version):
    assert wire_error(base(v=version)).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("version, shown", [(2, "2"), ("1", "'1'"), (None, "None")])
def test_a_version_refusal_names_the_version_it_got(version, shown):
    assert wire_error(base(v=version)).message == \
        f"unsupported protocol version {shown}; this node speaks 1"


def test_subject_optional_only_for_node_types():
    for mtype in sorted(wire.NODE_TYPES):
        env = base(type=mtype)
        del env["subject"]
        assert parse(env).subject is None
    env = base(type=wire.TYPE_STOP)
    del env["subject"]
    assert wire_error(env).code == ErrorCode.BAD_REQUEST


@FAST
@given(st.text(max_size=30).map(lambda s: wire.SYSTEM_PREFIX + s).filter(
    lambda t: t not in wire.SYSTEM_TYPES and len(t) <= wire.TYPE_LEN_MAX))
def test_unknown_system_type_is_unknown_type(mtype):
    err = wire_error(base(type=mtype))
    assert err.code == ErrorCode.UNKNOWN_TYPE
    assert err.request_id == "req-1"


@pytest.mark.parametrize("mtype,data", [
    (wire.TYPE_SPAWN, None),
    (wire.TYPE_SPAWN, "echo"),
    (wire.TYPE_SPAWN, {}),
    (wire.TYPE_SPAWN, {"behavior": 1}),
    (wire.TYPE_SPAWN, {"behavior": None, "init": {}}),
    (wire.TYPE_JOIN, None),
    (wire.TYPE_JOIN, {}),
    (wire.TYPE_JOIN, {"group": ""}),
    (wire.TYPE_JOIN, {"group": 7}),
    (wire.TYPE_JOIN, {"group": "g" * (wire.SUBJECT_LEN_MAX + 1)}),
    (wire.TYPE_LEAVE, ["group"]),
    (wire.TYPE_LEAVE, {"group": b"g"}),
])
def test_bad_system_request_data(mtype, data):
    err = wire_error(base(type=mtype, data=data))
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "req-1")


@pytest.mark.parametrize("mtype", sorted(wire.SYSTEM_TYPES))
def test_system_types_cannot_be_published(mtype):
    data = {"behavior": "echo", "group": "g"}
    err = wire_error(base(type=mtype, mode=wire.MODE_PUBLISH, data=data))
    assert err.code == ErrorCode.BAD_REQUEST


def test_agent_types_can_be_published():
    assert parse(base(type="news", subject="group-1", mode="publish")).mode == "publish"


def test_unknown_fields_are_ignored():
    req = parse(base(future_field={"x": [1, 2]}, re="old"))
    assert req.raw["future_field"] == {"x": [1, 2]}


# ------------------------------------------------------------------ size limits

def test_frame_at_the_limit_is_accepted_one_more_byte_is_too_large():
    frame = wire.encode(base(data="x" * 100))
    assert wire.parse_request(frame, len(frame)).id == "req-1"
    with pytest.raises(WireError) as info:
        wire.parse_request(frame, len(frame) - 1)
    assert (info.value.code, info.value.request_id) == (ErrorCode.TOO_LARGE, "req-1")


@FAST
@given(ids, st.integers(1, 4096))
def test_oversize_is_too_large_with_the_request_id(rid, extra):
    frame = wire.encode(base(id=rid, data=b"\0" * extra))
    err = wire_error(frame, max_bytes=len(frame) - extra)
    assert (err.code, err.request_id) == (ErrorCode.TOO_LARGE, rid)


def test_oversize_garbage_is_too_large_without_id():
    err = wire_error(b"\xc1" * 5000, max_bytes=1000)
    assert (err.code, err.request_id) == (ErrorCode.TOO_LARGE, None)


# ------------------------------------------------------------------ garbage in

def _only_wire_errors(frame: bytes, max_bytes: int = BIG) -> None:
    """The frame is accepted exactly when the spec says so, and refused with the
    spec's code and the id when the id is readable."""
    try:
        env = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:
        env = None  # not one msgpack document: bad_request
    expected = spec_refusal(env) if isinstance(env, dict) else ErrorCode.BAD_REQUEST
    try:
        req = wire.parse_request(frame, max_bytes)
    except WireError as err:
        assert err.code == expected, (err, expected)
        if isinstance(env, dict):
            assert err.request_id == readable_id(env.get("id"))
    else:
        assert expected is None, f"accepted, but the spec says {expected}"
        assert (req.id, req.type, req.subject, req.data, req.ttl, req.raw) == (
            env["id"], env["type"], env.get("subject"), env.get("data"), env.get("ttl"), env)
        assert req.mode == (env.get("mode") or wire.MODE_CALL)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xc1")                      # never-used msgpack byte
@example(b"\x81\x01\x02")              # map with an int key
@example(b"\xdf\xff\xff\xff\xff")      # map header promising 4G entries
@example(b"\x91" * 100_000 + b"\x80")  # deeply nested arrays
def test_garbage_bytes_never_raise_anything_but_wire_error(frame):
    _only_wire_errors(frame)


@FAST
@given(valid_requests, st.data())
def test_truncated_msgpack_is_bad_request(env, data):
    frame = wire.encode(env)
    cut = data.draw(st.integers(0, len(frame) - 1))
    err = wire_error(frame[:cut])
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id in (None, env["id"])  # the id, when the cut left it whole


def test_truncated_after_the_id_keeps_the_id():
    frame = wire.encode(base(data="x" * 50))
    err = wire_error(frame[:-10])
    assert (err.code, err.request_id, err.mode) == (ErrorCode.BAD_REQUEST, "req-1", "call")


@FAST
@given(valid_requests, st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_bad_request_with_the_id(env, junk):
    err = wire_error(wire.encode(env) + junk)
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, env["id"])
    assert err.mode == env.get("mode") and err.traceparent == env.get("traceparent")


@FAST
@given(msgpack_values.filter(lambda v: not isinstance(v, dict)))
def test_non_map_envelope_is_bad_request(value):
    err = wire_error(msgpack.packb(value, use_bin_type=True))
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, None)


@pytest.mark.parametrize("frame", [
    msgpack.packb({1: "x", "id": "a"}),
    msgpack.packb({"id": "a", "data": {1: 2}}),
    msgpack.packb({"id": "a", "data": {(1, 2): 2}}),
    msgpack.packb({None: 1}),
])
def test_non_string_map_keys_are_bad_request(frame):
    err = wire_error(frame)
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == ("a" if b"\xa2id\xa1a" in frame else None)


FIELDS = ["v", "id", "type", "subject", "mode", "data", "ttl", "source", "re", "vclock"]
hashable_values = st.recursive(
    scalars, lambda inner: st.dictionaries(keys, inner, max_size=3), max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | keys,
                       st.sampled_from([1, "call", "send", "publish", "x", "syn.spawn",
                                        "syn.ping", "syn.join"]) | msgpack_values,
                       max_size=8))
def test_random_maps_never_raise_anything_but_wire_error(env):
    _only_wire_errors(msgpack.packb(env, use_bin_type=True))


def test_protocol_doc_examples_are_exact():
    """docs/PROTOCOL.md: the worked-example hex is what wire.py produces, and the
    example client is valid Python."""
    import ast
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
    text = doc.read_text(encoding="utf-8")
    blocks = [b.replace(" ", "").replace("\n", "")
              for b in re.findall(r"```\n([0-9a-f][0-9a-f \n]+)```", text)]
    assert blocks == [
        wire.encode({"v": 1, "id": "1", "type": "get", "subject": "counter/alice",
                     "mode": "call"}).hex(),
        wire.reply("1", {"value": 0}, "node-a").hex(),
        wire.error("1", ErrorCode.UNKNOWN_AGENT, "no agent x", "node-a").hex(),
    ]
    # The raw example client; other sections show the project's own clients.
    [client] = re.findall(r"### Example client[^\n]*\n\n```python\n(.*?)```", text,
                          re.S)
    ast.parse(client)
    assert "import synthesis" not in client and "from node" not in client
    assert "Agent placement hash" in text


# ------------------------------------------------------------------ what a refused request still tells
# A refused request's error carries its id (so a pipelining client can match it),
# its mode (a one-way request gets no reply) and its traceparent, whenever each
# was readable at the top level of the envelope (docs/PROTOCOL.md section 2.3).

def _frame(*pairs: tuple[bytes, bytes]) -> bytes:
    """A msgpack map written by hand: (raw key, raw value) pairs, so it may be malformed."""
    assert len(pairs) < 16
    return bytes((0x80 | len(pairs),)) + b"".join(k + v for k, v in pairs)


def _s(text: str) -> bytes:
    return msgpack.packb(text)


TOP = [(_s("v"), b"\x01"), (_s("id"), _s("req-1")), (_s("type"), _s("get")),
       (_s("subject"), _s("counter/a")), (_s("traceparent"), _s(TRACEPARENT))]
DEEP = b"\x91" * wire.NESTING_MAX + b"\x80"  # one level more than msgpack's parse stack


@pytest.mark.parametrize("frame, why", [
    (_frame(*TOP, (b"\x07", _s("int key"))), "int key at the top level"),
    (_frame(*TOP, (_s("data"), b"\x81\x01\x02")), "int key inside data"),
    (_frame(*TOP, (_s("source"), b"\xa2\xff\xfe")), "invalid UTF-8 in source"),
    (_frame(*TOP, (_s("data"), DEEP)), "nesting too deep"),
    (_frame(*TOP) + b"\x00", "trailing bytes"),
    (_frame(*TOP, (_s("data"), b"\xc1")), "reserved byte"),
    (_frame(*TOP, (_s("data"), b"\xdd\xff\xff\xff\xff")), "array header claiming 4G elements"),
    (_frame(*TOP, (_s("data"), b"\xa5ab")), "cut short"),
])
def test_undecodable_envelope_error_keeps_id_and_traceparent(frame, why):
    err = wire_error(frame)
    assert err.code == ErrorCode.BAD_REQUEST, why
    assert (err.request_id, err.traceparent, err.mode) == ("req-1", TRACEPARENT, None), why
    assert not err.one_way
    env = msgpack.unpackb(wire.error(err.request_id, err.code, err.message, "n",
                                     err.traceparent))
    assert (env["id"], env["re"], env["traceparent"]) == ("req-1", "req-1", TRACEPARENT)


def test_deep_nesting_is_named_in_the_message():
    err = wire_error(_frame(*TOP, (_s("data"), DEEP)))
    assert f"nesting deeper than {wire.NESTING_MAX} levels" in err.message


def test_nesting_bound_is_exact():
    # The envelope map, then NESTING_MAX - 2 arrays, then a map: NESTING_MAX levels.
    at_bound = b"\x91" * (wire.NESTING_MAX - 2) + b"\x80"
    assert wire.parse_request(_frame(*TOP, (_s("data"), at_bound)), BIG).data is not None
    err = wire_error(_frame(*TOP, (_s("data"), b"\x91" + at_bound)))
    assert "nesting deeper" in err.message


@pytest.mark.parametrize("pairs, readable", [
    ([(_s("id"), _s("")), (b"\x07", b"\x00")], {}),                        # id too short
    ([(_s("id"), _s("x" * (wire.ID_LEN_MAX + 1))), (b"\x07", b"\x00")], {}),  # too long
    ([(_s("id"), b"\x07"), (b"\x07", b"\x00")], {}),                        # not a str
    ([(_s("id"), b"\xa2\xff\xfe"), (b"\x07", b"\x00")], {}),                # invalid UTF-8
    ([(b"\x07", b"\x00"), (_s("id"), _s("late"))], {"request_id": "late"}),  # after a bad key
    ([(_s("traceparent"), b"\x07"), (_s("id"), _s("i")), (b"\x07", b"\x00")],
     {"request_id": "i"}),                                                # traceparent not a str
    ([(_s("mode"), _s("shout")), (_s("id"), _s("i")), (b"\x07", b"\x00")],
     {"request_id": "i"}),                                                # not a mode
])
def test_only_readable_attributes_are_kept(pairs, readable):
    err = wire_error(_frame(*pairs))
    expected = {"request_id": None, "mode": None, "traceparent": None, **readable}
    assert {k: getattr(err, k) for k in expected} == expected


def test_peek_looks_at_a_bounded_number_of_keys():
    def frame_with_id_after(keys: int) -> bytes:
        env = {f"k{i}": 0 for i in range(keys)}
        env["id"] = "z"
        return msgpack.packb(env) + b"\x00"  # trailing byte: only the peek reads it
    assert wire.peek(frame_with_id_after(wire.PEEK_KEYS_MAX - 1)) == {"id": "z"}
    assert wire.peek(frame_with_id_after(wire.PEEK_KEYS_MAX)) == {}


def test_peek_of_non_maps_finds_nothing():
    for frame in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("id"), b"\x81"):
        assert wire.peek(frame) == {}


# ------------------------------------------------------------------ oversize frames are not decoded

ATTACK_BYTES = 4 * 1024 * 1024


def _empty_maps_payload(rid: str | None, count: int, **top: str) -> bytes:
    """An envelope whose data is an array of ``count`` empty maps (1 byte each)."""
    head = {"v": 1, "type": "echo", "subject": "echo/x", **top}
    if rid is not None:
        head["id"] = rid
    prefix = msgpack.packb(head)
    header = bytes((prefix[0] + 1,)) + prefix[1:] + _s("data")  # one more pair: data
    return header + b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def test_oversize_frame_is_refused_without_decoding_it():
    """4 MiB of empty maps decoded to ~300 MB of dicts before the size check
    (issue 6 #10).  Counted in bytes, not time: the refusal allocates almost nothing."""
    import tracemalloc
    frame = _empty_maps_payload("big", ATTACK_BYTES, mode="call", traceparent=TRACEPARENT)
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as info:
            wire.parse_request(frame, 1 << 20)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 64 * 1024, peak_bytes  # decoding it would take ~300 MB
    err = info.value
    assert (err.code, err.request_id, err.mode, err.traceparent) == (
        ErrorCode.TOO_LARGE, "big", "call", TRACEPARENT)


def test_oversize_frame_is_refused_even_when_it_would_not_decode():
    frame = _frame(*TOP, (_s("data"), b"\xc4\xff" + b"\x00" * 5000))  # bin 8 cut short too
    err = wire_error(frame, max_bytes=1000)
    assert (err.code, err.request_id, err.traceparent) == (
        ErrorCode.TOO_LARGE, "req-1", TRACEPARENT)


def test_oversize_frame_id_beyond_the_peek_window_is_not_read():
    env = {"v": 1, "type": "put", "subject": "kv/a", "data": "x" * wire.PEEK_BYTES_MAX,
           "id": "late", "mode": "send"}
    err = wire_error(wire.encode(env), max_bytes=wire.PEEK_BYTES_MAX)
    assert (err.code, err.request_id, err.mode) == (ErrorCode.TOO_LARGE, None, None)
    assert not err.one_way  # the node cannot know it was one-way: it answers


# ------------------------------------------------------------------ the send-mode rule
# A request readably in mode send or publish never gets a reply, whatever is
# wrong with it; the node counts the error.  WireError.one_way says which.

@pytest.mark.parametrize("mode", [wire.MODE_SEND, wire.MODE_PUBLISH])
@pytest.mark.parametrize("overrides, code", [
    ({"v": 2}, ErrorCode.BAD_REQUEST),
    ({"id": ""}, ErrorCode.BAD_REQUEST),
    ({"type": 7}, ErrorCode.BAD_REQUEST),
    ({"subject": ""}, ErrorCode.BAD_REQUEST),
    ({"ttl": 99}, ErrorCode.BAD_REQUEST),
    ({"type": "syn.explode"}, ErrorCode.UNKNOWN_TYPE),
    ({"type": wire.TYPE_SPAWN, "data": 5}, ErrorCode.BAD_REQUEST),
    ({"type": wire.TYPE_JOIN, "data": {"group": ""}}, ErrorCode.BAD_REQUEST),
    ({"type": wire.TYPE_STOP}, ErrorCode.BAD_REQUEST),  # send: fine; publish: refused
])
def test_one_way_requests_are_refused_without_reply(mode, overrides, code):
    env = base(mode=mode, traceparent=TRACEPARENT, **overrides)
    try:
        parse(env)
    except WireError as err:
        assert err.code == code
        assert err.one_way and err.mode == mode and err.traceparent == TRACEPARENT
    else:
        assert (mode, overrides) == (wire.MODE_SEND, {"type": wire.TYPE_STOP})


@pytest.mark.parametrize("mode", [wire.MODE_SEND, wire.MODE_PUBLISH])
def test_one_way_mode_is_read_from_undecodable_and_oversize_frames(mode):
    frame = wire.encode(base(mode=mode, data="x" * 100))
    assert wire_error(frame + b"\x00").one_way
    assert wire_error(frame, max_bytes=len(frame) - 1).one_way


@pytest.mark.parametrize("mode", [None, wire.MODE_CALL, "shout", 7, ["send"]])
def test_requests_not_readably_one_way_are_answered(mode):
    env = base(mode=mode, v=2)
    assert not wire_error(env).one_way
    assert not wire_error(wire.encode(env) + b"\x00").one_way


def test_request_builder_puts_data_last():
    """So a refused oversize frame still shows its traceparent within the peek window."""
    env = wire.request("r", "put", "kv/a", {"value": "x" * 2 * wire.PEEK_BYTES_MAX},
                       traceparent=TRACEPARENT, mode=wire.MODE_SEND)
    assert list(env)[-1] == "data"
    err = wire_error(wire.encode(env), max_bytes=wire.PEEK_BYTES_MAX)
    assert (err.code, err.request_id, err.traceparent, err.one_way) == (
        ErrorCode.TOO_LARGE, "r", TRACEPARENT, True)


# ------------------------------------------------------------------ exact limits
# Each bound is held at the value itself and one past it: random strategies
# almost never draw a string of exactly the maximum length.

@pytest.mark.parametrize("field, longest", [
    ("id", wire.ID_LEN_MAX), ("type", wire.TYPE_LEN_MAX), ("subject", wire.SUBJECT_LEN_MAX)])
def test_string_fields_are_accepted_at_their_maximum_length_and_refused_past_it(field, longest):
    assert getattr(parse(base(**{field: "x" * longest})), field) == "x" * longest
    assert wire_error(base(**{field: "x" * (longest + 1)})).code == ErrorCode.BAD_REQUEST


def test_ttl_is_accepted_up_to_its_maximum_and_refused_past_it():
    assert [parse(base(ttl=ttl)).ttl for ttl in (0, wire.TTL_MAX)] == [0, wire.TTL_MAX]
    assert wire_error(base(ttl=wire.TTL_MAX + 1)).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("mtype", [wire.TYPE_JOIN, wire.TYPE_LEAVE])
def test_group_names_are_accepted_at_the_subject_maximum_and_refused_past_it(mtype):
    longest = "g" * wire.SUBJECT_LEN_MAX
    assert parse(base(type=mtype, data={"group": longest})).data == {"group": longest}
    err = wire_error(base(type=mtype, data={"group": longest + "g"}))
    assert (err.code, err.message) == (ErrorCode.BAD_REQUEST,
                                       f"{mtype} needs data {{'group': str}}")


def test_an_id_of_the_maximum_length_is_carried_by_the_error_one_longer_is_not():
    for rid, carried in (("i" * wire.ID_LEN_MAX, "i" * wire.ID_LEN_MAX),
                         ("i" * (wire.ID_LEN_MAX + 1), None)):
        assert wire_error(base(id=rid, v=2)).request_id == carried          # decoded
        assert wire_error(wire.encode(base(id=rid)) + b"\x00").request_id == carried  # peeked


def test_the_envelope_size_is_recorded_on_the_request():
    frame = wire.encode(base())
    assert wire.parse_request(frame, BIG).nbytes == len(frame)
    assert wire.validate_request(base()).nbytes == 0  # not from a frame: no size yet


# ------------------------------------------------------------------ messages say what is wrong

def test_wire_error_reads_as_code_then_message():
    assert str(WireError(ErrorCode.TIMEOUT, "too slow")) == "timeout: too slow"


@pytest.mark.parametrize("frame, detail", [
    (b"\xc1", "FormatError"),                               # msgpack gives no text: the type
    (b"\x81\x01\x02", "int is not allowed for map key when strict_map_key=True"),
    (b"\x92\x01", "Unpack failed: incomplete input"),
])
def test_undecodable_frames_name_msgpacks_reason(frame, detail):
    assert wire_error(frame).message == f"not a msgpack document: {detail}"


def test_a_non_map_envelope_names_what_it_got():
    assert wire_error(msgpack.packb([1])).message == "envelope must be a map, got list"


def test_strings_decode_as_str_and_int_keys_are_refused():
    req = parse(base(data={"text": "é"}))
    assert req.data == {"text": "é"} and type(req.id) is str
    assert wire_error(msgpack.packb({**base(), 5: 1})).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("env, message", [
    (base(subject=None), "'subject' (the agent id or group) is required"),
    (base(type=wire.TYPE_SPAWN, data={"init": 1}),
     "syn.spawn needs data {'behavior': str, 'init': any}"),
])
def test_refusal_messages(env, message):
    assert wire_error(env).message == message


def test_a_traceparent_that_is_not_a_string_is_not_carried():
    assert wire_error(base(v=2, traceparent=7)).traceparent is None
    assert wire_error(base(v=2, traceparent=TRACEPARENT)).traceparent == TRACEPARENT


# ------------------------------------------------------------------ peek reads every short str form
# msgpack writes a str as fixstr (< 32 bytes), str 8 (< 256) or str 16 (< 65536);
# another encoder may use a longer form for a short string, so keys and values
# are read in each form.

def _str_as(text: str, form: str) -> bytes:
    raw = text.encode()
    return {"fix": bytes((0xa0 | len(raw),)) if len(raw) < 32 else None,
            "str8": b"\xd9" + bytes((len(raw),)),
            "str16": b"\xda" + len(raw).to_bytes(2, "big")}[form] + raw


@pytest.mark.parametrize("key_form", ["fix", "str8", "str16"])
@pytest.mark.parametrize("value_form", ["fix", "str8", "str16"])
def test_peek_reads_keys_and_values_in_every_str_form(key_form, value_form):
    frame = _frame((_str_as("id", key_form), _str_as("req-1", value_form)),
                   (_str_as("mode", key_form), _str_as("send", value_form))) + b"\x00"
    assert wire.peek(frame) == {"id": "req-1", "mode": "send"}


@pytest.mark.parametrize("form", ["fix", "str8", "str16"])
def test_peek_reads_an_empty_string_that_ends_the_frame(form):
    assert wire.peek(_frame((_s("id"), _str_as("", form)))) == {"id": ""}


def test_peek_reads_the_longest_fixstr():
    longest = "i" * 31  # 0xbf: the last fixstr header
    assert wire.peek(_frame((_s("id"), _s(longest))) + b"\x00") == {"id": longest}


def test_a_valid_spawn_is_accepted_with_its_data():
    data = {"behavior": "counter", "init": {"value": 3}}
    assert parse(base(type=wire.TYPE_SPAWN, data=data)).data == data


def test_peek_does_not_read_an_int_as_a_string_whatever_follows():
    # The bytes after the int would make a valid empty str 16 body if the int's
    # header byte were taken for a str 16 header.
    frame = _frame((_s("id"), b"\x05"), (b"\x00", b"\x00"), (_s("mode"), _s("call")))
    assert wire.peek(frame) == {"mode": "call"}


def test_peek_reads_values_up_to_its_string_bound_and_no_longer():
    at_bound = "t" * wire.PEEK_STR_BYTES_MAX
    assert wire.peek(_frame((_s("traceparent"), _s(at_bound)))) == {"traceparent": at_bound}
    assert wire.peek(_frame((_s("traceparent"), _s(at_bound + "t")), (_s("id"), _s("i")))) \
        == {"id": "i"}


@pytest.mark.parametrize("value", [None, 5, 300, True, b"bin", ["a"]])
def test_peek_takes_only_strings_and_nothing_from_other_keys(value):
    frame = _frame((_s("id"), msgpack.packb(value)), (_s("other"), _s("x")),
                   (_s("mode"), _s("call")))
    assert wire.peek(frame + b"\x00") == {"mode": "call"}


# ------------------------------------------------------------------ small helpers

def test_trace_id_is_the_second_field_of_a_traceparent():
    assert wire.trace_id(TRACEPARENT) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert wire.trace_id(TRACEPARENT[:35]) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for not_one in (TRACEPARENT[:34], "00_" + TRACEPARENT[3:], 7, None, b"00-" + b"a" * 40):
        assert wire.trace_id(not_one) is None


def test_system_types_are_those_with_the_reserved_prefix():
    assert wire.is_system_type("syn.anything") and wire.is_system_type(wire.TYPE_PING)
    assert not wire.is_system_type("get") and not wire.is_system_type("xsyn.ping")


def test_a_one_character_group_is_a_group():
    """The group bound is 1..SUBJECT_LEN_MAX characters, both ends included."""
    for group in ("g", "g" * wire.SUBJECT_LEN_MAX):
        env = wire.request("r1", wire.TYPE_JOIN, "counter/a", {"group": group})
        assert wire.validate_request(env).data == {"group": group}
    with pytest.raises(wire.WireError):
        wire.validate_request(wire.request("r1", wire.TYPE_JOIN, "counter/a", {"group": ""}))
