"""Wire protocol v1: the envelope, its codec, validation and error codes.

Pure data and functions: no sockets, no clocks.  ``docs/PROTOCOL.md`` is the
normative description; this module is its reference implementation.

An envelope is one msgpack map with string keys.  Attribute names follow
CloudEvents (``id``, ``source``, ``type``, ``subject``, ``time``,
``datacontenttype``, ``data``) plus extensions: ``v`` (protocol version),
``mode`` (delivery), ``re`` (the id a reply answers), ``traceparent`` (W3C trace
context), ``vclock`` (causality), ``seq``/``ack`` (delivery), ``ttl`` (routing:
forwarding hops allowed).
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1

# Delivery modes of a request.
MODE_CALL = "call"        # the sender wants a reply (data or error)
MODE_SEND = "send"        # one-way: no reply, errors are counted at the node
MODE_PUBLISH = "publish"  # one-way to every member of the group named by subject
MODES = frozenset((MODE_CALL, MODE_SEND, MODE_PUBLISH))

# Types reserved for the runtime.  Agent message types may not start with "syn.".
SYSTEM_PREFIX = "syn."
TYPE_REPLY = "syn.reply"
TYPE_ERROR = "syn.error"
TYPE_SPAWN = "syn.spawn"    # subject: agent id, data: {"behavior": str, "init": any}
TYPE_STOP = "syn.stop"      # subject: agent id
TYPE_STATUS = "syn.status"  # no subject: cluster status as seen from the entry node
TYPE_JOIN = "syn.join"      # subject: agent id, data: {"group": str}
TYPE_LEAVE = "syn.leave"    # subject: agent id, data: {"group": str}
TYPE_PING = "syn.ping"      # no subject: replies {"node": id}; a cheap liveness check
SYSTEM_TYPES = frozenset((TYPE_SPAWN, TYPE_STOP, TYPE_STATUS, TYPE_JOIN, TYPE_LEAVE, TYPE_PING))
# System requests addressed to the node itself rather than routed to an agent's owner.
NODE_TYPES = frozenset((TYPE_STATUS, TYPE_PING))

ID_LEN_MAX = 128
TYPE_LEN_MAX = 128
SUBJECT_LEN_MAX = 512
TTL_MAX = 8


class ErrorCode:
    """Stable error codes.  Never renumbered or renamed; new ones may be added."""

    BAD_REQUEST = "bad_request"      # not msgpack, not a map, a field missing or of the wrong type
    TOO_LARGE = "too_large"          # frame longer than the node's max_message_bytes
    UNKNOWN_AGENT = "unknown_agent"  # no such agent and its id names no known behavior
    UNKNOWN_TYPE = "unknown_type"    # the agent has no handler for this message type
    OVERLOADED = "overloaded"        # a bounded queue (mailbox, peer link) is full: retry later
    TIMEOUT = "timeout"              # the handler did not finish within its time limit
    UNAVAILABLE = "unavailable"      # node shutting down, agent failed, owner unreachable
    INTERNAL = "internal"            # the handler raised, or a bug in the node

    ALL = frozenset((BAD_REQUEST, TOO_LARGE, UNKNOWN_AGENT, UNKNOWN_TYPE, OVERLOADED,
                     TIMEOUT, UNAVAILABLE, INTERNAL))


class WireError(Exception):
    """A request that cannot be served, with its stable code.

    ``request_id`` is the id of the offending request when it could be read, so
    the error reply can still be correlated by the client.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class Request:
    """A validated request envelope.  ``raw`` is the map as decoded, kept so a
    node can forward the original bytes and a handler can read extensions.

    Treat it as read-only.  A plain slotted class rather than a frozen
    dataclass: one is built per message, and frozen ``__init__`` is ~3x slower.
    """

    __slots__ = ("id", "type", "subject", "mode", "data", "ttl", "raw")

    def __init__(self, id: str, type: str, subject: str | None, mode: str, data: Any,
                 ttl: int | None, raw: dict):
        self.id = id
        self.type = type
        self.subject = subject
        self.mode = mode
        self.data = data
        self.ttl = ttl
        self.raw = raw

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, type={self.type!r}, subject={self.subject!r}, mode={self.mode!r})"


_packer = msgpack.Packer(use_bin_type=True)


def encode(envelope: dict) -> bytes:
    """Envelope map -> bytes.  Raises TypeError for values msgpack cannot carry."""
    return _packer.pack(envelope)


def decode_map(frame: bytes, max_bytes: int) -> dict:
    """Bytes -> envelope map, or WireError(bad_request / too_large).

    The size check comes after decoding (when the frame decodes) so that even a
    too-large request gets an error reply its sender can correlate.
    """
    try:
        envelope = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        if len(frame) > max_bytes:
            raise WireError(ErrorCode.TOO_LARGE,
                            f"message of {len(frame)} bytes exceeds {max_bytes}") from None
        raise WireError(ErrorCode.BAD_REQUEST, f"not a msgpack document: {exc}") from None
    if not isinstance(envelope, dict):
        raise WireError(ErrorCode.BAD_REQUEST,
                        f"envelope must be a map, got {type(envelope).__name__}")
    if len(frame) > max_bytes:
        raise WireError(ErrorCode.TOO_LARGE,
                        f"message of {len(frame)} bytes exceeds {max_bytes}",
                        _readable_id(envelope))
    return envelope


def parse_request(frame: bytes, max_bytes: int) -> Request:
    """Bytes -> validated Request, or WireError with the stable code."""
    return validate_request(decode_map(frame, max_bytes))


def _readable_id(envelope: dict) -> str | None:
    rid = envelope.get("id")
    if isinstance(rid, str) and 0 < len(rid) <= ID_LEN_MAX:
        return rid
    return None


def _bad(message: str, request_id: str | None) -> WireError:
    return WireError(ErrorCode.BAD_REQUEST, message, request_id)


def validate_request(env: dict) -> Request:
    """Check a decoded request map; the hot path, so plain checks in a row."""
    rid = env.get("id")
    if type(rid) is not str or not 0 < len(rid) <= ID_LEN_MAX:
        raise _bad(f"'id' must be a string of 1..{ID_LEN_MAX} characters", None)
    version = env.get("v")
    if type(version) is not int or version != VERSION:  # True == 1 and 1.0 == 1 in Python
        raise _bad(f"unsupported protocol version {version!r}; this node speaks {VERSION}", rid)
    mtype = env.get("type")
    if type(mtype) is not str or not 0 < len(mtype) <= TYPE_LEN_MAX:
        raise _bad(f"'type' must be a string of 1..{TYPE_LEN_MAX} characters", rid)
    mode = env.get("mode")
    if mode is None:  # absent or nil: many serializers write nil for unset fields
        mode = MODE_CALL
    elif type(mode) is not str or mode not in MODES:
        raise _bad(f"'mode' must be one of {sorted(MODES)}", rid)
    subject = env.get("subject")
    if subject is None:
        if mtype not in NODE_TYPES:
            raise _bad("'subject' (the agent id or group) is required", rid)
    elif type(subject) is not str or not 0 < len(subject) <= SUBJECT_LEN_MAX:
        raise _bad(f"'subject' must be a string of 1..{SUBJECT_LEN_MAX} characters", rid)
    ttl = env.get("ttl")
    if ttl is not None and (type(ttl) is not int or not 0 <= ttl <= TTL_MAX):
        raise _bad(f"'ttl' must be an integer 0..{TTL_MAX}", rid)
    if mtype.startswith(SYSTEM_PREFIX):
        _validate_system(mtype, mode, env, rid)
    return Request(rid, mtype, subject, mode, env.get("data"), ttl, env)


def _validate_system(mtype: str, mode: str, env: dict, rid: str) -> None:
    if mtype not in SYSTEM_TYPES:
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown system type {mtype!r}", rid)
    if mode == MODE_PUBLISH:
        raise _bad(f"{mtype} cannot be published", rid)
    data = env.get("data")
    if mtype == TYPE_SPAWN:
        if not isinstance(data, dict) or type(data.get("behavior")) is not str:
            raise _bad("syn.spawn needs data {'behavior': str, 'init': any}", rid)
    elif mtype in (TYPE_JOIN, TYPE_LEAVE):
        group = data.get("group") if isinstance(data, dict) else None
        if type(group) is not str or not 0 < len(group) <= SUBJECT_LEN_MAX:
            raise _bad(f"{mtype} needs data {{'group': str}}", rid)


def request(rid: str, mtype: str, subject: str | None = None, data: Any = None,
            mode: str = MODE_CALL, **extensions: Any) -> dict:
    """Build a request map (the client side)."""
    env = {"v": VERSION, "id": rid, "type": mtype, "mode": mode}
    if subject is not None:
        env["subject"] = subject
    if data is not None:
        env["data"] = data
    for key, value in extensions.items():
        if value is not None:
            env[key] = value
    return env


def reply(request_id: str, data: Any, source: str, traceparent: str | None = None) -> bytes:
    """Encode a reply to ``request_id`` carrying the handler's result."""
    env = {"v": VERSION, "id": request_id, "re": request_id, "type": TYPE_REPLY,
           "source": source, "data": data}
    if traceparent is not None:
        env["traceparent"] = traceparent
    return _packer.pack(env)


def error(request_id: str | None, code: str, message: str, source: str,
          traceparent: str | None = None) -> bytes:
    """Encode an error reply.  ``request_id`` is None when the request was unreadable."""
    env = {"v": VERSION, "id": request_id or "", "re": request_id, "type": TYPE_ERROR,
           "source": source, "data": {"code": code, "message": message}}
    if traceparent is not None:
        env["traceparent"] = traceparent
    return _packer.pack(env)


def trace_id(traceparent: Any) -> str | None:
    """The trace id of a W3C ``traceparent`` value (for logs), or None."""
    if type(traceparent) is str and len(traceparent) >= 35 and traceparent[2] == "-":
        return traceparent[3:35]
    return None


def is_system_type(mtype: str) -> bool:
    return mtype.startswith(SYSTEM_PREFIX)
