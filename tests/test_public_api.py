"""The public face of the node package, pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import inspect

import node
from node import AsyncClient, Client

CLIENT_METHODS = {"call", "send", "publish", "spawn", "stop", "join", "leave", "status",
                  "ping", "members", "close", "pipeline", "broadcast"}


def test_node_exports():
    assert sorted(node.__all__) == sorted(["Agent", "AgentError", "behavior", "handler",
                                           "Client", "AsyncClient", "RemoteError",
                                           "CallTimeout"])
    for name in node.__all__:
        assert getattr(node, name) is not None


def test_both_clients_have_the_same_methods():
    for cls in (Client, AsyncClient):
        public = {n for n, _ in inspect.getmembers(cls, callable) if not n.startswith("_")}
        assert public == CLIENT_METHODS, cls
    for name in CLIENT_METHODS:
        sync = inspect.signature(getattr(Client, name))
        asynchronous = inspect.signature(getattr(AsyncClient, name))
        assert list(sync.parameters) == list(asynchronous.parameters), name


def test_call_signature():
    params = inspect.signature(Client.call).parameters
    assert list(params)[:4] == ["self", "agent", "type", "data"]
    assert params["data"].default is None
    assert params["timeout_s"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(Client).parameters["timeout_s"].default == 5.0
    assert inspect.signature(AsyncClient).parameters["timeout_s"].default == 5.0


def test_call_timeout_is_a_timeout_error():
    assert issubclass(node.CallTimeout, TimeoutError)
