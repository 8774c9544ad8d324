"""structlog setup: JSON lines on stderr, one object per record.

Every record carries ``timestamp`` (ISO 8601, UTC), ``level``, ``event`` and
``node_id``, plus whatever the caller bound (``agent_id``, ``trace_id``, ...), so logs
from many nodes can be merged and filtered by a machine.  ``fmt="console"`` renders the
same records for a human at a terminal.

Filtering uses structlog's fast path: ``make_filtering_bound_logger`` turns calls below
the configured level into no-ops that never build an event dict, and
``cache_logger_on_first_use`` skips re-resolving the configuration on every call.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("json", "console")
_FIRST_KEYS = ("timestamp", "level", "event", "node_id")


def _add_node_id(node_id: str) -> structlog.types.Processor:
    """Processor stamping the node id on every record (a bound value wins)."""
    def add(_logger: Any, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("node_id", node_id)
        return event_dict
    return add


def _first_keys_first(_logger: Any, _method: str, event_dict: dict) -> dict:
    """Put timestamp/level/event/node_id at the start of each line, for people who grep."""
    ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _processors(fmt: str, node_id: str) -> list:
    shared = [
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


def configure(level: str, fmt: str, node_id: str) -> None:
    """Configure structlog process-wide; call once at node start, before logging.

    Raises ValueError for an unknown level or format (config validation normally
    catches these first).
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {'|'.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {'|'.join(FORMATS)}, got {fmt!r}")
    structlog.reset_defaults()
    structlog.configure(
        processors=_processors(fmt, node_id),
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
