"""node.metrics: counters, histograms, cardinality cap, and the bounded HTTP endpoint."""

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.metrics import GAUGE_HELP, LATENCY_BUCKETS_S, OTHER, MetricsServer, NodeMetrics

pytestmark = pytest.mark.timeout(60)


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple], float]:
    """Scrape through the registry, as text, and index samples by (name, labels)."""
    from prometheus_client import generate_latest
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def health_state():
    return {"ok": True, "body": {"ok": True, "members": 3}}


@pytest.fixture
def server(health_state):
    metrics = NodeMetrics("n1", type_labels_max=4)
    srv = MetricsServer("127.0.0.1", 0, metrics,
                        lambda: (health_state["ok"], health_state["body"]))
    srv.start()
    yield srv, metrics
    srv.stop()


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def test_scrape_over_http_reports_counters(server):
    srv, m = server
    for _ in range(3):
        m.received("call")
    m.received("cast")
    m.handled("call")
    m.sent("reply")
    m.forwarded("call")
    m.errored("overloaded", "call")
    m.errored("malformed")
    m.agent_activated()
    m.agent_restarted()
    m.agent_failed()
    m.multicast_dropped(5)
    m.peer_send_failed()
    m.client_send_failed()
    m.client_send_failed()
    status, content_type, text = get(srv.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("synthesis_node_info", (("node_id", "n1"),))] == 1
    assert got[("synthesis_messages_received_total", (("type", "call"),))] == 3
    assert got[("synthesis_messages_received_total", (("type", "cast"),))] == 1
    assert got[("synthesis_messages_handled_total", (("type", "call"),))] == 1
    assert got[("synthesis_messages_sent_total", (("kind", "reply"),))] == 1
    assert got[("synthesis_messages_forwarded_total", (("type", "call"),))] == 1
    assert got[("synthesis_messages_errors_total", (("code", "overloaded"), ("type", "call")))] == 1
    assert got[("synthesis_messages_errors_total", (("code", "malformed"), ("type", "")))] == 1
    assert got[("synthesis_agents_activated_total", ())] == 1
    assert got[("synthesis_agents_restarted_total", ())] == 1
    assert got[("synthesis_agents_failed_total", ())] == 1
    assert got[("synthesis_multicast_dropped_total", ())] == 5
    assert got[("synthesis_peer_send_failures_total", ())] == 1
    assert got[("synthesis_client_send_failures_total", ())] == 2
    # Process metrics under the standard names, so stock dashboards find them.
    assert got[("process_resident_memory_bytes", ())] > 0
    assert got[("process_virtual_memory_bytes", ())] >= got[("process_resident_memory_bytes", ())]
    assert got[("process_cpu_seconds_total", ())] > 0
    assert got[("process_open_fds", ())] > 0
    assert got[("process_max_fds", ())] >= got[("process_open_fds", ())]
    assert time.time() - 3600 < got[("process_start_time_seconds", ())] <= time.time()
    assert any(name == "python_info" for name, _ in got)
    assert got[("synthesis_process_threads", ())] >= 2
    assert all(name.startswith(("synthesis_", "process_", "python_")) for name, _ in got)
    assert m.snapshot() == {"received": 4, "handled": 1, "sent": 1, "forwarded": 1,
                            "errors": 2, "agents_activated": 1, "agents_restarted": 1,
                            "agents_failed": 1, "multicast_dropped": 5,
                            "peer_send_failures": 1, "client_send_failures": 2,
                            "gossip_bytes": 0, "agents_moved_out": 0}


def test_histogram_buckets_are_cumulative():
    m = NodeMetrics("n1")
    observed = (0.000005, 0.00001, 0.00004, 0.00004, 0.003, 2.0, 100.0)
    for seconds in observed:
        m.observe_handler("call", seconds)
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("synthesis_handler_latency_seconds_bucket", (("le", le), ("type", "call")))]

    assert bucket("1e-05") == 2          # a value on a bound counts in that bucket
    assert bucket("2.5e-05") == 2
    assert bucket("5e-05") == 4          # tens of microseconds are told apart
    assert bucket("0.0025") == 4
    assert bucket("0.005") == 5
    assert bucket("2.5") == 6
    assert bucket("10.0") == 6
    assert bucket("+Inf") == 7
    assert got[("synthesis_handler_latency_seconds_count", (("type", "call"),))] == 7
    assert got[("synthesis_handler_latency_seconds_sum", (("type", "call"),))] == \
        pytest.approx(sum(observed))
    assert len(LATENCY_BUCKETS_S) + 1 == sum(
        1 for name, _ in got if name == "synthesis_handler_latency_seconds_bucket")


def test_type_label_cardinality_is_capped():
    m = NodeMetrics("n1", type_labels_max=3)
    for i in range(50):
        m.received(f"type{i}")
        m.observe_handler(f"type{i}", 0.01)
        m.errored(f"code{i}", f"type{i}")
    got = samples(m)
    received = {dict(labels)["type"]: v for (name, labels), v in got.items()
                if name == "synthesis_messages_received_total"}
    assert received == {"type0": 1, "type1": 1, "type2": 1, OTHER: 47}
    hist_types = {dict(labels)["type"] for (name, labels) in got
                  if name == "synthesis_handler_latency_seconds_count"}
    assert hist_types == {"type0", "type1", "type2", OTHER}
    assert m.snapshot()["received"] == 50


def test_gauges_read_at_scrape_time_and_bad_ones_skipped():
    m = NodeMetrics("n1")
    state = {"agents_active": 1}
    m.set_gauges(lambda: {"agents_active": state["agents_active"], "members": 3,
                          "bad name": 1, "not_a_number": "x"})
    state["agents_active"] = 7
    got = samples(m)
    assert got[("synthesis_agents_active", ())] == 7
    assert got[("synthesis_members", ())] == 3
    assert not any("bad" in name or "not_a_number" in name for name, _ in got)
    m.set_gauges(lambda: 1 / 0)
    assert ("synthesis_agents_active", ()) not in samples(m)   # scrape still works


def test_registries_are_per_instance():
    a, b = NodeMetrics("a"), NodeMetrics("b")
    a.received("x")
    assert ("synthesis_messages_received_total", (("type", "x"),)) not in samples(b)


def test_health_200_and_503(server, health_state):
    srv, _ = server
    status, content_type, body = get(srv.port, "/health")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"ok": True, "members": 3}
    health_state["ok"], health_state["body"] = False, {"ok": False, "reason": "draining"}
    status, _, body = get(srv.port, "/health")
    assert status == 503 and json.loads(body)["reason"] == "draining"


def test_failing_health_check_is_503(health_state):
    def broken():
        raise RuntimeError("loop stuck")
    srv = MetricsServer("127.0.0.1", 0, NodeMetrics("n1"), broken)
    srv.start()
    try:
        status, _, body = get(srv.port, "/health")
        assert status == 503 and "loop stuck" in json.loads(body)["error"]
    finally:
        srv.stop()


def test_other_paths_are_404(server):
    srv, _ = server
    assert get(srv.port, "/")[0] == 404
    assert get(srv.port, "/metricsx")[0] == 404
    assert get(srv.port, "/metrics?name[]=x")[0] == 200


def test_taken_port_raises_and_stop_frees_port():
    srv = MetricsServer("127.0.0.1", 0, NodeMetrics("n1"), lambda: (True, {}))
    srv.start()
    port = srv.port
    assert port != 0
    other = MetricsServer("127.0.0.1", port, NodeMetrics("n2"), lambda: (True, {}))
    with pytest.raises(OSError):
        other.start()
    srv.stop()
    srv.stop()  # idempotent
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def _bucket_counts(got: dict, name: str, labels: tuple = ()) -> dict[str, float]:
    return {dict(lab)["le"]: v for (n, lab), v in got.items()
            if n == name + "_bucket" and tuple(x for x in lab if x[0] != "le") == labels}


def test_latency_buckets_resolve_microseconds_to_seconds():
    assert LATENCY_BUCKETS_S[0] == 0.00001 and LATENCY_BUCKETS_S[-1] >= 5.0
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))


def test_mailbox_wait_histogram():
    m = NodeMetrics("n1")
    m.observe_mailbox_wait(0.00003)
    m.observe_mailbox_wait(0.2)
    got = samples(m)
    counts = _bucket_counts(got, "synthesis_mailbox_wait_seconds")
    assert counts["2.5e-05"] == 0 and counts["5e-05"] == 1
    assert counts["0.25"] == 2 and counts["+Inf"] == 2
    assert got[("synthesis_mailbox_wait_seconds_sum", ())] == pytest.approx(0.20003)


def test_request_seconds_local_measures_from_arrival():
    m = NodeMetrics("n1")
    m.replied_local(time.monotonic() - 0.003)      # arrived 3 ms ago
    m.replied_local(None)                          # no arrival time: not observed
    got = samples(m)
    local = _bucket_counts(got, "synthesis_request_seconds", (("path", "local"),))
    assert local["0.0025"] == 0 and local["0.005"] == 1 and local["+Inf"] == 1
    assert got[("synthesis_request_seconds_count", (("path", "forwarded"),))] == 0


def test_a_forwarded_reply_observes_request_and_forward_times():
    m = NodeMetrics("n1")
    now = time.monotonic()
    m.replied_forwarded(now - 0.004, now - 0.001)   # arrived 4 ms ago, forwarded 1 ms ago
    got = samples(m)
    forwarded = _bucket_counts(got, "synthesis_request_seconds", (("path", "forwarded"),))
    assert forwarded["0.0025"] == 0 and forwarded["0.005"] == 1
    assert _bucket_counts(got, "synthesis_forward_seconds")["0.0025"] == 1


@pytest.mark.parametrize("offsets_s", [
    (float("nan"), 0.0), (0.0, float("nan")),
    (60.0, 60.0),         # from the future
    (-1.0, 60.0),         # forward sent after the reply came back
    (-1e12, -1e12),       # older than any node
])
def test_impossible_forward_times_are_not_observed(offsets_s):
    m = NodeMetrics("n1")
    now = time.monotonic()
    m.replied_forwarded(now + offsets_s[0], now + offsets_s[1])
    got = samples(m)
    assert got[("synthesis_forward_seconds_count", ())] == 0
    assert got[("synthesis_request_seconds_sum", (("path", "forwarded"),))] == 0


def test_gauge_help_says_what_the_gauge_means():
    from prometheus_client import generate_latest
    m = NodeMetrics("n1")
    m.set_gauges(lambda: {"agents_active": 2, "mailbox_depth": 0, "brand_new_gauge": 1})
    text = generate_latest(m.registry).decode()
    assert f"# HELP synthesis_agents_active {GAUGE_HELP['agents_active']}" in text
    assert f"# HELP synthesis_mailbox_depth {GAUGE_HELP['mailbox_depth']}" in text
    assert "# HELP synthesis_brand_new_gauge Current brand_new_gauge." in text
    assert "# HELP process_resident_memory_bytes Resident memory size in bytes." in text


def _idle_connections(port: int, n: int) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return conns


def _closed_by_server(conn: socket.socket, timeout_s: float) -> bool:
    conn.settimeout(timeout_s)
    try:
        return conn.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_full_server_closes_the_oldest_connection_for_a_new_one():
    m = NodeMetrics("n1")
    srv = MetricsServer("127.0.0.1", 0, m, lambda: (True, {"ok": True}),
                        connections_max=4, request_timeout_s=30)
    srv.start()
    conns = []
    try:
        conns = _idle_connections(srv.port, 4)
        deadline = time.monotonic() + 5
        while m.http_connections() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.http_connections() == 4
        # A health check still gets through: it takes the oldest idle slot.
        assert get(srv.port, "/health")[0] == 200
        assert _closed_by_server(conns[0], 5)
        assert not _closed_by_server(conns[1], 0.05)
        got = samples(m)
        assert got[("synthesis_limited_total", (("reason", "http_connections_max"),))] == 1
        assert got[("synthesis_http_connections_open", ())] <= 4
    finally:
        for conn in conns:
            conn.close()
        srv.stop()


def test_idle_connection_is_cut_at_its_deadline():
    m = NodeMetrics("n1")
    srv = MetricsServer("127.0.0.1", 0, m, lambda: (True, {}), connections_max=8,
                        request_timeout_s=0.3)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as idle, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=5) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\n")   # headers never finish
            assert _closed_by_server(idle, 10)
            assert _closed_by_server(trickle, 10)
        got = samples(m)
        assert got[("synthesis_limited_total", (("reason", "http_request_timeout"),))] == 2
        assert get(srv.port, "/health")[0] == 200
    finally:
        srv.stop()


def test_server_limits_are_checked():
    for bad in ({"connections_max": 0}, {"request_timeout_s": 0}):
        with pytest.raises(ValueError):
            MetricsServer("127.0.0.1", 0, NodeMetrics("n1"), lambda: (True, {}), **bad)
