"""Peer protocol v3 frames: the pure codec of protocols/peer.py (docs/PROTOCOL.md section 9).

Round trips of every op, every malformed shape refused with its stable reason,
every corruption (a flipped bit, frames lost, added or swapped) refused by the
checksum before anything is decoded, and decode raising nothing but
PeerProtocolError whatever frames arrive.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocols import peer
from protocols.effects import GOSSIP, HANDOFF, STATUS_ANSWER, STATUS_QUERY, Send
from protocols.peer import (MAGIC, Forwarded, Gossiped, HandedOff, PeerProtocolError, Replied,
                            StatusAnswered, StatusQueried)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN = bytes(range(16))
MIB = 1 << 20

# ------------------------------------------------------------------ strategies

node_ids = (st.text(min_size=1, max_size=40)
            | st.text(alphabet="aé€𝄞", min_size=60, max_size=120)).filter(
    lambda s: len(s.encode()) <= peer.NODE_ID_BYTES_MAX)
call_tokens = st.binary(min_size=16, max_size=16)
fwd_tokens = call_tokens | st.just(b"")
envelopes = st.binary(max_size=2048)
hops = st.integers(min_value=1, max_value=peer.HOPS_MAX)
status_tokens = st.text(alphabet=st.characters(max_codepoint=127), min_size=1,
                        max_size=peer.STATUS_TOKEN_BYTES_MAX)

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=25)
bodies = st.dictionaries(st.text(max_size=12), values, max_size=6)


def reason(frames: list) -> str:
    with pytest.raises(PeerProtocolError) as info:
        peer.decode(frames)
    assert info.value.reason in peer.REASONS
    return info.value.reason


def replaced(op: str, index: int, frame: bytes) -> list[bytes]:
    """The valid ``op`` message with frame ``index`` replaced and sealed again: a
    message that passes the checksum and reaches the op's decoder."""
    frames = valid_frames()[op][:-1]
    frames[index] = frame
    return peer.seal(frames)


def valid_frames() -> dict[str, list[bytes]]:
    """One valid frame list per op."""
    return {
        "FWD": peer.forward("node-a", "node-b", 1, TOKEN, b"\x80"),
        "RPL": peer.reply("node-a", TOKEN, b"\x80"),
        "GOSSIP": peer.gossip("node-a", {"v": 1, "kind": "members", "members": []}),
        "HANDOFF": peer.handoff("node-a", {"v": 1, "kind": "want", "agent": "kv/a"}),
        "STATQ": peer.status_query("node-a", "7"),
        "STATR": peer.status_answer("node-a", "7", {"node": "node-a"}),
    }


# ------------------------------------------------------------------ round trips

@FAST
@given(node_ids, node_ids, hops, fwd_tokens, envelopes)
@example("n" * 255, "é" * 127, 16, b"", b"")
def test_forward_round_trip(sender, origin, hop_count, token, envelope):
    frames = peer.forward(sender, origin, hop_count, token, envelope)
    assert frames[:2] == [MAGIC, b"FWD"] and len(frames) == 8
    event = peer.decode(frames)
    assert event == Forwarded(sender, origin, hop_count, token, envelope)
    assert event.envelope is envelope  # carried, never copied or re-encoded


@FAST
@given(node_ids, call_tokens, envelopes)
def test_reply_round_trip(sender, token, envelope):
    frames = peer.reply(sender, token, envelope)
    assert frames[:2] == [MAGIC, b"RPL"] and len(frames) == 6
    event = peer.decode(frames)
    assert event == Replied(sender, token, envelope)
    assert event.envelope is envelope


@FAST
@given(node_ids, bodies)
def test_gossip_round_trip(sender, message):
    assert peer.decode(peer.gossip(sender, message)) == Gossiped(sender, message)


@FAST
@given(node_ids, bodies)
def test_handoff_round_trip(sender, message):
    frames = peer.handoff(sender, message)
    assert frames[:2] == [MAGIC, b"HANDOFF"] and len(frames) == 5
    assert peer.decode(frames) == HandedOff(sender, message)


@FAST
@given(node_ids, status_tokens)
def test_status_query_round_trip(sender, token):
    assert peer.decode(peer.status_query(sender, token)) == StatusQueried(sender, token)


@FAST
@given(node_ids, status_tokens, bodies)
def test_status_answer_round_trip(sender, token, status):
    event = peer.decode(peer.status_answer(sender, token, status))
    assert event == StatusAnswered(sender, {"token": token, "status": status})


def test_large_envelope_is_carried_whole():
    envelope = b"\x81\xa1d\xc6" + bytes(8 * MIB)  # never decoded, so no body limit applies
    assert peer.decode(peer.forward("a", "b", 2, TOKEN, envelope)).envelope is envelope
    assert peer.decode(peer.reply("a", TOKEN, envelope)).envelope is envelope


def test_body_of_exactly_one_mib_is_accepted():
    message = {"pad": bytes(MIB - 10)}  # map header 1, "pad" 4, bin 32 header 5
    frames = peer.gossip("a", message)
    assert len(frames[3]) == MIB
    assert peer.decode(frames).message == message


def test_handoff_bodies_are_bounded_by_their_own_larger_limit():
    """A handoff carries an agent's state (a kv agent's reaches 16 MiB): its body may
    reach HANDOFF_BODY_BYTES_MAX; every other body keeps BODY_BYTES_MAX."""
    limit = peer.HANDOFF_BODY_BYTES_MAX
    message = {"state": bytes(limit - 12)}  # map header 1, "state" 6, bin 32 header 5
    frames = peer.handoff("a", message)
    assert len(frames[3]) == limit
    assert peer.decode(frames).message == message
    too_large = b"\xc1" * (limit + 1)  # not msgpack either: the size is checked first
    assert reason(replaced("HANDOFF", 3, too_large)) == "too_large"
    with pytest.raises(ValueError):
        peer.handoff("a", {"state": bytes(limit)})
    assert reason(replaced("GOSSIP", 3, too_large[:MIB + 1])) == "too_large"


def test_send_effects_encode_by_channel():
    sender = "node-a"
    assert peer.encode(GOSSIP, sender, {"v": 1}) == peer.gossip(sender, {"v": 1})
    assert peer.encode(HANDOFF, sender, {"v": 1}) == peer.handoff(sender, {"v": 1})
    assert peer.encode(STATUS_QUERY, sender, "12") == peer.status_query(sender, "12")
    answer = {"token": "12", "status": {"node": sender}}
    assert peer.encode(STATUS_ANSWER, sender, answer) == \
        peer.status_answer(sender, "12", {"node": sender})
    with pytest.raises(ValueError):
        peer.encode("replication", sender, {})


def test_machines_messages_survive_the_codec():
    """What the membership and status machines actually send decodes to itself."""
    from protocols.membership import Member, Membership
    from protocols.status import StatusCollector

    me = Member.of("node-a", "tcp://127.0.0.1:7400", "tcp://127.0.0.1:7401", 5)
    effects = Membership(me, ["tcp://127.0.0.1:7500"]).start(0.0)
    sends = [e for e in effects if isinstance(e, Send)]
    assert sends
    for effect in sends:
        event = peer.decode(peer.encode(effect.channel, "node-a", effect.message))
        assert event == Gossiped("node-a", effect.message)

    collector = StatusCollector("node-a", 1.0)
    queries = collector.start("handle", "req-1", {"node": "node-a"},
                              {"node-a": "tcp://a:1", "node-b": "tcp://b:1"}, 0.0)
    (query,) = queries
    event = peer.decode(peer.encode(query.channel, "node-a", query.message))
    assert event == StatusQueried("node-a", query.message)
    # node-b answers; the decoded message is what the collector takes.
    answer = peer.decode(peer.status_answer("node-b", event.token, {"node": "node-b"}))
    (done,) = collector.receive(answer.sender, answer.message, 0.1)
    assert [row["node"] for row in done.data["members"]] == ["node-a", "node-b"]


# ------------------------------------------------------------------ events

def test_fast_built_events_are_ordinary_frozen_dataclasses():
    event = peer.decode(peer.forward("a", "b", 3, TOKEN, b"env"))
    built = Forwarded("a", "b", 3, TOKEN, b"env")
    assert type(event) is Forwarded and event == built and hash(event) == hash(built)
    assert repr(event) == repr(built)
    assert [f.name for f in dataclasses.fields(event)] == \
        ["sender", "origin", "hops", "token", "envelope"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.hops = 4
    assert dataclasses.replace(event, hops=4).hops == 4
    assert not hasattr(event, "__dict__")
    reply = peer.decode(peer.reply("a", TOKEN, b"r"))
    assert type(reply) is Replied and reply == Replied("a", TOKEN, b"r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.token = b""
    match reply:
        case Replied(sender, token, envelope):
            assert (sender, token, envelope) == ("a", TOKEN, b"r")


# ------------------------------------------------------------------ malformed shapes

@pytest.mark.parametrize("first, expected", [
    (b"SYNP1", "bad_version"), (b"SYNP2", "bad_version"), (b"SYNP4", "bad_version"),
    (b"SYNP", "bad_version"),
    (b"SYNQ2", "bad_magic"), (b"", "bad_magic"), (b"\x84\xa1v\x01", "bad_magic"),
])
def test_wrong_magic(first, expected):
    frames = valid_frames()["RPL"]
    assert reason([first, *frames[1:]]) == expected


def test_a_version_2_message_is_bad_version():
    """What a node of the previous version sends: no checksum, magic SYNP2."""
    assert reason([b"SYNP2", b"RPL", b"node-a", TOKEN, b"\x80"]) == "bad_version"
    assert reason([b"SYNP2", b"FWD", b"node-a", b"node-a", b"\x01", TOKEN, b"\x80"]) == \
        "bad_version"
    assert reason(peer.seal([b"SYNP2", b"RPL", b"node-a", TOKEN, b"\x80"])) == "bad_version"


def test_empty_and_short_lists():
    assert reason([]) == "bad_magic"
    assert reason([MAGIC]) == "bad_shape"
    assert reason([MAGIC, b"RPL"]) == "bad_shape"  # no sender


@pytest.mark.parametrize("op", [b"NOP", b"fwd", b"FWD ", b"", b"STAT", b"GOSSIPS", b"HANDOF",
                                b"\xff"])
def test_unknown_op(op):
    assert reason([MAGIC, op, b"node-a", TOKEN, b"x"]) == "unknown_op"


@pytest.mark.parametrize("op", ["FWD", "RPL", "GOSSIP", "HANDOFF", "STATQ", "STATR"])
def test_wrong_frame_count(op):
    frames = valid_frames()[op]
    assert reason(frames[:-1]) == "bad_shape"
    assert reason([*frames, b""]) == "bad_shape"
    assert reason([*frames, b"x", b"y"]) == "bad_shape"


BAD_IDS = [b"", b"n" * 256, b"\xff\xfe", b"node-\xc3", b"\xed\xa0\x80"]  # last: a surrogate


@pytest.mark.parametrize("op", ["FWD", "RPL", "GOSSIP", "HANDOFF", "STATQ", "STATR"])
@pytest.mark.parametrize("sender", BAD_IDS)
def test_bad_sender(op, sender):
    assert reason(replaced(op, 2, sender)) == "bad_sender"


@pytest.mark.parametrize("origin", BAD_IDS)
def test_bad_origin(origin):
    assert reason(replaced("FWD", 3, origin)) == "bad_origin"


@pytest.mark.parametrize("hops_frame", [b"\x00", b"\x11", b"\xff", b"\x01\x00", b"\x00\x01", b"",
                                        b"1"])
def test_bad_hops(hops_frame):
    assert reason(replaced("FWD", 4, hops_frame)) == "bad_hops"


@pytest.mark.parametrize("size", [1, 8, 15, 17, 32])
def test_bad_call_token(size):
    assert reason(replaced("FWD", 5, bytes(size))) == "bad_token"
    assert reason(replaced("RPL", 3, bytes(size))) == "bad_token"


def test_empty_token_is_a_one_way_forward_but_no_reply():
    assert peer.decode(replaced("FWD", 5, b"")).token == b""
    assert reason(replaced("RPL", 3, b"")) == "bad_token"


@pytest.mark.parametrize("token", [b"", b"x" * 33, b"t\xc3\xa9", b"\x80"])
def test_bad_status_query_token(token):
    assert reason(replaced("STATQ", 3, token)) == "bad_token"


BAD_BODIES = {
    "not msgpack": b"\xc1",
    "truncated": msgpack.packb({"kind": "members"})[:-2],
    "trailing bytes": msgpack.packb({}) + b"\x00",
    "empty": b"",
    "a list": msgpack.packb([1, 2]),
    "an int": msgpack.packb(7),
    "a string": msgpack.packb("members"),
    "nil": msgpack.packb(None),
    "bytes key": msgpack.packb({b"kind": "members"}),
    "int key": msgpack.packb({1: "x"}),
    "nested bytes key": msgpack.packb({"members": [{b"id": "x"}]}),
    "nested int key": msgpack.packb({"ep": {7: "tcp://a:1"}}),
    "too deep": b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0",
    "array header lies": b"\x81\xa1a\xdd\xff\xff\xff\xff",
    "map header lies": b"\xdf\xff\xff\xff\xff",
    "str header lies": b"\x81\xa1a\xdb\xff\xff\xff\xff",
    "invalid utf-8 str": b"\x81\xa1a\xa2\xff\xfe",
}


@pytest.mark.parametrize("op", ["GOSSIP", "HANDOFF", "STATR"])
@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_body(op, name):
    assert reason(replaced(op, 3, BAD_BODIES[name])) == "bad_body"


@pytest.mark.parametrize("op", ["GOSSIP", "STATR"])
def test_body_over_one_mib_is_refused_before_decoding(op):
    # not msgpack either: the size is checked first
    assert reason(replaced(op, 3, b"\xc1" * (MIB + 1))) == "too_large"
    assert reason(replaced(op, 3, b"\xc1" * MIB)) == "bad_body"


@pytest.mark.parametrize("body, expected", [
    ({"status": {}}, "bad_token"),
    ({"token": 7, "status": {}}, "bad_token"),
    ({"token": "", "status": {}}, "bad_token"),
    ({"token": "x" * 33, "status": {}}, "bad_token"),
    ({"token": "é", "status": {}}, "bad_token"),
    ({"token": "1"}, "bad_body"),
    ({"token": "1", "status": [1]}, "bad_body"),
    ({"token": "1", "status": None}, "bad_body"),
])
def test_bad_status_answer_body(body, expected):
    assert reason(replaced("STATR", 3, msgpack.packb(body))) == expected


def test_status_answer_with_unknown_keys_is_accepted_without_them():
    frames = replaced("STATR", 3, msgpack.packb({"token": "1", "status": {}, "later": [1, 2]}))
    assert peer.decode(frames).message == {"token": "1", "status": {}}


# ------------------------------------------------------------------ corruption

OPS = ["FWD", "RPL", "GOSSIP", "HANDOFF", "STATQ", "STATR"]


def realistic_messages() -> dict[str, list[bytes]]:
    """One message per op with the content a node sends (envelopes, member lists,
    agent state), so corruption lands in what matters."""
    request = msgpack.packb({"v": 1, "id": "42", "type": "call", "subject": "counter/alice",
                             "mode": "call", "message": "incr", "args": {"n": 3}})
    members = [{"id": f"node-{k}", "gen": 1_700_000_000_000_000_000 + k,
                "ep": {"zmq": f"tcp://10.0.0.{k}:7400", "zmq-pub": f"tcp://10.0.0.{k}:7401"}}
               for k in range(3)]
    return {
        "FWD": peer.forward("node-a", "node-b", 2, TOKEN, request),
        "RPL": peer.reply("node-b", TOKEN, msgpack.packb({"v": 1, "id": "42", "ok": 4})),
        "GOSSIP": peer.gossip("node-a", {"v": 1, "kind": "members", "members": members}),
        "HANDOFF": peer.handoff("node-a", {"v": 1, "kind": "state", "agent": "counter/alice",
                                           "seq": 7, "behavior": "counter",
                                           "state": msgpack.packb({"value": 4}),
                                           "groups": ["g1"]}),
        "STATQ": peer.status_query("node-a", "1234"),
        "STATR": peer.status_answer("node-b", "1234", {"node": "node-b", "agents": 3}),
    }


def refused_where(index: int) -> set[str]:
    """The reasons a message corrupted in frame ``index`` may be refused with: the
    magic and the op are read before the checksum, everything else is covered by it."""
    return {0: {"bad_magic", "bad_version"}, 1: {"unknown_op"}}.get(index, {"bad_checksum"})


def flipped(frames: list[bytes], index: int, byte: int, bit: int) -> list[bytes]:
    frame = bytearray(frames[index])
    frame[byte] ^= 1 << bit
    return [*frames[:index], bytes(frame), *frames[index + 1:]]


@pytest.mark.parametrize("op", OPS)
def test_every_single_bit_flip_is_refused(op):
    """Each bit of each frame, one at a time: refused, never decoded."""
    frames = realistic_messages()[op]
    for index, frame in enumerate(frames):
        for byte in range(len(frame)):
            for bit in range(8):
                assert reason(flipped(frames, index, byte, bit)) in refused_where(index), \
                    (index, byte, bit)


messages = st.one_of(
    st.builds(peer.forward, node_ids, node_ids, hops, fwd_tokens, envelopes),
    st.builds(peer.reply, node_ids, call_tokens, envelopes),
    st.builds(peer.gossip, node_ids, bodies),
    st.builds(peer.handoff, node_ids, bodies),
    st.builds(peer.status_query, node_ids, status_tokens),
    st.builds(peer.status_answer, node_ids, status_tokens, bodies))


@MANY
@given(messages, st.data())
def test_a_bit_flipped_anywhere_in_any_message_is_refused(frames, data):
    index = data.draw(st.sampled_from([i for i, frame in enumerate(frames) if frame]))
    byte = data.draw(st.integers(min_value=0, max_value=len(frames[index]) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    assert reason(flipped(frames, index, byte, bit)) in refused_where(index)


@pytest.mark.parametrize("op", OPS)
def test_lost_added_or_swapped_frames_are_refused(op):
    frames = realistic_messages()[op]
    for i in range(2, len(frames)):
        assert reason(frames[:i] + frames[i + 1:]) == "bad_shape"
        assert reason(frames[:i] + [b"x"] + frames[i:]) == "bad_shape"
        for j in range(i + 1, len(frames)):
            swapped = list(frames)
            swapped[i], swapped[j] = frames[j], frames[i]
            assert reason(swapped) == "bad_checksum", (i, j)
    assert reason(frames[1:]) == "bad_magic"
    assert reason([frames[0], *frames[2:]]) == "unknown_op"


@pytest.mark.parametrize("op", OPS)
def test_bytes_moved_across_a_frame_boundary_are_refused(op):
    """The frames' lengths are in the checksum: the same bytes cut at another place
    (``node-a``, ``node-b`` -> ``node-an``, ``ode-b``) are another message."""
    frames = realistic_messages()[op]
    for i in range(2, len(frames) - 2):  # each pair of covered frames
        moved = list(frames)
        moved[i], moved[i + 1] = frames[i] + frames[i + 1][:1], frames[i + 1][1:]
        assert b"".join(moved) == b"".join(frames)
        assert reason(moved) == "bad_checksum", i


def test_randomly_corrupted_messages_are_never_decoded():
    """The fault-injection experiment that found version 2 wanting: 2000 copies of
    each op, each with 1..3 random bytes of one random frame flipped (what the
    ``corrupt`` fault does on the wire).  Version 2 decoded most of them with
    changed content; none may be decoded now."""
    import random

    from node.transports.faults import corrupt_frames

    rng = random.Random(3)
    for op, frames in realistic_messages().items():
        for _ in range(2000):
            corrupted = corrupt_frames(frames, rng)
            try:
                peer.decode(corrupted)
            except PeerProtocolError as exc:
                assert exc.reason in {"bad_magic", "bad_version", "unknown_op", "bad_checksum"}
            else:  # corrupt_frames may flip a byte and flip it back: nothing changed
                assert corrupted == frames, op


# ------------------------------------------------------------------ random input

known_ops = st.sampled_from([b"FWD", b"RPL", b"GOSSIP", b"HANDOFF", b"STATQ", b"STATR"])
firsts = st.sampled_from([MAGIC, b"SYNP1", b"SYNP2", b"SYNP"]) | st.binary(max_size=8)
frame_values = (st.binary(max_size=64) | st.sampled_from([b"", b"\x01", b"\x10", b"\x11", TOKEN])
                | st.builds(msgpack.packb, values))


@MANY
@given(firsts, known_ops | st.binary(max_size=8), st.lists(frame_values, max_size=8),
       st.booleans())
def test_decode_raises_only_peer_protocol_errors(first, op, rest, sealed):
    """``sealed``: with a matching checksum, so the op's decoder sees the frames."""
    frames = [first, op, *rest]
    try:
        event = peer.decode(peer.seal(frames) if sealed else frames)
    except PeerProtocolError as exc:
        assert exc.reason in peer.REASONS
    else:
        assert type(event) in (Forwarded, Replied, Gossiped, HandedOff, StatusQueried,
                               StatusAnswered)


@MANY
@given(st.sampled_from(["FWD", "RPL", "GOSSIP", "HANDOFF", "STATQ", "STATR"]), st.data())
def test_decode_of_a_mutated_valid_list_raises_only_peer_protocol_errors(op, data):
    frames = valid_frames()[op][:-1]
    index = data.draw(st.integers(min_value=2, max_value=len(frames) - 1))
    frames[index] = data.draw(frame_values)
    try:
        peer.decode(peer.seal(frames))  # sealed again: the op's decoder sees it
    except PeerProtocolError as exc:
        assert exc.reason in peer.REASONS


@FAST
@given(st.lists(st.binary(max_size=32), max_size=10))
def test_decode_of_random_lists_raises_only_peer_protocol_errors(frames):
    try:
        peer.decode(frames)
    except PeerProtocolError as exc:
        assert exc.reason in peer.REASONS


# ------------------------------------------------------------------ is_peer

def test_is_peer():
    for frames in valid_frames().values():
        assert peer.is_peer(frames)
    assert peer.is_peer([b"SYNP1", b"GOSSIP", b"{}"])  # another version: decode counts it
    assert not peer.is_peer([MAGIC])
    assert peer.is_peer([MAGIC, b"RPL"])  # two frames: peer traffic (decode refuses it)
    assert not peer.is_peer([])
    envelope = msgpack.packb({"v": 1, "id": "1", "type": "get", "subject": "a", "mode": "call"})
    assert not peer.is_peer([envelope])             # a DEALER client
    assert not peer.is_peer([b"", envelope])        # a REQ client
    assert not peer.is_peer([envelope, envelope])   # a bad request, answered as one


@FAST
@given(st.dictionaries(st.text(max_size=8), values, max_size=4), st.binary(max_size=16))
def test_no_client_envelope_looks_like_a_peer_frame(envelope, extra):
    assert not peer.is_peer([msgpack.packb(envelope), extra])


# ------------------------------------------------------------------ local errors

@pytest.mark.parametrize("call", [
    lambda: peer.forward("a", "b", 0, TOKEN, b""),
    lambda: peer.forward("a", "b", 17, TOKEN, b""),
    lambda: peer.forward("a", "b", True, TOKEN, b""),
    lambda: peer.forward("a", "b", 1.0, TOKEN, b""),
    lambda: peer.forward("a", "b", 1, bytes(15), b""),
    lambda: peer.forward("a", "b", 1, "x" * 16, b""),
    lambda: peer.forward("", "b", 1, TOKEN, b""),
    lambda: peer.forward("a", "n" * 256, 1, TOKEN, b""),
    lambda: peer.forward("a", "é" * 128, 1, TOKEN, b""),
    lambda: peer.forward("\ud800", "b", 1, TOKEN, b""),
    lambda: peer.forward(b"a", "b", 1, TOKEN, b""),
    lambda: peer.reply("a", b"", b""),
    lambda: peer.reply("a", bytes(17), b""),
    lambda: peer.gossip("a", [1]),
    lambda: peer.gossip("a", {"pad": bytes(MIB)}),
    lambda: peer.gossip("a", {"x": object()}),
    lambda: peer.handoff("a", [1]),
    lambda: peer.handoff("", {}),
    lambda: peer.handoff("a", {"x": object()}),
    lambda: peer.status_query("a", ""),
    lambda: peer.status_query("a", "x" * 33),
    lambda: peer.status_query("a", "é"),
    lambda: peer.status_query("a", 7),
    lambda: peer.status_answer("a", "1", [1]),
    lambda: peer.status_answer("a", None, {}),
    lambda: peer.encode(STATUS_ANSWER, "a", "1"),
])
def test_encoders_refuse_what_the_protocol_cannot_carry(call):
    with pytest.raises(ValueError):
        call()


def test_id_caches_are_bounded():
    for k in range(peer.ID_CACHE_MAX + 100):
        event = peer.decode(peer.reply(f"node-{k}", TOKEN, b""))
        assert event.sender == f"node-{k}"
    assert len(peer._id_bytes) <= peer.ID_CACHE_MAX
    assert len(peer._id_text) <= peer.ID_CACHE_MAX


def test_id_caches_hold_up_to_id_cache_max_then_start_again():
    """Each cache keeps ID_CACHE_MAX ids (id -> frame, frame -> id); the next one
    starts it again."""
    peer._id_bytes.clear()
    peer._id_text.clear()
    for k in range(peer.ID_CACHE_MAX):
        peer.decode(peer.reply(f"cache-{k}", TOKEN, b""))
    assert len(peer._id_bytes) == len(peer._id_text) == peer.ID_CACHE_MAX
    assert peer._id_bytes["cache-7"] == b"cache-7" and peer._id_text[b"cache-7"] == "cache-7"
    peer.decode(peer.reply("one-more", TOKEN, b""))
    assert peer._id_bytes == {"one-more": b"one-more"}
    assert peer._id_text == {b"one-more": "one-more"}


def test_maps_in_a_body_are_bounded_like_arrays():
    """A map of CONTAINER_LEN_MAX entries is taken, one more is refused."""
    full = {f"k{i}": None for i in range(peer.CONTAINER_LEN_MAX)}
    assert len(peer.decode(peer.gossip("a", full)).message) == peer.CONTAINER_LEN_MAX
    over = msgpack.packb({f"k{i}": None for i in range(peer.CONTAINER_LEN_MAX + 1)})
    assert reason(replaced("GOSSIP", 3, over)) == "bad_body"


@pytest.mark.parametrize("op", [b"GOSSIP", b"HANDOFF", b"REPL", b"STATR"])
def test_the_sender_is_checked_first_even_when_the_body_is_a_known_id(op):
    """Only the sender frame is looked up among cached ids: a bad sender is refused
    as bad_sender whatever the body frame holds."""
    peer.decode(peer.reply("node-a", TOKEN, b""))  # b"node-a" is a cached id frame
    assert reason(peer.seal([MAGIC, op, b"\xff", b"node-a"])) == "bad_sender"


def test_cached_ids_are_still_checked():
    """A cached id frame decodes from the cache; an invalid one never enters it."""
    peer.decode(peer.reply("node-a", TOKEN, b""))
    frames = replaced("RPL", 2, b"\xff")
    assert reason(frames) == "bad_sender"
    assert reason(frames) == "bad_sender"
    assert b"\xff" not in peer._id_text


# ------------------------------------------------------------------ error texts

def text_of(frames: list) -> str:
    with pytest.raises(PeerProtocolError) as info:
        peer.decode(frames)
    return str(info.value)


@pytest.mark.parametrize("make, text", [
    (lambda: [], "bad_magic: first frame is not b'SYNP3'"),
    (lambda: [b"SYNP2", b"RPL"], "bad_version: peer protocol b'SYNP2', this node speaks b'SYNP3'"),
    (lambda: [MAGIC, b"RPL"], "bad_shape: 2 frames: no op or no sender"),
    (lambda: [MAGIC, b"NOP", b"x"], "unknown_op: op b'NOP'"),
    (lambda: [MAGIC, b"O" * 20, b"x"], "unknown_op: op b'OOOOOOOOOOOOOOOO'"),
    (lambda: [b"SYNP" + b"9" * 20, b"RPL"],
     "bad_version: peer protocol b'SYNP999999999999', this node speaks b'SYNP3'"),
    (lambda: replaced("GOSSIP", 3, msgpack.packb({1: 2})),
     "bad_body: not a msgpack document: int is not allowed for map key when strict_map_key=True"),
    (lambda: valid_frames()["RPL"][:-1], "bad_shape: RPL takes 6 frames, got 5"),
    (lambda: [*valid_frames()["RPL"][:-1], b"\x00\x00\x00\x00"],
     "bad_checksum: the frames do not match their checksum (corrupted on the way)"),
    (lambda: replaced("RPL", 2, b""), "bad_sender: node id of 0 bytes, not 1..255"),
    (lambda: replaced("RPL", 2, b"\xff"), "bad_sender: node id is not UTF-8"),
    (lambda: replaced("FWD", 3, b"\xff"), "bad_origin: node id is not UTF-8"),
    (lambda: replaced("FWD", 4, b"\x00"), "bad_hops: hops must be one byte in 1..16"),
    (lambda: replaced("FWD", 5, b"12345"),
     "bad_token: a forward token is 16 bytes or empty, got 5"),
    (lambda: replaced("RPL", 3, b"12345"), "bad_token: a reply token is 16 bytes, got 5"),
    (lambda: replaced("STATQ", 3, b""), "bad_token: a status token is 1..32 ASCII bytes"),
    (lambda: replaced("STATR", 3, msgpack.packb({"token": 7, "status": {}})),
     "bad_token: a status answer's 'token' is 1..32 ASCII characters"),
    (lambda: replaced("STATR", 3, msgpack.packb({"token": "7", "status": 1})),
     "bad_body: a status answer's 'status' is a map"),
    (lambda: replaced("GOSSIP", 3, b"\xc1" * (MIB + 1)),
     "too_large: body of 1048577 bytes exceeds 1048576"),
    (lambda: replaced("HANDOFF", 3, b"\xc1" * ((32 << 20) + 1)),
     "too_large: body of 33554433 bytes exceeds 33554432"),
    (lambda: replaced("GOSSIP", 3, msgpack.packb([1])), "bad_body: body must be a map, got list"),
    (lambda: replaced("GOSSIP", 3, b"\xc1"), "bad_body: not a msgpack document: FormatError"),
    (lambda: replaced("GOSSIP", 3, msgpack.packb({b"k": 1})),
     "bad_body: not a msgpack document: map key of type bytes"),
    (lambda: replaced("GOSSIP", 3, msgpack.packb({"a": "x" * 300})[:-1]),
     "bad_body: not a msgpack document: Unpack failed: incomplete input"),
])
def test_each_refusal_reads_reason_colon_detail(make, text):
    """The text of a PeerProtocolError is "reason: detail"; the detail names what
    was wrong (logs read it)."""
    assert text_of(make()) == text
    with pytest.raises(PeerProtocolError) as info:
        peer.decode(make())
    assert info.value.detail == text.split(": ", 1)[1]


@pytest.mark.parametrize("call, text", [
    (lambda: peer.forward("a", "b", 0, TOKEN, b""), "hops must be an int in 1..16, got 0"),
    (lambda: peer.forward("a", "b", True, TOKEN, b""), "hops must be an int in 1..16, got True"),
    (lambda: peer.forward("a", "b", 1, bytes(15), b""),
     "a forward token is 16 bytes (call) or empty (send)"),
    (lambda: peer.forward(b"a", "b", 1, TOKEN, b""), "sender must be a str, got bytes"),
    (lambda: peer.forward("a", "", 1, TOKEN, b""), "origin must be 1..255 bytes of UTF-8, got 0"),
    (lambda: peer.reply("a", b"", b""), "a reply token is 16 bytes"),
    (lambda: peer.gossip("a", [1]), "a gossip message is a map"),
    (lambda: peer.handoff("a", [1]), "a handoff message is a map"),
    (lambda: peer.replicate("a", [1]), "a replication message is a map"),
    (lambda: peer.gossip("a", {"pad": bytes(MIB)}),
     f"gossip body of {len(msgpack.packb({'pad': bytes(MIB)}))} bytes exceeds 1048576"),
    (lambda: peer.replicate("a", {"x": object()}),
     "replicate body cannot be packed: can not serialize 'object' object"),
    (lambda: peer.status_query("a", ""), "a status token is 1..32 ASCII characters"),
    (lambda: peer.status_answer("a", "1", [1]), "a status is a map"),
    (lambda: peer.status_answer("a", "", {}), "a status token is 1..32 ASCII characters"),
    (lambda: peer.handoff("a", {"x": object()}),
     "handoff body cannot be packed: can not serialize 'object' object"),
    (lambda: peer.status_answer("a", "1", {"x": object()}),
     "status answer body cannot be packed: can not serialize 'object' object"),
    (lambda: peer.encode(STATUS_ANSWER, "a", "1"),
     "a status_answer message is {'token': str, 'status': map}"),
    (lambda: peer.encode("nochannel", "a", {}), "no peer frame for channel 'nochannel'"),
    (lambda: peer.checksum([]), "a message has at least one frame"),
])
def test_local_errors_name_what_the_protocol_cannot_carry(call, text):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == text


@pytest.mark.parametrize("encode", [
    lambda sender: peer.reply(sender, TOKEN, b""),
    lambda sender: peer.gossip(sender, {}),
    lambda sender: peer.handoff(sender, {}),
    lambda sender: peer.replicate(sender, {}),
    lambda sender: peer.status_query(sender, "1"),
    lambda sender: peer.status_answer(sender, "1", {}),
])
def test_every_encoder_names_a_bad_sender(encode):
    with pytest.raises(ValueError, match=r"^sender must be a str, got bytes$"):
        encode(b"node-a")


def test_the_largest_bodies_and_frames_are_taken():
    """Bounds are inclusive: a handoff body of exactly HANDOFF_BODY_BYTES_MAX, a
    gossip body of exactly BODY_BYTES_MAX, a 255-byte node id, hops 16, 32-byte
    status tokens, containers of CONTAINER_LEN_MAX elements."""
    pad = peer.HANDOFF_BODY_BYTES_MAX - len(msgpack.packb({"s": bytes(1 << 17)})) + (1 << 17)
    big = {"s": bytes(pad)}
    assert len(msgpack.packb(big)) == peer.HANDOFF_BODY_BYTES_MAX
    assert peer.decode(peer.handoff("a", big)).message == big
    assert peer.decode(peer.replicate("a", big)).message == big
    gossip = {"s": bytes(MIB - len(msgpack.packb({"s": bytes(1 << 17)})) + (1 << 17))}
    assert peer.decode(peer.gossip("a", gossip)).message == gossip
    event = peer.decode(peer.forward("n" * 255, "o" * 255, 16, b"", b""))
    assert (event.sender, event.origin, event.hops) == ("n" * 255, "o" * 255, 16)
    assert peer.decode(peer.status_query("a", "t" * 32)).token == "t" * 32
    full = {"l": [None] * peer.CONTAINER_LEN_MAX}
    assert peer.decode(peer.gossip("a", full)).message == full
    over = msgpack.packb({"l": [None] * (peer.CONTAINER_LEN_MAX + 1)})
    assert reason(replaced("GOSSIP", 3, over)) == "bad_body"


def test_a_lengths_packer_takes_one_frame_and_up():
    """Packers are built for any frame count of one or more (8 bytes per length)."""
    import struct

    assert peer._lengths_packer(1)(5) == struct.pack(">Q", 5)
    assert peer._lengths_packer(9)(*range(9)) == struct.pack(">9Q", *range(9))


def test_the_checksum_is_crc32_of_the_lengths_then_the_frames():
    """For any frame count (the ops' and others): CRC-32 of every length as 8 bytes
    big-endian, then of the frames, as 4 bytes big-endian."""
    import struct
    import zlib

    for count in range(1, 10):
        frames = [bytes([n]) * n for n in range(count)]
        data = b"".join(struct.pack(">Q", len(f)) for f in frames) + b"".join(frames)
        assert peer.checksum(frames) == struct.pack(">I", zlib.crc32(data))


def test_a_fast_constructor_builds_ordinary_frozen_slotted_events():
    """_fast_constructor(cls) builds instances of ``cls`` itself (equal, frozen, no
    __dict__), through an unfrozen twin with the same slots; named for profiles."""
    build = peer._fast_constructor(Replied)
    event = build("a", TOKEN, b"r")
    assert type(event) is Replied and event == Replied("a", TOKEN, b"r")
    assert not hasattr(event, "__dict__") and build.__name__ == "fast_Replied"
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.sender = "b"


def test_replication_frames_round_trip_and_are_checked():
    """REPL: a replication message from an uncached sender decodes to Replicated; a
    bad sender or body is refused with its reason."""
    frames = peer.replicate("repl-sender-1", {"k": "w", "a": "x"})
    assert frames[1] == b"REPL" and len(frames) == 5
    assert peer.decode(frames) == peer.Replicated("repl-sender-1", {"k": "w", "a": "x"})
    peer._id_text.clear()
    assert peer.decode(frames).sender == "repl-sender-1"
    bad_sender = peer.seal([MAGIC, b"REPL", b"\xff", frames[3]])
    assert text_of(bad_sender) == "bad_sender: node id is not UTF-8"
    assert reason(peer.seal([MAGIC, b"REPL", b"x", b"\xc1"])) == "bad_body"
    peer._id_bytes.clear()
    with pytest.raises(ValueError, match=r"^sender must be a str, got bytes$"):
        peer.replicate(b"x", {})
    assert peer.decode(peer.replicate("repl-sender-2", {})).sender == "repl-sender-2"


# ------------------------------------------------------------------ the spec

def test_protocol_md_states_the_codec_s_frames_and_numbers():
    """docs/PROTOCOL.md section 9 and this codec say the same thing."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    section = text[text.index("## 9. Node-to-node"):text.index("## 11. ")]
    rows = dict(re.findall(r'\| `(\w+)` +\| `\[b"' + MAGIC.decode() + r'", b"\w+", ([^\]]*)\]`',
                           section))
    assert set(rows) == {op.decode() for op in peer.ROWS}
    for op, (count, _) in peer.ROWS.items():
        assert 2 + len(rows[op.decode()].split(",")) == count, op
    assert f'magic `{MAGIC.decode()}`' in section
    assert f"at most **{peer.BODY_BYTES_MAX}** bytes" in section
    assert f"at most **{peer.HANDOFF_BODY_BYTES_MAX}** bytes" in section
    assert f"an unsigned integer 1..{peer.HOPS_MAX}" in section
    assert f"exactly {peer.CALL_TOKEN_BYTES} bytes for a call" in section
    assert f"1..{peer.STATUS_TOKEN_BYTES_MAX} ASCII bytes" in section
    assert f"1..{peer.NODE_ID_BYTES_MAX} bytes of UTF-8" in section
    assert f"more than {peer.CONTAINER_LEN_MAX} elements" in section
    assert f"`crc`: {peer.CHECKSUM_BYTES} bytes" in section
    for name in peer.REASONS:
        assert f"`{name}`" in section, name


def test_a_status_answer_keeps_only_the_keys_the_protocol_names():
    """Found by fuzzing: an extra key in a STATR body was carried in the decoded
    answer, so decoding what the node would send again gave something else."""
    body = msgpack.packb({"token": "0", "status": {"n": 1}, "": None, "later": [1]})
    frames = peer.status_answer("n1", "0", {})[:3] + [body]
    frames.append(peer.checksum(frames))
    event = peer.decode(frames)
    assert event == peer.StatusAnswered("n1", {"token": "0", "status": {"n": 1}})
    assert peer.decode(peer.encode(STATUS_ANSWER, "n1", event.message)) == event
