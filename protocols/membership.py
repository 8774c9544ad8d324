"""Cluster membership: SWIM with Lifeguard's refinements, as a pure machine.

Every member probes one other per protocol period (``probe_interval_s``): a direct
``ping``; without an ``ack`` within ``probe_timeout_s``, a ``ping-req`` through
``indirect_probes`` others, who ping the target for us and relay its ack (or a
``nack`` when it stays silent, which tells us our own links work).  A member that
misses a whole period becomes *suspect*; unless it refutes in time it is declared
*dead*.  Updates about members ride on the probes (piggybacked, each retransmitted
``retransmit_mult * ceil(log10(n + 1))`` times, least-sent first), and every
``sync_interval_s`` a member exchanges one bounded page of its member list with a
random other (a joining node exchanges the whole list, page by page).  So a message
is bounded in size however large the cluster, and so is a member's traffic per
period.

States and merge rule.  A member is ``alive``, ``suspect``, ``dead`` or ``left``
(a graceful leave) at an *incarnation* (``gen`` on the wire: a node starts at its
start time in ns, so a restart comes back higher, and adds one to refute).  For one
member an update wins if its incarnation is higher, or equal with a stronger state
(alive < suspect < dead < left).  Only ``alive`` news creates a member we did not
know.  A node that hears itself suspected or declared dead at its incarnation or
above refutes: it takes a higher incarnation and gossips itself alive.

Lifeguard (Dadgar et al., 2018): the suspicion timeout starts at
``suspicion_max_mult`` times its floor (``suspicion_mult * max(1, log10(n)) *
probe_interval_s``) and shrinks towards the floor as independent members confirm
the suspicion (the ``by`` of a suspect entry); and a *local health* score, raised
when our probes fail without the nacks that would prove our own links, when we are
suspected, and when our own timers fire late (a paused or overloaded process),
stretches our probe interval and timeout, so a slow node does not accuse healthy
ones.  A node that finds its timer more than a period late also drops the probe in
flight and pushes its suspicion deadlines back by the lateness: what arrived while
it was stopped may be the refutation.

Split brain (``downing``).  The ring holds alive and suspect members and dead ones
not yet *downed*.  Whether this node may own agents (``quorate``) is decided by the
strategy over the *reference* (alive, suspect and undowned dead members) and the
*reachable* part of it (alive ones): ``keep-majority`` needs more than half (a tie
keeps the side holding the lowest node id), ``static-quorum`` at least
``quorum_size``.  A quorate node downs its dead members (they leave its ring) once
no member has been suspect and its view has not changed for ``stable_after_s``; a
node that is not quorate downs nobody, so its reference keeps the members it lost,
and it stays unquorate until they come back (it does not forget dead members it
has not downed).  A node with seeds owns nothing
until it has joined (every page of a member's whole list is in): with half a
view it would take agents whose owner it has not heard of.  Accusations (suspect, dead) are taken
only from members we hold alive or suspect: a node coming back from the other side
of a partition carries stale ones.  Dead members are still sent a sync page now and
then, and so are seeds no alive member answers for, until ``dead_reap_s`` forgets
them: that is how two sides find each other again, and, each hearing itself
declared dead, refute, so one view forms again.

Hardening until peers authenticate (see docs/OPERATIONS.md, "Trust"): an
incarnation may run at most ``generation_ahead_max_ns`` ahead of our own wall clock
(the node passes the offset; the machine reads no clock); the address of a member
changes only through a message from that member itself, or, relayed, when we hold
it dead or left (a restart at a new address); a node that hears its own id at
another address refutes at once to every member and emits ``Refuted`` so the node
logs it loudly.  Without authentication a sender can still claim any id: CURVE
(the security work) stops that.

Wire format (docs/PROTOCOL.md, section 9): every message is a map ``{"v": 2,
"kind": K, ...}``; ``u`` carries piggybacked entries ``{"id", "gen", "ep"[, "st",
"by"]}`` (``st``: ``a``/``s``/``d``/``l``, absent for alive; ``by``: who suspected or
declared it).  Kinds: ``ping {seq, u, ag}``, ``ack {seq, u, ag}``, ``ping-req {seq,
target, u}``, ``nack {seq}``, ``sync {u, want, full}``.  The sender's node id comes
from the peer frame.

The machine contract (``protocols/machine.py``): ``start``, ``receive``, ``tick``,
``next_deadline``; plus ``leave(now)`` for a graceful leave.
"""

from __future__ import annotations

import math
import random
import re
import reprlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

from .effects import GOSSIP, MembersChanged, QuorumChanged, Refuted, Send, seed_id

VERSION = 2            # of the membership message map; v1 (grow-only gossip) is refused
MEMBERS_MAX = 2048     # members one node holds; news of more is refused, entry by entry
FIELD_LEN_MAX = 255    # node ids and endpoints
ENDPOINTS_MAX = 8      # transports one member may advertise
TRANSPORT_NAME_MAX = 32
ENTRIES_MAX = 16       # piggybacked entries per message
SYNC_PAGE_MAX = 128    # entries per sync message
BUCKETS = 64           # digest buckets of a sync (ids by crc32 % BUCKETS)
RELAYS_MAX = 256       # ping-reqs relayed for others at once
CONFIRMATIONS = 2      # independent suspicions that bring the timeout to its floor
ROUND_PROBES_MAX = 20  # periods of a probe round counted before downing (see _stable_s)
ZMQ, ZMQ_PUB = "zmq", "zmq-pub"
ZMQ_KEY = "zmq-key"    # a CURVE node's public key (Z85), advertised like an endpoint
ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)
KEEP_MAJORITY, STATIC_QUORUM = "keep-majority", "static-quorum"
GENERATION_AHEAD_MAX_NS = 60 * 10**9  # how far an incarnation may lead our clock
PAUSE_FACTOR = 2.0     # a timer this many probe periods late means we were stopped

_CODE = {ALIVE: "a", SUSPECT: "s", DEAD: "d", LEFT: "l"}
_STATE_OF = {code: state for state, code in _CODE.items()}
_STRENGTH = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
_KINDS = frozenset(("ping", "ack", "ping-req", "nack", "sync"))
_ENDPOINT = re.compile(r"tcp://[^\s/:]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")


def advertised_replicas(members: Mapping[str, "Member"]) -> frozenset[int] | None:
    """The CRDT replica ids the view's entries advertise, whatever their state (a
    dead entry's too, until it is reaped): any other id is a retired process's
    (docs/STATE.md, 'Pruning').  None while an entry advertises none."""
    ids = [member.replica for member in members.values()]
    return None if 0 in ids else frozenset(ids)


def _entry_hash(member: "Member") -> int:
    return zlib.crc32(f"{member.node_id}\0{member.generation}\0{member.state}".encode())


class MembershipError(Exception):
    """A membership message from a peer that breaks the protocol (remote error)."""


@dataclass(frozen=True)
class SwimConfig:
    """Every timing of the protocol (the node fills it from its config)."""

    probe_interval_s: float = 0.5
    probe_timeout_s: float = 0.2
    indirect_probes: int = 3
    suspicion_mult: float = 2.0
    suspicion_max_mult: float = 2.0
    retransmit_mult: int = 3
    sync_interval_s: float = 1.0
    dead_reap_s: float = 60.0
    health_max: int = 8
    downing: str = KEEP_MAJORITY
    quorum_size: int = 0
    stable_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout_s <= self.probe_interval_s:
            raise ValueError("need 0 < probe_timeout_s <= probe_interval_s")
        if self.downing not in (KEEP_MAJORITY, STATIC_QUORUM):
            raise ValueError(f"downing is {KEEP_MAJORITY} or {STATIC_QUORUM}")
        if self.downing == STATIC_QUORUM and self.quorum_size < 1:
            raise ValueError("static-quorum needs quorum_size >= 1")


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    generation: int                         # the incarnation: larger after a restart
    endpoints: tuple[tuple[str, str], ...]  # (transport, endpoint), sorted by transport
    state: str = ALIVE
    by: str = ""                            # who suspected or declared it (suspect, dead)
    replica: int = 0                        # the CRDT replica id of this process (0: none)

    @classmethod
    def of(cls, node_id: str, address: str, pub_address: str, generation: int,
           replica: int = 0, **more: str) -> "Member":
        """A member serving ZeroMQ at ``address`` (ROUTER) and ``pub_address`` (PUB),
        plus any other transports named in ``more``."""
        endpoints = {ZMQ: address, ZMQ_PUB: pub_address, **more}
        return cls(node_id, generation, tuple(sorted(endpoints.items())), replica=replica)

    @property
    def incarnation(self) -> int:
        return self.generation

    def endpoint(self, transport: str) -> str | None:
        for name, endpoint in self.endpoints:
            if name == transport:
                return endpoint
        return None

    @property
    def address(self) -> str:
        """The ZeroMQ ROUTER endpoint, e.g. ``tcp://127.0.0.1:7400``."""
        return self.endpoint(ZMQ) or ""

    @property
    def pub_address(self) -> str:
        """The ZeroMQ PUB endpoint for multicast."""
        return self.endpoint(ZMQ_PUB) or ""

    def beats(self, other: "Member") -> bool:
        """SWIM's order for two entries about one member."""
        if self.generation != other.generation:
            return self.generation > other.generation
        return _STRENGTH[self.state] > _STRENGTH[other.state]

    def to_wire(self) -> dict:
        entry = {"id": self.node_id, "gen": self.generation, "ep": dict(self.endpoints)}
        if self.replica:
            entry["rid"] = self.replica
        if self.state != ALIVE:
            entry["st"] = _CODE[self.state]
            if self.by:
                entry["by"] = self.by
        return entry

    @classmethod
    def from_wire(cls, item: object) -> "Member":
        if not isinstance(item, dict):
            raise MembershipError(f"a member entry must be a map, got {reprlib.repr(item)}")
        node_id, generation, endpoints = item.get("id"), item.get("gen"), item.get("ep")
        if not (isinstance(node_id, str) and 0 < len(node_id) <= FIELD_LEN_MAX):
            raise MembershipError(f"member 'id' must be a string of 1..{FIELD_LEN_MAX}")
        if type(generation) is not int or not 0 <= generation < 2**64:
            raise MembershipError(f"member 'gen' must be an integer in 0..2**64-1 ({node_id!r:.40})")
        if not isinstance(endpoints, dict) or not 0 < len(endpoints) <= ENDPOINTS_MAX:
            raise MembershipError(f"member 'ep' must map 1..{ENDPOINTS_MAX} transports")
        for name, endpoint in endpoints.items():
            _check_endpoint(name, endpoint)
        if ZMQ not in endpoints or ZMQ_PUB not in endpoints:
            raise MembershipError(f"member {node_id!r:.40} lacks a '{ZMQ}' or '{ZMQ_PUB}' endpoint")
        code = item.get("st", "a")
        state = _STATE_OF.get(code) if type(code) is str else None
        if state is None:
            raise MembershipError(f"member 'st' must be one of a, s, d, l ({node_id!r:.40})")
        by = item.get("by", "")
        if not (isinstance(by, str) and len(by) <= FIELD_LEN_MAX):
            raise MembershipError(f"member 'by' must be a node id ({node_id!r:.40})")
        replica = item.get("rid", 0)
        if type(replica) is not int or not 0 <= replica < 2**64:
            raise MembershipError(f"member 'rid' must be an integer in 0..2**64-1 ({node_id!r:.40})")
        return cls(node_id, generation, tuple(sorted(endpoints.items())), state,
                   by if state in (SUSPECT, DEAD) else "", replica)


def _check_endpoint(name: object, endpoint: object) -> None:
    if not (isinstance(name, str) and 0 < len(name) <= TRANSPORT_NAME_MAX):
        raise MembershipError(f"transport names are strings of 1..{TRANSPORT_NAME_MAX}")
    if not (isinstance(endpoint, str) and 0 < len(endpoint) <= FIELD_LEN_MAX):
        raise MembershipError(f"endpoints are strings of 1..{FIELD_LEN_MAX}")
    if name in (ZMQ, ZMQ_PUB) and (not _ENDPOINT.fullmatch(endpoint)
                                   or int(endpoint.rsplit(":", 1)[1]) > 65535):
        raise MembershipError(f"member endpoint must be tcp://HOST:PORT, got {endpoint!r:.80}")


class _Probe:
    """The probe of this period: one target, direct then indirect."""

    __slots__ = ("target", "seq", "indirect_at", "ends_at", "acked", "indirect", "asked",
                 "nacks")

    def __init__(self, target: str, seq: int, indirect_at: float, ends_at: float):
        self.target, self.seq = target, seq
        self.indirect_at, self.ends_at = indirect_at, ends_at
        self.acked = False
        self.indirect = False  # the indirect stage has begun
        self.asked = 0         # ping-reqs sent
        self.nacks = 0         # intermediaries that answered "no ack from the target"


class _Suspicion:
    """Lifeguard's shrinking suspicion timer for one member at one incarnation."""

    __slots__ = ("generation", "started", "confirmers", "expected", "min_s", "max_s",
                 "deadline")

    def __init__(self, generation: int, by: str, now: float, expected: int, min_s: float,
                 max_s: float):
        self.generation, self.started = generation, now
        self.confirmers = {by}
        self.expected, self.min_s, self.max_s = expected, min_s, max_s
        self.deadline = now + self._timeout()

    def confirm(self, by: str) -> bool:
        if by in self.confirmers or len(self.confirmers) - 1 >= self.expected:
            return False
        self.confirmers.add(by)
        self.deadline = self.started + self._timeout()
        return True

    def _timeout(self) -> float:
        if self.expected < 1:
            return self.min_s
        fraction = math.log(len(self.confirmers)) / math.log(self.expected + 1)
        return max(self.min_s, self.max_s - (self.max_s - self.min_s) * fraction)


class _Broadcasts:
    """Updates waiting to be piggybacked: least-sent first, newest first among equals.

    One slot per member (its latest entry is what goes out), kept in buckets by
    transmit count so picking is O(picked), not a sort of the whole queue.
    """

    def __init__(self) -> None:
        self._buckets: list[OrderedDict[str, None]] = []
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._count)

    def push(self, node_id: str) -> None:
        self.discard(node_id)
        if not self._buckets:
            self._buckets.append(OrderedDict())
        self._buckets[0][node_id] = None
        self._count[node_id] = 0

    def discard(self, node_id: str) -> None:
        count = self._count.pop(node_id, None)
        if count is not None:
            del self._buckets[count][node_id]

    def take(self, limit: int, transmits_max: int) -> list[str]:
        """Up to ``limit`` ids to send now; each counts one transmission."""
        picked: list[str] = []
        for count, bucket in enumerate(self._buckets):
            for node_id in reversed(bucket):
                picked.append(node_id)
                if len(picked) == limit:
                    break
            if len(picked) == limit:
                break
        for node_id in picked:
            count = self._count[node_id]
            del self._buckets[count][node_id]
            if count + 1 >= transmits_max:
                del self._count[node_id]
                continue
            if len(self._buckets) <= count + 1:
                self._buckets.append(OrderedDict())
            self._buckets[count + 1][node_id] = None
            self._count[node_id] = count + 1
        return picked


class Membership:
    """A SWIM member: ``receive`` and ``tick`` return effects (see the module doc)."""

    def __init__(self, me: Member, seeds: Iterable[str], config: SwimConfig | None = None,
                 rng: random.Random | None = None, *, wall_offset_ns: int = 0,
                 generation_ahead_max_ns: int = GENERATION_AHEAD_MAX_NS):
        self.me = me
        self.config = config or SwimConfig()
        self._members: dict[str, Member] = {me.node_id: me}
        self._since: dict[str, float] = {}     # dead/left member -> when it became so
        # Indexes kept by _index as entries change, so no input costs O(members):
        self._alive: set[str] = {me.node_id}    # members alive (us, until we leave)
        self._on_ring: set[str] = {me.node_id}  # alive, suspect, dead not downed
        self._dead_up: set[str] = set()         # dead, not downed yet
        self._dirty = False                     # the view changed since _settle
        self._digest = [0] * BUCKETS            # per bucket: sum of entry hashes
        self._bucket_ids: list[set[str]] = [set() for _ in range(BUCKETS)]
        self._seeds = tuple(s for s in seeds if s != me.address)
        # Seeded, never the module-level random: a run replays from its seed.
        self._rng = rng or random.Random(zlib.crc32(me.node_id.encode()))
        self._wall_offset_ns = wall_offset_ns
        self._ahead_max_ns = generation_ahead_max_ns
        self._broadcasts = _Broadcasts()
        self._suspicions: dict[str, _Suspicion] = {}
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> (asker, its seq, deadline)
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._seq = 0
        self._health = 0
        self._next_probe: float | None = None
        self._next_sync: float | None = None
        self._cursor = 0                      # where the next sync page starts
        self._changed_at = -math.inf          # last change of any member's state
        self._refute_after = -math.inf        # loud refutations: one per probe period
        self._left = False
        self._joined = not self._seeds        # a node with seeds joins before it owns
        self._heard: set[str] = {me.node_id}  # members that sent us something themselves
        self._told_at: dict[str, float] = {}  # member -> when we last told it of a claim
        self._counted = (1, 1)                # (reachable, reference) of the last decision
        self._join_pages: dict[str, set[int]] = {}
        self._quorate = True
        self._ring: frozenset[str] = frozenset((me.node_id,))
        self._ids: list[str] | None = None    # sorted member ids, while unchanged
        self._agents: dict[str, int] = {}     # member -> agents it said it holds
        # With CURVE: node id -> the keys allowed to speak for it; a member is taken
        # only advertising one of them (None: no keys, any id goes).
        self._member_keys: Mapping[str, frozenset[str]] | None = None
        self.local_agents = 0                 # set by the node; sent on pings and acks
        self.stats = {"probes": 0, "probes_failed": 0, "indirect": 0, "suspected": 0,
                      "declared_dead": 0, "refuted": 0, "refused": 0, "downed": 0,
                      "pauses": 0}
        self._index(me.node_id, ALIVE, None, me)
        self._dirty = False

    # --- views --------------------------------------------------------------------------

    @property
    def members(self) -> dict[str, Member]:
        """Every member known, in every state (dead and left until reaped)."""
        return dict(self._members)

    @property
    def ring(self) -> frozenset[str]:
        """Members that own agents: alive, suspect, and dead ones not downed yet."""
        return self._ring

    @property
    def quorate(self) -> bool:
        """True while the downing strategy lets this node own agents."""
        return self._quorate

    @property
    def health(self) -> int:
        return self._health

    @property
    def refused_entries(self) -> int:
        return self.stats["refused"]

    def rows(self) -> list[dict]:
        """One row per member for ``synthesis-ctl members``."""
        rows = []
        for node_id in sorted(self._members):
            member = self._members[node_id]
            agents = self.local_agents if node_id == self.me.node_id else self._agents.get(node_id)
            rows.append({"node_id": node_id, "address": member.address, "state": member.state,
                         "incarnation": member.generation, "agents": agents,
                         "endpoints": dict(member.endpoints), "replica": member.replica})
        return rows

    def counts(self) -> dict[str, int]:
        """Members by state (a gauge)."""
        counts = dict.fromkeys(STATES, 0)
        for member in self._members.values():
            counts[member.state] += 1
        return counts

    # --- the machine contract ---------------------------------------------------------

    def start(self, now: float) -> list:
        """Join: exchange the whole member list with every seed; probing starts."""
        self._next_probe = now + self._interval()
        self._next_sync = now + self.config.sync_interval_s
        self._broadcasts.push(self.me.node_id)
        join = self._join_message()
        joins = [Send(seed_id(s), GOSSIP, join) for s in self._seeds]
        self._decide(now)
        first = [MembersChanged(self.members, self._ring)]
        if not self._quorate:  # before the view: the node must not own with it
            first.insert(0, QuorumChanged(False, 1, 1))
        return first + joins

    def next_deadline(self) -> float | None:
        if self._next_probe is None:
            return None
        deadlines = [self._next_probe, self._next_sync]
        probe = self._probe
        if probe is not None and not probe.acked:
            deadlines.append(probe.ends_at if probe.indirect else probe.indirect_at)
        deadlines += [s.deadline for s in self._suspicions.values()]
        deadlines += [r[2] for r in self._relays.values()]
        if self._dead_up and self._quorate and not self._suspicions:
            deadlines.append(self._changed_at + self.stable_s())
        return min(d for d in deadlines if d is not None)

    def tick(self, now: float) -> list:
        if self._next_probe is None:
            return []
        out: list = []
        self._check_pause(now)
        self._expire_relays(now, out)
        self._probe_timers(now, out)
        self._suspicion_timers(now)
        if now >= self._next_probe:
            self._next_probe = now + self._interval()
            if not self._left:
                self._start_probe(now, out)
        if now >= self._next_sync:
            self._next_sync = now + self.config.sync_interval_s
            self._reap(now)
            out += self._periodic_sync()
        return self._settle(now, out)

    def receive(self, sender: str, message: object, now: float) -> list:
        kind = self._check(message)
        out: list = []
        if kind == "nack":
            self._on_nack(message)
            return out
        self._merge_all(sender, self._entries(message, "u"), now, out)
        if sender not in self._heard and sender in self._members:
            self._heard.add(sender)  # it speaks for itself: it counts for downing
            self._dirty = True
        if kind == "ping":
            self._note_agents(sender, message)
            out.append(Send(sender, GOSSIP, self._message("ack", seq=self._seq_of(message),
                                                          about=sender)))
        elif kind == "ack":
            self._note_agents(sender, message)
            self._on_ack(self._seq_of(message), out)
        elif kind == "ping-req":
            self._on_ping_req(sender, message, now, out)
        else:
            out += self._on_sync(sender, message)
        return self._settle(now, out)

    def leave(self, now: float) -> list:
        """A graceful leave: every alive member hears it at once; probing stops."""
        if self._left:
            return []
        self._left = True
        before, self.me = self.me, replace(self.me, state=LEFT)
        self._members[self.me.node_id] = self.me
        self._index(self.me.node_id, LEFT, before, self.me)
        self._broadcasts.push(self.me.node_id)
        message = self._announcement()
        out = [Send(n, GOSSIP, message) for n, m in sorted(self._members.items())
               if n != self.me.node_id and m.state in (ALIVE, SUSPECT)]
        # The announcement goes first: the view change makes the node hand its
        # agents off, and their new owners must know it left before the states come.
        return out + self._settle(now, [], changed=True)

    # --- messages in ----------------------------------------------------------------

    def _check(self, message: object) -> str:
        if not isinstance(message, dict):
            raise MembershipError("a membership message must be a map")
        version = message.get("v")
        if type(version) is not int or version < VERSION:
            raise MembershipError(f"membership messages need an integer 'v' >= {VERSION} "
                                  f"(got {reprlib.repr(version)}: a node of an older version?)")
        kind = message.get("kind")
        if type(kind) is not str or kind not in _KINDS:
            raise MembershipError(f"unknown membership message kind {reprlib.repr(kind)}")
        return kind

    @staticmethod
    def _seq_of(message: dict) -> int:
        seq = message.get("seq")
        if type(seq) is not int or not 0 <= seq < 2**63:
            raise MembershipError("'seq' must be a non-negative integer")
        return seq

    def _entries(self, message: dict, key: str) -> list[Member]:
        """Validated entries that differ from what we hold (most don't: skipped
        before validation)."""
        items = message.get(key, [])
        if not isinstance(items, list) or len(items) > max(ENTRIES_MAX, SYNC_PAGE_MAX):
            raise MembershipError(f"'{key}' must be a list of at most {SYNC_PAGE_MAX} entries")
        members, fresh = self._members, []
        for item in items:
            if isinstance(item, dict) and type(item.get("id")) is str:
                known = members.get(item["id"])
                if (known is not None and known.generation == item.get("gen")
                        and _CODE[known.state] == item.get("st", "a")
                        and known.state == ALIVE and dict(known.endpoints) == item.get("ep")):
                    continue
            fresh.append(Member.from_wire(item))
        return fresh

    def _note_agents(self, sender: str, message: dict) -> None:
        agents = message.get("ag")
        if type(agents) is int and agents >= 0 and sender in self._members:
            self._agents[sender] = agents

    def _on_ack(self, seq: int, out: list) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.acked = True
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:  # the target answered the ping we sent for someone else
            asker, asker_seq, _ = relay
            out.append(Send(asker, GOSSIP, self._message("ack", seq=asker_seq, about=asker)))

    def _on_nack(self, message: dict) -> None:
        seq, probe = self._seq_of(message), self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def _on_ping_req(self, sender: str, message: dict, now: float, out: list) -> None:
        target, seq = message.get("target"), self._seq_of(message)
        known = self._members.get(target) if type(target) is str else None
        if known is None or known.state in (DEAD, LEFT) or len(self._relays) >= RELAYS_MAX:
            out.append(Send(sender, GOSSIP, {"v": VERSION, "kind": "nack", "seq": seq}))
            return
        self._seq += 1
        self._relays[self._seq] = (sender, seq, now + self._timeout())
        out.append(Send(target, GOSSIP, self._message("ping", seq=self._seq, about=target)))

    def _on_sync(self, sender: str, message: dict) -> list:
        """A join gets our whole list, page by page; a digest exchange (three steps:
        digest, entries + digest, entries) moves only the buckets that differ."""
        if message.get("full") is True:
            ids = self._sorted_ids()
            pages = range(0, len(ids), SYNC_PAGE_MAX)
            return [Send(sender, GOSSIP, {"v": VERSION, "kind": "sync", "page": k,
                                          "pages": len(pages),
                                          "u": [self._members[n].to_wire()
                                                for n in ids[i:i + SYNC_PAGE_MAX]]})
                    for k, i in enumerate(pages)]
        if "page" in message:
            self._join_page(sender, message)
            return []
        digest, step = message.get("dg"), message.get("r")
        if digest is None:
            return []
        if (not isinstance(digest, list) or len(digest) != BUCKETS
                or not all(type(x) is int and 0 <= x < 2**32 for x in digest)
                or step not in (1, 2)):
            raise MembershipError(f"a sync digest is {BUCKETS} integers of 32 bits, r 1 or 2")
        differ = [b for b in range(BUCKETS) if digest[b] != self._digest[b]]
        if step == 1:
            return [Send(sender, GOSSIP, {"v": VERSION, "kind": "sync", "r": 2,
                                          "u": self._bucket_entries(differ),
                                          "dg": list(self._digest)})]
        if differ:
            return [Send(sender, GOSSIP, {"v": VERSION, "kind": "sync",
                                          "u": self._bucket_entries(differ)})]
        return []

    def _join_page(self, sender: str, message: dict) -> None:
        """A page of a member's whole list, answering our join: once every page of
        one answer is in, we have joined (and may own agents: a node that serves
        with half a view would take agents whose owner it has not heard of)."""
        page, pages = message.get("page"), message.get("pages")
        if not (type(pages) is int and type(page) is int and 0 <= page < pages <= 64):
            raise MembershipError("a join page needs integers 0 <= page < pages <= 64")
        if self._joined:
            return
        got = self._join_pages.setdefault(sender, set())
        if len(self._join_pages) > RELAYS_MAX:
            self._join_pages = {sender: got}
        got.add(page)
        if len(got) == pages:
            self._joined, self._join_pages = True, {}
            self._dirty = True  # decide again

    def _bucket_entries(self, buckets: list[int]) -> list[dict]:
        """Our entries in ``buckets``, at most a page, starting at a rotating bucket
        so that repeated exchanges cover every one."""
        entries: list[dict] = []
        if not buckets:
            return entries
        self._cursor += 1
        start = self._cursor % len(buckets)
        for bucket in buckets[start:] + buckets[:start]:
            for node_id in sorted(self._bucket_ids[bucket]):
                entries.append(self._members[node_id].to_wire())
                if len(entries) == SYNC_PAGE_MAX:
                    return entries
        return entries

    # --- merging ----------------------------------------------------------------------

    def _merge_all(self, sender: str, entries: list[Member], now: float, out: list) -> None:
        limit_ns = self._wall_offset_ns + int(now * 1e9) + self._ahead_max_ns
        sender_known = self._members.get(sender)
        accuser = sender_known is not None and sender_known.state in (ALIVE, SUSPECT)
        for member in entries:
            if member.generation > limit_ns:
                self.stats["refused"] += 1  # from the future: forged, or a clock far off
            elif member.node_id == self.me.node_id:
                self._about_me(member, now, out)
            elif member.state in (SUSPECT, DEAD) and not accuser:
                continue  # stale accusations from a node we hold dead (or a stranger)
            else:
                self._merge(member, sender, now, out)

    def set_member_keys(self, keys: Mapping[str, frozenset[str]] | None) -> None:
        """Bind node ids to keys (the node's peer certificates): from now on a member
        is taken, or its entry changed, only advertising a key bound to its id."""
        self._member_keys = keys

    def _merge(self, member: Member, sender: str, now: float, out: list) -> None:
        keys = self._member_keys
        if keys is not None and member.endpoint(ZMQ_KEY) not in keys.get(member.node_id, ()):
            self.stats["refused"] += 1  # an id no peer certificate binds to that key
            return
        known = self._members.get(member.node_id)
        if known is None:
            if member.state != ALIVE:
                return  # only alive news makes a member
            if len(self._members) >= MEMBERS_MAX:
                self.stats["refused"] += 1
                return
            self._set(member, now)
            return
        if member.endpoints != known.endpoints and not (
                sender == member.node_id
                or (known.state in (DEAD, LEFT) and member.state == ALIVE)):
            self.stats["refused"] += 1  # an address changes only through its member
            return
        if member.beats(known):
            self._set(member, now)
        elif sender == member.node_id and member.endpoints != known.endpoints:
            self._tell(member, known, now, out)
        elif (member.state == SUSPECT and known.state == SUSPECT
              and member.generation == known.generation):
            suspicion = self._suspicions.get(member.node_id)
            if suspicion is not None and suspicion.confirm(member.by):
                self._broadcasts.push(member.node_id)  # confirmations spread too

    def _tell(self, member: Member, known: Member, now: float, out: list) -> None:
        """A member speaks for itself at endpoints we hold under a newer entry (its
        id claimed elsewhere while it was away, or forged): tell it, at the address
        it gives, so that it can refute (rate-limited per member)."""
        if self._told_at.get(member.node_id, -math.inf) + self.config.probe_interval_s > now:
            return
        if len(self._told_at) >= RELAYS_MAX:
            self._told_at.clear()
        self._told_at[member.node_id] = now
        out.append(Send(seed_id(member.address), GOSSIP,
                        {"v": VERSION, "kind": "sync", "u": [known.to_wire()]}))

    def _set(self, member: Member, now: float) -> None:
        """Take ``member`` as our entry; start or end timers; queue it for gossip."""
        node_id = member.node_id
        before = self._members.get(node_id)
        self._members[node_id] = member
        self._index(node_id, member.state, before, member)
        self._broadcasts.push(node_id)
        if before is None or before.state != member.state:
            self._changed_at = now
        if member.state == SUSPECT:
            self._suspect_timer(member, now)
        else:
            self._suspicions.pop(node_id, None)
        if member.state in (DEAD, LEFT):
            self._since[node_id] = now
        else:
            self._since.pop(node_id, None)
        if member.state == DEAD and before is not None and before.state != DEAD:
            self.stats["declared_dead"] += 1

    def _index(self, node_id: str, state: str | None, before: Member | None = None,
               after: Member | None = None) -> None:
        """Keep the state indexes and the sync digest for one member whose entry
        went from ``before`` to ``after`` (``state`` None: forgotten)."""
        self._dirty = True
        self._ids = None
        bucket = zlib.crc32(node_id.encode()) % BUCKETS
        if before is not None:
            self._digest[bucket] = (self._digest[bucket] - _entry_hash(before)) % 2**32
        if after is not None:
            self._digest[bucket] = (self._digest[bucket] + _entry_hash(after)) % 2**32
            self._bucket_ids[bucket].add(node_id)
        else:
            self._bucket_ids[bucket].discard(node_id)
        for index in (self._alive, self._on_ring, self._dead_up):
            index.discard(node_id)
        if state == ALIVE:
            self._alive.add(node_id)
        if state in (ALIVE, SUSPECT, DEAD):
            self._on_ring.add(node_id)
        if state == DEAD:
            self._dead_up.add(node_id)

    def _about_me(self, member: Member, now: float, out: list) -> None:
        """Someone gossips our own id: refute whatever could win over us."""
        me = self.me
        if self._left or not (member.beats(me) or (
                member.generation == me.generation and member.endpoints != me.endpoints)):
            return
        if member.endpoints != me.endpoints:
            if now < self._refute_after:
                return
            self._refute_after = now + self.config.probe_interval_s
            out.append(Refuted(member.address, member.generation, member.generation + 1))
        else:
            self._health = min(self.config.health_max, self._health + 1)
        self.stats["refuted"] += 1
        self.me = replace(me, generation=max(me.generation, member.generation) + 1)
        self._members[me.node_id] = self.me
        self._index(me.node_id, ALIVE, me, self.me)
        self._broadcasts.push(me.node_id)
        if member.endpoints != me.endpoints:  # a claim on our id: every member hears at once
            message = self._announcement()
            out += [Send(n, GOSSIP, message) for n, m in sorted(self._members.items())
                    if n != me.node_id and m.state in (ALIVE, SUSPECT)]

    # --- probing --------------------------------------------------------------------

    def _interval(self) -> float:
        return self.config.probe_interval_s * (1 + self._health)

    def _timeout(self) -> float:
        return self.config.probe_timeout_s * (1 + self._health)

    def _start_probe(self, now: float, out: list) -> None:
        self._end_probe(now, out)
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        self.stats["probes"] += 1
        self._probe = _Probe(target, self._seq, now + self._timeout(), now + self._interval())
        out.append(Send(target, GOSSIP, self._message("ping", seq=self._seq, about=target)))

    def _next_target(self) -> str | None:
        """Round robin over a shuffled list (every member probed within n periods)."""
        for _ in range(2):
            while self._probe_order:
                node_id = self._probe_order.pop()
                member = self._members.get(node_id)
                if member is not None and member.state in (ALIVE, SUSPECT):
                    return node_id
            self._probe_order = sorted(n for n, m in self._members.items()
                                       if n != self.me.node_id and m.state in (ALIVE, SUSPECT))
            self._rng.shuffle(self._probe_order)
        return None

    def _probe_timers(self, now: float, out: list) -> None:
        probe = self._probe
        if probe is None or probe.acked:
            return
        if not probe.indirect and now >= probe.indirect_at:
            self._ask_others(probe, out)
        if probe.indirect and now >= probe.ends_at:
            self._end_probe(now, out)

    def _ask_others(self, probe: _Probe, out: list) -> None:
        others = sorted(n for n, m in self._members.items()
                        if m.state == ALIVE and n not in (self.me.node_id, probe.target))
        helpers = self._rng.sample(others, min(self.config.indirect_probes, len(others)))
        probe.indirect, probe.asked = True, len(helpers)
        self.stats["indirect"] += len(helpers)
        message = {"v": VERSION, "kind": "ping-req", "seq": probe.seq, "target": probe.target,
                   "u": self._piggyback(None)}
        out += [Send(n, GOSSIP, message) for n in helpers]

    def _end_probe(self, now: float, out: list) -> None:
        """The period is over: an unanswered probe makes its target suspect."""
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if probe.acked:
            self._health = max(0, self._health - 1)
            return
        self.stats["probes_failed"] += 1
        if probe.nacks < probe.asked:  # silence from our helpers too: maybe it is us
            self._health = min(self.config.health_max, self._health + 1)
        target = self._members.get(probe.target)
        if target is None:
            return
        me = self.me.node_id
        if target.state == ALIVE:
            self.stats["suspected"] += 1
            self._set(replace(target, state=SUSPECT, by=me), now)
            # Tell it directly too: if it is alive but its links drop, this is one
            # more chance to refute before the suspicion runs out.
            out.append(Send(probe.target, GOSSIP, {"v": VERSION, "kind": "sync",
                                                    "u": [self._members[probe.target].to_wire()]}))
        elif target.state == SUSPECT:  # our own failed probe confirms the suspicion
            suspicion = self._suspicions.get(target.node_id)
            if suspicion is not None and suspicion.confirm(me):
                self._members[target.node_id] = replace(target, by=me)
                self._broadcasts.push(target.node_id)

    def _check_pause(self, now: float) -> None:
        """A timer far too late: we were stopped (SIGSTOP, swap, a long GC).  What we
        sent before may have been answered while we could not read: no accusation
        from the probe in flight, and suspicions get the lost time back."""
        late = now - self._next_probe
        if late <= PAUSE_FACTOR * self._interval():
            return
        self.stats["pauses"] += 1
        self._health = min(self.config.health_max, self._health + 1)
        self._probe = None
        self._relays.clear()
        for suspicion in self._suspicions.values():
            suspicion.started += late
            suspicion.deadline += late

    def _expire_relays(self, now: float, out: list) -> None:
        for seq, (asker, asker_seq, deadline) in list(self._relays.items()):
            if deadline <= now:
                del self._relays[seq]
                out.append(Send(asker, GOSSIP, {"v": VERSION, "kind": "nack", "seq": asker_seq}))

    # --- suspicion ------------------------------------------------------------------

    def _suspect_timer(self, member: Member, now: float) -> None:
        current = self._suspicions.get(member.node_id)
        if current is not None and current.generation == member.generation:
            current.confirm(member.by)
            return
        cfg = self.config
        alive = sum(1 for m in self._members.values() if m.state == ALIVE)
        n = len(self._ring)
        min_s = cfg.suspicion_mult * max(1.0, math.log10(max(n, 1))) * cfg.probe_interval_s
        expected = min(CONFIRMATIONS, max(alive - 1, 0))  # others alive, not us
        self._suspicions[member.node_id] = _Suspicion(
            member.generation, member.by or self.me.node_id, now, expected, min_s,
            min_s * cfg.suspicion_max_mult)

    def _suspicion_timers(self, now: float) -> None:
        for node_id, suspicion in sorted(self._suspicions.items()):
            if suspicion.deadline > now:
                continue
            member = self._members[node_id]
            del self._suspicions[node_id]
            if member.state == SUSPECT and member.generation == suspicion.generation:
                self._set(replace(member, state=DEAD, by=self.me.node_id), now)

    # --- gossip out -----------------------------------------------------------------

    def _transmits_max(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(len(self._members) + 1)))

    def _piggyback(self, about: str | None) -> list[dict]:
        """Queued updates; our own entry (a receiver that forgot us learns us
        back); our entry about the receiver when it is not plain alive (a suspect
        hears it at once and can refute)."""
        members, me = self._members, self.me.node_id
        ids = self._broadcasts.take(ENTRIES_MAX, self._transmits_max())
        entries = [members[n].to_wire() for n in ids if n in members]
        if me not in ids:
            entries.append(self.me.to_wire())
        if about is not None and about not in ids:
            known = members.get(about)
            if known is not None and known.state != ALIVE:
                entries.append(known.to_wire())
        return entries

    def _message(self, kind: str, *, seq: int, about: str | None) -> dict:
        return {"v": VERSION, "kind": kind, "seq": seq, "u": self._piggyback(about),
                "ag": self.local_agents}

    def _join_message(self) -> dict:
        """To a seed: here we are, send us your whole list."""
        return {"v": VERSION, "kind": "sync", "u": [self.me.to_wire()], "full": True}

    def _announcement(self) -> dict:
        """Our own entry, to every member at once (a leave, a claim refuted)."""
        return {"v": VERSION, "kind": "sync", "u": [self.me.to_wire()]}

    def _digest_message(self, about: str) -> dict:
        """The first step of a digest exchange: our bucket digest, us, and what we
        hold about the receiver (a member we hold dead hears it and refutes)."""
        entries = [self.me.to_wire()]
        known = self._members.get(about)
        if known is not None and known.state != ALIVE:
            entries.append(known.to_wire())
        return {"v": VERSION, "kind": "sync", "r": 1, "u": entries, "dg": list(self._digest)}

    def _periodic_sync(self) -> list:
        """One random alive member; one member we hold dead (they may only be cut
        off); seeds no alive member answers for (a lone node finds its way back)."""
        if self._left:
            return []
        me = self.me.node_id
        alive = sorted(n for n, m in self._members.items() if n != me and m.state == ALIVE)
        dead = sorted(n for n, m in self._members.items() if m.state == DEAD)
        targets = [self._rng.choice(pool) for pool in (alive, dead) if pool]
        out = [Send(t, GOSSIP, self._digest_message(t)) for t in targets]
        answered = {self._members[n].address for n in alive}
        join = self._join_message()
        out += [Send(seed_id(s), GOSSIP, join) for s in self._seeds if s not in answered]
        if not self._joined and alive:
            # Our seeds may all be down while other members talk to us (a restart):
            # any alive member answers a join as well as a seed does.
            out.append(Send(self._rng.choice(alive), GOSSIP, join))
        return out

    def _reap(self, now: float) -> None:
        """Forget left members, and dead ones once downed, ``dead_reap_s`` after.
        A dead member not downed (this side may not own agents) is kept: forgetting
        it would shrink the reference until a minority counted itself a majority."""
        for node_id, since in sorted(self._since.items()):
            if since + self.config.dead_reap_s <= now and node_id not in self._dead_up:
                del self._since[node_id]
                self._heard.discard(node_id)
                self._index(node_id, None, self._members.pop(node_id))
                self._agents.pop(node_id, None)
                self._broadcasts.discard(node_id)
                self._changed_at = now

    # --- ring and downing -------------------------------------------------------------

    def _sorted_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = sorted(self._members)
        return self._ids

    def stable_s(self) -> float:
        """How long the view must stay unchanged before dead members are downed:
        ``stable_after_s``, and at least one round of probes (every alive member
        probed once, up to ROUND_PROBES_MAX periods).  A node cut off with a minority
        that has not probed some member of the majority yet still counts it alive:
        it must find out (suspect it) before it may decide."""
        others = max(len(self._alive) - 1, 1)  # what our round robin still probes
        rounds = min(others, ROUND_PROBES_MAX) * self._interval()
        return max(self.config.stable_after_s, rounds)

    def _decide(self, now: float) -> None:
        """Apply the downing strategy: may we own agents; may dead members go.

        The reference is the ring (alive, suspect, dead not downed); the reachable
        part is the alive members (suspects count as unreachable)."""
        # An alive member counts once it has spoken to us itself: alive news of
        # members nobody meets (forged ones) can tip no majority.  A suspect or dead
        # member counts whether we met it or not: a node cut off before it met the
        # whole majority must not count itself one.
        counted = self._on_ring - (self._alive - self._heard)
        reference, reachable = len(counted), len(self._alive & self._heard)
        self._counted = (reachable, reference)
        if not self._joined or (self._seeds and len(self._members) == 1):
            quorate = False  # joining (or alone again): a node with seeds does not own alone
        elif self.config.downing == STATIC_QUORUM:
            quorate = reachable >= self.config.quorum_size
        else:
            quorate = (2 * reachable > reference or not counted
                       or (2 * reachable == reference and min(counted) in self._alive))
        self._quorate = quorate
        stable = not self._suspicions and now >= self._changed_at + self.stable_s()
        if quorate and stable and self._dead_up:
            self.stats["downed"] += len(self._dead_up)
            self._on_ring -= self._dead_up
            self._dead_up.clear()
            self._dirty = True

    def _settle(self, now: float, out: list, changed: bool = False) -> list:
        """After any input: decide, and tell the node what changed."""
        due = (self._dead_up and not self._suspicions
               and now >= self._changed_at + self.stable_s())
        if not (self._dirty or due or changed):
            return out
        was_quorate = self._quorate
        self._decide(now)
        if self._dirty or changed:
            self._dirty = False
            self._ring = frozenset(self._on_ring)
            out.insert(0, MembersChanged(self.members, self._ring))
        if self._quorate != was_quorate:
            out.insert(0, QuorumChanged(self._quorate, *self._counted))
        return out
