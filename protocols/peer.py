"""Peer frames: the node-to-node wire format as a pure codec (docs/PROTOCOL.md, section 9).

A peer message is a list of ZeroMQ frames.  Every one starts with ``MAGIC`` (which
is also the peer protocol's version, see section 10), then the operation, then the
sender's node id, and ends with ``crc``, a checksum of all the frames before it::

    FWD    [MAGIC, b"FWD",    sender, origin, hops, token, envelope, crc]
    RPL    [MAGIC, b"RPL",    sender, token, envelope, crc]
    GOSSIP [MAGIC, b"GOSSIP", sender, body, crc]     body: msgpack map (membership message)
    HANDOFF [MAGIC, b"HANDOFF", sender, body, crc]   body: msgpack map (handoff message)
    REPL   [MAGIC, b"REPL",   sender, body, crc]     body: msgpack map (replication message)
    STATQ  [MAGIC, b"STATQ",  sender, token, crc]    token: ASCII, 1..32 bytes
    STATR  [MAGIC, b"STATR",  sender, body, crc]     body: msgpack {"token": str, "status": map}

``crc`` (version 3) is there because fault injection showed that a message with a
few bytes flipped on the way mostly still decodes, and gets applied with changed
content: a changed gossip entry, a reply to another token.  It is the CRC-32
(``zlib.crc32``) of the frames' lengths, each 8 bytes big-endian, followed by the
frames themselves, as 4 bytes big-endian (``checksum``); the lengths make bytes
moved from one frame to the next a different message.  ``decode`` checks it right
after the op and the frame count, before it reads anything else, so a corrupted
message is refused (``bad_checksum``) and never applied.  It guards against
corruption, not forgery: anyone can compute it.

``decode(frames)`` turns a frame list (the ROUTER's identity frame already removed)
into one event (a frozen dataclass) or raises ``PeerProtocolError`` whose
``reason`` is a short stable string for a metric label.  The decode side is one
module-level table, op -> (frame count, decoder), h11 style: a frame list that
matches no row is a protocol error, never a guess.  The encoders (``forward``,
``reply``, ``gossip``, ``handoff``, ``status_query``, ``status_answer`` and ``encode`` for
``Send`` effects) build frame lists, checksum included, that ``decode`` accepts;
handed values the protocol cannot carry they raise ``ValueError`` (a local error: a
bug in the caller, not input from a peer).  ``seal`` appends the checksum to frames
built by hand (tests, tools).

Envelopes (the client's request and reply bytes inside FWD and RPL) are carried
untouched: this module never decodes, copies or re-encodes them.  Bodies are
checked for size before they are decoded and decoded with bounded containers.

Node ids repeat on every frame, so their encoding and decoding (with the
validation) is cached in two bounded dicts: FWD and RPL are on the hot path.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, fields, make_dataclass
from typing import Any, Callable, Sequence

import msgpack

from .effects import GOSSIP, HANDOFF, REPLICATE, STATUS_ANSWER, STATUS_QUERY

MAGIC = b"SYNP3"          # peer protocol version 3; any change of frame shapes takes a new one
MAGIC_FAMILY = b"SYNP"    # every version's magic starts with this (older: b"SYNP1", b"SYNP2")
OP_FWD = b"FWD"
OP_RPL = b"RPL"
OP_GOSSIP = b"GOSSIP"
OP_HANDOFF = b"HANDOFF"
OP_REPL = b"REPL"
OP_STATQ = b"STATQ"
OP_STATR = b"STATR"

NODE_ID_BYTES_MAX = 255
HOPS_MAX = 16
CALL_TOKEN_BYTES = 16           # FWD/RPL correlation token (opaque to the receiver)
STATUS_TOKEN_BYTES_MAX = 32
BODY_BYTES_MAX = 1 << 20        # GOSSIP and STATR bodies: 1 MiB
HANDOFF_BODY_BYTES_MAX = 32 << 20  # HANDOFF bodies carry agent state (a kv agent: 16 MiB)
CONTAINER_LEN_MAX = 65_536      # elements of any one array or map in a body
ID_CACHE_MAX = 4096             # node ids kept encoded / decoded (each cache)
CHECKSUM_BYTES = 4              # the last frame of every message: CRC-32, big-endian

# Every PeerProtocolError.reason, so a metric can register its label values up front.
REASONS = frozenset(("bad_magic", "bad_version", "unknown_op", "bad_shape", "bad_checksum",
                     "bad_sender", "bad_origin", "bad_hops", "bad_token", "too_large",
                     "bad_body"))


class PeerProtocolError(Exception):
    """A peer frame list that breaks the protocol (a remote error).

    ``reason`` is short and stable, fit for a metric label: ``bad_magic``,
    ``bad_version``, ``unknown_op``, ``bad_shape``, ``bad_checksum``, ``bad_sender``,
    ``bad_origin``, ``bad_hops``, ``bad_token``, ``too_large``, ``bad_body``.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A request forwarded by ``sender``; ``origin`` (the entry node) gets the reply.

    ``token`` is 16 bytes for a call (echo it in the reply) and empty for a one-way
    send (never answered).  ``hops`` counts hops taken, this one included.
    """

    sender: str
    origin: str
    hops: int
    token: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to the forwarded call whose token is ``token``."""

    sender: str
    token: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Gossiped:
    """A membership message (a map; ``protocols/membership.py`` validates it)."""

    sender: str
    message: dict


@dataclass(frozen=True, slots=True)
class HandedOff:
    """A handoff message (a map; ``protocols/handoff.py`` validates it)."""

    sender: str
    message: dict


@dataclass(frozen=True, slots=True)
class Replicated:
    """A replication message (a map; ``protocols/replication.py`` validates it)."""

    sender: str
    message: dict


@dataclass(frozen=True, slots=True)
class StatusQueried:
    """``sender`` asks for this node's status; answer with the same ``token``."""

    sender: str
    token: str


@dataclass(frozen=True, slots=True)
class StatusAnswered:
    """A member's status answer: ``message`` is ``{"token": str, "status": map}``."""

    sender: str
    message: dict


def _fast_constructor(cls: type) -> Callable:
    """A constructor of the frozen slotted dataclass ``cls`` for the hot path.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
    (to get past its own ``__setattr__``, which refuses): about 410 ns for five
    fields, against 95 ns for the same dataclass unfrozen.  So the hot-path
    decoders build an unfrozen twin with the same slots and then give it the
    frozen class (CPython allows ``__class__`` assignment between classes of the
    same slot layout): about 160 ns, and the result is an ordinary ``cls``
    instance (equal, hashed and frozen as one built by ``cls(...)``; a test pins it).
    """
    twin = make_dataclass(f"_Unfrozen{cls.__name__}",
                          [(f.name, f.type) for f in fields(cls)], slots=True)

    def build(*values: Any) -> Any:
        event = twin(*values)
        event.__class__ = cls
        return event

    build.__name__ = f"fast_{cls.__name__}"
    return build


_forwarded = _fast_constructor(Forwarded)
_replied = _fast_constructor(Replied)


# --- node ids (cached both ways) --------------------------------------------------------

_id_bytes: dict[str, bytes] = {}  # node id -> its validated UTF-8 bytes
_id_text: dict[bytes, str] = {}   # validated UTF-8 bytes -> node id


def _encode_id(node_id: str, what: str) -> bytes:
    """A node id's frame, validated: 1..255 bytes of UTF-8 (the uncached path)."""
    if type(node_id) is not str:
        raise ValueError(f"{what} must be a str, got {type(node_id).__name__}")
    data = node_id.encode()  # UnicodeEncodeError (a ValueError) for lone surrogates
    if not 0 < len(data) <= NODE_ID_BYTES_MAX:
        raise ValueError(f"{what} must be 1..{NODE_ID_BYTES_MAX} bytes of UTF-8, "
                         f"got {len(data)}")
    if len(_id_bytes) >= ID_CACHE_MAX:
        _id_bytes.clear()  # bounded; a cluster has far fewer ids than this
    _id_bytes[node_id] = data
    return data


def _decode_id(frame: bytes, reason: str) -> str:
    """A node id from its frame, or PeerProtocolError(reason) (the uncached path)."""
    if not 0 < len(frame) <= NODE_ID_BYTES_MAX:
        raise PeerProtocolError(reason, f"node id of {len(frame)} bytes, "
                                        f"not 1..{NODE_ID_BYTES_MAX}")
    try:
        text = frame.decode()
    except (UnicodeDecodeError, AttributeError):
        raise PeerProtocolError(reason, "node id is not UTF-8") from None
    if len(_id_text) >= ID_CACHE_MAX:
        _id_text.clear()  # bounded: a peer sending invented ids only churns it
    _id_text[frame] = text
    return text


# --- the checksum ------------------------------------------------------------------------

_crc32 = zlib.crc32
_pack_crc = struct.Struct(">I").pack  # CHECKSUM_BYTES
_join = b"".join


def _lengths_packer(count: int) -> Callable[..., bytes]:
    """Packs ``count`` frame lengths, 8 bytes each (no frame can overflow it)."""
    if count < 1:
        raise ValueError("a message has at least one frame")
    return struct.Struct(f">{count}Q").pack


# For the frame counts of the ops (the trailer not counted): no Struct built per call.
_PACK_LENGTHS = {n: _lengths_packer(n) for n in range(1, 8)}


def checksum(frames: Sequence[bytes]) -> bytes:
    """The trailer frame of ``frames`` (all of a message's frames but the trailer):
    CRC-32 of the frames' lengths (8 bytes each, big-endian) then the frames, 4 bytes
    big-endian.

    The last frame is the only large one (an envelope or a body), so it is fed to
    the CRC on its own, never copied; the others are short and go in joined: three
    CRC calls whatever the op (a call per frame costs more than the CRC of a 1 KiB
    envelope).
    """
    n = len(frames)
    pack_lengths = _PACK_LENGTHS.get(n) or _lengths_packer(n)
    crc = _crc32(pack_lengths(*map(len, frames)))
    return _pack_crc(_crc32(frames[n - 1], _crc32(_join(frames[:n - 1]), crc)))


def seal(frames: Sequence[bytes]) -> list[bytes]:
    """``frames`` with their checksum appended: a message ``decode`` checks whole.

    For tests and tools that build a message by hand (the encoders seal theirs).
    """
    return [*frames, checksum(frames)]


def _sealed(frames: list[bytes]) -> list[bytes]:
    frames.append(checksum(frames))
    return frames


# --- bodies -----------------------------------------------------------------------------

def _pack_body(body: dict, what: str, limit: int = BODY_BYTES_MAX) -> bytes:
    try:
        data = msgpack.packb(body)  # a Packer per call: safe from any thread
    except (TypeError, ValueError, OverflowError) as exc:  # a value msgpack cannot carry
        raise ValueError(f"{what} body cannot be packed: {exc}") from None
    if len(data) > limit:
        raise ValueError(f"{what} body of {len(data)} bytes exceeds {limit}")
    return data


def _str_keys(pairs: dict) -> dict:
    """object_hook: every map in a body has str keys only (msgpack's strict_map_key
    also lets bytes through)."""
    for key in pairs:
        if type(key) is not str:
            raise ValueError(f"map key of type {type(key).__name__}")
    return pairs


def _unpack_body(frame: bytes, limit: int = BODY_BYTES_MAX) -> dict:
    """A body map, size-checked (against ``limit``) before decoding, containers bounded.

    (``unpackb`` takes no ``max_buffer_size``: the size check before it bounds the
    buffer, and each ``max_*_len`` bounds what one header may claim.)
    """
    size = len(frame)
    if size > limit:
        raise PeerProtocolError("too_large", f"body of {size} bytes exceeds {limit}")
    bound = min(size, CONTAINER_LEN_MAX)
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, object_hook=_str_keys,
                               max_str_len=size,
                               max_bin_len=size, max_array_len=bound, max_map_len=bound,
                               max_ext_len=size)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise PeerProtocolError("bad_body", f"not a msgpack document: "
                                            f"{str(exc) or type(exc).__name__}"[:200]) from None
    if type(body) is not dict:
        raise PeerProtocolError("bad_body", f"body must be a map, got {type(body).__name__}")
    return body


def _is_status_token(token: Any) -> bool:
    return (type(token) is str and 0 < len(token) <= STATUS_TOKEN_BYTES_MAX
            and token.isascii())


# --- encoders ---------------------------------------------------------------------------

_HOPS_FRAME = {n: bytes((n,)) for n in range(1, HOPS_MAX + 1)}
_FWD_TOKEN_LENS = (0, CALL_TOKEN_BYTES)


def forward(sender: str, origin: str, hops: int, token: bytes, envelope: bytes) -> list[bytes]:
    """FWD: ``envelope`` forwarded; ``token`` is 16 bytes for a call, b"" for a send."""
    hops_frame = _HOPS_FRAME.get(hops)
    if hops_frame is None or type(hops) is not int:
        raise ValueError(f"hops must be an int in 1..{HOPS_MAX}, got {hops!r}")
    if type(token) is not bytes or len(token) not in _FWD_TOKEN_LENS:
        raise ValueError(f"a forward token is {CALL_TOKEN_BYTES} bytes (call) or empty (send)")
    return _sealed([MAGIC, OP_FWD, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    _id_bytes.get(origin) or _encode_id(origin, "origin"), hops_frame, token,
                    envelope])


def reply(sender: str, token: bytes, envelope: bytes) -> list[bytes]:
    """RPL: the reply ``envelope`` to the forwarded call ``token``."""
    if type(token) is not bytes or len(token) != CALL_TOKEN_BYTES:
        raise ValueError(f"a reply token is {CALL_TOKEN_BYTES} bytes")
    return _sealed([MAGIC, OP_RPL, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    token, envelope])


def gossip(sender: str, message: dict) -> list[bytes]:
    """GOSSIP: a membership message (a map)."""
    if not isinstance(message, dict):
        raise ValueError("a gossip message is a map")
    return _sealed([MAGIC, OP_GOSSIP, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    _pack_body(message, "gossip")])


def handoff(sender: str, message: dict) -> list[bytes]:
    """HANDOFF: a handoff message (a map; its body may reach HANDOFF_BODY_BYTES_MAX)."""
    if not isinstance(message, dict):
        raise ValueError("a handoff message is a map")
    return _sealed([MAGIC, OP_HANDOFF, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    _pack_body(message, "handoff", HANDOFF_BODY_BYTES_MAX)])


def replicate(sender: str, message: dict) -> list[bytes]:
    """REPL: a replication message (a map; agent state, so up to HANDOFF_BODY_BYTES_MAX)."""
    if not isinstance(message, dict):
        raise ValueError("a replication message is a map")
    return _sealed([MAGIC, OP_REPL, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    _pack_body(message, "replicate", HANDOFF_BODY_BYTES_MAX)])


def status_query(sender: str, token: str) -> list[bytes]:
    """STATQ: ask a member for its status; it answers with the same ``token``."""
    if not _is_status_token(token):
        raise ValueError(f"a status token is 1..{STATUS_TOKEN_BYTES_MAX} ASCII characters")
    return _sealed([MAGIC, OP_STATQ, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    token.encode("ascii")])


def status_answer(sender: str, token: str, status: dict) -> list[bytes]:
    """STATR: this node's ``status`` map, answering the query ``token``."""
    if not _is_status_token(token):
        raise ValueError(f"a status token is 1..{STATUS_TOKEN_BYTES_MAX} ASCII characters")
    if not isinstance(status, dict):
        raise ValueError("a status is a map")
    return _sealed([MAGIC, OP_STATR, _id_bytes.get(sender) or _encode_id(sender, "sender"),
                    _pack_body({"token": token, "status": status}, "status answer")])


def _encode_status_answer(sender: str, message: Any) -> list[bytes]:
    if not isinstance(message, dict):
        raise ValueError("a status_answer message is {'token': str, 'status': map}")
    return status_answer(sender, message.get("token"), message.get("status"))


# Send effect channel (protocols/effects.py) -> encoder of (sender, message).
_CHANNELS: dict[str, Callable[[str, Any], list[bytes]]] = {
    GOSSIP: gossip,
    HANDOFF: handoff,
    REPLICATE: replicate,
    STATUS_QUERY: status_query,
    STATUS_ANSWER: _encode_status_answer,
}


def encode(channel: str, sender: str, message: Any) -> list[bytes]:
    """The frames of a ``Send(to, channel, message)`` effect sent by ``sender``."""
    encoder = _CHANNELS.get(channel)
    if encoder is None:
        raise ValueError(f"no peer frame for channel {channel!r}")
    return encoder(sender, message)


# --- decoders ---------------------------------------------------------------------------

_HOPS_VALUE = {frame: n for n, frame in _HOPS_FRAME.items()}


def _decode_fwd(frames: list[bytes]) -> Forwarded:
    _, _, sender, origin, hops, token, envelope, _ = frames
    hops_value = _HOPS_VALUE.get(hops)
    if hops_value is None:
        raise PeerProtocolError("bad_hops", f"hops must be one byte in 1..{HOPS_MAX}")
    if len(token) not in _FWD_TOKEN_LENS:
        raise PeerProtocolError("bad_token", f"a forward token is {CALL_TOKEN_BYTES} bytes "
                                             f"or empty, got {len(token)}")
    return _forwarded(_id_text.get(sender) or _decode_id(sender, "bad_sender"),
                     _id_text.get(origin) or _decode_id(origin, "bad_origin"),
                     hops_value, token, envelope)


def _decode_rpl(frames: list[bytes]) -> Replied:
    _, _, sender, token, envelope, _ = frames
    if len(token) != CALL_TOKEN_BYTES:
        raise PeerProtocolError("bad_token", f"a reply token is {CALL_TOKEN_BYTES} bytes, "
                                             f"got {len(token)}")
    return _replied(_id_text.get(sender) or _decode_id(sender, "bad_sender"), token, envelope)


def _decode_gossip(frames: list[bytes]) -> Gossiped:
    sender = _id_text.get(frames[2]) or _decode_id(frames[2], "bad_sender")
    return Gossiped(sender, _unpack_body(frames[3]))


def _decode_handoff(frames: list[bytes]) -> HandedOff:
    sender = _id_text.get(frames[2]) or _decode_id(frames[2], "bad_sender")
    return HandedOff(sender, _unpack_body(frames[3], HANDOFF_BODY_BYTES_MAX))


def _decode_repl(frames: list[bytes]) -> Replicated:
    sender = _id_text.get(frames[2]) or _decode_id(frames[2], "bad_sender")
    return Replicated(sender, _unpack_body(frames[3], HANDOFF_BODY_BYTES_MAX))


def _decode_statq(frames: list[bytes]) -> StatusQueried:
    sender = _id_text.get(frames[2]) or _decode_id(frames[2], "bad_sender")
    token = frames[3]
    if not 0 < len(token) <= STATUS_TOKEN_BYTES_MAX or not token.isascii():
        raise PeerProtocolError("bad_token", f"a status token is 1..{STATUS_TOKEN_BYTES_MAX} "
                                             f"ASCII bytes")
    return StatusQueried(sender, token.decode("ascii"))


def _decode_statr(frames: list[bytes]) -> StatusAnswered:
    sender = _id_text.get(frames[2]) or _decode_id(frames[2], "bad_sender")
    body = _unpack_body(frames[3])
    if not _is_status_token(body.get("token")):
        raise PeerProtocolError("bad_token", f"a status answer's 'token' is 1.."
                                             f"{STATUS_TOKEN_BYTES_MAX} ASCII characters")
    if type(body.get("status")) is not dict:
        raise PeerProtocolError("bad_body", "a status answer's 'status' is a map")
    # Only the two keys the protocol names: other keys (a later version's) are dropped,
    # so what a node passes on is what it would send itself.
    return StatusAnswered(sender, {"token": body["token"], "status": body["status"]})


# op -> (number of frames, checksum included; decoder).  A frame list matching no row
# is a protocol error.  A decoder sees only frames whose checksum matched.
ROWS: dict[bytes, tuple[int, Callable[[list[bytes]], Any]]] = {
    OP_FWD: (8, _decode_fwd),
    OP_RPL: (6, _decode_rpl),
    OP_GOSSIP: (5, _decode_gossip),
    OP_HANDOFF: (5, _decode_handoff),
    OP_REPL: (5, _decode_repl),
    OP_STATQ: (5, _decode_statq),
    OP_STATR: (5, _decode_statr),
}


def is_peer(frames: list[bytes]) -> bool:
    """True if ``frames`` are peer traffic: they start with a peer magic, this
    version's or another's (so frames of another version reach ``decode`` and are
    counted as ``bad_version``, not answered as a client's bad request).  No client
    envelope starts with ``SYNP``: a msgpack map's first byte is 0x80..0x8f or 0xde/0xdf.
    """
    if len(frames) < 2:
        return False
    first = frames[0]
    return first == MAGIC or first[:4] == MAGIC_FAMILY


def decode(frames: list[bytes]) -> (Forwarded | Replied | Gossiped | HandedOff | StatusQueried
                                   | StatusAnswered):
    """The event a peer frame list carries, or PeerProtocolError with a stable reason."""
    if not frames or frames[0] != MAGIC:
        raise _magic_error(frames)
    if len(frames) < 3:
        raise PeerProtocolError("bad_shape", f"{len(frames)} frames: no op or no sender")
    row = ROWS.get(frames[1])
    if row is None:
        raise PeerProtocolError("unknown_op", f"op {bytes(frames[1][:16])!r}")
    count, decoder = row
    if len(frames) != count:
        raise PeerProtocolError("bad_shape", f"{frames[1].decode()} takes {count} frames, "
                                             f"got {len(frames)}")
    if checksum(frames[:-1]) != frames[-1]:
        raise PeerProtocolError("bad_checksum", "the frames do not match their checksum "
                                                "(corrupted on the way)")
    return decoder(frames)


def _magic_error(frames: list[bytes]) -> PeerProtocolError:
    first = frames[0] if frames else b""
    if first[:4] == MAGIC_FAMILY:
        return PeerProtocolError("bad_version", f"peer protocol {bytes(first[:16])!r}, "
                                               f"this node speaks {MAGIC!r}")
    return PeerProtocolError("bad_magic", f"first frame is not {MAGIC!r}")
