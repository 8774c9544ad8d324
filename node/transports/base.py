"""The Transport interface: how a node reaches its peers.

A transport carries opaque frames (the peer protocol of docs/PROTOCOL.md) to a
peer named by its advertised address; it never decodes envelopes, so a message
crosses any transport unchanged.  ZeroMQ is native; QUIC and HTTP/2 bridges
implement the same interface in later work.
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

# Called with (error code, reason) when a send is given up: 'overloaded' when the
# peer's queue is full (retrying later can help), 'unavailable' when the peer
# cannot be reached before the send's deadline.
OnGiveUp = Callable[[str, str], None]


class Transport(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Bind listening sockets."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Close everything; pending sends are given up."""

    @abc.abstractmethod
    def send(self, address: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0) -> bool:
        """Send frames to the peer at ``address``.

        Returns False when the frames could neither be sent nor queued (no
        link can be made, or the bounded queue is full).  A queued send that
        cannot go out before its deadline is counted as failed and
        ``on_give_up(code, reason)`` is called when given.
        """

    @abc.abstractmethod
    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        """Multicast frames to every subscribed peer (best effort)."""

    @abc.abstractmethod
    def health(self) -> dict:
        """Numbers for /health and status: peers, queued sends, failures."""
