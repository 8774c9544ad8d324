"""Built-in behaviors that make a fresh node useful: echo, counter, kv.

They double as examples of writing a behavior: a class, ``@behavior`` to
register it, ``@handler`` per message type, ``__slots__`` to stay small.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocols.wire import ErrorCode

from .agents import Agent, AgentError, behavior, handler

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
    """An integer: ``incr``/``decr`` by ``n`` (default 1), ``get``; each replies ``{"value": N}``."""

    __slots__ = ("value",)

    def on_start(self, init: Any) -> None:
        self.value = _int_arg(init, "value", 0)

    @handler("incr")
    def incr(self, data: Any) -> dict:
        self.value = _checked_sum(self.value, _int_arg(data, "n", 1))
        return {"value": self.value}

    @handler("decr")
    def decr(self, data: Any) -> dict:
        self.value = _checked_sum(self.value, -_int_arg(data, "n", 1))
        return {"value": self.value}

    @handler("get")
    def get(self, data: Any) -> dict:
        return {"value": self.value}


@behavior("kv")
class KeyValue(Agent):
    """A small string-keyed map: ``put``, ``get``, ``delete``, ``keys``."""

    __slots__ = ("items", "nbytes")

    def on_start(self, init: Any) -> None:
        self.items = None  # allocated on first write: idle kv agents stay small
        self.nbytes = 0    # msgpack size of every key and value held
        if isinstance(init, dict) and init:
            if len(init) > KV_KEYS_MAX:
                raise AgentError(ErrorCode.BAD_REQUEST,
                                 f"a kv init of {len(init)} keys, over {KV_KEYS_MAX}")
            self.items = dict(init)
            self.nbytes = sum(_size(k, v) for k, v in self.items.items())

    def restore(self, state: Any) -> None:
        """Take a snapshot from the agent's previous owner: its items, checked
        against this node's limits; ``nbytes`` is recomputed, never taken on trust."""
        if not isinstance(state, dict):
            raise ValueError(f"a kv state is a map, got {type(state).__name__}")
        items = state.get("items")
        if items is not None and (not isinstance(items, dict)
                                  or not all(type(key) is str for key in items)):
            raise ValueError("a kv state's items are a map with string keys")
        if items is not None and len(items) > KV_KEYS_MAX:
            raise ValueError(f"a kv state of {len(items)} keys, over {KV_KEYS_MAX}")
        nbytes = sum(_size(k, v) for k, v in items.items()) if items else 0
        if nbytes > KV_BYTES_MAX:
            raise ValueError(f"a kv state of {nbytes} bytes, over {KV_BYTES_MAX}")
        super().restore({"items": items or None})
        self.nbytes = nbytes

    @handler("put")
    def put(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        if self.items is None:
            self.items = {}
        if key not in self.items and len(self.items) >= KV_KEYS_MAX:
            raise AgentError(ErrorCode.OVERLOADED, f"kv agent holds its limit of {KV_KEYS_MAX} keys")
        value = data.get("value")
        grown = _size(key, value) - (_size(key, self.items[key]) if key in self.items else 0)
        if self.nbytes + grown > KV_BYTES_MAX:
            raise AgentError(ErrorCode.OVERLOADED,
                             f"kv agent holds its limit of {KV_BYTES_MAX} bytes")
        self.items[key] = value
        self.nbytes += grown
        return {"ok": True}

    @handler("get")
    def get(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        if self.items is None or key not in self.items:
            return {"found": False, "value": None}
        return {"found": True, "value": self.items[key]}

    @handler("delete")
    def delete(self, data: Any) -> dict:
        key = _str_arg(data, "key")
        if self.items is None or key not in self.items:
            return {"deleted": False}
        self.nbytes -= _size(key, self.items.pop(key))
        return {"deleted": True}

    @handler("keys")
    def keys(self, data: Any) -> dict:
        return {"keys": sorted(self.items or ())}


def _size(key: str, value: Any) -> int:
    """What a kv entry costs, counted as its msgpack bytes (values came off the wire)."""
    return len(msgpack.packb(key)) + len(msgpack.packb(value, use_bin_type=True))
