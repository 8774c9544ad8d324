"""Built-in behaviors that make a fresh node useful: echo, counter, kv.

They double as examples of writing a behavior: a class, ``@behavior`` to
register it, ``@handler`` per message type, ``__slots__`` to stay small.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocols.wire import ErrorCode

from protocols.crdt import LWWMap, PNCounter

from .agents import Agent, AgentError, behavior, handler, replicated

KV_KEYS_MAX = 10_000  # a kv agent is a small map, not a database
KV_BYTES_MAX = 16 << 20  # keys and values, as msgpack bytes
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # what every msgpack client can decode


def _int_arg(data: Any, key: str, default: int) -> int:
    if data is None:
        return default
    if not isinstance(data, dict):
        raise AgentError(ErrorCode.BAD_REQUEST, f"data must be a map, got {type(data).__name__}")
    value = data.get(key, default)
    if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
        raise AgentError(ErrorCode.BAD_REQUEST, f"{key!r} must be a 64-bit signed integer")
    return value


def _checked_sum(value: int, delta: int) -> int:
    """value + delta, refused (state unchanged) if it leaves the int64 range."""
    total = value + delta
    if not INT64_MIN <= total <= INT64_MAX:
        raise AgentError(ErrorCode.BAD_REQUEST, "counter would leave the 64-bit signed range")
    return total


def _str_arg(data: Any, key: str) -> str:
    if not isinstance(data, dict) or type(data.get(key)) is not str:
        raise AgentError(ErrorCode.BAD_REQUEST, f"data must be a map with a string {key!r}")
    return data[key]


@behavior("echo")
class Echo(Agent):
    """Replies with the data it got, whatever the message type."""

    __slots__ = ()

    @handler("*")
    def echo(self, data: Any) -> Any:
        return data


@behavior("counter")
class Counter(Agent):
    """An integer: ``incr``/``decr`` by ``n`` (default 1), ``get``; each replies ``{"value": N}``.

    Its value is a replicated PN-Counter: increments land on the agent's replicas
    and survive the loss of its owner (docs/STATE.md).
    """

    __slots__ = ()
    count = replicated(PNCounter)

    def on_start(self, init: Any) -> None:
        start = _int_arg(init, "value", 0)
        if start and "count" not in self._fields:  # a spawn, not a restart or failover
            self.count.increment(start)

    @handler("incr")
    def incr(self, data: Any) -> dict:
        return {"value": self._add(_int_arg(data, "n", 1))}

    @handler("decr")
    def decr(self, data: Any) -> dict:
        return {"value": self._add(-_int_arg(data, "n", 1))}

    @handler("get")
    def get(self, data: Any) -> dict:
        return {"value": self.count.value()}

    def _add(self, delta: int) -> int:
        total = _checked_sum(self.count.value(), delta)
        if delta > 0:
            self.count.increment(delta)
        elif delta < 0:
            self.count.decrement(-delta)
        return total


@behavior("kv")
class KeyValue(Agent):
    """A small string-keyed map: ``put``, ``get``, ``delete``, ``keys``.

    The map is a replicated LWW-Map: the latest write to a key wins on every
    replica, and the map survives the loss of its owner (docs/STATE.md).
    """

    __slots__ = ("nbytes",)
    items = replicated(LWWMap)

    def on_start(self, init: Any) -> None:
        if isinstance(init, dict) and init and "items" not in self._fields:
            if len(init) > KV_KEYS_MAX:
                raise AgentError(ErrorCode.BAD_REQUEST,
                                 f"a kv init of {len(init)} keys, over {KV_KEYS_MAX}")
            for key, value in init.items():
                self.items.set(_str_key(key), value)
        # Counted once here, then kept up to date by put/delete (the map may have
        # come from replicas: a count is never taken on trust from a peer).
        self.nbytes = sum(_size(k, v) for k, v in self.items.value().items()) \
            if "items" in self._fields else 0

    def restore(self, state: Any) -> None:
        """A handoff brings the map in the replicated fields; the byte count is
        recomputed here, never taken from the previous owner."""
        self.nbytes = sum(_size(k, v) for k, v in self.items.value().items()) \
            if "items" in self._fields else 0

    @handler("put")
    def put(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        items = self.items
        old = items.get(key, _MISSING)
        if old is _MISSING and len(items) >= KV_KEYS_MAX:
            raise AgentError(ErrorCode.OVERLOADED, f"kv agent holds its limit of {KV_KEYS_MAX} keys")
        value = data.get("value")
        grown = _size(key, value) - (_size(key, old) if old is not _MISSING else 0)
        if self.nbytes + grown > KV_BYTES_MAX:
            raise AgentError(ErrorCode.OVERLOADED,
                             f"kv agent holds its limit of {KV_BYTES_MAX} bytes")
        items.set(key, value)
        self.nbytes += grown
        return {"ok": True}

    @handler("get")
    def get(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        value = self.items.get(key, _MISSING)
        if value is _MISSING:
            return {"found": False, "value": None}
        return {"found": True, "value": value}

    @handler("delete")
    def delete(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        old = self.items.get(key, _MISSING)
        if old is _MISSING:
            return {"deleted": False}
        self.items.delete(key)
        self.nbytes -= _size(key, old)
        return {"deleted": True}

    @handler("keys")
    def keys(self, data: Any) -> dict:
        return {"keys": sorted(self.items.keys())}


_MISSING = object()


def _str_key(key: Any) -> str:
    if type(key) is not str:
        raise AgentError(ErrorCode.BAD_REQUEST, "kv keys are strings")
    return key


def _size(key: str, value: Any) -> int:
    """What a kv entry costs, counted as its msgpack bytes (values came off the wire)."""
    return len(msgpack.packb(key)) + len(msgpack.packb(value, use_bin_type=True))
