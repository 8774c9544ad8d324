"""node.metrics: counters, histogram, cardinality cap, and the HTTP endpoint."""

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.metrics import LATENCY_BUCKETS_S, OTHER, MetricsServer, NodeMetrics


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
    assert got[("synthesis_process_resident_memory_bytes", ())] > 0
    assert got[("synthesis_process_cpu_seconds_total", ())] > 0
    assert got[("synthesis_process_threads", ())] >= 2
    assert got[("synthesis_process_open_fds", ())] > 0
    assert all(name.startswith("synthesis_") for name, _ in got)
    assert m.snapshot() == {"received": 4, "handled": 1, "sent": 1, "forwarded": 1,
                            "errors": 2, "agents_activated": 1, "agents_restarted": 1,
                            "agents_failed": 1, "multicast_dropped": 5,
                            "peer_send_failures": 1, "client_send_failures": 2}


def test_histogram_buckets_are_cumulative():
    m = NodeMetrics("n1")
    for seconds in (0.0001, 0.001, 0.003, 0.003, 2.0, 100.0):
        m.observe_handler("call", seconds)
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("synthesis_handler_latency_seconds_bucket", (("le", le), ("type", "call")))]

    assert bucket("0.0005") == 1
    assert bucket("0.001") == 2          # a value on a bound counts in that bucket
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 4
    assert bucket("2.5") == 5
    assert bucket("60.0") == 5
    assert bucket("+Inf") == 6
    assert got[("synthesis_handler_latency_seconds_count", (("type", "call"),))] == 6
    assert got[("synthesis_handler_latency_seconds_sum", (("type", "call"),))] == \
        pytest.approx(0.0001 + 0.001 + 0.006 + 2.0 + 100.0)
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
