"""Wire protocol v1: the envelope, its codec, validation and error codes.

Pure data and functions: no sockets, no clocks.  ``docs/PROTOCOL.md`` is the
normative description; this module is its reference implementation.

An envelope is one msgpack map with string keys.  Attribute names follow
CloudEvents (``id``, ``source``, ``type``, ``subject``, ``time``,
``datacontenttype``, ``data``) plus extensions: ``v`` (protocol version),
``mode`` (delivery), ``re`` (the id a reply answers), ``traceparent`` (W3C trace
context), ``vclock`` (causality, carried only), ``seq``/``ack`` (reserved),
``ttl`` (routing: forwarding hops allowed), and the per-message guarantees
``consistency`` (how many replicas hold a write before it is acknowledged) and
``delivery`` (at most / at least / exactly once, or causal with ``session`` and
``vc``: the sender's process id and its vector clock), and ``routing`` (the
strategy: direct, multicast, gossip, pipeline with ``stages``, scatter with
``targets``; PROTOCOL.md 2.5).
"""

from __future__ import annotations

import reprlib
from typing import Any

import msgpack

VERSION = 1

# Delivery modes of a request.
MODE_CALL = "call"        # the sender wants a reply (data or error)
MODE_SEND = "send"        # one-way: no reply, errors are counted at the node
MODE_PUBLISH = "publish"  # one-way to every member of the group named by subject
MODES = frozenset((MODE_CALL, MODE_SEND, MODE_PUBLISH))

# Write consistency of a request (absent or nil: the node's configured default).
CONSISTENCY_LOCAL = "local"    # acknowledged once the owner applied it
CONSISTENCY_QUORUM = "quorum"  # ... once a majority of the agent's replicas hold it
CONSISTENCY_ALL = "all"        # ... once every replica holds it
CONSISTENCIES = frozenset((CONSISTENCY_LOCAL, CONSISTENCY_QUORUM, CONSISTENCY_ALL))

# Delivery guarantee of a request (absent or nil: at_most_once).  PROTOCOL.md 2.4.
DELIVERY_AT_MOST_ONCE = "at_most_once"    # sent once; never resent
DELIVERY_AT_LEAST_ONCE = "at_least_once"  # resent with the same id until answered
DELIVERY_EXACTLY_ONCE = "exactly_once"    # resent, and the owner runs it once per id
DELIVERY_CAUSAL = "causal"                # held until what it depends on was delivered
DELIVERIES = frozenset((DELIVERY_AT_MOST_ONCE, DELIVERY_AT_LEAST_ONCE,
                        DELIVERY_EXACTLY_ONCE, DELIVERY_CAUSAL))

# Routing strategy of a request (absent or nil: direct, or multicast for a publish).
ROUTING_DIRECT = "direct"        # one agent, through its owner
ROUTING_MULTICAST = "multicast"  # publish: PUB/SUB to the group's members, best effort
ROUTING_GOSSIP = "gossip"        # publish: epidemic broadcast, repaired, at most once per agent
ROUTING_PIPELINE = "pipeline"    # call: a chain of stages, each reply the next one's data
ROUTING_SCATTER = "scatter"      # call: one message to many agents, replies gathered
ROUTINGS = frozenset((ROUTING_DIRECT, ROUTING_MULTICAST, ROUTING_GOSSIP, ROUTING_PIPELINE,
                      ROUTING_SCATTER))
ROUTINGS_BY_MODE = {MODE_CALL: frozenset((ROUTING_DIRECT, ROUTING_PIPELINE, ROUTING_SCATTER)),
                    MODE_SEND: frozenset((ROUTING_DIRECT,)),
                    MODE_PUBLISH: frozenset((ROUTING_MULTICAST, ROUTING_GOSSIP))}
STAGES_MAX = 16            # stages of one pipeline, the first one included
TARGETS_MAX = 1000         # agents of one scatter
TIMEOUT_MS_MAX = 600_000   # a pipeline's or scatter's own deadline, at most 10 minutes

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
TYPE_MEMBERS = "syn.members"  # no subject: the entry node's member view (PROTOCOL.md)
SYSTEM_TYPES = frozenset((TYPE_SPAWN, TYPE_STOP, TYPE_STATUS, TYPE_JOIN, TYPE_LEAVE, TYPE_PING,
                          TYPE_MEMBERS))
# System requests addressed to the node itself rather than routed to an agent's owner.
NODE_TYPES = frozenset((TYPE_STATUS, TYPE_PING, TYPE_MEMBERS))

ID_LEN_MAX = 128
TYPE_LEN_MAX = 128
SUBJECT_LEN_MAX = 512
TTL_MAX = 8
SESSION_LEN_MAX = 128       # a causal sender's process id (the ``vc`` keys too)
VC_ENTRIES_MAX = 256        # entries in a ``vc`` map
VC_COUNT_MAX = (1 << 63) - 1  # a ``vc`` counter is an int 1..VC_COUNT_MAX

# Decoding bounds.  msgpack itself refuses a container header that claims more
# elements than the frame has bytes (before allocating), and strings longer
# than the frame, so sizes are bounded by max_message_bytes; nesting is bounded
# by msgpack's fixed parse stack.
NESTING_MAX = 1024       # containers inside one another, the envelope map included
# A frame that cannot be decoded (too large, or malformed) is still searched
# for the top-level attributes that say how to answer it: its id, mode and
# traceparent.  The search is bounded: for an oversize frame only its first
# PEEK_BYTES_MAX bytes are looked at (nothing is decoded for a frame over the
# limit), at most PEEK_KEYS_MAX top-level keys are looked at, and values of
# other keys are skipped, never decoded.
PEEK_BYTES_MAX = 4096
PEEK_KEYS_MAX = 64
PEEK_STR_BYTES_MAX = 1024  # longer id/mode/traceparent strings are not read
_PEEK_FIELDS = {b"id": "id", b"mode": "mode", b"traceparent": "traceparent"}


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

    What could still be read of the offending request travels with the error,
    so the node can answer it the way the request asked: ``request_id`` (the
    ``id``, when it was a str of 1..ID_LEN_MAX characters) lets a pipelining
    client match the error; ``mode`` (when it was one of MODES) decides
    whether an answer is wanted at all; ``traceparent`` (when it was a str)
    is copied into the error.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None,
                 mode: str | None = None, traceparent: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.mode = mode
        self.traceparent = traceparent

    @property
    def one_way(self) -> bool:
        """True when the request was readably ``send`` or ``publish``: it gets no reply."""
        return self.mode == MODE_SEND or self.mode == MODE_PUBLISH


class Request:
    """A validated request envelope.  ``raw`` is the map as decoded, kept so a
    node can forward the original bytes and a handler can read extensions.

    Treat it as read-only.  A plain slotted class rather than a frozen
    dataclass: one is built per message, and frozen ``__init__`` is ~3x slower.

    ``consistency``, ``delivery``, ``session`` and ``vc`` are None here: the
    request asked for no guarantee (the common case), and class attributes cost
    it nothing.  A request that asked for one is a ``GuaranteedRequest``.
    """

    __slots__ = ("id", "type", "subject", "mode", "data", "ttl", "raw", "nbytes")

    routing: str | None = None            # None: direct (multicast for a publish)
    consistency: str | None = None        # one of CONSISTENCIES, None: the node's default
    delivery: str | None = None           # one of DELIVERIES, None: at_most_once
    session: str | None = None            # causal only: the sender's process id
    vc: dict[str, int] | None = None      # causal only: the sender's vector clock

    def __init__(self, id: str, type: str, subject: str | None, mode: str, data: Any,
                 ttl: int | None, raw: dict, nbytes: int = 0):
        self.id = id
        self.type = type
        self.subject = subject
        self.mode = mode
        self.data = data
        self.ttl = ttl
        self.raw = raw
        self.nbytes = nbytes  # size of the envelope on the wire, for byte budgets

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, type={self.type!r}, subject={self.subject!r}, mode={self.mode!r})"


class RoutedRequest(Request):
    """A request that named a ``routing`` other than the default: the same fields
    with the strategy's own (PROTOCOL.md 2.5).  It takes no delivery guarantee."""

    __slots__ = ("routing", "stages", "stage", "targets", "timeout_ms")

    def __init__(self, id: str, type: str, subject: str | None, mode: str, data: Any,
                 ttl: int | None, raw: dict, *, routing: str,
                 stages: tuple[tuple[str, str], ...] = (), stage: int = 0,
                 targets: tuple[str, ...] = (), timeout_ms: int | None = None):
        super().__init__(id, type, subject, mode, data, ttl, raw)
        self.routing = routing
        self.stages = stages          # pipeline: the stages after this one, (agent, type)
        self.stage = stage            # pipeline: this stage's index, 0 for the first
        self.targets = targets        # scatter: the agents, in the caller's order
        self.timeout_ms = timeout_ms  # pipeline, scatter: the deadline the caller gave


class GuaranteedRequest(Request):
    """A request that named a ``consistency`` or ``delivery``: the same fields,
    with these four set per instance (slots shadow Request's class defaults)."""

    __slots__ = ("consistency", "delivery", "session", "vc")

    def __init__(self, id: str, type: str, subject: str | None, mode: str, data: Any,
                 ttl: int | None, raw: dict, nbytes: int = 0, *,
                 consistency: str | None = None, delivery: str | None = None,
                 session: str | None = None, vc: dict[str, int] | None = None):
        super().__init__(id, type, subject, mode, data, ttl, raw, nbytes)
        self.consistency = consistency
        self.delivery = delivery
        self.session = session
        self.vc = vc


_packer = msgpack.Packer(use_bin_type=True)


def encode(envelope: dict) -> bytes:
    """Envelope map -> bytes.  Raises TypeError for values msgpack cannot carry."""
    return _packer.pack(envelope)


def decode_map(frame: bytes, max_bytes: int) -> dict:
    """Bytes -> envelope map, or WireError(bad_request / too_large).

    The size is checked first: an oversize frame is never decoded (decoding
    costs CPU and memory in proportion to the frame, up to ~70 bytes of Python
    objects per byte).  Its error still carries the id, mode and traceparent
    when they are found in its first PEEK_BYTES_MAX bytes.
    """
    if len(frame) > max_bytes:
        raise refusal(frame[:PEEK_BYTES_MAX], ErrorCode.TOO_LARGE,
                          f"message of {len(frame)} bytes exceeds {max_bytes}")
    try:
        envelope = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except msgpack.StackError:
        raise refusal(frame, ErrorCode.BAD_REQUEST,
                          f"not a msgpack document: nesting deeper than {NESTING_MAX} "
                          f"levels") from None
    except Exception as exc:  # msgpack raises several unrelated exception types
        detail = str(exc) or type(exc).__name__
        raise refusal(frame, ErrorCode.BAD_REQUEST,
                          f"not a msgpack document: {detail}") from None
    if not isinstance(envelope, dict):
        raise WireError(ErrorCode.BAD_REQUEST,
                        f"envelope must be a map, got {type(envelope).__name__}")
    return envelope


def parse_request(frame: bytes, max_bytes: int) -> Request:
    """Bytes -> validated Request, or WireError with the stable code."""
    req = validate_request(decode_map(frame, max_bytes))
    req.nbytes = len(frame)
    return req


def refusal(frame: bytes, code: str, message: str) -> WireError:
    """The error for a frame that was not decoded, with what a peek could read:
    its id, mode and traceparent when readable (see ``peek``)."""
    return _refused(peek(frame), code, message)


def peek(frame: bytes) -> dict[str, str]:
    """The top-level ``id``, ``mode`` and ``traceparent`` strings of a frame that
    may not decode as a whole (trailing bytes, a bad key or value elsewhere, too
    deep, cut short).  Bounded work: at most PEEK_KEYS_MAX keys are looked at;
    keys are compared as raw bytes, other values skipped in C without building
    objects.  Returns only the fields it could read, as str.
    """
    found: dict[str, str] = {}
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(frame), 1))
    unpacker.feed(frame)
    try:
        pairs = unpacker.read_map_header()
        for _ in range(min(pairs, PEEK_KEYS_MAX)):
            field = _PEEK_FIELDS.get(_short_str_at(frame, unpacker.tell(), 16))
            unpacker.skip()  # the key
            if field is not None and _short_str_at(frame, unpacker.tell(),
                                                   PEEK_STR_BYTES_MAX) is not None:
                found[field] = unpacker.unpack()  # last one wins, as in a decoded map
            else:
                unpacker.skip()
    except Exception:  # anything unreadable ends the search; keep what was found
        pass
    return found


def _short_str_at(frame: bytes, pos: int, bytes_max: int) -> bytes | None:
    """The raw bytes of the msgpack str at ``pos`` if it is at most ``bytes_max``
    bytes long and wholly inside the frame, else None."""
    if pos >= len(frame):
        return None
    head = frame[pos]
    if 0xa0 <= head <= 0xbf:
        start, size = pos + 1, head & 0x1f
    elif head == 0xd9 and pos + 1 < len(frame):
        start, size = pos + 2, frame[pos + 1]
    elif head == 0xda and pos + 2 < len(frame):
        start, size = pos + 3, int.from_bytes(frame[pos + 1:pos + 3], "big")
    else:  # str32 is never short; anything else is not a str
        return None
    if size > bytes_max or start + size > len(frame):
        return None
    return frame[start:start + size]


def _readable_id(envelope: dict) -> str | None:
    rid = envelope.get("id")
    if isinstance(rid, str) and 0 < len(rid) <= ID_LEN_MAX:
        return rid
    return None


def _refused(env: dict, code: str, message: str) -> WireError:
    """A WireError carrying what could be read of the request ``env``."""
    mode = env.get("mode")
    traceparent = env.get("traceparent")
    return WireError(code, message, _readable_id(env),
                     mode if type(mode) is str and mode in MODES else None,
                     traceparent if type(traceparent) is str else None)


def _bad(message: str, env: dict) -> WireError:
    return _refused(env, ErrorCode.BAD_REQUEST, message)


def validate_request(env: dict) -> Request:
    """Check a decoded request map; the hot path, so plain checks in a row."""
    rid = env.get("id")
    if type(rid) is not str or not 0 < len(rid) <= ID_LEN_MAX:
        raise _bad(f"'id' must be a string of 1..{ID_LEN_MAX} characters", env)
    version = env.get("v")
    if type(version) is not int or version != VERSION:  # True == 1 and 1.0 == 1 in Python
        raise _bad(f"unsupported protocol version {reprlib.repr(version)}; this node speaks "
                   f"{VERSION}", env)
    mtype = env.get("type")
    if type(mtype) is not str or not 0 < len(mtype) <= TYPE_LEN_MAX:
        raise _bad(f"'type' must be a string of 1..{TYPE_LEN_MAX} characters", env)
    mode = env.get("mode")
    if mode is None:  # absent or nil: many serializers write nil for unset fields
        mode = MODE_CALL
    elif type(mode) is not str or mode not in MODES:
        raise _bad(f"'mode' must be one of {sorted(MODES)}", env)
    subject = env.get("subject")
    routing = env.get("routing")
    if routing is not None:
        return _routed(rid, mtype, mode, subject, env, routing)
    if subject is None:
        if mtype not in NODE_TYPES:
            raise _bad("'subject' (the agent id or group) is required", env)
    elif type(subject) is not str or not 0 < len(subject) <= SUBJECT_LEN_MAX:
        raise _bad(f"'subject' must be a string of 1..{SUBJECT_LEN_MAX} characters", env)
    ttl = env.get("ttl")
    if ttl is not None and (type(ttl) is not int or not 0 <= ttl <= TTL_MAX):
        raise _bad(f"'ttl' must be an integer 0..{TTL_MAX}", env)
    consistency = env.get("consistency")
    delivery = env.get("delivery")
    if consistency is None and delivery is None:  # the common case: two gets, no more
        if mtype.startswith(SYSTEM_PREFIX):
            _validate_system(mtype, mode, env)
        return Request(rid, mtype, subject, mode, env.get("data"), ttl, env)
    consistency, delivery, session, vc = _guarantees(mtype, mode, consistency, delivery, env)
    if mtype.startswith(SYSTEM_PREFIX):
        _validate_system(mtype, mode, env)
    return GuaranteedRequest(rid, mtype, subject, mode, env.get("data"), ttl, env,
                             consistency=consistency, delivery=delivery, session=session, vc=vc)


def _routed(rid: str, mtype: str, mode: str, subject: Any, env: dict,
            routing: Any) -> Request:
    """A request with a ``routing`` attribute (PROTOCOL.md 2.5): the default
    strategies make a plain request; the others a checked RoutedRequest."""
    allowed = ROUTINGS_BY_MODE[mode]
    if type(routing) is not str or routing not in allowed:
        raise _bad(f"'routing' of a {mode} must be one of {sorted(allowed)} (or absent)", env)
    if routing == ROUTING_DIRECT or routing == ROUTING_MULTICAST:
        plain = dict(env)
        del plain["routing"]
        req = validate_request(plain)
        req.raw = env
        return req
    if mtype.startswith(SYSTEM_PREFIX):
        raise _bad(f"'routing' {routing!r} carries agent messages, not {mtype}", env)
    if env.get("delivery") is not None or env.get("consistency") is not None:
        raise _bad(f"'routing' {routing!r} takes no 'delivery' or 'consistency'", env)
    ttl = env.get("ttl")
    if ttl is not None and (type(ttl) is not int or not 0 <= ttl <= TTL_MAX):
        raise _bad(f"'ttl' must be an integer 0..{TTL_MAX}", env)
    timeout_ms = env.get("timeout_ms")
    if timeout_ms is not None and (type(timeout_ms) is not int
                                   or not 0 < timeout_ms <= TIMEOUT_MS_MAX):
        raise _bad(f"'timeout_ms' must be an integer 1..{TIMEOUT_MS_MAX}", env)
    data = env.get("data")
    if routing == ROUTING_SCATTER:
        return RoutedRequest(rid, mtype, None, mode, data, ttl, env, routing=routing,
                             targets=_targets(env), timeout_ms=timeout_ms)
    _check_agent(subject, "'subject'", env)
    if routing == ROUTING_GOSSIP:
        return RoutedRequest(rid, mtype, subject, mode, data, ttl, env, routing=routing)
    stages, stage = _stages(env)
    return RoutedRequest(rid, mtype, subject, mode, data, ttl, env, routing=routing,
                         stages=stages, stage=stage, timeout_ms=timeout_ms)


def _check_agent(value: Any, what: str, env: dict) -> str:
    if type(value) is not str or not 0 < len(value) <= SUBJECT_LEN_MAX:
        raise _bad(f"{what} must be a string of 1..{SUBJECT_LEN_MAX} characters", env)
    return value


def _stages(env: dict) -> tuple[tuple[tuple[str, str], ...], int]:
    """A pipeline's remaining ``stages`` and this stage's index ``stage``."""
    stages, stage = env.get("stages"), env.get("stage")
    if stage is None:  # absent or nil: the first stage, as nil means absent everywhere
        stage = 0
    if type(stage) is not int or not 0 <= stage < STAGES_MAX:
        raise _bad(f"'stage' must be an integer 0..{STAGES_MAX - 1}", env)
    if type(stages) is not list or not 0 < len(stages) + stage + 1 <= STAGES_MAX \
            or not stages and stage == 0:
        raise _bad(f"'stages' must list the stages after the first as [agent, type] "
                   f"pairs, {STAGES_MAX} stages in all at most", env)
    checked = []
    for pair in stages:
        if type(pair) is not list or len(pair) != 2:
            raise _bad("each of 'stages' must be an [agent, type] pair", env)
        agent, mtype = pair
        _check_agent(agent, "a stage's agent", env)
        if type(mtype) is not str or not 0 < len(mtype) <= TYPE_LEN_MAX \
                or mtype.startswith(SYSTEM_PREFIX):
            raise _bad(f"a stage's type must be an agent message type of 1..{TYPE_LEN_MAX} "
                       f"characters", env)
        checked.append((agent, mtype))
    return tuple(checked), stage


def _targets(env: dict) -> tuple[str, ...]:
    targets = env.get("targets")
    if type(targets) is not list or not 0 < len(targets) <= TARGETS_MAX:
        raise _bad(f"'targets' must list 1..{TARGETS_MAX} agent ids", env)
    for agent in targets:
        _check_agent(agent, "each of 'targets'", env)
    if len(set(targets)) != len(targets):
        raise _bad("'targets' must not name an agent twice", env)
    return tuple(targets)


def _guarantees(mtype: str, mode: str, consistency: Any, delivery: Any,
                env: dict) -> tuple[str | None, str | None, str | None, dict | None]:
    """The checked ``consistency``, ``delivery``, ``session`` and ``vc`` of a request.

    ``session`` and ``vc`` are read only for causal delivery; otherwise they are
    not interpreted, so not validated (PROTOCOL.md section 2.1)."""
    if consistency is not None and (type(consistency) is not str
                                    or consistency not in CONSISTENCIES):
        raise _bad(f"'consistency' must be one of {sorted(CONSISTENCIES)} (or absent)", env)
    if delivery is not None and (type(delivery) is not str or delivery not in DELIVERIES):
        raise _bad(f"'delivery' must be one of {sorted(DELIVERIES)} (or absent)", env)
    if delivery is None or delivery == DELIVERY_AT_MOST_ONCE:
        return consistency, delivery, None, None
    if mode == MODE_PUBLISH:
        raise _bad(f"'delivery' {delivery!r} cannot be published (publish is best effort: "
                   f"at_most_once only)", env)
    if delivery != DELIVERY_CAUSAL:
        return consistency, delivery, None, None
    if mtype in NODE_TYPES:
        raise _bad(f"'delivery' 'causal' needs an agent subject; {mtype} has none", env)
    session, vc = _causal_clock(env)
    return consistency, delivery, session, vc


def _causal_clock(env: dict) -> tuple[str, dict[str, int]]:
    """The ``session`` and ``vc`` of a causal request, checked (section 2.4)."""
    session = env.get("session")
    if type(session) is not str or not 0 < len(session) <= SESSION_LEN_MAX:
        raise _bad(f"'session' must be a string of 1..{SESSION_LEN_MAX} characters "
                   f"with 'delivery' 'causal'", env)
    vc = env.get("vc")
    if type(vc) is not dict or not 0 < len(vc) <= VC_ENTRIES_MAX:
        raise _bad(f"'vc' must be a map of 1..{VC_ENTRIES_MAX} entries with 'delivery' "
                   f"'causal'", env)
    for key, count in vc.items():
        if type(key) is not str or not 0 < len(key) <= SESSION_LEN_MAX \
                or type(count) is not int or not 0 < count <= VC_COUNT_MAX:
            raise _bad(f"'vc' maps process ids (strings of 1..{SESSION_LEN_MAX} characters) "
                       f"to integers 1..2**63-1", env)
    if session not in vc:
        raise _bad("'vc' must have an entry for the request's 'session'", env)
    return session, vc


def _validate_system(mtype: str, mode: str, env: dict) -> None:
    if mtype not in SYSTEM_TYPES:
        raise _refused(env, ErrorCode.UNKNOWN_TYPE, f"unknown system type {mtype!r}")
    if mode == MODE_PUBLISH:
        raise _bad(f"{mtype} cannot be published", env)
    data = env.get("data")
    if mtype == TYPE_SPAWN:
        if not isinstance(data, dict) or type(data.get("behavior")) is not str:
            raise _bad("syn.spawn needs data {'behavior': str, 'init': any}", env)
    elif mtype in (TYPE_JOIN, TYPE_LEAVE):
        group = data.get("group") if isinstance(data, dict) else None
        if type(group) is not str or not 0 < len(group) <= SUBJECT_LEN_MAX:
            raise _bad(f"{mtype} needs data {{'group': str}}", env)


def request(rid: str, mtype: str, subject: str | None = None, data: Any = None,
            mode: str = MODE_CALL, **extensions: Any) -> dict:
    """Build a request map (the client side).

    ``data`` goes last: a node that refuses a frame without decoding it (too
    large, malformed) still finds the id, mode and traceparent before it.
    """
    env = {"v": VERSION, "id": rid, "type": mtype, "mode": mode}
    if subject is not None:
        env["subject"] = subject
    for key, value in extensions.items():
        if value is not None:
            env[key] = value
    if data is not None:
        env["data"] = data
    return env


def reply(request_id: str, data: Any, source: str, traceparent: str | None = None,
          vc: dict[str, int] | None = None) -> bytes:
    """Encode a reply to ``request_id`` carrying the handler's result.

    ``vc``: for a causal request, the agent's delivered clock after it (the
    client merges it into its own, PROTOCOL.md section 2.4)."""
    env = {"v": VERSION, "id": request_id, "re": request_id, "type": TYPE_REPLY,
           "source": source, "data": data}
    if traceparent is not None:
        env["traceparent"] = traceparent
    if vc is not None:
        env["vc"] = vc
    return _packer.pack(env)


def error(request_id: str | None, code: str, message: str, source: str,
          traceparent: str | None = None, retry_after_ms: int | None = None) -> bytes:
    """Encode an error reply.  ``request_id`` is None when the request was unreadable;
    ``retry_after_ms``: when sending again may succeed (``data.retry_after_ms``)."""
    data = {"code": code, "message": message}
    if retry_after_ms is not None:
        data["retry_after_ms"] = retry_after_ms
    env = {"v": VERSION, "id": request_id or "", "re": request_id, "type": TYPE_ERROR,
           "source": source, "data": data}
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
