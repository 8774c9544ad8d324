"""Effects: what a protocol machine asks the node to do.  Plain frozen data.

The machine contract (see ``protocols/machine.py``): a machine takes inputs through
``receive(sender, message, now)`` and ``tick(now)`` and returns a list of these
effects; ``next_deadline()`` says when it wants ``tick`` next.  The node's runtime and
the simulator carry effects out through one table of handlers each, and an effect
neither knows is an error in both.

Peers are named by node id.  Before a seed's node id is known it is named
``seed_id(address)``: the only place an address appears in an effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEED_PREFIX = "seed:"

# Channels of Send: what the message is, so the node frames it for the peer protocol.
GOSSIP = "gossip"
STATUS_QUERY = "status_query"
STATUS_ANSWER = "status_answer"
HANDOFF = "handoff"  # agent state moving to its new owner (protocols/handoff.py)
REPLICATE = "replicate"  # agent state deltas to replicas (protocols/replication.py)


def seed_id(address: str) -> str:
    """The peer name of a seed whose node id is not known yet."""
    return SEED_PREFIX + address


def seed_address(peer: str) -> str | None:
    """The address inside a ``seed_id``, or None for a real node id."""
    return peer[len(SEED_PREFIX):] if peer.startswith(SEED_PREFIX) else None


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` on ``channel`` to the peer node ``to`` (a node id)."""

    to: str
    channel: str
    message: Any


@dataclass(frozen=True, slots=True)
class MembersChanged:
    """The member view changed: ``members`` maps node id -> Member (every state);
    ``ring`` is the set of node ids that own agents (None: every member)."""

    members: dict
    ring: frozenset | None = None

    @property
    def ring_ids(self) -> frozenset:
        return frozenset(self.members) if self.ring is None else self.ring


@dataclass(frozen=True, slots=True)
class QuorumChanged:
    """The downing strategy now lets this node own agents (``quorate``) or not:
    ``reachable`` alive members of ``reference`` that count."""

    quorate: bool
    reachable: int
    reference: int


@dataclass(frozen=True, slots=True)
class Refuted:
    """Someone claimed our node id (at ``claimed_address`` with ``claimed_generation``);
    we took ``generation`` and told every member.  The node logs it loudly."""

    claimed_address: str
    claimed_generation: int
    generation: int


@dataclass(frozen=True, slots=True)
class Answer:
    """Reply ``data`` to the request ``request_id`` of the caller behind ``handle``."""

    handle: Any
    request_id: str
    data: Any


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the request ``request_id`` behind ``handle`` with an error."""

    handle: Any
    request_id: str
    code: str
    message: str
    mtype: str = ""


@dataclass(frozen=True, slots=True)
class Unresponsive:
    """Forwards to ``node_id`` went unanswered past their deadline: whatever still
    waits on the way to it (in a transport's queues) can be dropped."""

    node_id: str


@dataclass(frozen=True, slots=True)
class Surrender:
    """Take the agent ``agent_id`` out of this node's host and hand its state to the
    peer ``to`` (``Handoff.send_state``), or tell ``to`` there is none
    (``Handoff.none``).  An agent busy right now stays; the peer asks again."""

    agent_id: str
    to: str


@dataclass(frozen=True, slots=True)
class Install:
    """Activate ``agent_id`` here with ``behavior`` and restore ``state`` into it
    (``behavior`` None: activate it the usual way, fresh; ``state`` None: no state
    to restore), join it to ``groups``, then deliver the ``held`` requests to it in
    order.  If the agent is already active here, keep that one (and count it)."""

    agent_id: str
    behavior: str | None
    state: bytes | None
    groups: tuple
    held: tuple


@dataclass(frozen=True, slots=True)
class Restore:
    """The states of ``agent_id`` held by its other replicas have been gathered into
    this node's record (``Replication.gather``): activate it from the record (or
    fresh, when ``behavior`` is None: no replica had it), then deliver the ``held``
    requests in order."""

    agent_id: str
    behavior: str | None
    held: tuple


@dataclass(frozen=True, slots=True)
class WriteDone:
    """A write's consistency is met (``ok``) or its deadline passed first: release the
    reply held in ``handle`` (on a timeout, answer ``timeout``: the write is on the
    owner and ``acks`` replicas, it needed ``needed``)."""

    handle: Any
    ok: bool
    acks: int
    needed: int


@dataclass(frozen=True, slots=True)
class Activate:
    """This node owns ``agent_id`` now and holds a replica of it: wake it (failover,
    paced at ``failover_rate`` agents per second so a node loss does not wake tens of
    thousands of agents at once)."""

    agent_id: str


@dataclass(frozen=True, slots=True)
class Persist:
    """Keep ``fields`` (``encode_fields`` form: a delta or a copy to join) of the
    agent's record in local storage; ``handle`` (or None) is released by a
    ``WriteDone`` only once it is durable (the node's business)."""

    agent_id: str
    behavior: str
    fields: Any


@dataclass(frozen=True, slots=True)
class GroupDeliver:
    """A gossiped broadcast reached this node (``protocols/epidemic.py``, once per
    message id): hand ``envelope`` (the application's bytes, untouched) to every
    local member of ``group``."""

    group: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Forget:
    """This node holds no copy of ``agent_id`` any more: drop it from local storage."""

    agent_id: str


@dataclass(frozen=True, slots=True)
class Relay:
    """Send ``payload`` (an encoded reply or error envelope) to the caller behind
    ``reply_to``, unchanged (protocols/strategies.py)."""

    reply_to: Any
    payload: bytes


@dataclass(frozen=True, slots=True)
class Route:
    """Route ``request`` (encoded as ``payload``) as if it had just arrived, its
    answer going to ``reply_to``: a pipeline's next stage, one agent of a scatter."""

    request: Any
    payload: bytes
    reply_to: Any
    hops: int


@dataclass(frozen=True, slots=True)
class ForwardTo:
    """Forward ``request`` (``payload``) to the node ``owner`` (it owns the agents
    it names), its answer going to ``reply_to``: one part of a scatter."""

    owner: str
    request: Any
    payload: bytes
    reply_to: Any
    hops: int
