"""The Transport interface: how a node talks to clients and to its peers, both ways.

A transport carries opaque bytes: client envelopes, and the peer protocol's frames
(``protocols/peer.py``).  It never decodes an envelope, so a message crosses any
transport unchanged.  The runtime builds transports through the registry
(``node/transports/__init__.py``) and uses nothing this class does not declare.

Inbound traffic reaches the runtime through the ``Inbound`` it is started with:

- ``client(handle, payload, principal)``: a client's request.  ``handle`` is opaque,
  minted by the transport; ``reply(handle, payload)`` answers on the same connection
  (for ZeroMQ it is the ROUTER route, for a stream transport it would be the stream).
  ``principal`` (bytes) names who sent it, for limits per client: the authenticated
  key when the transport authenticates clients (CURVE), else the connection;
- ``peer(frames)``: peer protocol frames, starting at the protocol's magic;
- ``multicast(group, payload)``: an envelope published to a group by a peer;
- ``malformed(handle, nframes)``: a client message of the wrong shape (the runtime
  answers it ``bad_request`` through ``reply``);
- ``failed(handle, payload, exc)``: handling a message raised (a bug); the runtime
  counts it and answers the client, when there is one, ``internal``.

Peers are named by node id.  ``set_peers`` tells the transport each member's
advertised endpoints (one per transport a member serves) and the seeds; links to
anyone else are closed.  A peer name from ``protocols.effects.seed_id(address)``
reaches an address directly: the configured seeds, and (from a separate, small
budget) the rare address a gossip message names that no member has.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, Callable, Mapping, Protocol, Sequence

# Called with (error code, reason) when a send is given up: 'overloaded' when the
# peer's queue is full (retrying later can help), 'unavailable' when the peer
# cannot be reached before the send's deadline.
OnGiveUp = Callable[[str, str], None]


class Inbound(Protocol):
    def client(self, handle: Any, payload: bytes, principal: bytes) -> None: ...

    def peer(self, frames: list[bytes]) -> None: ...

    def multicast(self, group: str, payload: bytes) -> None: ...

    def malformed(self, handle: Any, nframes: int) -> None: ...

    def failed(self, handle: Any, payload: bytes | None, exc: Exception) -> None: ...


# Called with (peer, ok) as sends to a peer succeed (acknowledged or written) or fail
# (given up): the circuit breakers of node/transports/select.py count them.
OnOutcome = Callable[[str, bool], None]


class BridgeHandle:
    """Base of the reply handles a transport other than ZeroMQ mints: it names the
    transport, so replies find their way back through a set of transports."""

    __slots__ = ("transport",)

    def __init__(self, transport: "Transport"):
        self.transport = transport


class Transport(abc.ABC):
    name: str = ""

    def set_outcome(self, on_outcome: OnOutcome | None) -> None:
        """Report each peer send's outcome to ``on_outcome`` (circuit breakers);
        a transport that cannot tell success reports failures only."""
        self._on_outcome = on_outcome

    def _outcome(self, peer: str, ok: bool) -> None:
        report = getattr(self, "_on_outcome", None)
        if report is not None:
            report(peer, ok)

    @abc.abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        """Bind listening sockets and start delivering inbound traffic."""

    @abc.abstractmethod
    def stop(self, linger_ms: int = 0) -> None:
        """Close everything; pending sends are given up (their callers told)."""

    @abc.abstractmethod
    def endpoints(self) -> dict[str, str]:
        """What this node advertises for this transport: name -> endpoint."""

    @abc.abstractmethod
    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        """Every other member's endpoints (node id -> {transport: endpoint}) and the
        seed addresses; links to anyone else are closed."""

    @abc.abstractmethod
    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0, prefer: str | None = None) -> bool:
        """Send peer frames to node ``peer`` now, or queue them (bounded in count and
        time) until its link is up.  False when they could be neither sent nor
        queued; ``on_give_up(code, reason)`` is called, once, for any send that fails.
        ``prefer`` names a transport to try first where there is a choice (a set)."""

    @abc.abstractmethod
    def drop_queued(self, peer: str) -> None:
        """Drop whatever waits to go to ``peer`` (its callers are told); the link is
        made again by the next send.  For a peer that stopped reading."""

    @abc.abstractmethod
    def reply(self, handle: Any, payload: bytes) -> bool:
        """Send ``payload`` to the client behind ``handle``; False if it was dropped."""

    @abc.abstractmethod
    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        """Multicast frames to every subscribed peer (best effort, counted drops)."""

    @abc.abstractmethod
    def retry(self, now: float) -> None:
        """Send what waited for a link; give up on what waited past its deadline."""

    @property
    @abc.abstractmethod
    def has_queued(self) -> bool:
        """True while sends wait in a queue (the runtime then calls ``retry``)."""

    @abc.abstractmethod
    def health(self) -> dict:
        """Numbers for /health and status: peers, queued sends, failures."""
