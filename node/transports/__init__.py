"""Transport registry: transports by name.

``register(name, factory)`` adds one; ``create(name, **kwargs)`` builds it.
ZeroMQ ("zmq") is native and the default.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .base import Transport

_REGISTRY: dict[str, Callable[..., Transport]] = {}


def register(name: str, factory: Callable[..., Transport]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"transport {name!r} is already registered")
    _REGISTRY[name] = factory


def create(name: str, **kwargs) -> Transport:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {sorted(_REGISTRY)}") from None
    return factory(**kwargs)


def available() -> list[str]:
    return sorted(_REGISTRY)


def _register_builtin() -> None:
    from .zeromq import ZmqTransport
    register("zmq", ZmqTransport)
    register("http2", _lazy("http2", "Http2Transport"))
    register("quic", _lazy("quic", "QuicTransport"))


def _lazy(module: str, cls: str) -> Callable[..., Transport]:
    """A factory that imports its bridge on first use (aioquic's import is not free)."""
    def factory(**kwargs) -> Transport:
        mod = importlib.import_module(f"{__name__}.{module}")
        return getattr(mod, cls)(**kwargs)
    return factory


def load_modules(names) -> None:
    """Import third-party transport modules (config transport_modules): each calls
    ``register(name, factory)`` when imported."""
    for name in names:
        importlib.import_module(name)


_register_builtin()

__all__ = ["Transport", "register", "create", "available", "load_modules"]
