"""Fuzz targets for the parsers a hostile connection reaches (issue 11, "Fuzzing").

A target is a hypothesis strategy of inputs and a check that states the contract of
one parser: every input either parses into something well formed or raises the
module's own error type (``WireError``, ``PeerProtocolError``, ``MembershipError``,
``HandoffError``, ``ReplicationError``), never any other exception.  The machines
(membership, handoff, replication) are fed runs of messages and must stay usable:
after the fuzzed run a valid message is still processed as it would be fresh, and
everything they send still encodes as a peer frame.  ``tests/test_fuzz.py`` runs each
target for a bounded number of examples; ``scripts/fuzz.py`` runs them for a time.

A parser behind a cheap check is reached only by inputs that pass the check (random
frames almost never carry a right CRC, random bytes are almost never a msgpack map
with the right keys), so inputs come three ways:

- random bytes and random frame lists: the cheap checks themselves;
- msgpack built from raw parts: maps whose keys are the protocol's own fields and
  whose values are packed values or hostile fragments (nesting 3,000 deep, headers
  claiming 4 G elements, invalid UTF-8, ext types, bytes keys), then mutated (a field
  replaced, dropped, added or duplicated);
- valid messages built with the module's own encoders (``wire.request``,
  ``peer.forward`` and friends, ``peer.seal`` for bodies), one frame mutated and,
  most of the time, the checksum recomputed so the decoders behind it are reached.

Inputs are bounded (a few KiB; one body of 1 MiB + 1 byte), so memory is too.
"""

from __future__ import annotations

import math
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import msgpack
from hypothesis import strategies as st

from core_cy import HashRing, replica_id
from protocols import peer, wire
from protocols.crdt import (RGA, GCounter, GSet, LWWMap, LWWRegister, ORMap, ORSet, PNCounter,
                            TTLMap, TwoPSet, VClock, encode_fields)
from protocols.effects import (GOSSIP, HANDOFF, REPLICATE, Install, MembersChanged,
                               QuorumChanged, Refuted, Send, Surrender)
from protocols.handoff import Handoff, HandoffError
from protocols.membership import (ALIVE, MEMBERS_MAX, STATES, Member, Membership,
                                  MembershipError, SwimConfig)
from protocols.replication import Replication, ReplicationError


# Frames a node's parser has below it: Python's default recursion limit (1,000) less
# the node's own stack when it calls a parser (a few dozen frames), rounded down.
PARSER_FRAMES = 950


@contextmanager
def node_stack(frames: int = PARSER_FRAMES) -> Iterator[None]:
    """Run with the recursion room a node's parser has.  Hypothesis raises the limit
    while it runs a test, which hides a RecursionError (the repr of a list nested
    1,000 deep, which msgpack decodes) that a node would meet."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: inputs, and the check of one input."""

    name: str
    inputs: st.SearchStrategy
    check: Callable[[Any], None]

    def run(self, case: Any) -> None:
        """The check of ``case``, with a node's recursion room."""
        with node_stack():
            self.check(case)


# --- raw msgpack ---------------------------------------------------------------------

EDGE_INTS = (0, 1, -1, 2, 7, 8, 9, 16, 17, 64, 65, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
             2**63, 2**64 - 1, -(2**63))
ints = st.sampled_from(EDGE_INTS) | st.integers(-(2**63), 2**64 - 1)
scalars = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=10)


def pack(value: Any) -> bytes:
    return msgpack.packb(value)


def map_header(count: int) -> bytes:
    return bytes((0x80 | count,)) if count < 16 else b"\xde" + count.to_bytes(2, "big")


def list_header(count: int) -> bytes:
    return bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")


def pack_map(pairs: list[tuple[Any, bytes]]) -> bytes:
    """A msgpack map of packed keys and raw (already packed, maybe broken) values."""
    return map_header(len(pairs)) + b"".join(pack(key) + raw for key, raw in pairs)


def pack_list(items: list[bytes]) -> bytes:
    return list_header(len(items)) + b"".join(items)


# Fragments msgpack itself must refuse or carry safely: lying length headers, reserved
# and invalid bytes, ext types (a timestamp of a wrong size), invalid UTF-8, a map with
# a bytes, int, nil or list key, a document cut short.
FRAGMENTS = (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
             b"\xc6\x7f\xff\xff\xff", b"\xc1", b"\xd4\x05\x00", b"\xd6\xff\x00\x00\x00\x01",
             b"\xc7\x03\xff\x00\x00\x00", b"\xa2\xff\xfe", b"\x81\xc4\x02id\xa1x",
             b"\x81\x01\xc0", b"\x81\xc0\xc0", b"\x81\x91\x01\xc0", b"\x92\x01", b"\xda\x00",
             b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xca\x7f\x80\x00\x00")
NESTING_HEADS = (b"\x91", b"\x81\xa1a", b"\xdc\x00\x01", b"\xde\x00\x01\xa1a")
# Depths around the limits that matter: Python's recursion limit (1,000 frames, less
# the caller's) and msgpack's parse stack (1,024 containers).
NESTING_DEPTHS = (2, 100, 511, 512, 900, 960, 990, 1000, 1010, 1020, 1022, 1023, 1024, 3000)
nested = st.builds(lambda depth, head: head * depth + b"\xc0",
                   st.sampled_from(NESTING_DEPTHS) | st.integers(1, 3000),
                   st.sampled_from(NESTING_HEADS))
hostile = st.sampled_from(FRAGMENTS) | nested
raw_values = values.map(pack) | hostile


@st.composite
def soup(draw, words: tuple) -> bytes:
    """Tokens glued at random: packed field names and values of the protocol, map and
    list headers, fragments, stray bytes.  Near-valid maps random bytes never make."""
    tokens = st.sampled_from(tuple(pack(w) for w in words) + FRAGMENTS
                             + tuple(map_header(n) for n in range(4))
                             + tuple(list_header(n) for n in range(3)))
    head = draw(st.sampled_from((b"", map_header(1), map_header(2), map_header(5))))
    parts = draw(st.lists(tokens | st.binary(min_size=1, max_size=3), max_size=24))
    return head + b"".join(parts)


@st.composite
def mutated_map(draw, pairs: list[tuple[Any, bytes]], keys: tuple,
                field_values: st.SearchStrategy = raw_values) -> bytes:
    """``pairs`` packed as a map after 0..3 mutations: a value replaced, a pair dropped,
    a pair added under a known or random key, a key repeated (the last one wins)."""
    pairs = list(pairs)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(("set", "set", "drop", "add", "repeat")))
        if how == "add" or not pairs:
            key = draw(st.sampled_from(keys) | st.text(max_size=6) | st.binary(max_size=3)
                       | st.integers(-2, 2))
            pairs.append((key, draw(field_values)))
        elif how == "drop":
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif how == "repeat":
            pairs.append((pairs[draw(st.integers(0, len(pairs) - 1))][0], draw(field_values)))
        else:
            index = draw(st.integers(0, len(pairs) - 1))
            pairs[index] = (pairs[index][0], draw(field_values))
    return pack_map(pairs)


def pack_replacing(value: Any, path: tuple, raw: bytes) -> bytes:
    """``value`` packed with the part at ``path`` (keys and indexes) replaced by
    ``raw``: a valid document broken at one place, however deep."""
    if not path:
        return raw
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return pack_map([(k, pack_replacing(v, rest, raw) if k == head else pack(v))
                         for k, v in value.items()])
    return pack_list([pack_replacing(v, rest, raw) if i == head else pack(v)
                      for i, v in enumerate(value)])


def paths(value: Any) -> list[tuple]:
    """The path of every part of ``value`` (itself: the empty path)."""
    found, stack = [], [((), value)]
    while stack:
        path, item = stack.pop()
        found.append(path)
        if isinstance(item, dict):
            stack.extend((path + (k,), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((path + (i,), v) for i, v in enumerate(item))
    return found


@st.composite
def broken_inside(draw, documents: tuple) -> bytes:
    """One of ``documents`` (valid values) with one part, at any depth, replaced by
    a packed value or a hostile fragment."""
    value = draw(st.sampled_from(documents))
    return pack_replacing(value, draw(st.sampled_from(paths(value))), draw(raw_values))


@st.composite
def mangled(draw, base: st.SearchStrategy) -> bytes:
    """A document from ``base`` cut short, with a byte changed, bytes inserted or
    dropped, or trailing bytes appended (or untouched)."""
    data = bytearray(draw(base))
    how = draw(st.sampled_from(("keep", "cut", "flip", "insert", "drop", "append")))
    at = draw(st.integers(0, len(data)))
    if how == "cut":
        del data[at:]
    elif how == "flip" and at < len(data):
        data[at] ^= draw(st.integers(1, 255))
    elif how == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=4))
    elif how == "drop":
        del data[at:at + draw(st.integers(1, 8))]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=8) | st.sampled_from(FRAGMENTS))
    return bytes(data)


def walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value inside ``value``, itself included, with its depth; without
    recursion (a decoded body may nest a thousand levels)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, list):
            stack.extend((part, depth + 1) for part in item)


# --- target 1: client envelopes (wire.parse_request, wire.refusal) -----------------

WIRE_FIELDS = ("id", "v", "type", "mode", "subject", "data", "ttl", "consistency",
               "delivery", "session", "vc", "traceparent", "re", "source", "routing",
               "stages", "stage", "targets", "timeout_ms")
TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
WIRE_WORDS = (*WIRE_FIELDS, 1, 2, 0, 8, 9, -1, True, 1.0, "x", "call", "send", "publish",
              *sorted(wire.SYSTEM_TYPES), "syn.nope", "kv.get", *sorted(wire.CONSISTENCIES),
              *sorted(wire.DELIVERIES), "behavior", "group", "p1", {"behavior": "kv"},
              {"group": "g"}, {"p1": 1}, TRACEPARENT, "x" * 129, "x" * 513,
              *sorted(wire.ROUTINGS), [["a", "kv.get"]], ["a", "b"], ["a", "a"], 15, 16,
              wire.TIMEOUT_MS_MAX, wire.TIMEOUT_MS_MAX + 1)
wire_ids = st.text(min_size=1, max_size=8) | st.sampled_from(("x" * 128, "x" * 129, ""))
wire_values = raw_values | st.sampled_from(WIRE_WORDS).map(pack)


@st.composite
def wire_request_map(draw) -> dict:
    """A valid request, as a client builds it (any type, mode and guarantee)."""
    mtype = draw(st.sampled_from((*sorted(wire.SYSTEM_TYPES), "kv.get", "echo")))
    data = {wire.TYPE_SPAWN: {"behavior": "kv", "init": draw(values)},
            wire.TYPE_JOIN: {"group": "g"}, wire.TYPE_LEAVE: {"group": "g"}}.get(mtype)
    delivery = draw(st.sampled_from((None, *sorted(wire.DELIVERIES))))
    causal = delivery == wire.DELIVERY_CAUSAL and mtype not in wire.NODE_TYPES
    return wire.request(
        draw(wire_ids.filter(lambda s: 0 < len(s) <= wire.ID_LEN_MAX)), mtype,
        None if mtype in wire.NODE_TYPES else "agent-1",
        data if data is not None else draw(values),
        wire.MODE_CALL if delivery not in (None, wire.DELIVERY_AT_MOST_ONCE)
        else draw(st.sampled_from((wire.MODE_CALL, wire.MODE_SEND))),
        ttl=draw(st.none() | st.integers(0, wire.TTL_MAX)),
        traceparent=draw(st.none() | st.just(TRACEPARENT)),
        consistency=draw(st.sampled_from((None, *sorted(wire.CONSISTENCIES)))),
        delivery=delivery if causal or delivery != wire.DELIVERY_CAUSAL else None,
        session="p1" if causal else None,
        vc={"p1": draw(st.integers(1, 9)), "p2": 3} if causal else None)


@st.composite
def wire_routed_map(draw) -> dict:
    """A valid request naming a routing strategy (PROTOCOL.md 2.5)."""
    routing = draw(st.sampled_from(sorted(wire.ROUTINGS)))
    mode = draw(st.sampled_from(sorted(mode for mode, allowed in wire.ROUTINGS_BY_MODE.items()
                                       if routing in allowed)))
    extra: dict = {}
    if routing == wire.ROUTING_PIPELINE:
        extra["stages"] = [[f"agent-{n}", "kv.put"] for n in range(draw(st.integers(1, 3)))]
        extra["stage"] = draw(st.integers(0, 3))
    elif routing == wire.ROUTING_SCATTER:
        extra["targets"] = [f"agent-{n}" for n in range(draw(st.integers(1, 4)))]
    if routing in (wire.ROUTING_PIPELINE, wire.ROUTING_SCATTER):
        extra["timeout_ms"] = draw(st.none() | st.integers(1, wire.TIMEOUT_MS_MAX))
    return wire.request(draw(st.text(min_size=1, max_size=8)), "kv.get", "agent-1",
                        draw(values), mode, routing=routing,
                        ttl=draw(st.none() | st.integers(0, wire.TTL_MAX)), **extra)


@st.composite
def wire_mutated(draw) -> bytes:
    """A valid request with 0..3 fields replaced, dropped, added or repeated."""
    env = draw(wire_request_map() | wire_routed_map())
    return draw(mutated_map([(k, pack(v)) for k, v in env.items()], WIRE_FIELDS, wire_values))


wire_frames = st.one_of(
    st.binary(max_size=300),
    soup(WIRE_WORDS),
    wire_mutated(),
    mangled(wire_mutated()),
    hostile,
)
# Frames are refused as too large past max_bytes (and only peeked at): small limits
# make that path as common as the decoding one.
wire_inputs = st.tuples(wire_frames, st.just(1 << 20) | st.integers(0, 400))


def check_wire_error(exc: wire.WireError) -> None:
    """What a refusal carries is what the node may copy into its answer."""
    assert exc.code in wire.ErrorCode.ALL
    assert exc.request_id is None or (type(exc.request_id) is str
                                      and 0 < len(exc.request_id) <= wire.ID_LEN_MAX)
    assert exc.mode is None or exc.mode in wire.MODES
    assert exc.traceparent is None or type(exc.traceparent) is str
    assert type(exc.message) is str


def check_request(req: wire.Request, frame: bytes) -> None:
    assert type(req.id) is str and 0 < len(req.id) <= wire.ID_LEN_MAX
    assert type(req.type) is str and 0 < len(req.type) <= wire.TYPE_LEN_MAX
    assert req.mode in wire.MODES
    assert req.subject is None or (type(req.subject) is str
                                   and 0 < len(req.subject) <= wire.SUBJECT_LEN_MAX)
    assert req.ttl is None or (type(req.ttl) is int and 0 <= req.ttl <= wire.TTL_MAX)
    assert req.consistency is None or req.consistency in wire.CONSISTENCIES
    assert req.delivery is None or req.delivery in wire.DELIVERIES
    if req.delivery == wire.DELIVERY_CAUSAL:
        assert req.session in req.vc
    assert req.nbytes == len(frame)
    # What was accepted is accepted again once re-encoded (a node forwards raw maps).
    again = wire.parse_request(wire.encode(req.raw), 1 << 30)
    assert (again.id, again.type, again.mode, again.subject) == (req.id, req.type, req.mode,
                                                                 req.subject)


def check_wire(case: tuple[bytes, int]) -> None:
    """parse_request: a Request or a WireError; refusal and peek never raise."""
    frame, max_bytes = case
    try:
        req = wire.parse_request(frame, max_bytes)
    except wire.WireError as exc:
        check_wire_error(exc)
    else:
        check_request(req, frame)
    # The node builds this error when a handler fails on a frame it decoded earlier.
    check_wire_error(wire.refusal(frame, wire.ErrorCode.INTERNAL, "the handler raised"))
    peeked = wire.peek(frame)
    assert set(peeked) <= {"id", "mode", "traceparent"}
    assert all(type(v) is str and len(v.encode()) <= wire.PEEK_STR_BYTES_MAX
               for v in peeked.values())


# --- the gossip, handoff and replication bodies (target 3, and target 2's bodies) ---

WALL_NS = 1_700_000_000 * 10**9  # the nodes' wall clock at now=0 (wall_offset_ns)
GEN = WALL_NS - 10**9            # incarnation of every member the machine knows
ME = "n0"
# Longer than any id the strategies draw: no fuzzed message can have named it.
FRESH = "fresh-node-0000"
PEERS = ("n1", "n2", "n3")
member_ids = (st.sampled_from((ME, *PEERS, "n4", "x" * 255, "x" * 256, ""))
              | st.text(alphabet="n01é", min_size=1, max_size=3))


def address(node_id: str, port: int = 7400) -> str:
    return f"tcp://10.0.0.{sum(node_id.encode()) % 250}:{port}"


def member(node_id: str, gen: int = GEN) -> Member:
    return Member.of(node_id, address(node_id), address(node_id, 7401), gen)


ENDPOINTS = ("tcp://10.9.9.9:7400", "tcp://[::1]:7400", "tcp://h:65535", "tcp://h:65536",
             "tcp://h:99999", "udp://h:1", "tcp://h", "", "x" * 256, "tcp://a b:1")
endpoint_values = st.sampled_from(ENDPOINTS).map(pack) | raw_values
generations = st.sampled_from((GEN, GEN + 1, GEN - 1, WALL_NS + 60 * 10**9,
                               WALL_NS + 61 * 10**9, 0, 2**63, 2**64 - 1)) | ints
state_codes = st.sampled_from(("a", "s", "d", "l")) | st.sampled_from(("alive", "")) | values


@st.composite
def gossip_entry(draw) -> bytes:
    """A member entry ``{id, gen, ep[, st, by]}``, mutated."""
    node_id = draw(member_ids)
    ep = draw(mutated_map([("zmq", pack(address(node_id))),
                           ("zmq-pub", pack(address(node_id, 7401)))],
                          ("zmq", "zmq-pub", "ws"), endpoint_values))
    pairs = [("id", pack(node_id)), ("gen", pack(draw(generations))), ("ep", ep)]
    if draw(st.booleans()):
        pairs += [("st", pack(draw(state_codes))), ("by", pack(draw(member_ids)))]
    return draw(mutated_map(pairs, ("id", "gen", "ep", "st", "by")))


GOSSIP_KEYS = ("v", "kind", "seq", "u", "ag", "target", "full", "page", "pages", "r", "dg")
seqs = st.integers(0, 12) | ints


@st.composite
def gossip_body(draw) -> bytes:
    """A membership message of any kind, its entries and fields mutated."""
    kind = draw(st.sampled_from(("ping", "ack", "ping-req", "nack", "sync")))
    entries = pack_list(draw(st.lists(gossip_entry(), max_size=5)))
    fields = {"ping": [("seq", seqs), ("ag", ints)], "ack": [("seq", seqs), ("ag", ints)],
              "ping-req": [("seq", seqs), ("target", member_ids)], "nack": [("seq", seqs)],
              "sync": [("full", st.booleans()), ("page", st.integers(-1, 65)),
                       ("pages", st.integers(-1, 65)), ("r", st.integers(0, 3)),
                       ("dg", st.lists(st.integers(0, 2**32), min_size=64, max_size=64)
                        | st.lists(ints, max_size=65))]}[kind]
    pairs = [("v", pack(draw(st.sampled_from((2, 3, 1))))), ("kind", pack(kind)),
             ("u", entries)]
    pairs += [(key, pack(draw(strategy))) for key, strategy in fields
              if draw(st.booleans())]
    return draw(mutated_map(pairs, GOSSIP_KEYS))


HANDOFF_KEYS = ("v", "kind", "agent", "seq", "behavior", "state", "groups")
agent_ids = st.sampled_from(("a1", "a2", "x" * 1024, "x" * 1025, "")) | st.text(max_size=4)


@st.composite
def handoff_body(draw) -> bytes:
    """A handoff message (want, none, state, ack), mutated."""
    kind = draw(st.sampled_from(("want", "none", "state", "ack")))
    pairs = [("v", pack(1)), ("kind", pack(kind)), ("agent", pack(draw(agent_ids)))]
    if kind in ("state", "ack"):
        pairs.append(("seq", pack(draw(seqs))))
    if kind == "state":
        pairs += [("behavior", pack(draw(st.sampled_from(("kv", None, ""))))),
                  ("state", pack(draw(st.none() | st.binary(max_size=16)))),
                  ("groups", pack(draw(st.lists(st.sampled_from(("g", "", "x" * 600)),
                                                max_size=3))))]
    return draw(mutated_map(pairs, HANDOFF_KEYS))


def _encoded_fields() -> dict:
    """Encoded CRDT fields, one of every type, each holding something."""
    def bound(crdt: Any, replica: int) -> Any:
        return crdt.bind(replica_id(f"r{replica}"), lambda: 100)

    fields = {"n": bound(PNCounter(), 1), "_gen": bound(GCounter(), 2), "s": bound(ORSet(), 3),
              "r": bound(LWWRegister(), 4), "m": bound(LWWMap(), 5), "o": bound(ORMap(), 6),
              "q": bound(RGA(), 7), "g": bound(GSet(), 8), "t": bound(TwoPSet(), 9),
              "c": bound(VClock(), 10), "ttl": bound(TTLMap(), 11)}
    fields["n"].increment(5)
    gone = replica_id("r0")  # a retired writer, folded: the counter carries a marker
    fields["n"].merge(PNCounter.from_wire([[gone], [3], [1], []]))
    fields["n"].fold([gone], replica_id("r1"), 0, 10**9)
    fields["_gen"].increment(2)
    fields["s"].add("x")
    fields["r"].set({"k": [1, 2]})
    fields["m"].set("k", [1, {"a": None}])
    fields["o"].update("k", PNCounter, lambda counter: counter.increment(1))
    fields["q"].insert(0, "a")
    fields["g"].add(7)
    fields["t"].add(b"b")
    fields["c"].tick()
    fields["ttl"].set("k", "v", 10**9)
    return encode_fields(fields)


ENCODED_FIELDS = _encoded_fields()
# Valid ``f`` values: none, a wrong shape, every type together, each type alone.
FIELDS_SAMPLES = [{}, {"n": ["pn", 1]}, ENCODED_FIELDS,
                  *({name: field} for name, field in ENCODED_FIELDS.items())]
REPL_KEYS = ("k", "a", "b", "e", "s", "f", "z", "m")
repl_fields = (st.sampled_from(FIELDS_SAMPLES).map(pack) | broken_inside(tuple(FIELDS_SAMPLES))
               | raw_values)


@st.composite
def replication_message(draw, batch: bool = True) -> bytes:
    """A replication message of any kind, or a batch of packed ones, mutated."""
    kind = draw(st.sampled_from(("d", "f", "a", "n", "p", "pa", "w", "h", "b")
                                if batch else ("d", "f", "a", "n", "p", "pa", "w", "h")))
    if kind == "b":
        inner = draw(st.lists(replication_message(batch=False) | raw_values,
                              min_size=1, max_size=4))
        pairs = [("k", pack("b")), ("m", pack_list([pack(blob) for blob in inner]))]
    else:
        pairs = [("k", pack(kind)), ("a", pack(draw(agent_ids))),
                 ("b", pack(draw(st.sampled_from(("counter", None, ""))))),
                 ("e", pack(draw(st.sampled_from((1 << 32, (1 << 32) + 1)) | ints))),
                 ("s", pack(draw(seqs))), ("f", draw(repl_fields)),
                 ("z", pack(draw(st.booleans())))]
    return draw(mutated_map(pairs, REPL_KEYS))


# --- target 2: peer frames (peer.decode) ---------------------------------------------

OPS = tuple(peer.ROWS)
PACK_DEPTH_MAX = 500  # nesting msgpack's packer takes (its limit is 511)
BIG_BODY = pack({"x": b"\0" * peer.BODY_BYTES_MAX})  # 1 MiB + a few bytes: too large
node_id_frames = (st.sampled_from((b"n1", "é".encode(), b"x" * 255, b"x" * 256, b"",
                                   b"\xff\xfe", b"\xc3\x28"))
                  | st.binary(max_size=6))
node_ids = st.sampled_from(("n1", "é€𝄞", "x" * 255)) | st.text(min_size=1, max_size=6).filter(
    lambda s: len(s.encode(errors="replace")) <= peer.NODE_ID_BYTES_MAX and s.isprintable())
status_tokens = st.text(alphabet="abc012", min_size=1, max_size=peer.STATUS_TOKEN_BYTES_MAX)
any_body = (gossip_body() | handoff_body() | replication_message() | soup(GOSSIP_KEYS)
            | raw_values | st.just(BIG_BODY))


@st.composite
def status_body(draw) -> bytes:
    pairs = [("token", pack(draw(status_tokens))), ("status", pack(draw(values)))]
    return draw(mutated_map(pairs, ("token", "status")))


BODY_OF_OP = {peer.OP_GOSSIP: gossip_body(), peer.OP_HANDOFF: handoff_body(),
              peer.OP_REPL: replication_message(), peer.OP_STATR: status_body()}


@st.composite
def valid_peer_message(draw) -> list[bytes]:
    """A message of any op as a node sends it: the encoders' frames, or a body from the
    generators above sealed with the module's own checksum."""
    op = draw(st.sampled_from(OPS))
    sender = draw(node_ids)
    if op == peer.OP_FWD:
        return peer.forward(sender, draw(node_ids), draw(st.integers(1, peer.HOPS_MAX)),
                            draw(st.sampled_from((b"", b"t" * 16))), draw(wire_frames))
    if op == peer.OP_RPL:
        return peer.reply(sender, b"t" * 16, draw(wire_frames))
    if op == peer.OP_STATQ:
        return peer.status_query(sender, draw(status_tokens))
    return peer.seal([peer.MAGIC, op, sender.encode(), draw(BODY_OF_OP[op])])


@st.composite
def mutated_peer_message(draw) -> tuple[list[bytes], str | None]:
    """A valid message with one frame replaced, changed, cut or grown, or a frame added
    or dropped; resealed (its checksum right) four times in five."""
    frames = draw(valid_peer_message())[:-1]
    how = draw(st.sampled_from(("keep", "replace", "body", "flip", "cut", "grow", "add",
                                "drop")))
    at = draw(st.integers(0, len(frames) - 1))
    if how == "replace":
        frames[at] = draw(node_id_frames | st.sampled_from(OPS) | st.binary(max_size=20))
    elif how == "body":
        frames[at] = draw(any_body)
    elif how == "flip" and frames[at]:
        frames[at] = mangle_byte(frames[at], draw(st.integers(0, len(frames[at]) - 1)),
                                 draw(st.integers(1, 255)))
    elif how == "cut":
        frames[at] = frames[at][:draw(st.integers(0, len(frames[at])))]
    elif how == "grow":
        frames[at] += draw(st.binary(min_size=1, max_size=4))
    elif how == "add":
        frames.insert(at, draw(st.binary(max_size=8)))
    elif how == "drop" and len(frames) > 1:
        frames.pop(at)
    if draw(st.integers(0, 4)):
        return peer.seal(frames), None
    return frames + [draw(st.binary(min_size=4, max_size=4))], None


def mangle_byte(frame: bytes, at: int, xor: int) -> bytes:
    return frame[:at] + bytes((frame[at] ^ xor,)) + frame[at + 1:]


@st.composite
def corrupted_peer_message(draw) -> tuple[list[bytes], str | None]:
    """A valid message with one bit flipped after the op, checksum not recomputed: the
    CRC catches every single-bit error, so this must be refused as bad_checksum."""
    frames = draw(valid_peer_message())
    at = draw(st.integers(2, len(frames) - 1))
    if not frames[at]:
        return frames, None  # an empty frame (a send's token) has no bit to flip
    bit = draw(st.integers(0, 8 * len(frames[at]) - 1))
    frames[at] = mangle_byte(frames[at], bit // 8, 1 << (bit % 8))
    return frames, "bad_checksum"


@st.composite
def sealed_random(draw) -> tuple[list[bytes], str | None]:
    """The magic, an op and random frames, with a right checksum."""
    op = draw(st.sampled_from(OPS) | st.binary(max_size=8))
    rest = draw(st.lists(node_id_frames | st.binary(max_size=24) | any_body, max_size=6))
    return peer.seal([peer.MAGIC, op, *rest]), None


random_frames = st.lists(st.sampled_from((peer.MAGIC, b"SYNP2", b"SYNP", b"SYN", *OPS))
                         | st.binary(max_size=24), max_size=9)
peer_inputs = st.one_of(random_frames.map(lambda frames: (frames, None)), sealed_random(),
                        mutated_peer_message(), corrupted_peer_message())


def check_node_id(node_id: Any) -> None:
    assert type(node_id) is str and 0 < len(node_id.encode()) <= peer.NODE_ID_BYTES_MAX


def check_body(body: Any) -> None:
    """A decoded body: a map whose maps have str keys, every one."""
    assert type(body) is dict
    assert all(type(key) is str for item, _ in walk(body) if isinstance(item, dict)
               for key in item)


def reencoded(event: Any) -> list[bytes]:
    """The frames the module's encoders make of ``event`` (a node relays some)."""
    kind = type(event)
    if kind is peer.Forwarded:
        return peer.forward(event.sender, event.origin, event.hops, event.token,
                            event.envelope)
    if kind is peer.Replied:
        return peer.reply(event.sender, event.token, event.envelope)
    if kind is peer.StatusQueried:
        return peer.status_query(event.sender, event.token)
    if kind is peer.StatusAnswered:
        return peer.status_answer(event.sender, event.message["token"],
                                  event.message["status"])
    encoder = {peer.Gossiped: peer.gossip, peer.HandedOff: peer.handoff,
               peer.Replicated: peer.replicate}[kind]
    return encoder(event.sender, event.message)


def comparable(event: Any) -> tuple:
    """The event's fields, bodies packed (a NaN inside is not equal to itself)."""
    return tuple(pack(value) if isinstance(value, dict) else value
                 for value in (getattr(event, name) for name in event.__slots__))


def check_event(event: Any, frames: list[bytes]) -> None:
    check_node_id(event.sender)
    kind = type(event)
    if kind is peer.Forwarded:
        check_node_id(event.origin)
        assert 1 <= event.hops <= peer.HOPS_MAX and len(event.token) in (0, 16)
    elif kind is peer.Replied:
        assert len(event.token) == peer.CALL_TOKEN_BYTES
    elif kind is peer.StatusQueried:
        assert 0 < len(event.token) <= peer.STATUS_TOKEN_BYTES_MAX and event.token.isascii()
    else:
        check_body(event.message)
    # Re-encoding may grow a body, and msgpack packs 511 levels at most (the decoder
    # takes 1,023): the round trip holds for the bodies a node could have sent.
    body = getattr(event, "message", None)
    if (len(frames[-2]) <= peer.BODY_BYTES_MAX // 2
            and max(depth for _, depth in walk(body)) < PACK_DEPTH_MAX):
        assert comparable(peer.decode(reencoded(event))) == comparable(event)


def check_peer(case: tuple[list[bytes], str | None]) -> None:
    """peer.decode: an event or a PeerProtocolError with a known reason."""
    frames, expected = case
    try:
        event = peer.decode(frames)
    except peer.PeerProtocolError as exc:
        assert exc.reason in peer.REASONS
        assert expected is None or exc.reason == expected, (exc.reason, expected)
    else:
        assert expected is None, f"decoded, expected {expected}"
        check_event(event, frames)


# --- target 3: the machines fed decoded bodies -------------------------------------

steps_dt = st.sampled_from((0.0, 0.05, 0.3, 0.6, 1.5, 5.0, 70.0))


def decoded(op: bytes, sender: str, body: bytes) -> dict | None:
    """The body as a node hands it to its machine, or None if the codec refuses it."""
    try:
        return peer.decode(peer.seal([peer.MAGIC, op, sender.encode(), body])).message
    except peer.PeerProtocolError:
        return None


def run_steps(steps: list, receive: Callable[[str, dict, float], list], op: bytes,
              error: type[Exception], check: Callable[[list, float], None]) -> float:
    """Feed each (sender, body, dt) step; checks after every one.  Returns the time."""
    now = 0.0
    for sender, body, dt in steps:
        now += dt
        message = decoded(op, sender, body) if len(sender.encode()) <= 255 else None
        if message is None:
            continue
        try:
            effects = receive(sender, message, now)
        except error:
            effects = []
        check(effects, now)
    return now


def check_sends(effects: list, channel: str, sender: str, allowed: tuple) -> None:
    """Every effect is of a kind the node handles; every Send still encodes and
    decodes as a peer frame (a fuzzed value kept and sent on would break the node)."""
    for effect in effects:
        assert isinstance(effect, allowed), effect
        if isinstance(effect, Send):
            assert effect.channel == channel
            peer.decode(peer.encode(channel, sender, effect.message))


def gossip_machine(seeded: bool) -> Membership:
    """Member n0 that knows n1..n3 (alive, each heard directly); with a seed it has
    not joined yet, so join pages count."""
    machine = Membership(member(ME), ("tcp://10.0.0.99:7400",) if seeded else (),
                         SwimConfig(), rng=random.Random(0), wall_offset_ns=WALL_NS)
    machine.start(0.0)
    for node_id in PEERS:
        machine.receive(node_id, {"v": 2, "kind": "sync", "u": [member(node_id).to_wire()]},
                        0.0)
    return machine


def check_membership(machine: Membership, effects: list, now: float) -> None:
    """The invariants a fuzzed message may not break."""
    check_sends(effects, GOSSIP, ME, (Send, MembersChanged, QuorumChanged, Refuted))
    members = machine.members
    assert members[ME] == machine.me and machine.me.state == ALIVE
    assert ME in machine.ring and machine.ring <= set(members)
    assert len(members) <= MEMBERS_MAX
    for node_id, known in members.items():
        assert known.node_id == node_id and known.state in STATES
        assert type(known.generation) is int and 0 <= known.generation < 2**64
    deadline = machine.next_deadline()
    assert deadline is not None and math.isfinite(deadline)
    if deadline <= now:  # the node's timer would fire now
        check_sends(machine.tick(now), GOSSIP, ME,
                    (Send, MembersChanged, QuorumChanged, Refuted))


def check_gossip(case: tuple[bool, list]) -> None:
    """Membership.receive: effects or MembershipError; afterwards a ping is still
    answered and a new member still joins."""
    seeded, steps = case
    machine = gossip_machine(seeded)
    now = run_steps(steps, machine.receive, peer.OP_GOSSIP, MembershipError,
                    lambda effects, at: check_membership(machine, effects, at))
    now += 0.01
    ping = {"v": 2, "kind": "ping", "seq": 12345, "u": []}
    answers = [e for e in machine.receive("n1", ping, now) if isinstance(e, Send)]
    assert any(e.to == "n1" and e.message["kind"] == "ack" and e.message["seq"] == 12345
               for e in answers)
    fresh = member(FRESH, WALL_NS + int(now * 1e9)).to_wire()
    machine.receive(FRESH, {"v": 2, "kind": "sync", "u": [fresh]}, now)
    assert machine.members[FRESH].state == ALIVE


gossip_inputs = st.tuples(st.booleans(), st.lists(
    st.tuples(member_ids, gossip_body(), steps_dt), min_size=1, max_size=6))


def check_handoff(steps: list) -> None:
    """Handoff.receive: effects or HandoffError; afterwards a want is still answered."""
    machine = Handoff("me", timeout_s=1.0, window_s=10.0)
    machine.send_state("a1", "n1", "kv", b"\x80", ("g",), 0.0)  # one state in flight
    allowed = (Send, Install, Surrender)
    now = run_steps(steps, machine.receive, peer.OP_HANDOFF, HandoffError,
                    lambda effects, at: check_sends(effects + machine.tick(at), HANDOFF,
                                                    "me", allowed))
    want = {"v": 1, "kind": "want", "agent": FRESH}
    assert machine.receive("n2", want, now) == [Surrender(FRESH, "n2")]


handoff_inputs = st.lists(st.tuples(member_ids, handoff_body(), steps_dt),
                          min_size=1, max_size=6)


def replication_machine() -> Replication:
    """Node "me" replicating with n1, n2; it owns agent a1 (so acks and needs count)."""
    clock = iter(range(1, 10**9)).__next__
    machine = Replication("me", replica_id("me/1"), clock, epoch_start=1 << 32)
    ring = HashRing(("me", "n1", "n2"))
    machine.members_changed(("n1", "n2"), 0.0)
    machine.ring_changed(HashRing(("me",)), ring, 0.0)
    machine.primary("a1", "counter", 0.0)
    return machine


def check_replication(steps: list) -> None:
    """Replication.receive: effects or ReplicationError; afterwards a gather's want is
    still answered."""
    machine = replication_machine()
    now = run_steps(steps, machine.receive, peer.OP_REPL, ReplicationError,
                    lambda effects, at: check_sends(
                        [e for e in effects + machine.tick(at) if isinstance(e, Send)],
                        REPLICATE, "me", (Send,)))
    answer = machine.receive("n1", {"k": "w", "a": FRESH}, now)
    assert answer == [Send("n1", REPLICATE, {"k": "h", "a": FRESH, "b": None,
                                             "f": None})]


replication_inputs = st.lists(st.tuples(st.sampled_from(("n1", "n2", "n9")),
                                        replication_message(), steps_dt),
                              min_size=1, max_size=6)


TARGETS = {target.name: target for target in (
    Target("wire", wire_inputs, check_wire),
    Target("peer", peer_inputs, check_peer),
    Target("gossip", gossip_inputs, check_gossip),
    Target("handoff", handoff_inputs, check_handoff),
    Target("replication", replication_inputs, check_replication),
)}
