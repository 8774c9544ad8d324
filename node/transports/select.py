"""Several transports as one: per-peer selection, fallback, circuit breakers.

The node talks to one ``Transport``; with bridges configured (QUIC, HTTP/2, or a
registered third-party transport) that is a ``TransportSet`` over all of them.

- **Selection.** A peer's transport order comes from ``transport_policy``: the first
  rule ``LABEL=VALUE:T1/T2`` whose label the peer advertises wins; else a peer
  labelled ``transport=T`` gets T first; else ``transport_order``.  Only transports
  this node runs and the peer advertises an endpoint for are tried (ZeroMQ always
  counts: every member has it).  A message may name its transport (``prefer``),
  which then goes first.
- **Fallback.** A send given up on one transport (``on_give_up``) is tried on the
  next in the order at once; the caller hears of a give-up only when every one
  failed.
- **Circuit breakers** (``protocols/breaker.py``), one per (peer, transport): an
  open one is skipped without spending time on it.  Outcomes come from the
  transports (``set_outcome``); a transport that only reports failures gets a
  success counted when it takes a send.
- **Replies** go back through the transport that minted the handle: ZeroMQ's are
  tuples of frames, every other one's a ``BridgeHandle`` naming its transport.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from protocols.breaker import STATE_CODES, Breaker
from protocols.membership import ZMQ

from .base import Inbound, OnGiveUp, Transport

LABELS_ENDPOINT = "labels"     # a member's labels, advertised beside its endpoints
BREAKERS_MAX = 8192            # (peer, transport) breakers kept; the oldest go first


def parse_labels(text: str | None) -> dict[str, str]:
    """``"zone=eu,dc=fra1"`` -> {"zone": "eu", "dc": "fra1"} (junk pairs skipped)."""
    labels = {}
    for pair in (text or "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key and value:
            labels[key] = value
    return labels


class Policy:
    """Which transports to try for a peer, in order (see the module docstring)."""

    def __init__(self, order: Sequence[str], rules: Sequence[str]):
        self.order = tuple(order)
        self.rules: list[tuple[str, str, tuple[str, ...]]] = []
        for rule in rules:
            label, _, names = rule.partition(":")
            key, _, value = label.partition("=")
            self.rules.append((key, value, tuple(names.split("/"))))

    def chain(self, labels: Mapping[str, str], prefer: str | None = None) -> list[str]:
        order = self.order
        for key, value, names in self.rules:
            if labels.get(key) == value:
                order = names
                break
        else:
            wanted = labels.get("transport")
            if wanted:
                order = (wanted, *order)
        if prefer:
            order = (prefer, *order)
        return list(dict.fromkeys(order))


class TransportSet(Transport):
    name = "set"

    def __init__(self, transports: Sequence[Transport], policy: Policy, *, labels: str = "",
                 breaker_failures: int = 5, breaker_open_s: float = 5.0, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        self._all = {t.name: t for t in transports}
        self._native = self._all[ZMQ]
        self._policy = policy
        self._labels = labels
        self._breaker_args = {"failures_max": breaker_failures, "open_s": breaker_open_s}
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._peers: dict[str, Mapping[str, str]] = {}
        self._metrics = metrics
        self._clock = clock  # the node's loop clock: outcomes come with no time of their own
        self.stats = {name: {"messages": 0, "bytes": 0, "errors": 0, "fallbacks": 0,
                             "skipped_open": 0} for name in self._all}

    # Lifecycle ----------------------------------------------------------------------

    def start(self, loop, inbound: Inbound) -> None:
        for name, transport in self._all.items():
            transport.set_outcome(lambda peer, ok, seconds=None, name=name:
                                  self._record(peer, name, ok, seconds))
            transport.start(loop, inbound)

    def stop(self, linger_ms: int = 0) -> None:
        for transport in self._all.values():
            transport.stop(linger_ms)

    def endpoints(self) -> dict[str, str]:
        endpoints: dict[str, str] = {}
        for transport in self._all.values():
            endpoints.update(transport.endpoints())
        if self._labels:
            endpoints[LABELS_ENDPOINT] = self._labels
        return endpoints

    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        self._peers = dict(peers)
        for transport in self._all.values():
            transport.set_peers(peers, seeds)

    # Sending --------------------------------------------------------------------------

    def chain(self, peer: str, prefer: str | None = None) -> list[str]:
        """The transports to try for ``peer``, in order."""
        endpoints = self._peers.get(peer)
        if endpoints is None:  # a seed or a stranger: only ZeroMQ dials an address
            return [ZMQ]
        names = self._policy.chain(parse_labels(endpoints.get(LABELS_ENDPOINT)), prefer)
        usable = [n for n in names if n in self._all and (n == ZMQ or n in endpoints)]
        if ZMQ not in usable:
            usable.append(ZMQ)  # the native transport is the last resort
        return usable

    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0, prefer: str | None = None) -> bool:
        return self._attempt(peer, frames, on_give_up, now, self.chain(peer, prefer), 0,
                             ("unavailable", f"no transport reaches {peer!r}"))

    def _attempt(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None,
                 now: float, chain: list[str], i: int, last: tuple[str, str]) -> bool:
        """Send over the first transport of ``chain[i:]`` whose breaker allows it; its
        give-up (now or later) moves on to the next.  The caller's ``on_give_up``
        hears only the last failure, once every transport failed."""
        while i < len(chain):
            name = chain[i]
            i += 1
            if not self._breaker(peer, name).allow(now):
                self.stats[name]["skipped_open"] += 1
                continue
            stats = self.stats[name]
            stats["messages"] += 1
            stats["bytes"] += sum(len(f) for f in frames)
            stats["fallbacks"] += i > 1
            rest: list[bool] = []  # what the rest of the chain made of a give-up

            def give_up(code: str, reason: str, name: str = name, after: int = i,
                        rest: list[bool] = rest) -> None:
                self.stats[name]["errors"] += 1
                self._record(peer, name, False, None)
                rest.append(self._attempt(peer, frames, on_give_up, now, chain, after,
                                          (code, reason)))

            transport = self._all[name]
            if transport.send(peer, frames, give_up, now):
                if not getattr(transport, "acks", False):  # it reports failures only
                    self._record(peer, name, True, None, now)
                return True
            return bool(rest and rest[0])  # refused at once: the rest was tried inside
        if on_give_up is not None:
            on_give_up(*last)
        return False

    def drop_queued(self, peer: str) -> None:
        for transport in self._all.values():
            transport.drop_queued(peer)

    def reply(self, handle: Any, payload: bytes) -> bool:
        if type(handle) is tuple:
            return self._native.reply(handle, payload)
        return handle.transport.reply(handle, payload)

    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        self._native.broadcast(topic, frames)

    def retry(self, now: float) -> None:
        for transport in self._all.values():
            transport.retry(now)

    @property
    def has_queued(self) -> bool:
        return any(t.has_queued for t in self._all.values())

    # Breakers and health ------------------------------------------------------------

    def _breaker(self, peer: str, name: str) -> Breaker:
        key = (peer, name)
        breaker = self._breakers.get(key)
        if breaker is None:
            if len(self._breakers) >= BREAKERS_MAX:
                del self._breakers[next(iter(self._breakers))]
            breaker = self._breakers[key] = Breaker(**self._breaker_args)
        return breaker

    def _record(self, peer: str, name: str, ok: bool, seconds: float | None,
                now: float | None = None) -> None:
        self._breaker(peer, name).record(ok, self._clock() if now is None else now)
        if seconds is not None and self._metrics is not None:
            self._metrics.transport_latency(name, seconds)

    def breakers(self) -> list[dict]:
        """Every breaker that is not closed, for status and metrics."""
        return [{"peer": peer, "transport": name, "state": b.state, "opened": b.opened,
                 "rejected": b.rejected}
                for (peer, name), b in list(self._breakers.items()) if b.state != "closed"]

    def breaker_states(self) -> dict[tuple[str, str], int]:
        return {key: STATE_CODES[b.state] for key, b in list(self._breakers.items())}

    def health(self) -> dict:
        health = {name: t.health() for name, t in self._all.items()}
        health["breakers_open"] = len(self.breakers())
        return health
