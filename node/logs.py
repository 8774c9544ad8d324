"""structlog setup: JSON lines on stderr, one object per record.

Every record carries ``timestamp`` (ISO 8601, UTC), ``level``, ``event`` and
``node_id``, plus whatever the caller bound (``agent_id``, ``trace_id``, ...), so logs
from many nodes can be merged and filtered by a machine.  ``fmt="console"`` renders the
same records for a human at a terminal.

Repeated events are rate-limited per event name (``RateLimiter``): a peer or client
that makes the node log a warning per bad message must not turn a small message into
kilobytes of log.  At most ``events_per_s`` records of one event pass per second;
the rest are dropped and counted, and one ``log_suppressed`` line per event and
second says how many.  Info lifecycle events pass untouched, except those a remote
peer can trigger at will (``RATE_LIMITED_INFO_EVENTS``).

Filtering uses structlog's fast path: ``make_filtering_bound_logger`` turns calls below
the configured level into no-ops that never build an event dict, and
``cache_logger_on_first_use`` skips re-resolving the configuration on every call.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("json", "console")
_FIRST_KEYS = ("timestamp", "level", "event", "node_id")

EVENTS_PER_S = 10            # records of one event name let through per second
LIMITED_LEVELS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
# Info events that remote input can trigger at will: a gossip message with a bumped
# generation logs the whole member list (kilobytes).  Each record that passes still
# carries the full current view, so limiting loses no state.
RATE_LIMITED_INFO_EVENTS = frozenset({"members_changed"})
SUPPRESSED_EVENT = "log_suppressed"
EVENT_NAMES_MAX = 256        # distinct event names tracked; more share one slot
_OTHER = "_other"


class RateLimiter:
    """structlog processor: at most ``events_per_s`` records per event name per
    1-second window for warning-and-above records (and the listed info events).

    A dropped record raises ``structlog.DropEvent`` before any other processor runs,
    so suppression is cheap.  When a window with drops has ended, the next log call
    of any kind first emits one ``log_suppressed`` record per event
    (``suppressed_event``, ``count``, ``window_s``) through ``emit``.  Totals per
    event are kept for the ``synthesis_log_events_suppressed_total`` metric.
    """

    def __init__(self, events_per_s: int = EVENTS_PER_S,
                 clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str, int, float], None] | None = None,
                 info_events: frozenset = RATE_LIMITED_INFO_EVENTS):
        if events_per_s < 1:
            raise ValueError(f"events_per_s must be >= 1, got {events_per_s}")
        self._per_window = events_per_s
        self._window_s = 1.0
        self._clock = clock
        self._emit = emit or _emit_summary
        self._info_events = info_events
        self._windows: dict[str, list] = {}  # event -> [window end, passed, dropped]
        self._summaries_due = False          # some drops are not reported yet
        self._due_at = float("inf")          # earliest end of a window with drops
        self._lock = threading.Lock()        # executor threads may log too
        self.totals: dict[str, int] = {}     # event -> records dropped since start

    def __call__(self, _logger: Any, method: str, event_dict: dict) -> dict:
        name = event_dict.get("event")
        if name == SUPPRESSED_EVENT or not isinstance(name, str):
            return event_dict
        if self._summaries_due:
            now = self._clock()
            if now >= self._due_at:
                self._emit_due(now)
        if method not in LIMITED_LEVELS and name not in self._info_events:
            return event_dict
        if self._admit(name, self._clock()):
            return event_dict
        raise structlog.DropEvent

    def _admit(self, name: str, now: float) -> bool:
        with self._lock:
            window = self._windows.get(name)
            if window is None:
                if len(self._windows) >= EVENT_NAMES_MAX:
                    name = _OTHER
                    window = self._windows.get(name)
                if window is None:
                    window = self._windows[name] = [now + self._window_s, 0, 0]
            if now >= window[0]:  # a new window (drops of the old one are reported first)
                window[0], window[1] = now + self._window_s, 0
            if window[1] < self._per_window:
                window[1] += 1
                return True
            window[2] += 1
            self.totals[name] = self.totals.get(name, 0) + 1
            self._summaries_due = True
            self._due_at = min(self._due_at, window[0])
            return False

    def _emit_due(self, now: float) -> None:
        """Report, once each, the windows that ended with drops."""
        due = []
        with self._lock:
            for name, window in self._windows.items():
                if window[2] and now >= window[0]:
                    due.append((name, window[2]))
                    window[2] = 0
            ends = [w[0] for w in self._windows.values() if w[2]]
            self._due_at = min(ends, default=float("inf"))
            self._summaries_due = bool(ends)
        for name, count in due:
            self._emit(name, count, self._window_s)


def _emit_summary(name: str, count: int, window_s: float) -> None:
    structlog.get_logger().warning(SUPPRESSED_EVENT, suppressed_event=name, count=count,
                                   window_s=window_s)


_limiter: RateLimiter | None = None


def suppressed_totals() -> dict[str, int]:
    """Records dropped by the rate limit since ``configure``, by event name."""
    return dict(_limiter.totals) if _limiter is not None else {}


_node_id = [""]  # the id stamped on records; set_node_id changes it after configure


def set_node_id(node_id: str) -> None:
    """Stamp ``node_id`` from now on, on every logger, even one made before: a node
    listening on port 0 learns its derived id only once its socket is bound."""
    _node_id[0] = node_id


def _add_node_id(node_id: str) -> structlog.types.Processor:
    """Processor stamping the node id on every record (a bound value wins)."""
    set_node_id(node_id)

    def add(_logger: Any, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("node_id", _node_id[0])
        return event_dict
    return add


def _first_keys_first(_logger: Any, _method: str, event_dict: dict) -> dict:
    """Put timestamp/level/event/node_id at the start of each line, for people who grep."""
    ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _processors(fmt: str, node_id: str, limiter: RateLimiter) -> list:
    shared = [
        limiter,  # first: a dropped record costs nothing more
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_node_id(node_id),
    ]
    if fmt == "console":
        colors = sys.stderr.isatty()
        return shared + [structlog.dev.ConsoleRenderer(colors=colors)]
    return shared + [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _first_keys_first,
        structlog.processors.JSONRenderer(default=str),
    ]


def configure(level: str, fmt: str, node_id: str, events_per_s: int = EVENTS_PER_S) -> None:
    """Configure structlog process-wide; call once at node start, before logging.

    ``events_per_s`` is the rate limit per event name (see ``RateLimiter``).
    Raises ValueError for an unknown level or format (config validation normally
    catches these first).
    """
    global _limiter
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {'|'.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {'|'.join(FORMATS)}, got {fmt!r}")
    _limiter = RateLimiter(events_per_s)
    structlog.reset_defaults()
    structlog.configure(
        processors=_processors(fmt, node_id, _limiter),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that use the stdlib (asyncio warnings, ...) go to stderr at the same level.
    logging.basicConfig(level=LEVELS[level], stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(**bound: Any) -> Any:
    """A logger with ``bound`` key/values (e.g. agent_id=..., trace_id=...) on every record."""
    return structlog.get_logger().bind(**bound)
