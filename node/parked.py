"""Replies waiting for their origin to become a member.

A forwarded request names the entry node's id (its ``origin``), and the reply goes
back over the link to that member.  The node dials members only, so a FWD
naming a made-up origin cannot make it open links; but an origin that joined a
moment ago may forward to us before gossip has told us about it.  Its replies wait
here, bounded in count, bytes and time, and leave as soon as a member view names
the origin; the rest are dropped and counted.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

PARKED_MAX = 1024             # replies held at once
PARKED_BYTES_MAX = 16 << 20   # bytes of replies held at once
PARKED_WAIT_S = 2.0           # how long a reply waits for its origin to be a member


class ParkedReplies:
    def __init__(self, metrics, count_max: int = PARKED_MAX, bytes_max: int = PARKED_BYTES_MAX,
                 wait_s: float = PARKED_WAIT_S):
        self._metrics = metrics
        self._count_max = count_max
        self._bytes_max = bytes_max
        self._wait_s = wait_s
        self._queue: deque[tuple[float, str, list, int]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._queue)

    def park(self, origin: str, frames: list, now: float) -> bool:
        """Hold a reply for ``origin``; False (counted) if the bounds say no."""
        size = sum(len(f) for f in frames)
        if len(self._queue) >= self._count_max or self._bytes + size > self._bytes_max:
            self._metrics.limited("reply_to_stranger_dropped")
            return False
        self._queue.append((now + self._wait_s, origin, frames, size))
        self._bytes += size
        return True

    def flush(self, members: set[str], send: Callable[[str, list], None]) -> None:
        """Send every held reply whose origin is now a member."""
        if not self._queue:
            return
        keep: deque = deque()
        for item in self._queue:
            if item[1] in members:
                self._bytes -= item[3]
                send(item[1], item[2])
            else:
                keep.append(item)
        self._queue = keep

    def expire(self, now: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= now:
            self._bytes -= queue.popleft()[3]
            self._metrics.limited("reply_to_stranger_dropped")
