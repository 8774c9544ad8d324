"""A deterministic simulator: many protocol machines in one process, virtual time.

The simulator plays the node runtime for pure machines (see ``protocols/``):
it feeds them virtual time and messages, and carries out their effects.

- ``Send(address, message)`` goes through a seeded, faulty network that can
  drop, duplicate, delay (and so reorder) messages, and that can be split into
  partitions and healed.  Messages are round-tripped through msgpack by
  default, as on the real wire, so a machine never shares objects with a peer.
- ``SetTimer(at)`` schedules a call to the machine's ``tick(now)`` at ``at``
  (every timer is honoured; identical pending timers are merged).
- Every other effect (``MembersChanged`` and future ones) is recorded in
  ``effects_log`` as ``(time, address, effect)``; ``MembersChanged`` is also
  kept in ``changes``.

A machine is any object with ``receive(message, now) -> effects`` and
``tick(now) -> effects``, and optionally ``start(now) -> effects``.

Everything is driven by one ``random.Random(seed)``: a run replays exactly from
its seed.  Pure: no sockets, no asyncio, no clocks, no module-level random.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack

from .effects import MembersChanged, Send, SetTimer

_TIMER = 0
_MESSAGE = 1
_START = 2


@dataclass
class NetworkConfig:
    """Faults of the simulated network.  Probabilities are per message."""

    drop_rate: float = 0.0        # a sent message is lost
    dup_rate: float = 0.0         # a sent message arrives twice (independent delays)
    delay_min_s: float = 0.001    # one-way latency, uniform in [min, max]:
    delay_max_s: float = 0.010    #   different delays reorder messages

    def __post_init__(self) -> None:
        if not (0.0 <= self.drop_rate <= 1.0 and 0.0 <= self.dup_rate <= 1.0):
            raise ValueError("drop_rate and dup_rate are probabilities in [0, 1]")
        if not 0.0 <= self.delay_min_s <= self.delay_max_s:
            raise ValueError("need 0 <= delay_min_s <= delay_max_s")


@dataclass
class SimStats:
    sent: int = 0          # Send effects carried out
    delivered: int = 0     # receive() calls
    dropped: int = 0       # lost to drop_rate
    duplicated: int = 0    # extra copies made
    partitioned: int = 0   # lost to a partition
    undeliverable: int = 0  # no node at that address (not added yet, or crashed)
    timers: int = 0        # tick() calls
    errors: int = 0        # exceptions raised by a machine's receive()


@dataclass
class _Node:
    address: str
    machine: Any
    up: bool = True
    timers: set = field(default_factory=set)


class Simulator:
    """Runs machines against a virtual clock and a seeded faulty network."""

    def __init__(self, seed: int, network: NetworkConfig | None = None, *,
                 wire_roundtrip: bool = True, strict: bool = True):
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = network or NetworkConfig()
        self.now = 0.0
        self.stats = SimStats()
        self.changes: list[tuple[float, str, MembersChanged]] = []
        self.effects_log: list[tuple[float, str, Any]] = []
        self.errors: list[tuple[float, str, Exception]] = []
        self._strict = strict
        self._roundtrip = wire_roundtrip
        self._nodes: dict[str, _Node] = {}
        self._queue: list[tuple] = []
        self._seq = 0
        self._group_of: dict[str, int] | None = None  # address -> partition group
        self._observers: list[Callable[["Simulator", str, list], None]] = []

    # -- topology ---------------------------------------------------------
    def add(self, address: str, machine: Any, start_at: float | None = None) -> None:
        """Add a machine reachable at ``address``; ``start(now)`` runs at ``start_at``
        (default: now) when the machine has one."""
        if address in self._nodes:
            raise ValueError(f"address {address!r} already in the simulation")
        self._nodes[address] = _Node(address, machine)
        if hasattr(machine, "start"):
            at = self.now if start_at is None else max(start_at, self.now)
            self._push(at, _START, address, None)

    def machine(self, address: str) -> Any:
        return self._nodes[address].machine

    @property
    def addresses(self) -> list[str]:
        return list(self._nodes)

    def up_addresses(self) -> list[str]:
        return [a for a, n in self._nodes.items() if n.up]

    def crash(self, address: str) -> None:
        """Stop a node: it gets no messages and no timers until ``restart``."""
        node = self._nodes[address]
        node.up = False
        node.timers.clear()

    def restart(self, address: str, machine: Any) -> None:
        """Put a fresh machine (e.g. a higher generation) at a crashed node's address."""
        node = self._nodes[address]
        node.machine, node.up = machine, True
        node.timers.clear()
        if hasattr(machine, "start"):
            self._push(self.now, _START, address, None)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: messages flow only inside a group.  Addresses left out
        of every group form one more group together."""
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for address in group:
                if address in group_of:
                    raise ValueError(f"{address!r} is in two partition groups")
                group_of[address] = index
        self._group_of = group_of

    def heal(self) -> None:
        self._group_of = None

    def connected(self, a: str, b: str) -> bool:
        if self._group_of is None:
            return True
        return self._group_of.get(a, -1) == self._group_of.get(b, -1)

    def observe(self, callback: Callable[["Simulator", str, list], None]) -> None:
        """``callback(sim, address, effects)`` after every step that ran a machine:
        the place to check invariants."""
        self._observers.append(callback)

    # -- running ------------------------------------------------------------
    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> bool:
        """Run the next event (advancing virtual time to it).  False when idle."""
        if not self._queue:
            return False
        at, _, kind, address, payload = heapq.heappop(self._queue)
        self.now = max(self.now, at)
        node = self._nodes.get(address)
        if kind == _TIMER:
            if node is None or at not in node.timers:
                return True  # cancelled by a crash/restart
            node.timers.discard(at)
            self.stats.timers += 1
            effects = node.machine.tick(self.now)
        elif kind == _START:
            if node is None or not node.up:
                return True
            effects = node.machine.start(self.now)
        else:
            sender, message = payload
            if node is None or not node.up:
                self.stats.undeliverable += 1
                return True
            if not self.connected(sender, address):
                self.stats.partitioned += 1
                return True
            self.stats.delivered += 1
            try:
                effects = node.machine.receive(message, self.now)
            except Exception as exc:  # a remote protocol error: the runtime logs it
                self.stats.errors += 1
                self.errors.append((self.now, address, exc))
                if self._strict:
                    raise
                effects = []
        self._apply(address, effects)
        for callback in self._observers:
            callback(self, address, effects)
        return True

    def run_until(self, t: float, stop: Callable[["Simulator"], bool] | None = None,
                  max_steps: int | None = None) -> bool:
        """Run every event due at or before ``t``; the clock ends at ``t``.

        ``stop(sim)`` is checked after each step; returns True when it ended the
        run early.  ``max_steps`` bounds the work (ValueError when exceeded).
        """
        steps = 0
        while self._queue and self._queue[0][0] <= t:
            self.step()
            steps += 1
            if stop is not None and stop(self):
                return True
            if max_steps is not None and steps >= max_steps:
                raise ValueError(f"more than {max_steps} steps before t={t} (seed {self.seed})")
        self.now = max(self.now, t)
        return False

    def run_for(self, duration_s: float, **kwargs: Any) -> bool:
        return self.run_until(self.now + duration_s, **kwargs)

    # -- effects ------------------------------------------------------------
    def _push(self, at: float, kind: int, address: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, address, payload))

    def _apply(self, address: str, effects: list) -> None:
        node = self._nodes[address]
        for effect in effects:
            if isinstance(effect, Send):
                self._send(address, effect.address, effect.message)
            elif isinstance(effect, SetTimer):
                at = max(effect.at, self.now)
                if at not in node.timers:
                    node.timers.add(at)
                    self._push(at, _TIMER, address, None)
            else:
                if isinstance(effect, MembersChanged):
                    self.changes.append((self.now, address, effect))
                self.effects_log.append((self.now, address, effect))

    def _send(self, sender: str, to: str, message: Any) -> None:
        self.stats.sent += 1
        rng, net = self.rng, self.net
        if rng.random() < net.drop_rate:
            self.stats.dropped += 1
            return
        copies = 1
        if rng.random() < net.dup_rate:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            delivered = msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False) \
                if self._roundtrip else message
            delay = rng.uniform(net.delay_min_s, net.delay_max_s)
            self._push(self.now + delay, _MESSAGE, to, (sender, delivered))
