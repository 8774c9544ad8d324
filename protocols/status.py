"""Cluster status: one ``syn.status`` request gathered from every member, with a deadline.

The entry node asks every other member for its status (``Send`` on the
``status_query`` channel with a token) and answers the caller once every member
has answered or ``timeout_s`` has passed, whichever is first; a member that did not
answer in time is listed ``reachable: false``.  At most ``waits_max`` collections
run at once (more answer ``overloaded``); a collection's slot is always freed, by
its last answer or by its deadline.

A member answering a query sends its own status back on ``status_answer`` with the
same token; the node does that directly (it is one local read), not through here.
"""

from __future__ import annotations

from typing import Any

from .effects import STATUS_QUERY, Answer, Fail, Send
from .wire import ErrorCode, TYPE_STATUS

WAITS_MAX = 256
TOKEN_LEN_MAX = 32


class StatusError(Exception):
    """A status answer that breaks the protocol (remote error)."""


class _Wait:
    __slots__ = ("token", "handle", "request_id", "deadline", "results", "expected", "members")

    def __init__(self, token: str, handle: Any, request_id: str, deadline: float,
                 results: dict, expected: set, members: dict):
        self.token = token
        self.handle = handle
        self.request_id = request_id
        self.deadline = deadline
        self.results = results
        self.expected = expected
        self.members = members  # node id -> address, as the view was at the start


class StatusCollector:
    """Status collections of one node (see the module docstring)."""

    def __init__(self, node_id: str, timeout_s: float, waits_max: int = WAITS_MAX,
                 key: bytes = b""):
        self.node_id = node_id
        # Tokens are the node's random key (given, hex) and a counter: a peer cannot
        # guess one to slip a made-up status row into a collection.
        self._prefix = key[:8].hex()
        self._timeout_s = timeout_s
        self._waits_max = waits_max
        self._waits: dict[str, _Wait] = {}
        self._serial = 0

    @property
    def in_flight(self) -> int:
        return len(self._waits)

    def start(self, handle: Any, request_id: str, local_status: dict,
              members: dict[str, str], now: float) -> list:
        """Begin a collection for the caller behind ``handle``.

        ``members`` maps node id -> address for every member (this node included).
        """
        if len(self._waits) >= self._waits_max:
            return [Fail(handle, request_id, ErrorCode.OVERLOADED,
                         "too many status requests in flight", TYPE_STATUS)]
        self._serial += 1
        token = f"{self._prefix}{self._serial}"[:TOKEN_LEN_MAX]
        others = {n for n in members if n != self.node_id}
        wait = _Wait(token, handle, request_id, now + self._timeout_s,
                     {self.node_id: local_status}, others, dict(members))
        if not others:
            return [self._finish(wait)]
        self._waits[token] = wait
        return [Send(n, STATUS_QUERY, token) for n in sorted(others)]

    def receive(self, sender: str, message: Any, now: float) -> list:
        """A member's answer: ``message`` is ``{"token": str, "status": map}``."""
        if not isinstance(message, dict):
            raise StatusError("a status answer is a map")
        token, status = message.get("token"), message.get("status")
        if type(token) is not str or len(token) > TOKEN_LEN_MAX or not isinstance(status, dict):
            raise StatusError("a status answer needs 'token' (str) and 'status' (map)")
        wait = self._waits.get(token)
        if wait is None:
            return []  # answered after the deadline, or never asked
        if status.get("node") != sender or sender not in wait.members:
            raise StatusError(f"status from {sender!r:.40} was not asked for")
        if sender not in wait.expected:
            return []  # a repeated answer (the network duplicated it): nothing new
        wait.results[sender] = status
        wait.expected.discard(sender)
        if wait.expected:
            return []
        del self._waits[token]
        return [self._finish(wait)]

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waits.values()), default=None)

    def tick(self, now: float) -> list:
        late = [w for w in self._waits.values() if w.deadline <= now]
        for wait in late:
            del self._waits[wait.token]
        return [self._finish(w) for w in late]

    def stop(self) -> list:
        """Shutting down: answer every collection with what it has."""
        waits = list(self._waits.values())
        self._waits.clear()
        return [self._finish(w) for w in waits]

    def _finish(self, wait: _Wait) -> Answer:
        rows = []
        for node_id in sorted(wait.members):
            row = wait.results.get(node_id)
            if row is None:
                row = {"node": node_id, "address": wait.members[node_id], "reachable": False}
            rows.append(row)
        return Answer(wait.handle, wait.request_id, {"node": self.node_id, "members": rows})
