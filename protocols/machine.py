"""The machine contract every protocol in ``protocols/`` keeps.

A machine is a plain object with three verbs::

    receive(sender, message, now) -> list[Effect]   # sender: a node id
    tick(now)                     -> list[Effect]   # time passed; due work runs
    next_deadline()               -> float | None   # when it wants tick next

and, where it has a first move, ``start(now) -> list[Effect]``.  ``now`` is a number
of seconds on one clock the caller chooses (the node's loop clock, or the
simulator's virtual clock).  A machine never reads a clock, never sleeps, never
touches a socket and never uses an unseeded random: the same inputs give the same
effects, which is what lets the simulator replay any run from its seed.

Effects are frozen dataclasses from ``protocols/effects.py``.  Whoever drives a
machine carries them out through one table (``Effects`` below): an effect type
with no handler is an error, in the node and in the simulator alike, so a
machine cannot ask for something that silently never happens.

Some machines also offer plain synchronous methods for their hot path (routing
decides local/forward/refuse per message without building an effect object):
those return data, never perform I/O, and are documented on the machine.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class Machine(Protocol):
    def receive(self, sender: str, message: Any, now: float) -> list: ...

    def tick(self, now: float) -> list: ...

    def next_deadline(self) -> float | None: ...


class UnhandledEffect(TypeError):
    """A machine returned an effect its driver has no handler for."""


class Effects:
    """One table from effect type to handler; ``run`` carries a list of effects out."""

    def __init__(self, handlers: dict[type, Callable[[Any], None]]):
        self._handlers = dict(handlers)

    def run(self, effects: list) -> None:
        handlers = self._handlers
        for effect in effects:
            handler = handlers.get(type(effect))
            if handler is None:
                raise UnhandledEffect(f"no handler for effect {effect!r}")
            handler(effect)

    def handles(self) -> frozenset[type]:
        return frozenset(self._handlers)
