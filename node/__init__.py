"""The Synthesis node: everything that does I/O.

The public face for behavior authors and client users is re-exported here.
"""

from .agents import Agent, AgentError, behavior, handler
from .client import AsyncClient, CallTimeout, Client, RemoteError

__all__ = ["Agent", "AgentError", "behavior", "handler",
           "Client", "AsyncClient", "RemoteError", "CallTimeout"]
