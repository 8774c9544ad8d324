"""Admission: limits per client, so that one client cannot starve the others.

A client is a *principal*: the bytes the transport names a request's sender with
(the connection today, the authenticated key once CURVE is on; this module never
looks inside them).  Each principal gets

- a token bucket: on average ``rate`` requests per second, up to ``burst`` at once
  (a new principal starts with a full bucket).  Over any window of ``t`` seconds a
  principal is admitted at most ``burst + rate * t`` requests;
- an in-flight count: requests admitted and not yet ``done``, at most
  ``inflight_max``.  The node calls ``done`` when a call is answered (or its answer
  dropped) and when a one-way request has been taken in.

``admit(principal, now)`` is the hot path: it returns None (admitted: the caller
owes one ``done``) or a ``Refused(reason, retry_after_s)``; ``rate`` 0 and
``inflight_max`` 0 mean unlimited.  A refused request costs no token and counts
nothing in flight.  The retry hint is exact for the rate (the time until the next
token); for the other refusals it is nominal (``BUSY_RETRY_S``): they end when the
client's own calls are answered.

Like the other machines this is pure (``now`` is passed in, on whatever clock the
caller uses) and returns data.  It has no timers and receives no messages, so it
offers only the synchronous verbs (``protocols/machine.py``, last paragraph).

Bounded: at most ``tracked_max`` principals are remembered.  An entry with nothing
in flight and a full bucket is the same as no entry, so forgetting it loses
nothing; when the table is full, a new principal takes the place of such an entry
among the ``EVICT_LOOKS`` oldest (entries looked at and kept go to the back).  If
none of those is idle, the first with nothing in flight is forgotten anyway (its
bucket refills at once: the rate bound holds per principal only while the table
is not full, which takes ``tracked_max`` clients each sending within ``burst /
rate`` seconds); if all of them have requests in flight, the newcomer is refused
(``CLIENTS_FULL``).  Cost: one dict lookup and a few float operations per admit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

CLIENT_RATE = "client_rate"          # over its token bucket
CLIENT_INFLIGHT = "client_inflight"  # at its in-flight cap
CLIENTS_FULL = "clients_tracked"     # the table is full of clients with calls in flight
REASONS = (CLIENT_RATE, CLIENT_INFLIGHT, CLIENTS_FULL)

BUSY_RETRY_S = 0.05  # the nominal hint when the refusal ends with answers, not time
EVICT_LOOKS = 8      # oldest entries looked at to make room for a new principal

# An entry is a list (the cheapest mutable record to index): tokens, when they were
# counted, requests in flight.
_TOKENS, _STAMP, _INFLIGHT = 0, 1, 2
# A token short by float rounding only ((0.5 - 0.4) * 10 < 1) counts as whole: a client
# sending at exactly the rate is not refused.  The debt carries over, so over any
# window the bound is exceeded by at most this much of one token.
_ROUNDING = 1e-6


class Refused(NamedTuple):
    reason: str           # one of REASONS
    retry_after_s: float  # when trying again may succeed


class Admission:
    """Token bucket and in-flight count per principal, for ``tracked_max`` of them."""

    __slots__ = ("rate", "burst", "inflight_max", "tracked_max", "enabled", "_clients",
                 "admitted", "refused", "evicted", "forgiven", "unmatched")

    def __init__(self, rate: float = 0.0, burst: int = 0, inflight_max: int = 0,
                 tracked_max: int = 16_384):
        if rate < 0 or burst < 0 or inflight_max < 0 or tracked_max < 1:
            raise ValueError("rate, burst and inflight_max must be >= 0, tracked_max >= 1")
        self.rate = float(rate)
        # A burst of 0 means one second of the rate (at least one request).
        self.burst = float(burst) if burst else max(1.0, self.rate)
        self.inflight_max = inflight_max
        self.tracked_max = tracked_max
        self.enabled = bool(rate or inflight_max)
        self._clients: OrderedDict[bytes, list] = OrderedDict()
        self.admitted = 0
        self.refused = dict.fromkeys(REASONS, 0)
        self.evicted = 0    # idle entries forgotten to make room
        self.forgiven = 0   # entries with a partly drained bucket forgotten to make room
        self.unmatched = 0  # done() with nothing in flight (a caller's bug; ignored)

    def __len__(self) -> int:
        """Principals remembered now (at most ``tracked_max``)."""
        return len(self._clients)

    def admit(self, principal: bytes, now: float) -> Refused | None:
        """Admit one request from ``principal`` at ``now`` (None), or refuse it."""
        if not self.enabled:
            self.admitted += 1
            return None
        entry = self._clients.get(principal)
        if entry is None:
            entry = self._enter(principal, now)
            if entry is None:
                return self._refuse(CLIENTS_FULL, BUSY_RETRY_S)
        inflight_max = self.inflight_max
        if inflight_max and entry[_INFLIGHT] >= inflight_max:
            return self._refuse(CLIENT_INFLIGHT, BUSY_RETRY_S)
        rate = self.rate
        if rate:
            tokens = entry[_TOKENS]
            elapsed = now - entry[_STAMP]
            if elapsed > 0:  # a clock that went back refills nothing
                tokens += elapsed * rate
                if tokens > self.burst:
                    tokens = self.burst
                entry[_STAMP] = now
            if tokens < 1.0 - _ROUNDING:
                entry[_TOKENS] = tokens
                return self._refuse(CLIENT_RATE, (1.0 - tokens) / rate)
            entry[_TOKENS] = tokens - 1.0
        entry[_INFLIGHT] += 1
        self.admitted += 1
        return None

    def done(self, principal: bytes) -> None:
        """One admitted request of ``principal`` was answered, or taken in (one-way)."""
        if not self.enabled:
            return
        entry = self._clients.get(principal)
        if entry is not None and entry[_INFLIGHT] > 0:
            entry[_INFLIGHT] -= 1
        else:
            self.unmatched += 1

    def in_flight(self, principal: bytes) -> int:
        entry = self._clients.get(principal)
        return entry[_INFLIGHT] if entry is not None else 0

    def stats(self) -> dict[str, int]:
        """Counts for metrics: admitted, refused per reason, table events."""
        return {"admitted": self.admitted, **{f"refused_{r}": n for r, n in self.refused.items()},
                "tracked": len(self._clients), "evicted": self.evicted,
                "forgiven": self.forgiven, "unmatched": self.unmatched}

    # ------------------------------------------------------------------ internals

    def _refuse(self, reason: str, retry_after_s: float) -> Refused:
        self.refused[reason] += 1
        return Refused(reason, retry_after_s)

    def _enter(self, principal: bytes, now: float) -> list | None:
        """A new principal's entry (a full bucket), or None when there is no room."""
        clients = self._clients
        if len(clients) >= self.tracked_max and not self._make_room(now):
            return None
        entry = [self.burst, now, 0]
        clients[principal] = entry
        return entry

    def _make_room(self, now: float) -> bool:
        """Forget one of the oldest entries that has nothing in flight, an idle one
        (full bucket) first; False if each of them has requests in flight."""
        clients = self._clients
        spare = None
        for _ in range(min(EVICT_LOOKS, len(clients))):
            principal = next(iter(clients))
            entry = clients[principal]
            if entry[_INFLIGHT] == 0:
                if self._full(entry, now):
                    del clients[principal]
                    self.evicted += 1
                    return True
                if spare is None:
                    spare = principal
            clients.move_to_end(principal)
        if spare is None:
            return False
        del clients[spare]
        self.forgiven += 1
        return True

    def _full(self, entry: list, now: float) -> bool:
        """The bucket is full at ``now``: the entry is as good as a new one."""
        if not self.rate:
            return True
        elapsed = max(0.0, now - entry[_STAMP])
        return entry[_TOKENS] + elapsed * self.rate >= self.burst
