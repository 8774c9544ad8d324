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

Latency histograms are lists of bucket counts bumped with one ``bisect``; the buckets
start at 10 us because a handler runs in tens of microseconds.  Process metrics use the
standard names (``process_cpu_seconds_total``, ...) from prometheus_client's
ProcessCollector, so stock dashboards find them.

The HTTP server is bounded: at most ``connections_max`` connections are open at once
(each holds a thread; a new one closes the oldest), and a connection is cut
``request_timeout_s`` after it was accepted however slowly it trickles bytes.  Both
are counted in ``synthesis_limited_total``.
"""

from __future__ import annotations

import bisect
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from . import logs

OTHER = "_other"
PREFIX = "synthesis_"
# Latencies run from handlers of tens of microseconds to model calls of seconds: a
# 1-2.5-5 series from 10 us to 10 s (slower ones land in +Inf and still count in _sum).
LATENCY_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                     0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
_BUCKET_LABELS = tuple(floatToGoString(b) for b in LATENCY_BUCKETS_S)
_ROW_LEN = len(LATENCY_BUCKETS_S) + 2   # one count per bucket, one above the last, the sum
PATH_LOCAL = "local"          # answered by an agent or the node here
PATH_FORWARDED = "forwarded"  # answered by the owner node, relayed back through here
CODE_LABELS_MAX = 64   # error codes are a fixed set in protocols/wire.py; cap anyway
KIND_LABELS_MAX = 64   # reply/error/forward/gossip/publish, and limit reasons
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
    ("gossip_bytes", "gossip_bytes_sent_total",
     "Bytes of membership messages (probes, acks, syncs) this node sent."),
    ("agents_moved_out", "agents_moved_out_total",
     "Agents whose state this node handed to their new owner."),
)

# What each gauge the runtime reports means (its HELP text); unknown ones get a generic text.
GAUGE_HELP = {
    "agents_active": "Agents held by this node, in every lifecycle state (failed ones too).",
    "mailbox_depth": "Messages waiting in all agent mailboxes, not counting ones being handled.",
    "peers_connected": "Peer links opened (members and seeds, dead ones included); "
                       "not a count of live connections.",
    "peer_queue_depth": "Sends waiting for a peer link to come up.",
    "clients_tracked": "Clients (CURVE keys, else connections) whose rate and in-flight "
                       "requests the node tracks now (at most clients_tracked_max).",
    "members": "Members in this node's view, itself and dead members included.",
    "mailbox_bytes": "Envelope bytes of the messages waiting in all agent mailboxes.",
    "forwards_in_flight": "Calls of this node's clients forwarded to their owners and "
                          "not answered yet (each ends by reply, deadline or departure).",
    "members_alive": "Members this node holds alive (itself included).",
    "members_suspect": "Members this node suspects (missed a probe; not declared dead yet).",
    "members_dead": "Members this node holds dead and has not forgotten yet.",
    "members_left": "Members that left gracefully and are not forgotten yet.",
    "quorate": "1 while the downing strategy lets this node own agents, 0 on the "
               "minority side of a split.",
    "local_health": "Lifeguard local health score: 0 is healthy; each point stretches "
                    "this node's probe interval and timeout.",
    "handoff_held": "Requests held for agents whose state is moving to this node.",
    "handoff_kept": "Agent states sent to a new owner and not acknowledged yet.",
    "replication_records": "Agents whose replicated state this node holds (owned or copies).",
    "replication_primary": "Of those, agents this node owns (their writes stream from here).",
    "replication_replica": "Of those, copies of agents other nodes own.",
    "replication_lagging": "Agents with a replica or a copy still behind (resent with backoff).",
    "replication_gathering": "Agents whose copies this node is gathering before it serves them.",
    "replication_waiting_writes": "Writes whose reply waits for quorum/all acknowledgements.",
    "replication_failover_queue": "Agents this node owns after a node loss, still to wake "
                                  "(paced at failover_rate).",
}

EVENT_HELP = {
    "membership": "Membership protocol events: probes, probes_failed, indirect (ping-reqs "
                  "sent), suspected, declared_dead, refuted, refused (entries), downed, "
                  "pauses (this node found itself stopped).",
    "handoff": "Agent handoff events: sent, acked, resent, returned, installed, duplicates, "
               "timed_out (started fresh: state may be lost), owner_lost, refused, conflicts.",
    "replication": "Replication events: deltas_sent, deltas_applied, fulls_sent, "
                   "fulls_applied, acks, needs, pushes, gathers, gather_timeouts, "
                   "write_timeouts, activations, dropped (copies handed on), duplicates "
                   "(exactly-once ids answered from the window), pruned (counter rows and "
                   "clock entries of retired replicas folded away).",
}

_ELAPSED_MAX_S = 86400.0          # a sane elapsed time is never longer than this


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


def _observe(row: list, seconds: float) -> None:
    row[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # buckets are "<= bound"
    row[-1] += seconds


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
        self._limited: dict[str, int] = {}
        # type -> [count per bucket..., count above the last bucket, sum of seconds]
        self._latency: dict[str, list[float]] = {}
        self._request = {PATH_LOCAL: [0] * _ROW_LEN, PATH_FORWARDED: [0] * _ROW_LEN}
        self._request_local = self._request[PATH_LOCAL]
        self._request_forwarded = self._request[PATH_FORWARDED]
        self._mailbox_wait = [0] * _ROW_LEN
        self._forward = [0] * _ROW_LEN
        self._replication_lag = [0] * _ROW_LEN
        self._transport_latency: dict[str, list] = {}  # transport -> histogram row
        self._transports: Callable[[], dict] | None = None
        self._plain = {attr: 0 for attr, _, _ in _PLAIN_COUNTERS}
        self._gauges: Callable[[], dict[str, float]] | None = None
        self._events: Callable[[], dict[str, dict[str, int]]] | None = None
        self.http_connections: Callable[[], int] | None = None  # set by MetricsServer
        self._process = psutil.Process()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # Standard process_* and python_info series (Linux: read from /proc at scrape).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # --- hot path: O(1), no locks -------------------------------------------------------

    # A type already counted is already a bounded label: the common case skips the
    # label mapping (a call per message each, measured on the one-way path).

    def received(self, mtype: str) -> None:
        counts = self._received
        if mtype in counts:
            counts[mtype] += 1
        else:
            key = self._type(mtype)
            counts[key] = counts.get(key, 0) + 1

    def handled(self, mtype: str) -> None:
        counts = self._handled
        if mtype in counts:
            counts[mtype] += 1
        else:
            key = self._type(mtype)
            counts[key] = counts.get(key, 0) + 1

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
        row = self._latency.get(mtype)
        if row is None:
            key = self._type(mtype)
            row = self._latency.get(key)
            if row is None:
                row = self._latency[key] = [0] * _ROW_LEN
        row[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # buckets are "<= bound"
        row[-1] += seconds

    def observe_mailbox_wait(self, seconds: float) -> None:
        """Time a message waited in an agent's mailbox before its handler started."""
        _observe(self._mailbox_wait, seconds)

    def replied_local(self, arrived_s: float | None) -> None:
        """A reply produced here left for our own client; ``arrived_s`` is the
        ``time.monotonic()`` reading (the loop's clock) taken when the request was read."""
        if arrived_s is not None:
            _observe(self._request_local, time.monotonic() - arrived_s)

    def replied_forwarded(self, arrived_s: float, forwarded_s: float) -> None:
        """An owner's reply to a call we forwarded left for our client: when the
        request arrived and when its forward left (``time.monotonic()`` readings)."""
        now = time.monotonic()
        request_s, forward_s = now - arrived_s, now - forwarded_s
        if 0.0 <= forward_s <= request_s < _ELAPSED_MAX_S:  # NaN fails too
            _observe(self._request_forwarded, request_s)
            _observe(self._forward, forward_s)

    def replication_lag(self, seconds: float) -> None:
        """A replica acknowledged an owner's latest delta ``seconds`` after it left."""
        if 0.0 <= seconds < _ELAPSED_MAX_S:
            _observe(self._replication_lag, seconds)

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

    def http_connection_rejected(self) -> None:
        """The metrics server held its maximum of connections: one was closed."""
        self.limited("http_connections_max")

    def http_connection_timed_out(self) -> None:
        """A metrics server connection was cut at its deadline."""
        self.limited("http_request_timeout")

    def limited(self, reason: str, n: int = 1) -> None:
        """A limit or trust rule acted: a connection cut, an entry refused, ... (by reason)."""
        key = self._kind(reason)
        self._limited[key] = self._limited.get(key, 0) + n

    def refuted(self) -> None:
        self.limited("node_id_refuted")

    def gossip_refused(self, n: int) -> None:
        self.limited("gossip_entry_refused", n)

    def gossip_sent(self, nbytes: int) -> None:
        self._plain["gossip_bytes"] += nbytes

    def agent_moved_out(self) -> None:
        self._plain["agents_moved_out"] += 1

    def transport_latency(self, transport: str, seconds: float) -> None:
        """A bridge's send was acknowledged by the peer ``seconds`` after it left."""
        row = self._transport_latency.get(transport)
        if row is None:
            row = self._transport_latency[transport] = [0] * _ROW_LEN
        _observe(row, seconds)

    def set_transports(self, fn: Callable[[], dict]) -> None:
        """Register the function read at scrape time for the transports:
        ``{"stats": {transport: {stat: count}}, "breakers": {(peer, transport):
        state code}}`` (node/transports/select.py)."""
        self._transports = fn

    def read_transports(self) -> tuple[dict, dict]:
        if self._transports is None:
            return {}, {}
        try:
            seen = self._transports()
            return dict(seen.get("stats", {})), dict(seen.get("breakers", {}))
        except Exception:  # noqa: BLE001 - never a failed scrape
            return {}, {}

    def set_events(self, fn: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Register the function read at scrape time for protocol event counters:
        ``{family: {event: count}}``, e.g. ``{"membership": {"probes": 10, ...}}``
        becomes ``synthesis_membership_events_total{event="probes"} 10``."""
        self._events = fn

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

    def read_events(self) -> dict[str, dict[str, int]]:
        if self._events is None:
            return {}
        try:
            families = dict(self._events())
        except Exception:  # noqa: BLE001 - as read_gauges
            return {}
        return {family: {str(k): int(v) for k, v in counts.items()}
                for family, counts in families.items() if _GAUGE_NAME_RE.match(family)}

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
        yield _by_label("limited_total", "Connections cut, requests refused and gossip "
                        "entries dropped by a limit or trust rule, by reason "
                        "(docs/OPERATIONS.md, Limits).", "reason", m._limited)
        yield _latency(m._latency)
        yield _histogram("request_seconds",
                         "Time from reading a call to its reply (or error) leaving for "
                         "the client, for calls whose client is connected to this node; "
                         "path=forwarded when another node answered it.",
                         {"path": m._request})
        yield _histogram("mailbox_wait_seconds",
                         "Time messages waited in an agent's mailbox before their handler "
                         "started (messages that ran at once are not observed).",
                         {"": m._mailbox_wait})
        yield _histogram("forward_seconds",
                         "Round trip of forwarded calls: from the forward leaving this node "
                         "to the owner's reply coming back.", {"": m._forward})
        yield _histogram("replication_lag_seconds",
                         "From an owner sending a write's delta to a replica's ack of it: "
                         "the time a write takes to reach another node.",
                         {"": m._replication_lag})
        yield from _transport_families(m)
        for attr, name, help_text in _PLAIN_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=m._plain[attr])
        yield _by_label("log_events_suppressed_total",
                        "Log records dropped by the per-event rate limit, by event name.",
                        "event", logs.suppressed_totals())
        for family, counts in m.read_events().items():
            yield _by_label(f"{family}_events_total", EVENT_HELP.get(family, family),
                            "event", counts)
        for name, value in m.read_gauges().items():
            yield GaugeMetricFamily(PREFIX + name, GAUGE_HELP.get(name, f"Current {name}."),
                                    value=value)
        if m.http_connections is not None:
            yield GaugeMetricFamily(PREFIX + "http_connections_open",
                                    "Connections the metrics/health server holds now, this "
                                    "scrape's own included.", value=m.http_connections())
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
    return _histogram("handler_latency_seconds",
                      "Time handlers took, by message type (crashes and timeouts included).",
                      {"type": rows})


def _histogram(name: str, help_text: str, labelled: dict[str, Any]) -> Metric:
    """One histogram family from bucket-count rows: ``{label: {value: row}}``, or
    ``{"": row}`` for a histogram without labels."""
    (label, rows), = labelled.items()
    family = HistogramMetricFamily(PREFIX + name, help_text, labels=[label] if label else None)
    for value, row in (sorted(rows.copy().items()) if label else [("", rows)]):
        row = row.copy()
        cumulative, buckets = 0, []
        for bound, count in zip(_BUCKET_LABELS, row):
            cumulative += count
            buckets.append((bound, cumulative))
        buckets.append(("+Inf", cumulative + row[-2]))
        family.add_metric([value] if label else [], buckets, sum_value=row[-1])
    return family


TRANSPORT_STATS = {
    "messages": "Peer messages handed to each transport (a fallback counts on each it tried).",
    "bytes": "Bytes of peer messages handed to each transport.",
    "errors": "Peer sends each transport gave up on.",
    "fallbacks": "Peer sends that went to a transport after an earlier one in the order "
                 "failed.",
    "skipped_open": "Peer sends that skipped a transport because its circuit breaker was "
                    "open.",
}


def _transport_families(m: NodeMetrics) -> Iterator[Metric]:
    stats, breakers = m.read_transports()
    if not stats:
        return
    for stat, help_text in TRANSPORT_STATS.items():
        family = CounterMetricFamily(PREFIX + f"transport_{stat}_total", help_text,
                                     labels=["transport"])
        for name, counts in sorted(stats.items()):
            family.add_metric([name], counts.get(stat, 0))
        yield family
    state = GaugeMetricFamily(PREFIX + "transport_breaker_state",
                              "Circuit breaker per peer and transport: 0 closed, 1 half-open, "
                              "2 open.", labels=["peer", "transport"])
    for (peer, name), code in sorted(breakers.items()):
        state.add_metric([peer, name], code)
    yield state
    yield _histogram("transport_seconds", "From a bridge's peer send to the peer's "
                     "acknowledgement, by transport.", {"transport": m._transport_latency})


def _process_families(process: psutil.Process) -> Iterator[Metric]:
    """What the standard process_* series (ProcessCollector) do not cover."""
    yield GaugeMetricFamily(PREFIX + "process_threads",
                            "OS threads of this process (the metrics server uses one per "
                            "open connection).", value=process.num_threads())


# --- HTTP endpoint ----------------------------------------------------------------------------

HTTP_CONNECTIONS_MAX = 32      # connections served at once, one thread each
HTTP_THREADS_SLACK = 8         # threads of closed connections still finishing, on top
HTTP_REQUEST_TIMEOUT_S = 5.0   # a connection is cut this long after it was accepted


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on threads and on time per connection.

    Without them every idle connection (slowloris) holds a thread for good.  At
    most ``connections_max`` connections are open; a new one past that closes the
    oldest (a scrape is answered in milliseconds, so the oldest is almost always an
    idle one), so idle connections cannot lock Prometheus or a health check out.
    Threads are capped too (closed connections' threads may still be finishing):
    past the cap a new connection is closed at once.  A connection still open
    ``request_timeout_s`` after it was accepted is shut down from the accepting
    thread (service_actions), which also frees a handler blocked writing to a
    client that does not read.  Every connection closed early is counted.
    """

    daemon_threads = True
    request_queue_size = 64
    connections_max = HTTP_CONNECTIONS_MAX
    request_timeout_s = HTTP_REQUEST_TIMEOUT_S
    metrics: NodeMetrics

    def server_activate(self) -> None:
        # connection -> deadline (monotonic); insertion order is accept order
        self._open: dict[socket.socket, float] = {}
        self._threads_running = 0
        self._open_lock = threading.Lock()
        super().server_activate()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._open_lock:
            admit = self._threads_running < self.connections_max + HTTP_THREADS_SLACK
            if admit:
                if len(self._open) >= self.connections_max:
                    self.metrics.http_connection_rejected()  # counted before the close
                    self._close_early(next(iter(self._open)))  # the oldest
                self._open[request] = time.monotonic() + self.request_timeout_s
                self._threads_running += 1
        if not admit:
            self.metrics.http_connection_rejected()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started
            self._forget(request)
            self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a client that vanished mid-reply; nothing to do
            pass
        finally:
            # Forget it under the lock before closing, so the accepting thread never
            # shuts down a socket this thread is closing.
            self._forget(request)
            self.shutdown_request(request)

    def _forget(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.pop(request, None)
            self._threads_running -= 1

    def _close_early(self, conn: socket.socket) -> None:
        """Cut an open connection (lock held): its thread's recv/send return now."""
        del self._open[conn]
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._open_lock:
            late = [conn for conn, deadline in self._open.items() if deadline <= now]
            for conn in late:  # counted first: whoever sees the close sees the count
                self.metrics.http_connection_timed_out()
                self._close_early(conn)

    def open_connections(self) -> int:
        return len(self._open)


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics and /health; everything else is 404."""

    # Each socket read or write gives up after this; the server's deadline per
    # connection (request_timeout_s) is the real bound, this is a second line.
    timeout = HTTP_REQUEST_TIMEOUT_S + 1.0
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
                 health: Callable[[], tuple[bool, dict]], *,
                 connections_max: int = HTTP_CONNECTIONS_MAX,
                 request_timeout_s: float = HTTP_REQUEST_TIMEOUT_S):
        if connections_max < 1 or request_timeout_s <= 0:
            raise ValueError("connections_max must be >= 1 and request_timeout_s > 0")
        self.host = host.strip("[]")
        self.port = port
        self._metrics = metrics
        self._limits = {"connections_max": connections_max,
                        "request_timeout_s": request_timeout_s, "metrics": metrics}
        self._handler = type("Handler", (_Handler,), {
            "metrics": metrics, "health": staticmethod(health),
            "timeout": request_timeout_s + 1.0})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; raises OSError if the address is taken."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        attrs = dict(self._limits)
        if ":" in self.host:
            attrs["address_family"] = socket.AF_INET6
        server_class = type("Server", (_Server,), attrs)
        self._server = server_class((self.host, self.port), self._handler)
        self.port = self._server.server_address[1]
        self._metrics.http_connections = self._server.open_connections
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
