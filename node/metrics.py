"""Prometheus metrics and the HTTP endpoint (/metrics, /health).

The hot path (every message) only bumps plain ints in dicts: no prometheus_client
objects, no locks.  A custom Collector turns those dicts into metric families when
Prometheus scrapes, from the HTTP server's thread.  That is safe without locks because
under the GIL ``dict.copy()`` / ``list.copy()`` of str-keyed containers are atomic, and
a scrape that sees a counter one increment old is harmless.

Label cardinality is bounded: after ``type_labels_max`` distinct message types, new
types are counted under ``type="_other"`` so a client sending random types cannot grow
the node's memory or the Prometheus series count without limit.

There is no node_id label on every series (scrape targets label them); the node id is
exported once as ``synthesis_node_info{node_id=...} 1``.
"""

from __future__ import annotations

import bisect
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder

OTHER = "_other"
PREFIX = "synthesis_"
# Handler latencies run from sub-millisecond local calls to model calls of tens of seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CODE_LABELS_MAX = 64   # error codes are a fixed set in protocols/wire.py; cap anyway
KIND_LABELS_MAX = 32   # reply/error/forward/gossip/publish
GAUGES_MAX = 64
_GAUGE_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# (attribute, metric name, help) of the label-less counters.
_PLAIN_COUNTERS = (
    ("agents_activated", "agents_activated_total", "Agents activated on this node."),
    ("agents_restarted", "agents_restarted_total", "Agent restarts by supervision."),
    ("agents_failed", "agents_failed_total", "Agents that failed past their restart limit."),
    ("multicast_dropped", "multicast_dropped_total",
     "Multicast messages missed, detected as sequence gaps."),
    ("peer_send_failures", "peer_send_failures_total", "Sends to peers that failed."),
    ("client_send_failures", "client_send_failures_total",
     "Replies to clients that could not be sent (client gone, or its queue full)."),
)


class _Labels:
    """Maps raw label values to bounded ones: the first ``limit`` distinct values pass
    through, later ones become ``_other``."""

    __slots__ = ("_seen", "_limit")

    def __init__(self, limit: int):
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER


class NodeMetrics:
    """Counters, a latency histogram and gauges of one node, plus its own registry."""

    def __init__(self, node_id: str, type_labels_max: int = 256):
        if type_labels_max < 1:
            raise ValueError(f"type_labels_max must be >= 1, got {type_labels_max}")
        self.node_id = node_id
        self._type = _Labels(type_labels_max)
        self._code = _Labels(CODE_LABELS_MAX)
        self._kind = _Labels(KIND_LABELS_MAX)
        self._received: dict[str, int] = {}
        self._handled: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._forwarded: dict[str, int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        # type -> [count per bucket..., count above the last bucket, sum of seconds]
        self._latency: dict[str, list[float]] = {}
        self._plain = {attr: 0 for attr, _, _ in _PLAIN_COUNTERS}
        self._gauges: Callable[[], dict[str, float]] | None = None
        self._process = psutil.Process()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # --- hot path: O(1), no locks -------------------------------------------------------

    def received(self, mtype: str) -> None:
        key = self._type(mtype)
        self._received[key] = self._received.get(key, 0) + 1

    def handled(self, mtype: str) -> None:
        key = self._type(mtype)
        self._handled[key] = self._handled.get(key, 0) + 1

    def sent(self, kind: str) -> None:
        key = self._kind(kind)
        self._sent[key] = self._sent.get(key, 0) + 1

    def forwarded(self, mtype: str) -> None:
        key = self._type(mtype)
        self._forwarded[key] = self._forwarded.get(key, 0) + 1

    def errored(self, code: str, mtype: str = "") -> None:
        key = (self._code(code), self._type(mtype) if mtype else "")
        self._errors[key] = self._errors.get(key, 0) + 1

    def observe_handler(self, mtype: str, seconds: float) -> None:
        key = self._type(mtype)
        row = self._latency.get(key)
        if row is None:
            row = self._latency[key] = [0] * (len(LATENCY_BUCKETS_S) + 2)
        row[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # buckets are "<= bound"
        row[-1] += seconds

    def agent_activated(self) -> None:
        self._plain["agents_activated"] += 1

    def agent_restarted(self) -> None:
        self._plain["agents_restarted"] += 1

    def agent_failed(self) -> None:
        self._plain["agents_failed"] += 1

    def multicast_dropped(self, n: int) -> None:
        self._plain["multicast_dropped"] += n

    def peer_send_failed(self) -> None:
        self._plain["peer_send_failures"] += 1

    def client_send_failed(self) -> None:
        self._plain["client_send_failures"] += 1

    def set_gauges(self, fn: Callable[[], dict[str, float]]) -> None:
        """Register the function read at scrape time for gauges (agents_active, ...).

        It runs on the HTTP server's thread, so it should only read sizes and counts.
        """
        self._gauges = fn

    # --- read side ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        """Totals across labels, for status replies."""
        totals = {
            "received": sum(self._received.copy().values()),
            "handled": sum(self._handled.copy().values()),
            "sent": sum(self._sent.copy().values()),
            "forwarded": sum(self._forwarded.copy().values()),
            "errors": sum(self._errors.copy().values()),
        }
        totals.update(self._plain.copy())
        return totals

    def read_gauges(self) -> dict[str, float]:
        """Call the gauge function; a failing or malformed one yields no gauges rather
        than a failed scrape."""
        if self._gauges is None:
            return {}
        try:
            values = dict(self._gauges())
        except Exception:  # noqa: BLE001 - the runtime's problem must not break /metrics
            return {}
        return {name: float(value) for name, value in list(values.items())[:GAUGES_MAX]
                if _GAUGE_NAME_RE.match(name) and isinstance(value, (int, float))}


class _Collector:
    """Builds metric families from a NodeMetrics' plain counters at scrape time."""

    def __init__(self, metrics: NodeMetrics):
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        info = GaugeMetricFamily(PREFIX + "node_info", "Identity of this node.",
                                 labels=["node_id"])
        info.add_metric([m.node_id], 1)
        yield info
        yield _by_label("messages_received_total", "Messages received, by type.",
                        "type", m._received)
        yield _by_label("messages_handled_total", "Messages handled by agents, by type.",
                        "type", m._handled)
        yield _by_label("messages_sent_total", "Messages sent, by kind.", "kind", m._sent)
        yield _by_label("messages_forwarded_total", "Messages forwarded to the owner node.",
                        "type", m._forwarded)
        yield _errors(m._errors)
        yield _latency(m._latency)
        for attr, name, help_text in _PLAIN_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=m._plain[attr])
        for name, value in m.read_gauges().items():
            yield GaugeMetricFamily(PREFIX + name, f"Current {name}.", value=value)
        yield from _process_families(m._process)


def _by_label(name: str, help_text: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(PREFIX + name, help_text, labels=[label])
    for value, count in sorted(counts.copy().items()):
        family.add_metric([value], count)
    return family


def _errors(counts: dict[tuple[str, str], int]) -> Metric:
    family = CounterMetricFamily(PREFIX + "messages_errors_total",
                                 "Error replies, by code and message type.",
                                 labels=["code", "type"])
    for (code, mtype), count in sorted(counts.copy().items()):
        family.add_metric([code, mtype], count)
    return family


def _latency(rows: dict[str, list[float]]) -> Metric:
    family = HistogramMetricFamily(PREFIX + "handler_latency_seconds",
                                   "Time handlers took, by message type.", labels=["type"])
    for mtype, row in sorted(rows.copy().items()):
        row = row.copy()
        cumulative, buckets = 0, []
        for bound, count in zip(LATENCY_BUCKETS_S, row):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", cumulative + row[-2]))
        family.add_metric([mtype], buckets, sum_value=row[-1])
    return family


def _process_families(process: psutil.Process) -> Iterator[Metric]:
    """Resource use of this process, measured now."""
    with process.oneshot():
        cpu = process.cpu_times()
        rss = process.memory_info().rss
        threads = process.num_threads()
        fds = process.num_fds() if hasattr(process, "num_fds") else None
    yield CounterMetricFamily(PREFIX + "process_cpu_seconds_total",
                              "User and system CPU time.", value=cpu.user + cpu.system)
    yield GaugeMetricFamily(PREFIX + "process_resident_memory_bytes",
                            "Resident set size.", value=rss)
    yield GaugeMetricFamily(PREFIX + "process_threads", "OS threads.", value=threads)
    if fds is not None:
        yield GaugeMetricFamily(PREFIX + "process_open_fds", "Open file descriptors.",
                                value=fds)


# --- HTTP endpoint ----------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics and /health; everything else is 404."""

    timeout = 10  # seconds a slow client may hold a connection thread
    server_version = "synthesis-metrics"
    metrics: NodeMetrics
    health: Callable[[], tuple[bool, dict]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.metrics.registry))
        elif path == "/health":
            ok, body = self._health()
            self._reply(200 if ok else 503, "application/json",
                        json.dumps(body, default=str).encode())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found\n")

    def _health(self) -> tuple[bool, dict]:
        try:
            ok, body = type(self).health()
        except Exception as exc:  # noqa: BLE001 - report, don't kill the server thread
            return False, {"ok": False, "error": repr(exc)}
        return bool(ok), dict(body)

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Access logs stay off stderr, which carries the node's JSON log lines."""


class MetricsServer:
    """Serves /metrics and /health from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: NodeMetrics,
                 health: Callable[[], tuple[bool, dict]]):
        self.host = host.strip("[]")
        self.port = port
        self._handler = type("Handler", (_Handler,), {
            "metrics": metrics, "health": staticmethod(health)})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; raises OSError if the address is taken."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        server_class = _Server
        if ":" in self.host:
            server_class = type("Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._server = server_class((self.host, self.port), self._handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="synthesis-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket, freeing the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
