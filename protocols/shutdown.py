"""The shutdown sequence of a node, as a machine.

Phases, in order; each ends when its work is done or the one deadline
(``begin`` + ``timeout_s``) passes, whichever comes first:

1. ``draining``: new requests are refused ``unavailable``; agents finish what is in
   their mailboxes.
2. ``forwards``: calls this node forwarded for its own clients wait for their
   owners' replies (the router answers whatever is left when this phase ends).
3. ``closing``: queued sends go out or are given up, sockets close.
4. ``closed``.

The node tells the machine what happened (``agents_idle``, ``forwards_settled``) and
calls ``tick`` at ``next_deadline``; each returns the phase the node must now be in
as a ``Phase`` effect, so the order lives here and the waiting (on tasks, on
replies) stays event-driven in the node, with no polling loop.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVING, DRAINING, FORWARDS, CLOSING, CLOSED = "serving", "draining", "forwards", "closing", "closed"
_ORDER = (SERVING, DRAINING, FORWARDS, CLOSING, CLOSED)


@dataclass(frozen=True, slots=True)
class Phase:
    """Enter phase ``name`` (one of the constants above)."""

    name: str


class Shutdown:
    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self.phase = SERVING
        self.deadline: float | None = None

    def begin(self, now: float) -> list:
        if self.phase != SERVING:
            return []
        self.deadline = now + self._timeout_s
        return self._enter(DRAINING)

    def agents_idle(self, now: float) -> list:
        """No agent has work left (or the node stopped waiting for them)."""
        return self._enter(FORWARDS) if self.phase == DRAINING else []

    def forwards_settled(self, now: float) -> list:
        """Every call this node forwarded has been answered."""
        return self._enter(CLOSING) if self.phase == FORWARDS else []

    def closed(self) -> list:
        return self._enter(CLOSED) if self.phase == CLOSING else []

    def next_deadline(self) -> float | None:
        return self.deadline if self.phase in (DRAINING, FORWARDS) else None

    def tick(self, now: float) -> list:
        """Past the deadline the waiting phases end: draining, then forwards."""
        if self.deadline is None or now < self.deadline:
            return []
        if self.phase == DRAINING:
            return self._enter(FORWARDS) + self._enter(CLOSING)
        if self.phase == FORWARDS:
            return self._enter(CLOSING)
        return []

    def receive(self, sender: str, message: object, now: float) -> list:
        raise TypeError("the shutdown sequence receives no peer messages")

    def _enter(self, phase: str) -> list:
        if _ORDER.index(phase) <= _ORDER.index(self.phase):
            return []
        self.phase = phase
        return [Phase(phase)]
