"""A circuit breaker: stop trying a path that keeps failing, and try it again later.

One breaker per (peer, transport) in node/transports/select.py.  Pure: time is
passed in.  States:

- **closed**: sends go through; outcomes are counted over the last ``window``
  sends.  ``failures_max`` failures in a row, or a failure rate of at least
  ``failure_rate`` once ``window`` outcomes are in, open it.
- **open**: ``allow`` says no (the caller tries its next transport at once, with
  no time spent on this one) until ``open_s`` has passed.
- **half-open**: one trial send is allowed; its success closes the breaker, its
  failure opens it again for another ``open_s``.  A trial that reports nothing
  within ``open_s`` counts as failed, so a breaker never sticks half-open.
"""

from __future__ import annotations

from collections import deque

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # for a gauge


class Breaker:
    __slots__ = ("failures_max", "failure_rate", "window", "open_s", "state", "opened_at",
                 "trial_at", "_run", "_recent", "opened", "rejected")

    def __init__(self, *, failures_max: int = 5, failure_rate: float = 0.5,
                 window: int = 20, open_s: float = 5.0):
        if failures_max < 1 or not 0 < failure_rate <= 1 or window < 1 or open_s <= 0:
            raise ValueError("failures_max >= 1, 0 < failure_rate <= 1, window >= 1, "
                             "open_s > 0")
        self.failures_max = failures_max
        self.failure_rate = failure_rate
        self.window = window
        self.open_s = open_s
        self.state = CLOSED
        self.opened_at = 0.0
        self.trial_at: float | None = None   # when the half-open trial went out
        self._run = 0                        # failures in a row
        self._recent: deque[bool] = deque(maxlen=window)
        self.opened = 0                      # times it opened
        self.rejected = 0                    # sends it turned away

    def allow(self, now: float) -> bool:
        """May a send go this way now?  (A half-open breaker lets one through.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at < self.open_s:
                self.rejected += 1
                return False
            self.state = HALF_OPEN
            self.trial_at = None
        if self.trial_at is not None and now - self.trial_at < self.open_s:
            self.rejected += 1  # the one trial is out: wait for its outcome
            return False
        if self.trial_at is not None:  # the trial never reported: as failed
            self._open(now)
            self.rejected += 1
            return False
        self.trial_at = now
        return True

    def record(self, ok: bool, now: float) -> None:
        """A send this way succeeded or failed."""
        if self.state == HALF_OPEN:
            if ok:
                self._close()
            else:
                self._open(now)
            return
        if self.state == OPEN:
            return  # outcomes of sends from before it opened change nothing
        self._recent.append(ok)
        self._run = 0 if ok else self._run + 1
        failures = self._recent.count(False)
        if self._run >= self.failures_max or (
                len(self._recent) == self.window and failures >= self.failure_rate * self.window):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self.trial_at = None
        self.opened += 1

    def _close(self) -> None:
        self.state = CLOSED
        self.trial_at = None
        self._run = 0
        self._recent.clear()
